"""``crystal-llm evaluate`` end to end on a handful of MP-20 test crystals (CPU, M3GNet)."""

import csv
import json
import math

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from ase_crystal_llm.cli import main
from ase_crystal_llm.evaluation import pipeline, references

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
        assert _run(samples_file, out, "--overwrite", "--db") == 0  # the same folder: its relaxations are reused
    finally:
        mp.undo()
    return out, partial, json.loads((out / "metrics.json").read_text())


def _check_samples_table(path, result):
    """Per-structure results: one row per sample, energies and thresholds consistent with E_hull."""
    import csv

    from ase_crystal_llm.evaluation.pipeline import SAMPLE_COLUMNS

    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == SAMPLE_COLUMNS and len(rows) == result["samples"]["n"]
    assert result["settings"]["hull"].startswith("MP-20 (train+val+test) + MP elemental references 2023-02-07")
    judged = [r for r in rows if r["e_above_hull"]]
    assert judged and all(r["hull"] == result["settings"]["hull"] for r in judged)
    for row in judged:
        e = float(row["e_above_hull"])
        assert row["stable"] == str(e <= 0) and row["metastable"] == str(e < 0.1)
        assert row["potential"] == "M3GNet-MP-2021.2.8-PES"
        assert float(row["formation_energy_per_atom"]) > -6 and float(row["energy_per_atom"]) < 0
    invalid = [r for r in rows if r["structure_valid"] == "False"]
    assert invalid and all(not r["e_above_hull"] and r["failure"] for r in invalid)
    assert sum(r["metastable"] == "True" for r in rows) == round(result["stability"]["metastable"] * len(rows))


def _check_samples_db(path, csv_path):
    """--db: the same table as an ase.db, relaxed structures with their energies."""
    import csv

    from ase.db import connect

    with open(csv_path) as handle:
        table = list(csv.DictReader(handle))
    rows = sorted(connect(path).select(), key=lambda r: r.sample_index)
    assert [r.sample_index for r in rows] == [int(t["index"]) for t in table]
    for row, line in zip(rows, table):
        if line["e_above_hull"]:
            assert row.e_above_hull == pytest.approx(float(line["e_above_hull"]))
            assert row.metastable == (line["metastable"] == "True") and row.hull == line["hull"]
            assert row.energy / row.natoms == pytest.approx(float(line["energy_per_atom"]), abs=1e-5)


def _table(out):
    with open(out / "samples.csv") as handle:
        return list(csv.DictReader(handle))


def test_cli_writes_report(first_run, samples_file):
    out, _, result = first_run
    for name in ("metrics.json", "report.md", "samples.csv", "relaxed.extxyz", "e_above_hull.png", "rates.png",
                 "density.png", "n_elements.png", "relax_cache.db"):
        assert (out / name).is_file(), name
    assert result["samples"] == {"source": str(samples_file), "n": N_REAL + 2, "n_valid": N_REAL}
    _check_samples_table(out / "samples.csv", result)
    _check_samples_db(out / "samples.db", out / "samples.csv")
    v = result["validity"]["returned"]
    assert v["structure"] == pytest.approx(7 / 8) and v["composition"] == pytest.approx(7 / 8)
    assert v["valid"] == pytest.approx(6 / 8)
    emitted = result["validity"]["emitted"]["all"]
    assert emitted["emitted"] == 9 and emitted["valid_over_emitted"] == pytest.approx(6 / 9)
    stab = result["stability"]
    assert stab["over_emitted"]["emitted"] == 9
    # 9 model outputs (sample 2 took two): the metastable rows of the table over 9, not over the 8 returned
    metastable_rows = sum(row["metastable"] == "True" for row in _table(out))
    assert metastable_rows >= 4 and stab["over_emitted"]["metastable"] == pytest.approx(metastable_rows / 9)
    assert result["coverage"]["reference_size"] == 40 == result["settings"]["coverage_reference_size"]
    assert result["coverage"]["reference"]["subsample"] and result["coverage"]["reference"]["split_size"] == 9046
    # (a random 40-crystal subsample of the test split need not contain anything like these 6)
    assert 0 <= result["coverage"]["recall"] <= 6 / 40 and 0 <= result["coverage"]["precision"] <= 6 / 8
    # a sample within both cutoffs is within each one
    cov = result["coverage"]
    assert cov["precision"] <= min(cov["structure_precision"], cov["composition_precision"])
    assert result["wasserstein"]["density"] >= 0
    assert result["uniqueness"] == 1.0
    assert result["novelty"] is not None
    cond = result["conditional"]
    assert cond["formula"] == {"n": 2, "match": 0.5}
    assert cond["spacegroup"]["n"] == 1 and cond["spacegroup"]["match_symprec_0.1"] == 1.0
    report = (out / "report.md").read_text()
    assert "MP-20 only" in report or "MP-20 (plus elemental references) only" in report
    assert "40-crystal subsample" in report and "not the full test split of the paper's protocol" in report
    assert "metastable S.U.N." in report and f"Hull: {result['settings']['hull']}" in report
    assert f"structure / composition | {100 * cov['structure_precision']:.1f}% / " in report
    assert "- space group match: 100.0% at symprec 0.1, 100.0% at symprec 0.2 of 1" in report
    assert "- crystal system match: 100.0% at symprec 0.1, 100.0% at symprec 0.2" in report
    # distribution: the valid samples (real test crystals here) beside as many real val crystals, same reference
    dist = result["distribution"]
    assert dist["samples"]["n"] == N_REAL == dist["real"]["n"] and dist["reference"]["n"] == 40
    assert 0 <= dist["samples"]["element_count_jsd"] <= 1 and dist["real"]["spacegroup_jsd"] > 0
    assert sum(dist["reference"]["element_count_mix"].values()) == pytest.approx(1.0, abs=1e-3)
    assert "## Distribution: samples beside real crystals" in report and "| binary |" in report


def test_known_stable_crystals_are_metastable(first_run):
    out, _, result = first_run
    s = result["stability"]
    # real MP-20 crystals, relaxed with M3GNet, against a hull that contains them:
    # nearly all within 0.1 eV/atom; the two invalid samples count as failures
    assert s["failures"].get("invalid sample") == 2
    assert 4 / 8 <= s["metastable"] <= 6 / 8
    assert math.isfinite(s["e_hull_median"]) and s["e_hull_median"] < 0.1
    # The rates count the per-structure E_hull of samples.csv against the thresholds, over all 8 samples.
    rows = _table(out)
    e_hull = [float(r["e_above_hull"]) for r in rows if r["e_above_hull"]]
    assert len(e_hull) == N_REAL and s["e_hull_median"] == pytest.approx(float(np.median(e_hull)), abs=1e-6)
    assert s["metastable"] == pytest.approx(sum(e < 0.1 for e in e_hull) / 8)
    assert s["stable"] == pytest.approx(sum(e <= 0 for e in e_hull) / 8)
    new = [float(r["e_above_hull"]) for r in rows if r["unique"] == r["novel"] == "True" and r["e_above_hull"]]
    assert new  # most MP-20 test crystals are in neither the training nor the validation split
    assert s["msun"] == pytest.approx(sum(e < 0.1 for e in new) / 8)
    assert s["sun"] == pytest.approx(sum(e <= 0 for e in new) / 8)


def test_rattled_relaxations_start_from_seeded_moved_copies(first_run, samples_file, tmp_path):
    import shutil

    first_out, _, result = first_run
    out = tmp_path / "rattled"
    out.mkdir()
    shutil.copy(first_out / "relax_cache.db", out / "relax_cache.db")  # the as-written relaxations
    rattled = pipeline.evaluate(samples_file, out, rattle=0.05, coverage_size=40, progress=False, plots=False)
    assert rattled["relaxation"]["computed"] == N_REAL  # no start is the as-written sample
    assert rattled["settings"]["rattle"] == 0.05 and "rattled by 0.05 A" in (out / "report.md").read_text()
    # Real crystals relax back to their minima from a small rattle.
    before = [float(r["e_above_hull"]) for r in _table(first_out) if r["e_above_hull"]]
    after = [float(r["e_above_hull"]) for r in _table(out) if r["e_above_hull"]]
    assert np.allclose(after, before, atol=0.02)
    assert rattled["stability"]["metastable"] == result["stability"]["metastable"]
    again = pipeline.evaluate(samples_file, out, rattle=0.05, coverage_size=40, progress=False, plots=False)
    assert again["relaxation"]["computed"] == 0  # seeded: the same moved copies


def test_coverage_of_relaxed_samples(first_run, samples_file, tmp_path):
    import shutil

    first_out, _, result = first_run
    assert "coverage_relaxed" not in result  # as written only, unless asked
    out = tmp_path / "relaxed_coverage"
    out.mkdir()
    shutil.copy(first_out / "relax_cache.db", out / "relax_cache.db")
    again = pipeline.evaluate(samples_file, out, coverage_size="all", coverage_relaxed=True, progress=False,
                              plots=False)
    assert again["relaxation"]["computed"] == 0
    written, relaxed = again["coverage"], again["coverage_relaxed"]
    assert relaxed["relaxed"] == N_REAL and relaxed["reference_size"] == written["reference_size"] == 9046
    # the six are test crystals: relaxed with M3GNet they stay within the cutoffs of themselves (of 8 samples)
    assert written["precision"] == relaxed["precision"] == N_REAL / 8
    assert relaxed["recall"] >= N_REAL / 9046
    assert "coverage recall / precision of the relaxed samples (6 relaxed)" in (out / "report.md").read_text()


def test_relaxation_cache_ignores_a_killed_writers_lock_file(tmp_path):
    import threading

    from ase_crystal_llm.evaluation.relaxation import RelaxCache

    path = tmp_path / "relax_cache.db"
    (tmp_path / "relax_cache.db.lock").write_text("")  # left behind by a writer killed mid-write (kill -9)
    cache = RelaxCache(path)
    writer = threading.Thread(target=cache.put, args=("key", bulk("Cu")), daemon=True)
    writer.start()
    writer.join(timeout=30)
    assert not writer.is_alive(), "the write waited on a stale lock file"
    assert len(cache) == 1 and cache.get("key") is not None


def test_resume_reuses_relaxation_cache(first_run):
    _, partial, result = first_run
    assert partial["relaxation"]["computed"] == 3
    # the full run relaxed only the samples the interrupted run had not reached
    assert result["relaxation"]["computed"] == N_REAL - 3
    assert result["relaxation"]["from_cache"] == 3


def test_rerun_does_no_relaxation_work_and_adds_ipt(first_run, samples_file, tiny_model_dir):
    out, _, result = first_run
    assert result["ipt"] is None
    again = pipeline.evaluate(samples_file, out, coverage_size=40, progress=False, plots=False,
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


# -- reference fingerprints: chunked, resumable, parallel, precomputed ------------------
def _small_crystals():
    """12 small hand-made crystals: a reference that needs no shared data."""
    return [bulk("NaCl", "rocksalt", a=5.64), bulk("KCl", "rocksalt", a=6.3), bulk("Si"), bulk("Cu"),
            bulk("MgO", "rocksalt", a=4.2), bulk("CsCl", "cesiumchloride", a=4.1), bulk("Al"), bulk("Fe"),
            bulk("ZnS", "zincblende", a=5.41), bulk("GaAs", "zincblende", a=5.65), bulk("LiF", "rocksalt", a=4.03),
            bulk("W")]


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    """A 12-crystal CSV with a ``cif`` column, and its fingerprints computed in one go (no chunks, no cache)."""
    from ase_crystal_llm.chemistry import validity
    from ase_crystal_llm.evaluation import metrics

    cifs = [validity.as_structure(a).to(fmt="cif") for a in _small_crystals()]
    path = tmp_path_factory.mktemp("reference") / "ref.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["material_id", "cif"])
        writer.writerows([f"x-{i}", cif] for i, cif in enumerate(cifs))
    whole = metrics.Fingerprints.from_structures([references._parse_cif(cif) for cif in cifs])
    return path, whole


def _same(a, b):
    return len(a) == len(b) and all(np.allclose(getattr(a, k), getattr(b, k), equal_nan=True)
                                    for k in ("structure", "composition", "density", "n_elements"))


def _rows_in(part, whole):
    """For each crystal of ``part``, the one row of ``whole`` with the same fingerprints."""
    fields = ("structure", "composition", "density", "n_elements")
    found = []
    for i in range(len(part)):
        same = [j for j in range(len(whole))
                if all(np.allclose(getattr(part, k)[i], getattr(whole, k)[j], equal_nan=True) for k in fields)]
        assert len(same) == 1, f"crystal {i} of the subsample matches rows {same}"
        found += same
    return found


def _chunk_files(cache):
    return sorted(cache.glob("fingerprints-*/rows-*.npz"))


def test_interrupted_reference_fingerprints_resume(small_reference, tmp_path, monkeypatch):
    path, whole = small_reference
    real, computed = references._fingerprint_chunk, []

    def interrupt_after_two(task, tick=None):
        if len(computed) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third chunk
        computed.append(task[0])
        return real(task, tick)

    monkeypatch.setattr(references, "_fingerprint_chunk", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        references.reference_fingerprints(path, cache=tmp_path, chunk_size=4, progress=False)
    assert len(_chunk_files(tmp_path)) == 2  # both finished chunks were saved at once

    computed.clear()
    monkeypatch.setattr(references, "_fingerprint_chunk", lambda task, tick=None: computed.append(task[0]) or
                        real(task, tick))
    fps, info = references._reference(path, cache=tmp_path, chunk_size=4, progress=False)
    assert info["computed"] == 4 and info["from_cache"] == 8  # only the missing chunk
    assert [list(rows) for rows in computed] == [[8, 9, 10, 11]]
    assert _same(fps, whole)

    # a damaged chunk (and a temporary file a kill -9 left mid-write) cost only that chunk
    damaged = _chunk_files(tmp_path)[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    (damaged.parent / f".{damaged.name}.123.tmp").write_bytes(b"half")
    fps, info = references._reference(path, cache=tmp_path, chunk_size=4, progress=False)
    assert info["computed"] == 4 and _same(fps, whole)


def test_subsamples_share_cached_rows_and_cached_runs_show_no_bar(small_reference, tmp_path, capsys):
    path, whole = small_reference
    part, info = references._reference(path, size=5, seed=3, cache=tmp_path, chunk_size=4, label="tiny split")
    assert info == {"size": 5, "split_size": 12, "subsample": True, "seed": 3, "precomputed": 0,
                    "from_cache": 0, "computed": 5}
    rows = _rows_in(part, whole)  # 5 different crystals of the split, in file order
    assert len(set(rows)) == 5 and rows == sorted(rows)
    other, _ = references._reference(path, size=5, seed=4, cache=tmp_path / "other", chunk_size=4, progress=False)
    assert _rows_in(other, whole) != rows  # the seed picks the crystals
    assert "reference fingerprints (tiny split, 5 of 12 crystals" in capsys.readouterr().err
    full, info = references._reference(path, cache=tmp_path, chunk_size=4, label="tiny split")
    assert (info["from_cache"], info["computed"]) == (5, 7) and _same(full, whole)
    assert "12 crystals, 5 already cached" in capsys.readouterr().err
    again = references.reference_fingerprints(path, size=5, seed=3, cache=tmp_path)
    assert _same(again, part)
    assert capsys.readouterr().err == ""  # everything cached: no bar


@pytest.mark.subprocess  # spawned worker interpreters
def test_reference_fingerprints_in_worker_processes(small_reference, tmp_path):
    path, whole = small_reference
    fps, info = references._reference(path, cache=tmp_path, chunk_size=4, workers=2, progress=False)
    assert info["computed"] == 12 and len(_chunk_files(tmp_path)) == 3
    assert _same(fps, whole)


def test_precomputed_reference_file(small_reference, tmp_path, monkeypatch):
    path, whole = small_reference
    split = tmp_path / "split.csv"
    split.write_bytes(path.read_bytes())
    assert references.precomputed_path(tmp_path / "test.csv.gz") == tmp_path / "test_fingerprints.npz"
    marked = whole.take(np.arange(12))
    marked.density = marked.density + 1000.0  # to tell the file's values from computed ones
    marked.save(references.precomputed_path(split))
    real = references._fingerprint_chunk
    monkeypatch.setattr(references, "_fingerprint_chunk", lambda *a, **k: pytest.fail("computed"))
    fps, info = references._reference(split, size=5, seed=1, cache=tmp_path / "cache", progress=False)
    rows = _rows_in(fps, marked)  # the file's values (computed ones have other densities), 5 different rows
    assert info["precomputed"] == 5 and len(set(rows)) == 5
    assert not (tmp_path / "cache").exists() or not _chunk_files(tmp_path / "cache")

    monkeypatch.setattr(references, "_fingerprint_chunk", real)
    for stale in ({"version": np.array(references.FINGERPRINT_VERSION + 1)}, {}):
        rows = np.arange(12) if stale else np.arange(11)  # another version, or another row count
        marked.take(rows).save(references.precomputed_path(split), **stale)
        with pytest.warns(UserWarning, match="ignoring"):
            fps, info = references._reference(split, cache=tmp_path / "cache", progress=False)
        assert info["precomputed"] == 0 and _same(fps, whole)
    fps, info = references._reference(split, cache=tmp_path / "cache", precomputed=False, progress=False)
    assert info["from_cache"] == 12


def test_coverage_size_values():
    assert pipeline._coverage_size(None) == references.COVERAGE_SIZE
    assert pipeline._coverage_size("all") is None and pipeline._coverage_size(0) is None
    assert pipeline._coverage_size(40) == 40
    for bad in (-1, "some", 2.5, True):
        with pytest.raises(ValueError, match="coverage_size"):
            pipeline._coverage_size(bad)


def test_run_record_beside_samples_counts_every_attempt(tmp_path):
    from ase_crystal_llm.io.outputs import write_run_record

    path = tmp_path / "samples.extxyz"
    ase.io.write(path, [bulk("Si"), bulk("Cu")])
    assert pipeline.run_stats(path, 2) is None  # no record
    write_run_record(path, {"run_id": "a", "rank": 0, "stats": {"attempts": 5, "returned": 1, "gave_up": 1,
                                                                  "parse_failures": {"truncated": 3}}})
    write_run_record(path, {"run_id": "b", "rank": 0, "stats": {"attempts": 2, "returned": 1,
                                                                  "parse_failures": {"truncated": 1}}})
    stats = pipeline.run_stats(path, 2)
    assert stats == {"attempts": 7, "returned": 2, "gave_up": 1, "parse_failures": {"truncated": 4}}
    assert pipeline.run_stats(path, 3) is None  # the file no longer matches its record
    assert pipeline.run_stats(path, 2, limit=1) is None


def test_structures_in_memory_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not periodic"):
        pipeline.evaluate([Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]])], tmp_path)
    with pytest.raises(ValueError, match="no structures"):
        pipeline.evaluate([], tmp_path)


def test_all_invalid_samples(tmp_path, data_dir, monkeypatch):
    close = Atoms("Na2", positions=[[0, 0, 0], [0.3, 0, 0]], cell=[5, 5, 5], pbc=True)
    monkeypatch.setattr(pipeline, "COVERAGE_SIZE", 5)  # the default subsample, kept small
    result = pipeline.evaluate([close, close.copy()], tmp_path, progress=False)
    ref = result["coverage"]["reference"]
    assert (ref["size"], ref["split_size"], ref["subsample"], ref["seed"]) == (5, 9046, True, 0)
    assert result["settings"]["coverage_reference_size"] == 5 == result["coverage"]["reference_size"]
    report = (tmp_path / "report.md").read_text()
    assert "subsample of 5 of the 9,046 MP-20 test crystals" in report and "not the full test split" in report
    assert result["validity"]["returned"]["valid"] == 0.0
    assert result["coverage"]["precision"] == 0.0 and result["coverage"]["recall"] == 0.0
    assert result["stability"]["metastable"] == 0.0
    assert result["stability"]["failures"] == {"invalid sample": 2}
    assert result["relaxation"]["attempted"] == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "rates.png").is_file()
