"""The CLI bad-input catalogue: every bad input is one line on stderr and exit status 2.

Each case of ``CASES`` is a row of the table in docs/reliability.md.  The
catalogue runs through :func:`ase_crystal_llm.cli.main` in this process (the
same code path as the console script, without paying the start-up of a new
Python for every case); ``test_real_process`` repeats one case per subcommand
as a real ``python -m ase_crystal_llm.cli`` process, and ``test_debug_traceback``
checks that ``--debug`` shows the traceback instead.
"""

import inspect
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from ase.build import bulk, molecule
from ase.io import write

from ase_crystal_llm import cli

TIMEOUT = 180


@dataclass(frozen=True)
class Case:
    """One bad input: the argument list (with {placeholders}) and text the error must contain."""

    command: str
    name: str
    args: tuple
    expect: tuple  # every string must appear in the error line (case-insensitive)
    needs_model: bool = False
    needs_run: bool = False

    @property
    def id(self):
        return f"{self.command}-{self.name}"


TRAIN = ("--from-scratch", "tiny", "--max-steps", "1", "--batch-size", "2")
CKPT = ("--from-scratch", "tiny", "--max-steps", "2", "--save-every", "1", "--batch-size", "1")
EVAL = ("--coverage-size", "5", "--steps", "2", "--no-progress")

CASES = [
    # convert
    Case("convert", "missing-file", ("convert", "{missing}", "-o", "{out}/a.extxyz"), ("not found", "{missing}")),
    Case("convert", "empty-file", ("convert", "{empty}", "-o", "{out}/a.extxyz"), ("empty",)),
    Case("convert", "wrong-format", ("convert", "{junk}", "-o", "{out}/a.extxyz"), ("cannot read",)),
    Case("convert", "non-periodic", ("convert", "{molecule}", "-o", "{out}/a.extxyz"), ("periodic",)),
    Case("convert", "unknown-element", ("convert", "{unknown_element}", "-o", "{out}/a.extxyz"),
         ("unknown element", "Qq")),
    Case("convert", "unknown-output-format", ("convert", "{good}", "-o", "{out}/a.foo"), ("foo",)),
    Case("convert", "unknown-option-value", ("convert", "{good}", "-o", "{out}/a.extxyz", "--limit", "0"), ("limit",)),
    Case("convert", "output-dir-missing", ("convert", "{good}", "-o", "{nodir}/a.extxyz"),
         ("does not exist", "{nodir}")),
    # evaluate
    Case("evaluate", "missing-file", ("evaluate", "{missing}", "-o", "{out}/rep", *EVAL), ("not found", "{missing}")),
    Case("evaluate", "empty-file", ("evaluate", "{empty}", "-o", "{out}/rep", *EVAL), ("empty",)),
    Case("evaluate", "wrong-format", ("evaluate", "{junk}", "-o", "{out}/rep", *EVAL), ("cannot read",)),
    Case("evaluate", "non-periodic", ("evaluate", "{molecule}", "-o", "{out}/rep", *EVAL), ("periodic",)),
    Case("evaluate", "unknown-element", ("evaluate", "{unknown_element}", "-o", "{out}/rep", *EVAL),
         ("unknown element", "Qq")),
    Case("evaluate", "unknown-potential", ("evaluate", "{good}", "-o", "{out}/rep", "--potential", "nonsense", *EVAL),
         ("unknown potential", "nonsense")),
    Case("evaluate", "unknown-option-value", ("evaluate", "{good}", "-o", "{out}/rep", "--fmax", "-1", *EVAL),
         ("fmax",)),
    Case("evaluate", "model-weight-corrupt",
         ("evaluate", "{good}", "-o", "{out}/rep", "--model", "{model_bad_hash}", *EVAL),
         ("sha256", "model.safetensors"), needs_model=True),
    # mutate
    Case("mutate", "missing-file", ("mutate", "{missing}", "-n", "2", "--baseline", "-o", "{out}/m.extxyz"),
         ("not found", "{missing}")),
    Case("mutate", "empty-file", ("mutate", "{empty}", "-n", "2", "--baseline", "-o", "{out}/m.extxyz"), ("empty",)),
    Case("mutate", "wrong-format", ("mutate", "{junk}", "-n", "2", "--baseline", "-o", "{out}/m.extxyz"),
         ("cannot read",)),
    Case("mutate", "non-periodic", ("mutate", "{molecule}", "-n", "2", "--baseline", "-o", "{out}/m.extxyz"),
         ("periodic",)),
    Case("mutate", "unknown-element", ("mutate", "{unknown_element}", "-n", "2", "--baseline", "-o", "{out}/m.extxyz"),
         ("unknown element", "Qq")),
    Case("mutate", "unknown-option-value", ("mutate", "{good}", "-n", "0", "--baseline", "-o", "{out}/m.extxyz"),
         ("-n",)),
    Case("mutate", "unknown-potential",
         ("mutate", "{good}", "-n", "1", "--baseline", "--relax", "nonsense", "-o", "{out}/m.extxyz"),
         ("nonsense",)),
    Case("mutate", "unknown-output-format", ("mutate", "{good}", "-n", "1", "--baseline", "-o", "{out}/m.foo"),
         ("foo",)),
    Case("mutate", "output-dir-missing", ("mutate", "{good}", "-n", "1", "--baseline", "-o", "{nodir}/m.extxyz"),
         ("does not exist", "{nodir}")),
    Case("mutate", "model-weight-missing",
         ("mutate", "{good}", "-n", "1", "--model", "{model_no_weights}", "-o", "{out}/m.extxyz"),
         ("missing", "model.safetensors"), needs_model=True),
    Case("mutate", "model-weight-corrupt",
         ("mutate", "{good}", "-n", "1", "--model", "{model_bad_hash}", "-o", "{out}/m.extxyz"),
         ("sha256", "model.safetensors"), needs_model=True),
    # generate
    Case("generate", "model-dir-missing", ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{missing}"),
         ("not found", "{missing}")),
    Case("generate", "model-dir-empty", ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{empty_dir}"),
         ("crystal_llm.json",)),
    Case("generate", "model-card-corrupt",
         ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model_bad_card}"),
         ("model card",), needs_model=True),
    Case("generate", "model-weight-missing",
         ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model_no_weights}"),
         ("missing", "model.safetensors"), needs_model=True),
    Case("generate", "model-weight-corrupt",
         ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model_bad_hash}"),
         ("sha256", "model.safetensors"), needs_model=True),
    Case("generate", "unknown-element",
         ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model}", "--elements", "Na,Qq"),
         ("Qq",), needs_model=True),
    Case("generate", "unknown-element-formula", ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model}",
                                                 "--formula", "QqO2"), ("QqO2",), needs_model=True),
    Case("generate", "unknown-option-value", ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model}",
                                              "--top-p", "2"), ("top_p",), needs_model=True),
    Case("generate", "zero-count", ("generate", "-n", "0", "-o", "{out}/g.extxyz", "--model", "{model}"),
         ("-n",), needs_model=True),
    Case("generate", "unknown-output-format", ("generate", "-n", "1", "-o", "{out}/g.foo", "--model", "{model}"),
         ("foo",), needs_model=True),
    Case("generate", "output-dir-missing", ("generate", "-n", "1", "-o", "{nodir}/g.extxyz", "--model", "{model}"),
         ("does not exist", "{nodir}"), needs_model=True),
    Case("generate", "bad-spacegroup", ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model}",
                                        "--spacegroup", "12,231"), ("1 to 230", "12,231"), needs_model=True),
    Case("generate", "negative-min-distance", ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model}",
                                               "--min-distance", "-1"), ("--min-distance", ">= 0"), needs_model=True),
    Case("generate", "spacegroup-symbol", ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model}",
                                           "--spacegroup", "Fm3x"), ("unknown space group", "Fm-3m"), needs_model=True),
    Case("generate", "lowercase-formula", ("generate", "-n", "1", "-o", "{out}/g.extxyz", "--model", "{model}",
                                           "--formula", "nacl"), ("capital letter", "NaCl"), needs_model=True),
    Case("generate", "existing-output", ("generate", "-n", "1", "-o", "{good}", "--model", "{model}"),
         ("already exists", "--overwrite", "--resume"), needs_model=True),
    Case("generate", "unwritable-output", ("generate", "-n", "1", "-o", "/sys/g.extxyz", "--model", "{model}"),
         ("cannot write", "/sys"), needs_model=True),
    Case("convert", "existing-output", ("convert", "{good}", "-o", "{good}"), ("already exists", "--overwrite")),
    Case("mutate", "existing-output", ("mutate", "{good}", "-n", "1", "--baseline", "-o", "{good}"),
         ("already exists", "--overwrite")),
    Case("evaluate", "existing-report", ("evaluate", "{good}", "-o", "{report}", *EVAL),
         ("already holds a report", "--overwrite")),
    Case("merge", "existing-output", ("merge", "{model}", "-o", "{model}"), ("already holds a model", "--overwrite"),
         needs_model=True),
    # train
    Case("train", "missing-file", ("train", "--data", "{missing}", "--out", "{out}/t", *TRAIN),
         ("not found", "{missing}")),
    Case("train", "empty-file", ("train", "--data", "{empty}", "--out", "{out}/t", *TRAIN), ("empty",)),
    Case("train", "wrong-format", ("train", "--data", "{junk}", "--out", "{out}/t", *TRAIN), ("cannot read",)),
    Case("train", "non-periodic", ("train", "--data", "{molecule}", "--out", "{out}/t", *TRAIN), ("periodic",)),
    Case("train", "unknown-element", ("train", "--data", "{unknown_element}", "--out", "{out}/t", *TRAIN),
         ("unknown element", "Qq")),
    Case("train", "unknown-size",
         ("train", "--data", "{good}", "--out", "{out}/t", "--from-scratch", "huge", "--max-steps", "1"),
         ("huge",)),
    Case("train", "unknown-quantize", ("train", "--data", "{good}", "--out", "{out}/t", *TRAIN, "--quantize", "3bit"),
         ("3bit",)),
    Case("train", "bad-prompts-file", ("train", "--data", "{good}", "--out", "{out}/t", *TRAIN, "--prompts", "{junk}"),
         ("argument --prompts", "expecting value")),
    Case("train", "base-model-missing",
         ("train", "--data", "{good}", "--out", "{out}/t", "--base", "{missing}", "--max-steps", "1"),
         ("{missing}",)),
    Case("train", "resume-checkpoint-weight-missing",
         ("train", "--data", "{good}", "--out", "{run_no_weights}", *CKPT, "--resume"),
         ("model.safetensors",), needs_run=True),
    Case("train", "resume-checkpoint-weight-corrupt",
         ("train", "--data", "{good}", "--out", "{run_bad_weights}", *CKPT, "--resume"),
         ("model.safetensors",), needs_run=True),
    # merge
    Case("merge", "model-dir-missing", ("merge", "{missing}", "-o", "{out}/merged"), ("{missing}",)),
    Case("merge", "not-an-adapter", ("merge", "{model}", "-o", "{out}/merged"), ("adapter",), needs_model=True),
]

# evaluate loads its potential (M3GNet, from the shared data) before the model it is given
POTENTIAL_CASES = ["evaluate-model-weight-corrupt"]


def _marked(cases):
    """Markers of the fast lane (tests/conftest.py): the ``models`` fixture is the tiny model trained on MP-20."""
    return [pytest.param(c, marks=[pytest.mark.data] * c.needs_model
                         + [pytest.mark.potential] * (c.id in POTENTIAL_CASES)) for c in cases]


def implemented(command):
    """False while ``_run_<command>`` still only says it is not available."""
    return "is not available yet" not in inspect.getsource(cli.COMMANDS[command][1])


# -- inputs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {
        "missing": root / "no_such_file.extxyz",
        "empty": root / "empty.extxyz",
        "junk": root / "junk.extxyz",
        "molecule": root / "water.extxyz",
        "unknown_element": root / "unknown_element.crystxt",
        "good": root / "good.extxyz",
        "empty_dir": root / "empty_dir",
        "report": root / "report",
    }
    paths["report"].mkdir()
    (paths["report"] / "metrics.json").write_text("{}")
    paths["empty"].write_text("")
    paths["junk"].write_text("this is not\na structure file\n")
    write(paths["molecule"], molecule("H2O"))
    paths["unknown_element"].write_text("5.0 5.0 5.0\n90 90 90\nQq\n0.00 0.00 0.00\n")
    write(paths["good"], [bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.43)])
    paths["empty_dir"].mkdir()
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def models(request, tmp_path_factory):
    """The tiny model plus damaged copies: weight file gone, weight bytes changed, card not JSON."""
    source = request.getfixturevalue("tiny_model_dir")
    root = tmp_path_factory.mktemp("bad_models")
    out = {"model": str(source)}
    for name in ("model_no_weights", "model_bad_hash", "model_bad_card"):
        dst = root / name
        shutil.copytree(source, dst, ignore=shutil.ignore_patterns("checkpoints"))
        out[name] = str(dst)
    weights = root / "model_no_weights" / "model.safetensors"
    assert weights.exists(), "the tiny model has no model.safetensors: update these cases"
    weights.unlink()
    corrupt = root / "model_bad_hash" / "model.safetensors"
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensor data: safetensors would load it silently
    corrupt.write_bytes(bytes(data))
    (root / "model_bad_card" / "crystal_llm.json").write_text("{ this is not json")
    return out


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """A 2-step training run with checkpoints, copied twice: last checkpoint's weights gone / cut in half."""
    root = tmp_path_factory.mktemp("bad_runs")
    assert cli.main(["train", "--data", inputs["good"], "--out", str(root / "run"), *CKPT]) == 0
    out = {}
    for name in ("run_no_weights", "run_bad_weights"):
        shutil.copytree(root / "run", root / name)
        out[name] = str(root / name)
    last = lambda name: sorted((root / name / "checkpoints").glob("step-*"))[-1] / "model.safetensors"  # noqa: E731
    last("run_no_weights").unlink()
    data = last("run_bad_weights").read_bytes()
    last("run_bad_weights").write_bytes(data[: len(data) // 2])
    return out


def _paths(case, inputs, tmp_path, request):
    paths = dict(inputs, out=str(tmp_path), nodir=str(tmp_path / "no_such_dir" / "deeper"))
    if case.needs_model:
        paths.update(request.getfixturevalue("models"))
    if case.needs_run:
        paths.update(request.getfixturevalue("runs"))
    return paths


def _fill(case, paths):
    return [a.format(**paths) for a in case.args], [e.format(**paths) for e in case.expect]


def _check_error(command, status, stderr, expect):
    assert status == 2, f"exit status {status}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1, f"want exactly one error line, got:\n{stderr}"
    line = errors[0]
    assert line.startswith(f"crystal-llm {command}: error:"), line
    for text in expect:
        assert text.lower() in line.lower(), f"{text!r} not in the error line {line!r}"
    return line


@pytest.mark.parametrize("case", _marked(CASES), ids=lambda c: c.id)
def test_bad_input(case, inputs, tmp_path, capsys, request):
    if not implemented(case.command):
        pytest.fail(f"crystal-llm {case.command} is not implemented yet")
    argv, expect = _fill(case, _paths(case, inputs, tmp_path, request))
    capsys.readouterr()
    try:
        status = cli.main(argv)
    except SystemExit as stop:  # argparse
        status = stop.code
    _check_error(case.command, status, capsys.readouterr().err, expect)
    # Nothing half-made is left behind in the output folder.
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".tmp", ".partial")]


def _process(args, timeout=TIMEOUT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ase_crystal_llm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# One representative case per subcommand, as a real process.
PROCESS_CASES = ["convert-non-periodic", "evaluate-empty-file", "mutate-unknown-element",
                 "generate-model-weight-corrupt", "train-missing-file", "merge-model-dir-missing"]


@pytest.mark.subprocess
@pytest.mark.parametrize("case", _marked(c for c in CASES if c.id in PROCESS_CASES),
                         ids=lambda c: c.id)
def test_real_process(case, inputs, tmp_path, request):
    if not implemented(case.command):
        pytest.fail(f"crystal-llm {case.command} is not implemented yet")
    argv, expect = _fill(case, _paths(case, inputs, tmp_path, request))
    proc = _process(argv)
    _check_error(case.command, proc.returncode, proc.stderr, expect)
    assert not proc.stdout.strip(), "errors go to stderr"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr holds more than the error line:\n{proc.stderr}"


@pytest.mark.subprocess
def test_debug_traceback(inputs, tmp_path):
    """``--debug`` (before or after the subcommand) shows the traceback."""
    for argv in (["--debug", "convert", inputs["molecule"], "-o", str(tmp_path / "a.extxyz")],
                 ["convert", inputs["missing"], "-o", str(tmp_path / "a.extxyz"), "--debug"]):
        proc = _process(argv)
        assert proc.returncode != 0
        assert "Traceback (most recent call last)" in proc.stderr, proc.stderr


@pytest.mark.subprocess
def test_argparse_errors_are_one_line(tmp_path):
    """Unknown options and bad choices: one line, exit 2, no usage dump."""
    for argv in (["generate", "-n", "x", "-o", "a.extxyz"], ["train", "--data", "a", "--out", "b"], ["nonsense"]):
        proc = _process(argv, timeout=60)
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "error" in lines[0], proc.stderr
