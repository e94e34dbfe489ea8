"""The ASE I/O plugin: format="crystal-text" and the .crystxt extension."""

import json
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io.formats import filetype, ioformats


def crystals():
    triclinic = Atoms("LiFePO2", cell=[4.7, 6.0, 10.3, 80, 95, 110], pbc=True,
                      scaled_positions=[[0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.9, 0.1, 0.4],
                                        [0.3, 0.7, 0.8], [0.6, 0.35, 0.15]])
    return [
        bulk("NaCl", "rocksalt", a=5.64),
        bulk("Si", "diamond", a=5.43),
        bulk("Cu", "fcc", a=3.61, cubic=True),
        bulk("ZnO", "wurtzite", a=3.25, c=5.2),
        triclinic,
    ]


def assert_same(a, b):
    assert b.get_chemical_symbols() == a.get_chemical_symbols()
    assert b.pbc.all()
    assert np.abs(b.cell.lengths() - a.cell.lengths()).max() <= 0.05 + 1e-9
    assert np.abs(b.cell.angles() - a.cell.angles()).max() <= 0.5 + 1e-9
    d = b.get_scaled_positions() - a.get_scaled_positions()
    assert np.abs(d - np.round(d)).max() <= 0.005 + 1e-9


def test_format_is_registered():
    assert "crystal-text" in ioformats
    fmt = ioformats["crystal-text"]
    assert fmt.can_read and fmt.can_write and fmt.single is False
    assert filetype("some.crystxt", read=False) == "crystal-text"


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "several.crystxt"
    images = crystals()
    ase.io.write(path, images, format="crystal-text")
    back = ase.io.read(path, format="crystal-text", index=":")
    assert len(back) == len(images)
    for a, b in zip(images, back):
        assert_same(a, b)


def test_crystals_are_separated_by_one_blank_line(tmp_path):
    path = tmp_path / "x.crystxt"
    ase.io.write(path, crystals()[:3])
    text = path.read_text()
    assert text.count("\n\n") == 2 and "\n\n\n" not in text
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_extension_detection_and_indexing(tmp_path):
    path = tmp_path / "auto.crystxt"
    images = crystals()
    ase.io.write(path, images)  # format from the extension
    assert filetype(str(path)) == "crystal-text"
    assert len(ase.io.read(path, index=":")) == 5
    assert_same(images[-1], ase.io.read(path))  # default: the last one
    assert_same(images[0], ase.io.read(path, index=0))
    assert_same(images[3], ase.io.read(path, index=-2))
    assert [len(a) for a in ase.io.read(path, index="1:3")] == [len(images[1]), len(images[2])]
    assert len(list(ase.io.iread(path))) == 5


def test_single_atoms_write(tmp_path):
    path = tmp_path / "one.crystxt"
    ase.io.write(path, bulk("Si"))
    assert_same(bulk("Si"), ase.io.read(path))


def test_bad_file_raises_crystal_text_error(tmp_path):
    from ase_crystal_llm import CrystalTextError


    path = tmp_path / "bad.crystxt"
    path.write_text("5.6 5.6 5.6\n90 90 90\nLn\n0 0 0\n")
    with pytest.raises(CrystalTextError, match="unknown element symbol 'Ln'"):
        ase.io.read(path, index=":")


SCRIPT = """
import json, sys
import ase.io
from ase.build import bulk
images = [bulk("NaCl", "rocksalt", a=5.64), bulk("Si")]
ase.io.write(sys.argv[1], images, format="crystal-text")
ase.io.write(sys.argv[2], images)
read = ase.io.read(sys.argv[1], format="crystal-text", index=":")
auto = ase.io.read(sys.argv[2], index=":")
print(json.dumps([[a.get_chemical_formula() for a in read], [a.get_chemical_formula() for a in auto]]))
"""


@pytest.mark.subprocess
def test_plugin_works_without_importing_the_package(tmp_path):
    # A fresh interpreter whose script never imports ase_crystal_llm: the
    # ase.ioformats entry point must find the format (ASE loads the plugin module
    # itself, so the package does end up in sys.modules, through ASE).
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "a.txt"), str(tmp_path / "b.crystxt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [["ClNa", "Si2"], ["ClNa", "Si2"]]
    assert (tmp_path / "a.txt").read_text().startswith("4.0 4.0 4.0\n60 60 60\nNa\n")
