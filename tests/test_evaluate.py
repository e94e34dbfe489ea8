"""``crystal-llm evaluate`` end to end on a handful of MP-20 test crystals (CPU, M3GNet)."""

import json
import math

import ase.io
import pytest
from ase import Atoms
from ase.build import bulk

from ase_crystal_llm import evaluation
from ase_crystal_llm.cli import main

N_REAL = 6


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory, mp20_test_sample):
    """6 real MP-20 test crystals + one structurally and one compositionally invalid sample."""
    structures = [a.copy() for a in mp20_test_sample[:N_REAL]]
    structures[0].info["condition_formula"] = structures[0].info["pretty_formula"]
    structures[0].info["condition_spacegroup"] = structures[0].info["spacegroup_number"]
    structures[1].info["condition_formula"] = "SiO2"
    close = Atoms("Na2", positions=[[0, 0, 0], [0.3, 0, 0]], cell=[5, 5, 5], pbc=True)
    nacl2 = bulk("NaCl", "rocksalt", a=5.64)
    nacl2 += Atoms("Cl", positions=[[1.41, 1.41, 1.41]])
    structures += [close, nacl2]
    for i, atoms in enumerate(structures):
        atoms.info["attempts"] = 2 if i == 2 else 1
    path = tmp_path_factory.mktemp("samples") / "samples.extxyz"
    ase.io.write(path, structures)
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CRYSTAL_LLM_CACHE", str(tmp_path_factory.getbasetemp() / "fp-cache"))


def _run(samples, out, *extra):
    return main(["evaluate", str(samples), "-o", str(out), "--coverage-size", "40", "--no-progress", *extra])


@pytest.fixture(scope="module")
def first_run(samples_file, tmp_path_factory, m3gnet_dir, data_dir):
    out = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("CRYSTAL_LLM_CACHE", str(tmp_path_factory.getbasetemp() / "fp-cache"))
    try:
        # an interrupted run: only the first 3 samples got relaxed
        assert _run(samples_file, out, "--limit", "3") == 0
        partial = json.loads((out / "metrics.json").read_text())
        assert _run(samples_file, out) == 0
    finally:
        mp.undo()
    return out, partial, json.loads((out / "metrics.json").read_text())


def test_cli_writes_report(first_run):
    out, _, result = first_run
    for name in ("metrics.json", "report.md", "samples.csv", "relaxed.extxyz", "e_above_hull.png", "rates.png",
                 "density.png", "n_elements.png", "relax_cache.db"):
        assert (out / name).is_file(), name
    assert result["samples"] == {"source": result["samples"]["source"], "n": N_REAL + 2, "n_valid": N_REAL}
    v = result["validity"]["returned"]
    assert v["structure"] == pytest.approx(7 / 8) and v["composition"] == pytest.approx(7 / 8)
    assert v["valid"] == pytest.approx(6 / 8)
    emitted = result["validity"]["emitted"]["all"]
    assert emitted["emitted"] == 9 and emitted["valid_over_emitted"] == pytest.approx(6 / 9)
    stab = result["stability"]
    assert stab["over_emitted"]["emitted"] == 9
    assert stab["over_emitted"]["metastable"] == pytest.approx(stab["metastable"] * stab["n"] / 9)
    assert result["coverage"]["reference_size"] == 40
    # (a random 40-crystal subsample of the test split need not contain anything like these 6)
    assert 0 <= result["coverage"]["recall"] <= 6 / 40 and 0 <= result["coverage"]["precision"] <= 6 / 8
    assert result["wasserstein"]["density"] >= 0
    assert result["uniqueness"] == 1.0
    assert result["novelty"] is not None
    cond = result["conditional"]
    assert cond["formula"] == {"n": 2, "match": 0.5}
    assert cond["spacegroup"]["n"] == 1 and cond["spacegroup"]["match_symprec_0.1"] == 1.0
    report = (out / "report.md").read_text()
    assert "MP-20 only" in report or "MP-20 (plus elemental references) only" in report


def test_known_stable_crystals_are_metastable(first_run):
    _, _, result = first_run
    s = result["stability"]
    # real MP-20 crystals, relaxed with M3GNet, against a hull that contains them:
    # nearly all within 0.1 eV/atom; the two invalid samples count as failures
    assert s["failures"].get("invalid sample") == 2
    assert 4 / 8 <= s["metastable"] <= 6 / 8
    assert s["stable"] <= s["metastable"]
    assert s["sun"] <= s["stable"]
    assert math.isfinite(s["e_hull_median"]) and s["e_hull_median"] < 0.1


def test_resume_reuses_relaxation_cache(first_run):
    _, partial, result = first_run
    assert partial["relaxation"]["computed"] == 3
    # the full run relaxed only the samples the interrupted run had not reached
    assert result["relaxation"]["computed"] == N_REAL - 3
    assert result["relaxation"]["from_cache"] == 3


def test_rerun_does_no_relaxation_work_and_adds_ipt(first_run, samples_file, tiny_model_dir):
    out, _, result = first_run
    assert result["ipt"] is None
    again = evaluation.evaluate(samples_file, out, coverage_size=40, progress=False, plots=False,
                                model=tiny_model_dir, ipt_size=3)
    assert again["relaxation"]["computed"] == 0
    assert again["relaxation"]["from_cache"] == N_REAL
    assert again["stability"] == result["stability"]
    ipt = again["ipt"]
    assert ipt["n_structures"] == 3 and ipt["n_translations"] == 20
    assert math.isfinite(ipt["ipt"]) and ipt["ipt"] >= 0 and math.isfinite(ipt["mean_perplexity"])
    assert "Symmetry (IPT)" in (out / "report.md").read_text()


def test_bad_input_gives_one_line(tmp_path, capsys, data_dir):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    assert _run(empty, tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "empty.extxyz" in err

    molecule = tmp_path / "molecule.xyz"
    ase.io.write(molecule, Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    assert _run(molecule, tmp_path / "r") == 2
    err = capsys.readouterr().err.strip()
    assert "not periodic" in err and "\n" not in err

    crystal = tmp_path / "si.extxyz"
    ase.io.write(crystal, bulk("Si"))
    assert _run(crystal, tmp_path / "r", "--potential", "no-such-potential") == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-potential" in err and "\n" not in err

    assert _run(crystal, tmp_path / "r", "--reference", "oqmd") == 2
    assert "unknown reference" in capsys.readouterr().err

    assert _run(tmp_path / "missing.extxyz", tmp_path / "r") == 2
    assert "not found" in capsys.readouterr().err


def test_reference_fingerprints_are_cached(data_dir, tmp_path):
    from ase_crystal_llm import settings

    path = settings.mp20_path("test", data_dir)
    first = evaluation.reference_fingerprints(path, size=5, seed=3, cache=tmp_path, progress=False)
    files = list(tmp_path.glob("fingerprints-*.npz"))
    assert len(files) == 1 and len(first) == 5
    again = evaluation.reference_fingerprints(path, size=5, seed=3, cache=tmp_path, progress=False)
    assert (again.structure[first.ok] == first.structure[first.ok]).all()
    evaluation.reference_fingerprints(path, size=5, seed=4, cache=tmp_path, progress=False)
    assert len(list(tmp_path.glob("fingerprints-*.npz"))) == 2


def test_run_record_beside_samples_counts_every_attempt(tmp_path):
    from ase_crystal_llm.outputs import write_run_record

    path = tmp_path / "samples.extxyz"
    ase.io.write(path, [bulk("Si"), bulk("Cu")])
    assert evaluation.run_stats(path, 2) is None  # no record
    write_run_record(path, {"run_id": "a", "rank": 0, "stats": {"attempts": 5, "returned": 1, "gave_up": 1,
                                                                  "parse_failures": {"truncated": 3}}})
    write_run_record(path, {"run_id": "b", "rank": 0, "stats": {"attempts": 2, "returned": 1,
                                                                  "parse_failures": {"truncated": 1}}})
    stats = evaluation.run_stats(path, 2)
    assert stats == {"attempts": 7, "returned": 2, "gave_up": 1, "parse_failures": {"truncated": 4}}
    assert evaluation.run_stats(path, 3) is None  # the file no longer matches its record
    assert evaluation.run_stats(path, 2, limit=1) is None


def test_structures_in_memory_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not periodic"):
        evaluation.evaluate([Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])], tmp_path)
    with pytest.raises(ValueError, match="no structures"):
        evaluation.evaluate([], tmp_path)


def test_all_invalid_samples(tmp_path, data_dir):
    close = Atoms("Na2", positions=[[0, 0, 0], [0.3, 0, 0]], cell=[5, 5, 5], pbc=True)
    result = evaluation.evaluate([close, close.copy()], tmp_path, coverage_size=5, progress=False)
    assert result["validity"]["returned"]["valid"] == 0.0
    assert result["coverage"]["precision"] == 0.0 and result["coverage"]["recall"] == 0.0
    assert result["stability"]["metastable"] == 0.0
    assert result["stability"]["failures"] == {"invalid sample": 2}
    assert result["relaxation"]["attempted"] == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "rates.png").is_file()
