"""The crystal-llm command: help, version, usage errors and convert."""

import argparse
import shutil
import subprocess
import sys

import ase.io
import pytest
from ase.build import bulk

from ase_crystal_llm import __version__
from ase_crystal_llm.cli import main


def crystal_llm(*args, cwd=None):
    exe = shutil.which("crystal-llm")
    command = [exe] if exe else [sys.executable, "-m", "ase_crystal_llm.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.subprocess
def test_help():
    out = crystal_llm("--help")
    assert out.returncode == 0
    for command in ("train", "generate", "evaluate", "mutate", "merge", "convert"):
        assert command in out.stdout


@pytest.mark.subprocess
def test_version():
    out = crystal_llm("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"crystal-llm {__version__}"


@pytest.mark.subprocess
def test_unknown_option_is_one_line_exit_2():
    out = crystal_llm("--no-such-option")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "unrecognized arguments: --no-such-option" in out.stderr


@pytest.mark.subprocess
def test_convert_missing_file_is_one_line_exit_2(tmp_path):
    out = crystal_llm("convert", str(tmp_path / "missing.csv.gz"), "-o", str(tmp_path / "out.crystxt"))
    assert out.returncode == 2
    missing = tmp_path / "missing.csv.gz"
    assert out.stderr.strip() == f"crystal-llm convert: error: structure source not found: {missing}"
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out.crystxt").exists()


@pytest.mark.subprocess
def test_convert_end_to_end(tmp_path):
    src = tmp_path / "in.extxyz"
    ase.io.write(src, [bulk("Cu", "fcc", a=3.61, cubic=True), bulk("NaCl", "rocksalt", a=5.64, cubic=True)])
    out = crystal_llm("convert", str(src), "-o", str(tmp_path / "out.crystxt"))
    assert out.returncode == 0, out.stderr
    assert "wrote 2 structures (primitive Niggli cells)" in out.stderr
    back = ase.io.read(tmp_path / "out.crystxt", index=":")
    assert [len(a) for a in back] == [1, 2]
    assert (tmp_path / "out.crystxt").read_text().startswith("2.6 2.6 2.6\n60 60 60\nCu\n0.00 0.00 0.00\n\n")
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_convert_options_in_process(tmp_path, capsys):
    src = tmp_path / "in.extxyz"
    ase.io.write(src, [bulk("Cu", "fcc", a=3.61, cubic=True)] * 3)
    assert main(["convert", str(src), "-o", str(tmp_path / "out.extxyz"), "--no-canonicalize", "--limit", "2"]) == 0
    back = ase.io.read(tmp_path / "out.extxyz", index=":")
    assert [len(a) for a in back] == [4, 4]
    assert "wrote 2 structures (as read cells)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["out.db", "out.json", "out.traj"])
def test_convert_to_formats_ase_writes_by_path(tmp_path, name):
    import ase.db

    src = tmp_path / "in.extxyz"
    ase.io.write(src, [bulk("Cu", "fcc", a=3.61), bulk("NaCl", "rocksalt", a=5.64)])
    assert main(["convert", str(src), "-o", str(tmp_path / name)]) == 0
    if name == "out.traj":
        back = ase.io.read(tmp_path / name, index=":")
    else:
        back = [row.toatoms() for row in ase.db.connect(tmp_path / name).select()]
    assert sorted(a.get_chemical_formula() for a in back) == ["ClNa", "Cu"]
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_convert_skip_bad_reports_on_one_line(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("material_id,cif\nmp-1,garbage\n")
    assert main(["convert", str(src), "-o", str(tmp_path / "out.crystxt"), "--skip-bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("crystal-llm convert: warning: skipped 1 unreadable structure(s): in.csv row 1 (mp-1)")
    assert err[1] == f"crystal-llm convert: error: no structures read from {src}"
    assert not (tmp_path / "out.crystxt").exists()


@pytest.mark.parametrize("name", ["out.unknownext"])
def test_convert_unknown_output_format(tmp_path, capsys, name):
    ase.io.write(tmp_path / "in.extxyz", bulk("Si"))
    assert main(["convert", str(tmp_path / "in.extxyz"), "-o", str(tmp_path / name)]) == 2
    assert "unknown or read-only output format" in capsys.readouterr().err


def test_generate_option_types():
    from ase_crystal_llm.cli import non_negative_float, spacegroups

    assert spacegroups("225") == [225] and spacegroups("1,230") == [1, 230]
    assert non_negative_float("0") == 0.0 and non_negative_float("0.35") == 0.35
    for bad in ("0,12", "x", "231"):
        with pytest.raises(argparse.ArgumentTypeError, match="space group"):
            spacegroups(bad)
    for bad in ("-0.1", "inf", "nan", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            non_negative_float(bad)


def test_every_option_has_help():
    from ase_crystal_llm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [(name, a.option_strings) for name, parser in sub.choices.items() for a in parser._actions
               if a.option_strings and not a.help]
    assert not missing
