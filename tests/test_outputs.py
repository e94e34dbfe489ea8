"""StructureWriter: every format round-trips through ase.io.read, appends without duplicates,
survives a half-written tail, and keeps a run record beside the output."""

import json
import os

import ase.db
import ase.io
import numpy as np
import pytest
from ase.build import bulk

from ase_crystal_llm.io.outputs import (
    FORMATS,
    StructureWriter,
    identifier,
    merge_outputs,
    output_format,
    read_run_records,
    split_info,
)

EXTENSIONS = ["extxyz", "cif", "traj", "db", "crystxt"]


def sample(i, run="r1", rank=0):
    atoms = bulk("NaCl", "rocksalt", a=5.0 + 0.1 * i)
    atoms.info.update(run_id=run, rank=rank, sample_index=i, condition_formula="NaCl",
                      condition_spacegroup=225, temperature=0.7, attempts=1,
                      generated_text=f"{i}.0 4.0 4.0\n60 60 60\nNa\n0.00 0.00 0.00")
    return atoms


def lengths(images):
    return [round(float(a.cell.cellpar()[0]), 1) for a in images]


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_round_trip_through_ase_io_read(tmp_path, ext):
    path = tmp_path / f"out.{ext}"
    with StructureWriter(path) as w:
        for i in range(3):
            assert w.write(sample(i))
    back = ase.io.read(path, ":")
    assert len(back) == 3
    expected = lengths(sample(i) for i in range(3))
    # crystal text keeps one decimal, the others full precision
    np.testing.assert_allclose(lengths(back), expected, atol=0.051)
    assert all(a.pbc.all() and sorted(a.get_chemical_symbols()) == ["Cl", "Na"] for a in back)


@pytest.mark.parametrize("ext", ["extxyz", "traj"])
def test_info_round_trips(tmp_path, ext):
    path = tmp_path / f"out.{ext}"
    with StructureWriter(path) as w:
        w.write(sample(4))
    info = ase.io.read(path).info
    assert info["condition_formula"] == "NaCl" and int(info["condition_spacegroup"]) == 225
    assert identifier(info) == ("r1", 4)
    assert info["generated_text"].startswith("4.0 4.0 4.0")


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_append_skips_structures_already_written(tmp_path, ext):
    path = tmp_path / f"out.{ext}"
    with StructureWriter(path) as w:
        for i in range(3):
            w.write(sample(i))
    with StructureWriter(path, append=True) as w:
        assert w.existing == {("r1", 0), ("r1", 1), ("r1", 2)}
        written = [w.write(sample(i)) for i in range(1, 5)]
    assert written == [False, False, True, True]
    assert len(ase.io.read(path, ":")) == 5


def test_a_database_left_locked_by_a_killed_run_takes_more_rows(tmp_path):
    import threading

    path = tmp_path / "out.db"
    with StructureWriter(path) as w:
        w.write(sample(0))
    (tmp_path / "out.db.lock").write_text("")  # ASE's lock file of a run killed mid-write (kill -9)

    def resume():
        with StructureWriter(path, append=True) as w:
            w.write(sample(1))

    writer = threading.Thread(target=resume, daemon=True)
    writer.start()
    writer.join(timeout=30)
    assert not writer.is_alive(), "the resumed run waited on a stale lock file"
    assert len(ase.io.read(path, ":")) == 2


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_without_append_the_file_is_replaced(tmp_path, ext):
    path = tmp_path / f"out.{ext}"
    for _ in range(2):
        with StructureWriter(path) as w:
            w.write(sample(0))
    assert len(ase.io.read(path, ":")) == 1


@pytest.mark.parametrize("ext", ["extxyz", "cif", "crystxt"])
@pytest.mark.parametrize("cut", [1, 3, 12, 40])
def test_half_written_tail_is_dropped_on_append(tmp_path, ext, cut):
    path = tmp_path / f"out.{ext}"
    with StructureWriter(path) as w:
        for i in range(3):
            w.write(sample(i))
    data = path.read_bytes()
    path.write_bytes(data[:-cut])  # a crash in the middle of the last structure
    with pytest.warns(UserWarning, match="incomplete structure"):
        with StructureWriter(path, append=True) as w:
            assert w.existing == {("r1", 0), ("r1", 1)}
    back = ase.io.read(path, ":")
    assert len(back) == 2
    np.testing.assert_allclose(lengths(back), lengths([sample(0), sample(1)]), atol=0.051)


def test_db_key_value_pairs_follow_ase_db_rules(tmp_path):
    atoms = sample(0)
    atoms.info.update({"spacegroup.number": 225, "energy": -3.0, "natoms": 2, "label": "62",
                       "stats": {"a": 1}, "nan": float("nan")})
    kvp, data = split_info(atoms.info)
    assert {"spacegroup.number", "energy", "natoms", "label", "stats", "nan", "generated_text"} <= set(data)
    assert kvp["condition_formula"] == "NaCl" and kvp["sample_index"] == 0
    path = tmp_path / "out.db"
    with StructureWriter(path) as w:
        w.write(atoms)
        w.write_run_record({"run_id": "r1", "rank": 0, "seed": 5})
    db = ase.db.connect(path)
    row = db.get(sample_index=0)
    assert row.condition_spacegroup == 225 and row.data["generated_text"].startswith("0.0 4.0")
    assert row.data["spacegroup.number"] == 225
    assert db.metadata["runs"] == [{"run_id": "r1", "rank": 0, "seed": 5}]


def test_run_record_sidecar(tmp_path):
    path = tmp_path / "out.extxyz"
    with StructureWriter(path) as w:
        w.write(sample(0))
        w.write_run_record({"run_id": "r1", "rank": 0, "session": "a", "status": "running"})
        w.write_run_record({"run_id": "r1", "rank": 0, "session": "a", "status": "complete"})
        w.write_run_record({"run_id": "r1", "rank": 0, "session": "b", "status": "complete"})
    runs = read_run_records(path)
    assert [r["session"] for r in runs] == ["a", "b"] and runs[0]["status"] == "complete"
    assert json.loads((tmp_path / "out.extxyz.run.json").read_text())["runs"] == runs


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_merge_parts(tmp_path, ext):
    out = tmp_path / f"out.{ext}"
    parts = []
    for rank in range(2):
        part = tmp_path / f"out.part{rank}.{ext}"
        with StructureWriter(part) as w:
            for i in range(rank, 6, 2):
                w.write(sample(i, rank=rank))
            w.write_run_record({"run_id": "r1", "rank": rank})
        parts.append(part)
    merge_outputs(parts, out)
    assert not any(p.exists() for p in parts)
    assert len(ase.io.read(out, ":")) == 6
    assert sorted(r["rank"] for r in read_run_records(out)) == [0, 1]
    with StructureWriter(out, append=True) as w:
        assert w.existing == {("r1", i) for i in range(6)}  # every part's structures, by identifier
        assert not w.write(sample(3, rank=1))  # so a resumed merge adds no duplicate


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported output extension '.mp4'"):
        StructureWriter(tmp_path / "x.mp4")
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        StructureWriter(tmp_path / "no" / "x.extxyz")
    assert output_format("A.CIF") == "cif" and ".crystxt" in FORMATS


@pytest.mark.parametrize("ext", ["extxyz", "traj", "json", "db"])
def test_generated_info_survives_ase_own_writers(tmp_path, crystal_model, ext):
    """ase.io.write (not the package's writer) on generate()'s output reads back with the same info."""
    from ase_crystal_llm.generation.generator import CrystalGenerator
    from ase_crystal_llm.text.format import text_to_atoms

    crystals = CrystalGenerator.from_pretrained(crystal_model, device="cpu").generate(3, seed=0)
    assert crystals
    path = tmp_path / f"ase.{ext}"
    ase.io.write(path, crystals)
    back = ase.io.read(path, ":")
    assert len(back) == len(crystals)
    for before, after in zip(crystals, back):
        assert after.get_chemical_symbols() == before.get_chemical_symbols()
        if ext in ("json", "db"):
            continue  # ASE's own db writers store no info at all
        assert after.info == before.info
        assert len(text_to_atoms(after.info["generated_text"])) == len(before)


@pytest.mark.parametrize("ext", ["db", "traj"])
def test_relaxed_energy_is_stored_as_the_calculators(tmp_path, ext):
    """mutate --relax output: the energy shows as row.energy / atoms.get_potential_energy()."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = sample(1)
    atoms.calc = SinglePointCalculator(atoms, energy=-7.25, forces=np.zeros((2, 3)))
    atoms.info["energy"] = -7.25
    path = tmp_path / f"relaxed.{ext}"
    with StructureWriter(path) as w:
        w.write(atoms)
    if ext == "db":
        row = next(ase.db.connect(path).select())
        assert row.energy == pytest.approx(-7.25)
    assert ase.io.read(path).get_potential_energy() == pytest.approx(-7.25)


def test_run_record_is_readable_like_its_output(tmp_path):
    from ase_crystal_llm.io.outputs import run_record_path, write_run_record

    out = tmp_path / "x.extxyz"
    out.write_text("")
    write_run_record(out, {"run_id": "r1", "rank": 0, "session": "s"})
    mask = os.umask(0)
    os.umask(mask)
    assert run_record_path(out).stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("target", ["cifs.zip", "cifs/"])
def test_convert_to_one_cif_per_crystal(tmp_path, target):
    """The export outside benchmarks read: each CIF reads back with ase.io and, without warnings, pymatgen."""
    import warnings
    import zipfile

    from pymatgen.core import Structure

    from ase_crystal_llm.cli import main

    source = tmp_path / "in.extxyz"
    crystals = [bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.6)]
    ase.io.write(source, crystals)
    out = tmp_path / target
    arg = str(out) + ("/" if target.endswith("/") else "")  # a folder is named with its trailing slash
    assert main(["convert", str(source), "-o", arg, "--no-canonicalize"]) == 0
    folder = tmp_path / "unzipped"
    if target.endswith(".zip"):
        zipfile.ZipFile(out).extractall(folder)
    else:
        folder = out
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["00000_NaCl.cif", "00001_Si.cif", "00002_Cu.cif"]
    for path, atoms in zip(files, crystals):
        assert ase.io.read(path).get_chemical_formula() == atoms.get_chemical_formula()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            structure = Structure.from_file(path)
        assert structure.composition.reduced_formula == path.stem.split("_")[1]
    assert main(["convert", str(source), "-o", arg]) == 2  # exists: refused without --overwrite
    assert main(["convert", str(source), "-o", arg, "--overwrite"]) == 0
    assert not list(tmp_path.glob(".*partial"))
