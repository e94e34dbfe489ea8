"""Crash safety: ``kill -9`` a running ``generate``, ``evaluate`` and ``train``.

Each command runs as a real process; once it has finished some work (rows in
its output, relaxations in its cache, a checkpoint) it is killed with SIGKILL.
Then:

* nothing it wrote is truncated or corrupt (every file reads back whole);
* the finished work is still there, and re-running resumes from it:
  ``generate --resume`` appends the missing crystals without duplicates,
  ``evaluate`` takes the finished relaxations from its cache, ``train --resume``
  continues from the last checkpoint.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
from ase.io import read, write

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

# PYTHONFAULTHANDLER: a command stopped for taking too long prints where it was (SIGABRT, below).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONFAULTHANDLER": "1"}



def cli(*args):
    return [sys.executable, "-m", "ase_crystal_llm.cli", *map(str, args)]


def kill_when(cmd, ready, *, timeout=240, log=None):
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true; return its stderr so far."""
    log = Path(log)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if ready():
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    break
                if proc.poll() is not None:
                    pytest.fail(f"{cmd[3]} ended (status {proc.returncode}) before it could be killed:\n"
                                f"{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    _abort(proc)
                    pytest.fail(f"{cmd[3]} made no progress in {timeout} s:\n{_tracebacks(log.read_text())}")
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def _tracebacks(text, limit=6000):
    """The end of a dump without faulthandler's list of extension modules, which would crowd out the stacks."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("Extension modules:"))[-limit:]


def _abort(proc):
    """Stop ``proc`` with SIGABRT, so that its faulthandler prints every thread's traceback."""
    proc.send_signal(signal.SIGABRT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def run(cmd, timeout=240):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # read the pipes while it prints its tracebacks
        try:
            err = proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1]
        pytest.fail(f"{cmd[3]} did not finish in {timeout} s:\n{_tracebacks(err)}")
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _read_all(path):
    """Every structure of an output file, with its info (ase.db: key-value pairs)."""
    if path.suffix == ".db":
        import ase.db

        with ase.db.connect(path) as db:
            images = []
            for row in db.select():
                atoms = row.toatoms()
                atoms.info.update(row.key_value_pairs)
                images.append(atoms)
            return images
    return read(path, index=":")


def _count(path):
    try:
        return len(_read_all(path))
    except Exception:  # not created yet, or (text) half-written: not ready
        return 0


def _integrity(db):
    """SQLite's own check of a database file; the connection is closed at once (no lock left)."""
    with closing(sqlite3.connect(db)) as con:
        return con.execute("PRAGMA integrity_check").fetchall()[0][0]


def _ids(images):
    return [(a.info["run_id"], a.info["rank"], a.info["sample_index"]) for a in images]


# -- generate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".extxyz", ".db"])
def test_generate_killed_then_resumed(crystal_model, tmp_path, suffix):
    out = tmp_path / f"samples{suffix}"
    n = 60
    args = ("generate", "-n", n, "-o", out, "--model", crystal_model, "--seed", 0, "--batch-size", 2,
            "--max-atoms", 8, "--device", "cpu")
    kill_when(cli(*args), lambda: out.exists() and out.stat().st_size > 0 and _count(out) >= 6,
              log=tmp_path / "gen.log")

    # Every structure in the file reads back whole, with its identifiers.
    if suffix == ".db":
        assert _integrity(out) == "ok"
    before = _read_all(out)
    assert 6 <= len(before) < n, "killed too late to prove anything"
    ids_before = _ids(before)
    assert len(set(ids_before)) == len(ids_before)
    assert len({run for run, _, _ in ids_before}) == 1

    run(cli(*args, "--resume"))
    after = _read_all(out)
    ids_after = _ids(after)
    counts = Counter(ids_after)
    assert max(counts.values()) == 1, f"duplicates after resume: {counts.most_common(3)}"
    assert {run for run, _, _ in ids_after} == {ids_before[0][0]}, "the resumed run keeps its run id"
    assert sorted(i for _, _, i in ids_after) == list(range(n)), "every requested crystal, once"
    # The crystals finished before the kill are kept as they were.
    for a, b in zip(before, after[: len(before)]):
        assert a.info["sample_index"] == b.info["sample_index"]
        assert a.get_chemical_formula() == b.get_chemical_formula()
        assert abs(a.positions - b.positions).max() < 1e-6
    records = json.loads(Path(str(out) + ".run.json").read_text())["runs"]
    assert records[-1]["status"] == "complete"


# -- evaluate ------------------------------------------------------------------------------------------


def _cache_rows(db):
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)) as con:
            return con.execute("SELECT COUNT(*) FROM systems").fetchall()[0][0]
    except sqlite3.Error:  # still being created
        return 0


def test_evaluate_killed_then_resumed_from_cache(data_dir, m3gnet_dir, tmp_path):
    from ase_crystal_llm.data.datasets import read_structures

    structures = read_structures(data_dir / "mp_20" / "test.csv.gz", limit=12)
    for i, atoms in enumerate(structures):
        atoms.rattle(0.02 + 0.01 * (i % 6), seed=i)  # varied distortions: they finish one after another
    samples = tmp_path / "samples.extxyz"
    write(samples, structures)
    report = tmp_path / "report"
    cache = report / "relax_cache.db"
    args = ("evaluate", samples, "-o", report, "--coverage-size", 5, "--steps", 150, "--no-progress")
    kill_when(cli(*args), lambda: _cache_rows(cache) >= 2, log=tmp_path / "eval.log")

    # The cache is an intact database holding the finished relaxations; no report was half-written.
    assert _integrity(cache) == "ok"
    cached = _cache_rows(cache)
    assert 2 <= cached < len(structures), "killed too late to prove anything"
    for name in ("metrics.json", "report.md"):
        assert not (report / name).exists() or (report / name).stat().st_size > 0

    run(cli(*args))
    metrics = json.loads((report / "metrics.json").read_text())
    relaxation = metrics["relaxation"]
    assert relaxation["from_cache"] >= cached, relaxation
    assert relaxation["computed"] == relaxation["attempted"] - relaxation["from_cache"]
    assert cached < relaxation["attempted"] <= len(structures), "killed too late to prove anything"
    assert _cache_rows(cache) == relaxation["attempted"]


# -- train ---------------------------------------------------------------------------------------------


def _checkpoints(out):
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []


def test_train_killed_then_resumed_from_checkpoint(data_dir, tmp_path):
    from ase_crystal_llm.data.datasets import read_structures
    from ase_crystal_llm.model.modelcard import ModelCard

    data = tmp_path / "train.extxyz"
    write(data, read_structures(data_dir / "mp_20" / "train.csv.gz", limit=48))
    out = tmp_path / "model"
    steps = 80
    args = ("train", "--data", data, "--out", out, "--from-scratch", "tiny", "--max-steps", steps,
            "--save-every", 10, "--batch-size", 8, "--seed", 0)
    kill_when(cli(*args), lambda: len(_checkpoints(out)) >= 1, log=tmp_path / "train.log")

    # Every committed checkpoint is complete and loads; a half-written one is never named step-*.
    from safetensors.torch import load_file

    kept = _checkpoints(out)
    assert kept
    for ckpt in kept:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert load_file(ckpt / "model.safetensors")
        assert state["step"] == int(ckpt.name.split("-")[1])
    last = json.loads((kept[-1] / "trainer_state.json").read_text())
    assert last["step"] < steps, "killed too late to prove anything"
    assert not (out / "crystal_llm.json").exists(), "an unfinished run must not look like a finished model"

    run(cli(*args, "--resume"))
    log = json.loads((out / "training_log.json").read_text())["steps"]
    assert [e["step"] for e in log] == list(range(1, steps + 1)), "every step exactly once"
    # The steps before the checkpoint were carried over, not trained again (same wall times).
    assert log[: last["step"]] == last["log"]["steps"][: last["step"]]
    card = ModelCard.from_pretrained(out)
    assert card.verify_weights(out)
