"""ReferenceHull: known answers on a hand-made system, MP2020 scale handling, MP-20 sanity."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from ase_crystal_llm.evaluation import hull as hull_module
from ase_crystal_llm.evaluation.hull import ReferenceHull, mp2020_energy, mp_run_parameters

# Chemical potentials (eV/atom) and formation energies (eV/atom) of a made-up Li-O system.
MU = {"Li": -1.9, "O": -4.9}
PHASES = [("li2o", "Li2O", -2.0), ("li2o2", "Li2O2", -1.6), ("lio2", "LiO2", -1.0)]


@pytest.fixture()
def tiny():
    return ReferenceHull(PHASES, MU)


def crystal(formula, eform, scale="mp2020"):
    """A cell of ``formula`` whose total energy gives formation energy ``eform``."""
    from pymatgen.core import Composition

    comp = Composition(formula)
    symbols = [el.symbol for el, n in comp.items() for _ in range(int(n))]
    n = len(symbols)
    atoms = Atoms(symbols, scaled_positions=np.random.default_rng(0).random((n, 3)), cell=[5, 5, 5], pbc=True)
    total = eform * n + sum(MU[s] for s in symbols)
    atoms.info.update(energy=total, energy_scale=scale)
    return atoms


# ------------------------------------------------------------------ hand-made hull


def test_known_answers_on_tiny_system(tiny):
    # hull: Li (0) - Li2O (-2.0 at x_O=1/3) - Li2O2 (-1.6 at 1/2) - O (0); LiO2 (x_O=2/3)
    # lies above the Li2O2-O tie line at -1.6 * (1/3) / (1/2) = -1.0667
    assert tiny.formation_energy(crystal("Li2O2", -1.6)) == pytest.approx(-1.6)
    assert tiny.e_above_hull(crystal("Li2O2", -1.6)) == pytest.approx(0.0, abs=1e-9)
    assert tiny.e_above_hull(crystal("LiO2", -1.0)) == pytest.approx(1.6 / 1.5 - 1.0)
    assert tiny.e_above_hull(crystal("Li2O", -1.9)) == pytest.approx(0.1)
    assert tiny.e_above_hull(crystal("Li2O", -2.1)) == pytest.approx(-0.1)  # below: negative
    # an element against itself
    li = Atoms("Li", cell=[3, 3, 3], pbc=True, info={"energy": MU["Li"] + 0.05, "energy_scale": "mp2020"})
    assert tiny.e_above_hull(li) == pytest.approx(0.05)
    # explicit energy argument wins over info
    assert tiny.formation_energy(crystal("Li2O", -2.0), energy=3 * -2.0 + 2 * MU["Li"] + MU["O"] + 0.3) == (
        pytest.approx(-1.9)
    )


def test_leaving_a_material_out(tiny):
    # without Li2O2 the hull at x_O = 1/2 is the Li2O-O line: -2.0 * 0.5 / (2/3) = -1.5
    assert tiny.e_above_hull(crystal("Li2O2", -1.6), exclude="li2o2") == pytest.approx(-0.1)
    assert tiny.e_above_hull(crystal("Li2O2", -1.6), exclude="Li2O2") == pytest.approx(-0.1)  # by composition
    assert tiny.e_above_hull(crystal("Li2O2", -1.6), exclude="LiO") == pytest.approx(-0.1)  # same reduced formula
    assert tiny.e_above_hull(crystal("Li2O2", -1.6)) == pytest.approx(0.0, abs=1e-9)  # cache not polluted


def test_e_above_hull_many_leaves_out_per_structure_and_keeps_failures(tiny):
    from ase_crystal_llm.evaluation.pipeline import e_above_hull_many

    failed = crystal("Li2O", -2.0)
    failed.info.update(relax_failed=True, relax_error="exploded")
    foreign = crystal("Li2O", -2.0, scale="matpes")
    relaxed = [crystal("Li2O2", -1.6), crystal("Li2O2", -1.6), failed, foreign]
    values, errors = e_above_hull_many(relaxed, tiny, exclude=[None, "li2o2", None, None])
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    assert values[1] == pytest.approx(-0.1)  # judged with itself left out
    assert values[2:] == [None, None]
    assert errors[:2] == [None, None]
    assert errors[2] == "relaxation failed: exploded"
    assert errors[3].startswith("hull: energy scale 'matpes' cannot be compared")
    with pytest.raises(ValueError, match="exclude has 1 entries for 4 structures"):
        e_above_hull_many(relaxed, tiny, exclude=["li2o2"])


def test_e_above_hull_many_refuses_holes_of_the_potential(tiny):
    from ase_crystal_llm.evaluation.pipeline import E_HULL_FLOOR, e_above_hull_many

    # Li2O2 at -1.6 eV/atom formation energy is on the hull; 1.5 eV/atom lower is a hole, not a crystal
    values, errors = e_above_hull_many([crystal("Li2O2", -1.6 - 0.5), crystal("Li2O2", -1.6 - 1.5)], tiny)
    assert values[0] == pytest.approx(-0.5) and errors[0] is None  # unusual, but above the floor
    assert values[1] is None and errors[1].startswith("hull: E_hull -1.5 eV/atom is below -1.0")
    assert E_HULL_FLOOR == -1.0


def test_from_entries_matches_formation_energy_space():
    from pymatgen.analysis.phase_diagram import PDEntry
    from pymatgen.core import Composition

    entries = [PDEntry(Composition(el), MU[el], name=el) for el in MU]
    for entry_id, formula, eform in PHASES:
        comp = Composition(formula)
        total = eform * comp.num_atoms + sum(MU[el.symbol] * n for el, n in comp.items())
        entries.append(PDEntry(comp, total, name=entry_id))
    hull = ReferenceHull.from_entries(entries)
    assert hull.chemical_potentials == pytest.approx(MU)
    assert hull.e_above_hull(crystal("LiO2", -1.0)) == pytest.approx(1.6 / 1.5 - 1.0)


def test_phase_diagram_cache_is_capped():
    hull = ReferenceHull(PHASES + [("nacl", "NaCl", -2.0)], {**MU, "Na": -1.3, "Cl": -1.8}, cache_size=2)
    for system in (["Li", "O"], ["Na", "Cl"], ["Li"], ["Li", "O"]):
        hull.phase_diagram(system)
    assert len(hull._cache) == 2


def test_missing_reference_element(tiny):
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.info.update(energy=-4.0, energy_scale="mp2020")
    with pytest.raises(ValueError, match="no elemental reference energy for Cu"):
        tiny.formation_energy(atoms)


# ------------------------------------------------------------------ energy scales


def test_unknown_or_foreign_scale_is_refused(tiny):
    atoms = crystal("Li2O", -2.0)
    del atoms.info["energy_scale"]
    with pytest.raises(ValueError, match="unknown scale"):
        tiny.e_above_hull(atoms)
    atoms.info["energy_scale"] = "matpes"
    with pytest.raises(ValueError, match="cannot be compared"):
        tiny.formation_energy(atoms)
    failed = crystal("Li2O", -2.0)
    failed.info.update(relax_failed=True, relax_error="exploded")
    with pytest.raises(ValueError, match="relaxation failed"):
        tiny.formation_energy(failed)


def test_mp2020_correction_applied_to_raw_energies_only():
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    oxide = MaterialsProject2020Compatibility(check_potcar=False).comp_correction["oxide"]
    li2o = bulk("Li2O", "fluorite", a=4.6)
    raw = li2o.copy()
    raw.info.update(energy=-14.0, energy_scale="mp_raw")  # M3GNet-MP-2021.2.8
    corrected = li2o.copy()
    corrected.info.update(energy=-14.0, energy_scale="mp2020")  # CHGNet
    assert mp2020_energy(raw) == pytest.approx(-14.0 + oxide)  # one O: the oxide correction
    assert mp2020_energy(corrected) == -14.0  # never corrected twice


def test_gga_plus_u_follows_mp_relax_set():
    assert mp_run_parameters(["Fe", "O"]) == {"run_type": "GGA+U", "is_hubbard": True, "hubbards": {"Fe": 5.3}}
    assert mp_run_parameters(["Fe", "S"])["run_type"] == "GGA"
    assert mp_run_parameters(["Ni", "F", "Li"])["hubbards"] == {"Ni": 6.2}
    feo = bulk("FeO", "rocksalt", a=4.3)
    feo.info.update(energy=-17.0, energy_scale="mp_raw")
    corrected = mp2020_energy(feo)
    assert corrected < -17.0 - 2.0  # Fe U correction (~ -2.3 eV/Fe) plus the oxide one


def test_rejected_entry_is_an_error_not_a_dropped_sample(monkeypatch):
    feo = bulk("FeO", "rocksalt", a=4.3)
    feo.info.update(energy=-17.0, energy_scale="mp_raw")
    # FeO labelled plain GGA: pymatgen's process_entry refuses (returns None / raises)
    monkeypatch.setattr(hull_module, "mp_run_parameters", lambda symbols: {"run_type": "GGA", "hubbards": {}})
    with pytest.raises(ValueError, match="MP2020 correction"):
        mp2020_energy(feo)


# ------------------------------------------------------------------ MP-20


@pytest.fixture(scope="module")
def mp20_hull(data_dir):
    return ReferenceHull.from_mp20(data_dir)


def test_mp20_hull_reproduces_dft_rows(mp20_hull, data_dir):
    import pandas as pd

    assert len(mp20_hull) == 45229 and len(mp20_hull.chemical_potentials) == 89
    frame = pd.read_csv(data_dir / "mp_20" / "test.csv.gz", nrows=20)
    for row in frame.itertuples():
        from pymatgen.core import Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = AseAtomsAdaptor.get_atoms(Structure.from_str(row.cif, fmt="cif"))
        mu = sum(mp20_hull.chemical_potentials[s] for s in atoms.get_chemical_symbols())
        atoms.info.update(energy=row.formation_energy_per_atom * len(atoms) + mu, energy_scale="mp2020")
        assert mp20_hull.formation_energy(atoms) == pytest.approx(row.formation_energy_per_atom)
        e_hull = mp20_hull.e_above_hull(atoms)
        assert e_hull >= -1e-6  # its own DFT entry is in the reference
        if np.isfinite(row.e_above_hull) and row.e_above_hull == 0:
            assert e_hull == pytest.approx(0.0, abs=1e-6)
        assert mp20_hull.e_above_hull(atoms, exclude=row.material_id) == pytest.approx(
            mp20_hull.e_above_hull(atoms, exclude=row.material_id)
        )


def test_m3gnet_sanity_on_small_sample(mp20_hull, m3gnet_dir, mp20_test_sample):
    """Relaxed M3GNet formation energies of a few MP-20 test crystals match DFT."""
    from ase_crystal_llm.evaluation.relaxation import relax_many
    from ase_crystal_llm.settings import torch_threads

    sample = sorted((a for a in mp20_test_sample if len(a) <= 4), key=len)[:6]
    with torch_threads(1):
        relaxed = relax_many(sample, str(m3gnet_dir))
    errors, metastable = [], []
    for atoms in relaxed:
        assert not atoms.info.get("relax_failed"), atoms.info.get("relax_error")
        errors.append(mp20_hull.formation_energy(atoms) - atoms.info["formation_energy_per_atom"])
        metastable.append(mp20_hull.e_above_hull(atoms, exclude=atoms.info["material_id"]) < 0.1)
    assert np.mean(np.abs(errors)) < 0.08  # ~0.02 expected; 1-2 eV/atom with the aggregation bug
    assert np.mean(metastable) >= 0.5


def test_linear_program_hull_equals_phase_diagram(mp20_hull):
    """The LP used above LP_ABOVE elements gives the PhaseDiagram's hull energy, with and without exclusion."""
    from pymatgen.core import Composition

    rng = np.random.default_rng(0)
    systems = [s for s in mp20_hull._by_system if 2 <= len(s) <= 4]
    for i in rng.choice(len(systems), size=25, replace=False):
        elements = sorted(systems[i])
        comp = Composition({el: int(n) for el, n in zip(elements, rng.integers(1, 5, len(elements)))})
        pd_energy = mp20_hull.phase_diagram(elements).get_hull_energy_per_atom(comp)
        assert mp20_hull.hull_energy(comp) == pytest.approx(pd_energy, abs=1e-6)
    entry_id, comp, eform = mp20_hull._by_system[systems[0]][0]
    left_out = mp20_hull.phase_diagram(sorted(systems[0]), exclude=entry_id).get_hull_energy_per_atom(comp)
    assert mp20_hull.hull_energy(comp, exclude=entry_id) == pytest.approx(left_out, abs=1e-6)


def test_many_element_systems_use_the_linear_program(mp20_hull, monkeypatch):
    def no_diagram(*args, **kwargs):
        raise AssertionError("PhaseDiagram built for a large system")

    monkeypatch.setattr(mp20_hull, "phase_diagram", no_diagram)
    comp = "LiNaKRbCsMgCaSrBaO9"  # 10 elements: PhaseDiagram would enumerate facets for minutes
    e_hull = mp20_hull.e_above_hull_from_formation(comp, 0.0)
    assert e_hull == pytest.approx(-mp20_hull.hull_energy(comp)) and e_hull > 0
