"""Reading structures with properties: CSV(.gz), ase.db, ase.io files and globs; canonical cells."""

import csv
import gzip

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.cif import CifWriter

from ase_crystal_llm.data.datasets import DatasetError, canonicalize, iter_structures, property_name, read_structures

COLUMNS = ["material_id", "formation_energy_per_atom", "band_gap", "pretty_formula",
           "e_above_hull", "elements", "cif", "spacegroup.number"]


def cif_of(atoms):
    return str(CifWriter(AseAtomsAdaptor.get_structure(atoms)))


def write_csv(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def nacl_row(material_id="mp-22862", **changes):
    row = dict(material_id=material_id, formation_energy_per_atom="-2.09", band_gap="5.0",
               pretty_formula="NaCl", e_above_hull="0.0", elements="['Cl', 'Na']",
               cif=cif_of(bulk("NaCl", "rocksalt", a=5.64, cubic=True)), **{"spacegroup.number": "225"})
    row.update(changes)
    return [row[c] for c in COLUMNS]


DISORDERED_CIF = """data_disordered
_cell_length_a 4.0
_cell_length_b 4.0
_cell_length_c 4.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
 Fe Fe1 0 0 0 0.6
 Co Co1 0 0 0 0.4
 O O1 0.5 0.5 0.5 1
 Li Li1 0.5 0 0 0.3
"""

OXIDATION_CIF = """data_FeO
_cell_length_a 4.3
_cell_length_b 4.3
_cell_length_c 4.3
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
 _atom_type_symbol
 _atom_type_oxidation_number
  Fe2+  2.0
  O2-  -2.0
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
 Fe2+ Fe1 0 0 0 1
 O2- O1 0.5 0.5 0.5 1
"""


# --------------------------------------------------------------------------- CSV


def test_csv_properties_and_missing_values(tmp_path):
    path = write_csv(tmp_path / "x.csv", [
        nacl_row(),
        nacl_row("mp-2", band_gap="nan", e_above_hull="", formation_energy_per_atom="NaN", pretty_formula="NaN"),
    ])
    first, second = read_structures(path, canonical=False)
    assert first.info == {"material_id": "mp-22862", "formation_energy_per_atom": -2.09, "band_gap": 5.0,
                          "pretty_formula": "NaCl", "e_above_hull": 0.0, "spacegroup_number": 225}
    assert isinstance(first.info["spacegroup_number"], int)
    # NaN and empty cells stay missing, never zero; a formula spelled "NaN" is text
    assert second.info == {"material_id": "mp-2", "pretty_formula": "NaN", "spacegroup_number": 225}
    assert first.get_chemical_symbols().count("Na") == 4 and first.pbc.all()


def test_csv_gz_and_canonical_default(tmp_path):
    path = write_csv(tmp_path / "x.csv.gz", [nacl_row(), nacl_row("mp-3")])
    as_read = read_structures(path, canonical=False)
    canonical = read_structures(path)
    assert [len(a) for a in as_read] == [8, 8]
    assert [len(a) for a in canonical] == [2, 2]  # conventional rock salt -> primitive
    assert np.allclose(canonical[0].cell.angles(), 60)
    assert canonical[1].info["material_id"] == "mp-3"


def test_malformed_row_is_reported_with_its_number(tmp_path):
    path = write_csv(tmp_path / "bad.csv",
                     [nacl_row("mp-1"), nacl_row("mp-bad", cif="data_x\nnonsense"), nacl_row("mp-3")])
    with pytest.raises(DatasetError, match=r"bad.csv row 2 \(mp-bad\): cif does not parse"):
        read_structures(path)


def test_skip_bad_warns_with_count_and_rows(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [
        nacl_row("mp-1"), nacl_row("mp-bad", cif="garbage"), nacl_row("mp-3"), nacl_row("mp-worse", cif=""),
    ])
    with pytest.warns(UserWarning,
                      match=r"skipped 2 unreadable structure\(s\): bad.csv row 2 \(mp-bad\); bad.csv row 4"):
        structures = read_structures(path, skip_bad=True)
    assert [a.info["material_id"] for a in structures] == ["mp-1", "mp-3"]


def test_limit_and_streaming(tmp_path):
    path = write_csv(tmp_path / "x.csv", [nacl_row(f"mp-{i}") for i in range(5)])
    assert [a.info["material_id"] for a in read_structures(path, limit=2)] == ["mp-0", "mp-1"]
    assert read_structures(path, limit=0) == []
    stream = iter_structures(path)
    assert next(stream).info["material_id"] == "mp-0"
    with pytest.raises(ValueError, match="limit must be a non-negative integer"):
        read_structures(path, limit=-1)


def test_reading_selected_rows_skips_the_others_unparsed(tmp_path):
    rows = [nacl_row(f"mp-{i}") for i in range(5)]
    rows[1] = nacl_row("mp-1", cif="not a cif")  # never parsed: not selected
    path = write_csv(tmp_path / "x.csv", rows)
    assert [a.info["material_id"] for a in read_structures(path, rows=[4, 0, 2])] == ["mp-0", "mp-2", "mp-4"]
    assert [a.info["material_id"] for a in read_structures(path, rows=range(2, 5), limit=2)] == ["mp-2", "mp-3"]
    with pytest.raises(DatasetError, match="row 2"):
        read_structures(path, rows=[1])


def test_row_with_wrong_number_of_fields(tmp_path):
    path = write_csv(tmp_path / "short.csv", [nacl_row("mp-1")])
    with open(path, "a") as handle:
        handle.write("mp-2,-1.0\n")
    with pytest.raises(DatasetError, match=r"short.csv row 2 \(mp-2\): wrong number of fields"):
        read_structures(path)


def test_csv_without_cif_column(tmp_path):
    path = tmp_path / "nocif.csv"
    path.write_text("material_id,band_gap\nmp-1,1.0\n")
    with pytest.raises(DatasetError, match="no 'cif' column"):
        read_structures(path)


def test_missing_source():
    with pytest.raises(FileNotFoundError, match="structure source not found"):
        read_structures("/nonexistent/mp_20/train.csv.gz")
    with pytest.raises(FileNotFoundError, match="no files match"):
        read_structures("/nonexistent/*.extxyz")


def test_oxidation_states_become_plain_elements(tmp_path):
    path = write_csv(tmp_path / "ox.csv", [nacl_row("mp-ox", cif=OXIDATION_CIF)])
    (atoms,) = read_structures(path, canonical=False)
    assert atoms.get_chemical_symbols() == ["Fe", "O"]


def test_disordered_site_is_rejected_with_reason(tmp_path):
    path = write_csv(tmp_path / "dis.csv", [nacl_row("mp-dis", cif=DISORDERED_CIF)])
    reason = r"row 1 \(mp-dis\): partially occupied site \d \((Li:0.3|Fe:0.6, Co:0.4)\): .*order_disordered=True"
    with pytest.raises(DatasetError, match=reason):
        read_structures(path)


def test_order_disordered_takes_the_majority_occupant(tmp_path):
    path = write_csv(tmp_path / "dis.csv", [nacl_row("mp-dis", cif=DISORDERED_CIF)])
    (atoms,) = read_structures(path, canonical=False, order_disordered=True)
    # Fe (0.6) beats Co (0.4); the Li site is 70 % vacant and goes away
    assert atoms.get_chemical_symbols() == ["Fe", "O"]


def test_real_mp20_rows(mp20_test_sample):
    for atoms in mp20_test_sample:
        assert atoms.pbc.all() and len(atoms) <= 20
        keys = {"material_id", "formation_energy_per_atom", "band_gap", "pretty_formula", "spacegroup_number"}
        assert keys <= set(atoms.info)
        assert "elements" not in atoms.info and "cif" not in atoms.info
        assert all(not (isinstance(v, float) and np.isnan(v)) for v in atoms.info.values())
    # e_above_hull is NaN for most MP-20 rows: absent there, present where known
    assert 0 < sum("e_above_hull" in a.info for a in mp20_test_sample) < len(mp20_test_sample)


def test_property_names():
    assert property_name("spacegroup.number") == "spacegroup_number"
    assert property_name("band gap (eV)") == "band_gap__eV_"
    assert property_name("1st") == "_1st"


# --------------------------------------------------------------------------- ase.db and ase.io


def test_ase_db_key_value_pairs(tmp_path):
    path = tmp_path / "x.db"
    with ase.db.connect(path) as db:
        cu = bulk("Cu", "fcc", a=3.61, cubic=True)
        cu.calc = SinglePointCalculator(cu, energy=-16.0)
        db.write(cu, material_id="mp-30", band_gap=0.0, potential="m3gnet")
        db.write(bulk("Si"), material_id="mp-149", band_gap=float("nan"))
    as_read = read_structures(path, canonical=False)
    assert [len(a) for a in as_read] == [4, 2]
    assert as_read[0].info == {"material_id": "mp-30", "band_gap": 0.0, "potential": "m3gnet", "energy": -16.0}
    assert as_read[1].info == {"material_id": "mp-149"}  # NaN dropped
    canonical = read_structures(path)
    assert len(canonical[0]) == 1
    assert canonical[0].info["energy"] == pytest.approx(-4.0)  # scaled with the cell


def test_glob_of_extxyz_files(tmp_path):
    a = bulk("Si")
    a.info["band_gap"] = 1.1
    ase.io.write(tmp_path / "b.extxyz", [a, bulk("Ge")])
    ase.io.write(tmp_path / "a.extxyz", bulk("NaCl", "rocksalt", a=5.64))
    (tmp_path / "notes.txt").write_text("not a structure")
    structures = read_structures(str(tmp_path / "*.extxyz"))
    assert [a.get_chemical_formula() for a in structures] == ["ClNa", "Si2", "Ge2"]
    assert structures[1].info["band_gap"] == 1.1


def test_unreadable_file_in_a_glob(tmp_path):
    ase.io.write(tmp_path / "a.extxyz", bulk("Si"))
    (tmp_path / "b.extxyz").write_text("garbage\n")
    with pytest.raises(DatasetError, match="b.extxyz: cannot read file"):
        read_structures(str(tmp_path / "*.extxyz"))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable structure\(s\): b.extxyz"):
        assert len(read_structures(str(tmp_path / "*.extxyz"), skip_bad=True)) == 1


def test_crystal_text_and_cif_files(tmp_path):
    ase.io.write(tmp_path / "x.crystxt", [bulk("Si"), bulk("Cu")])
    assert [len(a) for a in read_structures(tmp_path / "x.crystxt")] == [2, 1]
    (tmp_path / "dis.cif").write_text(DISORDERED_CIF)
    with pytest.raises(DatasetError, match=r"dis.cif index 0: partially occupied site"):
        read_structures(tmp_path / "dis.cif")
    (tmp_path / "ox.cif").write_text(OXIDATION_CIF)
    assert read_structures(tmp_path / "ox.cif")[0].get_chemical_symbols() == ["Fe", "O"]


# --------------------------------------------------------------------------- canonical cells


def test_canonicalize_gives_primitive_niggli_cell():
    conventional = bulk("Cu", "fcc", a=3.61, cubic=True)
    conventional.info["material_id"] = "mp-30"
    conventional.info["energy"] = -16.0
    prim = canonicalize(conventional)
    assert len(prim) == 1
    assert np.allclose(prim.cell.lengths(), 3.61 / np.sqrt(2))
    assert np.allclose(prim.cell.angles(), 60)
    assert prim.info == {"material_id": "mp-30", "energy": pytest.approx(-4.0)}
    assert conventional.info["energy"] == -16.0  # the input is not touched


def test_canonicalize_reduces_a_skewed_cell():
    # the same simple cubic lattice in a sheared setting: Niggli gives back the cube
    skewed = Atoms("Po", cell=[[3.3, 0, 0], [3.3, 3.3, 0], [0, 3.3, 3.3]], pbc=True)
    reduced = canonicalize(skewed)
    assert np.allclose(reduced.cell.cellpar(), [3.3, 3.3, 3.3, 90, 90, 90])


def test_canonicalize_leaves_a_canonical_cell_unchanged():
    zno = canonicalize(bulk("ZnO", "wurtzite", a=3.25, c=5.2))
    again = canonicalize(zno)
    assert again.get_chemical_symbols() == zno.get_chemical_symbols()
    assert np.allclose(again.cell, zno.cell)
    assert np.allclose(again.get_scaled_positions(), zno.get_scaled_positions())


def test_canonicalize_is_idempotent_on_mp20(mp20_test_sample):
    for atoms in mp20_test_sample[:50]:
        again = canonicalize(atoms)
        assert again.get_chemical_symbols() == atoms.get_chemical_symbols()
        assert np.allclose(again.cell, atoms.cell)


def test_canonicalize_needs_a_periodic_crystal():
    with pytest.raises(ValueError, match="periodic in 3D"):
        canonicalize(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]]))
