"""Potentials, the M3GNet known-answer check, relax and relax_many (batched, cached)."""

import importlib.util
from pathlib import Path

import ase.db
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from ase_crystal_llm.evaluation import batched as engine
from ase_crystal_llm.evaluation import potentials
from ase_crystal_llm.evaluation.potentials import NACL_KNOWN_ANSWER, get_calculator, nacl_energy_per_atom
from ase_crystal_llm.evaluation.relaxation import relax, relax_many, structure_hash


class CountingEMT(EMT):
    """EMT that counts its evaluations (to prove the cache is used)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.potential_name = "emt"
        self.energy_scale = "unknown"

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        self.calls += 1
        super().calculate(atoms, properties, system_changes)


class NaNCalculator(Calculator):
    implemented_properties = ["energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        n = len(self.atoms)
        self.results = {"energy": np.nan, "forces": np.full((n, 3), np.nan), "stress": np.zeros(6)}


def strained_copper(strain=0.03, seed=0):
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
    atoms.rattle(0.03, seed=seed)
    atoms.info["material_id"] = f"cu-{seed}"
    return atoms


def small_crystals():
    out = []
    crystals = [("NaCl", "rocksalt", 5.5), ("Si", "diamond", 5.35), ("MgO", "rocksalt", 4.3)]
    for seed, (symbol, kind, a) in enumerate(crystals):
        atoms = bulk(symbol, kind, a=a)
        atoms.rattle(0.04, seed=seed)
        out.append(atoms)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small graphs on a shared 2-core machine: one thread is much faster than two."""
    from ase_crystal_llm.settings import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def m3gnet(m3gnet_dir):
    return get_calculator(str(m3gnet_dir))


# ------------------------------------------------------------------ M3GNet


def test_m3gnet_known_answer_after_loading(m3gnet):
    assert m3gnet.energy_scale == "mp_raw"
    assert "M3GNet-MP-2021.2.8" in m3gnet.potential_name
    atoms = bulk("NaCl", "rocksalt", a=5.69)
    atoms.calc = m3gnet
    assert atoms.get_potential_energy() / len(atoms) == pytest.approx(NACL_KNOWN_ANSWER, abs=0.005)


def test_m3gnet_correction_is_instance_local(m3gnet, m3gnet_dir):
    import matgl
    from matgl.layers._graph_convolution import M3GNetGraphConv

    fresh = matgl.load_model(str(m3gnet_dir))  # matgl as shipped, without our check
    fresh_energy = nacl_energy_per_atom(fresh)
    convs = [m for m in fresh.model.modules() if isinstance(m, M3GNetGraphConv)]
    assert convs and all(type(m) is M3GNetGraphConv for m in convs)  # untouched
    if abs(fresh_energy - NACL_KNOWN_ANSWER) > 0.01:  # matgl still reverses the aggregation
        assert m3gnet.potential.aggregation_patched
        assert fresh_energy == pytest.approx(potentials.NACL_REVERSED, abs=0.01)
    else:  # fixed upstream: nothing patched
        assert not m3gnet.potential.aggregation_patched
    # get_calculator("m3gnet") reuses the checked instance
    assert get_calculator("m3gnet").potential is m3gnet.potential


def test_batched_and_serial_paths_agree(m3gnet):
    assert isinstance(engine.batch_evaluator(m3gnet), engine.MatglBatchEvaluator)
    structures = small_crystals()
    serial = relax_many(structures, m3gnet, backend="serial")
    batched = relax_many(structures, m3gnet, backend="batched", batch_size=2)  # refills the batch
    single = relax(structures[0], m3gnet)
    for s, b in zip(serial, batched):
        assert not s.info.get("relax_failed") and not b.info.get("relax_failed")
        assert s.info["relax_converged"] and b.info["relax_converged"]
        assert abs(s.info["energy"] - b.info["energy"]) / len(s) < 0.005
        assert b.info["energy_scale"] == "mp_raw"
    assert single.info["energy"] == pytest.approx(serial[0].info["energy"], abs=1e-4)
    # relaxed rock-salt NaCl: conventional a close to the model's 5.69 A
    nacl = batched[0]
    assert (nacl.get_volume() * 4) ** (1 / 3) == pytest.approx(5.69, abs=0.03)


@pytest.mark.potential
def test_chgnet_declares_corrected_scale_and_batches():
    pytest.importorskip("chgnet")
    calc = get_calculator("chgnet")
    assert calc.energy_scale == "mp2020" and calc.potential_name == "chgnet"
    structures = small_crystals()[:2]
    batched = engine.CHGNetBatchEvaluator(calc).evaluate(structures)
    for atoms, (energy, forces, stress) in zip(structures, batched):
        atoms = atoms.copy()
        atoms.calc = calc
        assert energy == pytest.approx(atoms.get_potential_energy(), abs=1e-3)
        assert np.allclose(forces, atoms.get_forces(), atol=1e-3)
        assert np.allclose(stress, atoms.get_stress(), atol=1e-4)


@pytest.mark.potential
@pytest.mark.parametrize("name, recorded, reference", [
    ("sevennet", "sevennet-0-11jul2024", -3.3827),
    ("sevennet-l3i5", "sevennet-l3i5", -3.3854),
])
def test_sevennet_on_rock_salt_against_stored_energy(name, recorded, reference):
    """SevenNet from the weights inside its wheel; raw MP scale (like M3GNet, unlike the MP2020-corrected CHGNet)."""
    if importlib.util.find_spec("sevenn") is None:
        pytest.skip("the sevennet extra is not installed: pip install 'ase-crystal-llm[sevennet]'")
    calc = get_calculator(name)
    assert calc.potential_name == recorded and calc.energy_scale == "mp_raw"
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.calc = calc
    # stored: eV/atom at a = 5.64 A, sevenn 0.13 (CPU, float32)
    assert atoms.get_potential_energy() / len(atoms) == pytest.approx(reference, abs=2e-3)
    relaxed = relax(bulk("NaCl", "rocksalt", a=5.9), name, fmax=0.05, steps=200)
    assert relaxed.info["relax_converged"] and relaxed.info["potential"] == recorded
    assert relaxed.info["energy"] / 2 < reference  # relaxed below the strained start's reference cell


@pytest.mark.potential
def test_sevennet_batches_agree_with_its_calculator():
    if importlib.util.find_spec("sevenn") is None:
        pytest.skip("the sevennet extra is not installed: pip install 'ase-crystal-llm[sevennet]'")
    calc = get_calculator("sevennet")
    evaluator = engine.batch_evaluator(calc)
    assert isinstance(evaluator, engine.SevenNetBatchEvaluator)
    structures = [bulk("NaCl", "rocksalt", a=5.7), bulk("Si", "diamond", a=5.43) * (1, 1, 2)]
    for atoms in structures:
        atoms.rattle(0.05, seed=1)
    reference = engine.BatchEvaluator(calc).evaluate(structures)
    for (energy, forces, stress), one in zip(evaluator.evaluate(structures), reference):
        assert energy == pytest.approx(one[0], abs=1e-5)
        assert np.abs(forces - one[1]).max() < 1e-5 and np.abs(stress - one[2]).max() < 1e-6
        assert np.abs(forces).max() > 1e-3  # rattled: the comparison is not between zeros


# ------------------------------------------------------------------ relax


def test_relax_returns_new_atoms_with_records():
    atoms = strained_copper()
    before = atoms.positions.copy()
    calc = CountingEMT()
    relaxed = relax(atoms, calc, fmax=0.02, steps=300)
    assert relaxed is not atoms and np.allclose(atoms.positions, before)
    assert atoms.calc is None
    assert isinstance(relaxed.calc, SinglePointCalculator)
    info = relaxed.info
    assert info["relax_converged"] is True and 0 < info["relax_steps"] <= 300
    assert info["potential"] == "emt" and info["energy_scale"] == "unknown"
    assert info["material_id"] == "cu-0"
    assert info["energy"] == pytest.approx(relaxed.get_potential_energy())
    assert np.abs(relaxed.get_forces()).max() < 0.02
    assert relaxed.get_stress().shape == (6,)
    # the cell relaxed back towards EMT's Cu lattice (a ~ 3.59 A): volume shrank
    assert relaxed.get_volume() < atoms.get_volume()
    # same answer as ASE's own FIRE on FrechetCellFilter
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    reference = atoms.copy()
    reference.calc = EMT()
    with engine._small_matrix_threads():
        FIRE(FrechetCellFilter(reference), logfile=None).run(fmax=0.02, steps=300)
    assert relaxed.info["energy"] == pytest.approx(reference.get_potential_energy(), abs=1e-8)


def test_relax_step_limit_is_not_a_failure():
    relaxed = relax(strained_copper(0.08), EMT(), fmax=1e-4, steps=3)
    assert relaxed.info["relax_steps"] == 3 and relaxed.info["relax_converged"] is False
    assert "relax_failed" not in relaxed.info


def test_exploding_structures_are_reported_not_raised():
    collapsed = Atoms("Cu2", positions=[[0, 0, 0], [0.3, 0, 0]], cell=[4, 4, 4], pbc=True)
    failed = relax(collapsed, EMT())
    assert failed.info["relax_failed"] is True and "collapsed" in failed.info["relax_error"]
    nan = relax(strained_copper(), NaNCalculator())
    assert nan.info["relax_failed"] is True and "NaN" in nan.info["relax_error"]
    assert "energy" not in nan.info


def test_bad_input():
    molecule = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    with pytest.raises(ValueError, match="not periodic"):
        relax(molecule, EMT())
    out = relax_many([molecule, strained_copper()], CountingEMT())
    assert out[0].info["relax_failed"] and "not periodic" in out[0].info["relax_error"]
    assert out[1].info["relax_converged"]
    with pytest.raises(ValueError, match="unknown potential"):
        get_calculator("no-such-potential")
    with pytest.raises(ValueError, match="backend"):
        relax_many([strained_copper()], EMT(), backend="gpu-magic")
    with pytest.raises(FileNotFoundError, match="model.json"):
        potentials.load_matgl_potential(Path(__file__).parent)


# ------------------------------------------------------------------ relax_many


def test_relax_many_keeps_order_and_info():
    structures = [strained_copper(0.02 * i, seed=i) for i in range(4)]
    calc = CountingEMT()
    out = relax_many(structures, calc, batch_size=3)
    assert [a.info["material_id"] for a in out] == [f"cu-{i}" for i in range(4)]
    for atoms, relaxed in zip(structures, out):
        assert relaxed.info["energy"] == pytest.approx(relax(atoms, EMT()).info["energy"], abs=1e-8)


def test_cache_reuse_and_resume(tmp_path):
    structures = [strained_copper(0.02 * i, seed=i) for i in range(3)]
    db = tmp_path / "relax.db"
    first = CountingEMT()
    partial = relax_many(structures[:2], first, cache=db)  # "interrupted" after two structures
    assert first.calls > 0
    second = CountingEMT()
    full = relax_many(structures, second, cache=db)
    alone = CountingEMT()
    relax_many(structures[2:], alone)
    assert second.calls == alone.calls  # only the third structure was computed
    third = CountingEMT()
    again = relax_many(structures, third, cache=db)
    assert third.calls == 0  # nothing recomputed
    for a, b in zip(full, again):
        assert a.info["energy"] == pytest.approx(b.info["energy"])
        assert a.info["relax_converged"] == b.info["relax_converged"]
        assert np.allclose(a.get_forces(), b.get_forces())
        assert np.allclose(a.cell, b.cell)
    assert partial[0].info["energy"] == pytest.approx(again[0].info["energy"])
    assert again[1].info["material_id"] == "cu-1"
    # other settings are other cache entries
    fourth = CountingEMT()
    relax_many(structures[:1], fourth, cache=db, fmax=0.01)
    assert fourth.calls > 0


def test_cache_shared_by_two_writers_of_the_same_structure(tmp_path):
    """Two processes (or a duplicate sample) can both store one relaxation: reading it must still work."""
    atoms = strained_copper(0.02, seed=0)
    db = tmp_path / "relax.db"
    for _ in range(2):  # two caches, no lookup between them, like two processes
        relax_many([atoms.copy()], CountingEMT(), cache=db, workers=1)
        with ase.db.connect(db) as con:
            row = next(con.select(limit=1))
            con.write(row.toatoms(), **row.key_value_pairs)  # the same key again
    calc = CountingEMT()
    out = relax_many([atoms, atoms.copy()], calc, cache=db)
    assert calc.calls == 0
    assert out[0].info["energy"] == pytest.approx(out[1].info["energy"])


def test_structure_hash_is_stable_under_wrapping():
    atoms = strained_copper()
    shifted = atoms.copy()
    shifted.positions += atoms.cell[0]  # same crystal, positions one cell over
    assert structure_hash(atoms) == structure_hash(shifted)
    other = atoms.copy()
    other.positions[0, 0] += 0.01
    assert structure_hash(atoms) != structure_hash(other)


@pytest.mark.subprocess  # spawned worker interpreters
def test_worker_processes_match_one_process(tmp_path):
    structures = [strained_copper(0.02 * i, seed=i) for i in range(3)]
    one = relax_many(structures, EMT())
    two = relax_many(structures, EMT(), workers=2, batch_size=1, threads=1, cache=tmp_path / "w.db")
    for a, b in zip(one, two):
        assert a.info["energy"] == pytest.approx(b.info["energy"], abs=1e-8)
        assert b.info["material_id"] == a.info["material_id"]
    again = CountingEMT()
    relax_many(structures, again, workers=2, cache=tmp_path / "w.db")
    assert again.calls == 0  # the workers' results were cached by the parent


@pytest.mark.slow
def test_fast_cell_algebra_matches_scipy():
    from scipy.linalg import expm_frechet, logm

    from ase_crystal_llm.evaluation.batched import eig_expm_frechet, eig_logm

    rng = np.random.default_rng(3)
    cases = [np.eye(3), np.eye(3) * 1.05, np.diag([0.97, 1.0, 1.03])]
    cases += [np.eye(3) + rng.uniform(-0.2, 0.2, (3, 3)) for _ in range(20)]
    cases.append(np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))  # defective: scipy fallback
    for matrix in cases:
        log = eig_logm(matrix)
        assert np.allclose(log, logm(matrix).real, atol=1e-10)
        for direction in np.eye(9).reshape(9, 3, 3):
            expected = expm_frechet(log, direction, compute_expm=False)
            assert np.allclose(eig_expm_frechet(log, direction, compute_expm=False), expected, atol=1e-10)
