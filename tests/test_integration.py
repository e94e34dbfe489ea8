"""Generation to evaluation through a file: the ``atoms.info`` keys ``generate`` writes are the keys ``evaluate`` reads.

``CrystalGenerator.generate`` (conftest's over-fitted tiny model) -> ``ase.io.write`` / ``ase.io.read``
(extxyz, ASE's own writer) -> ``evaluation.pipeline.evaluate``, with a Lennard-Jones calculator
standing in for the ML potential (evaluate takes any calculator that declares its energy scale).

* ``condition_<key>`` -> the conditional-accuracy section;
* ``attempts`` and ``formula_constrained`` -> validity over everything the model emitted, split by
  whether decoding was held to the formula;
* ``run_id`` / ``sample_index`` -> kept through relaxation (``relaxed.extxyz``, with ``input_index``);
* the file's order -> the ``index`` column of ``samples.csv``.
"""

import csv
import json

import ase.io
import pytest
from ase.calculators.lj import LennardJones
from ase.formula import Formula

from ase_crystal_llm.evaluation.pipeline import evaluate
from ase_crystal_llm.generation.generator import CrystalGenerator

POTENTIAL = "lennard-jones (test stand-in)"

# (kwargs, how many rows carry each contract key): held to a formula, the formula (and a space
# group) only in the prompt, no condition at all.
RUNS = [
    dict(n=4, formula=["NaCl", "MgO"], seed=0, max_attempts=50),
    dict(n=2, formula="NaCl", spacegroup=225, constrain_formula=False, seed=1, max_attempts=50),
    dict(n=2, seed=2, max_attempts=50),
]


def _reduced(formula):
    return Formula(formula).reduce()[0]


@pytest.fixture(scope="module")
def generated(crystal_model, one_thread):
    """The crystals of the three runs in one list, and each run's statistics."""
    gen = CrystalGenerator.from_pretrained(crystal_model, device="cpu")
    crystals, stats = [], []
    for kwargs in RUNS:
        kwargs = dict(kwargs)
        run = gen.generate(kwargs.pop("n"), **kwargs)
        crystals += run
        stats.append(gen.stats)
    return crystals, stats


@pytest.fixture(scope="module")
def evaluated(generated, data_dir, tmp_path_factory):
    crystals, _ = generated
    folder = tmp_path_factory.mktemp("integration")
    path = folder / "generated.extxyz"
    ase.io.write(path, crystals, format="extxyz")
    calc = LennardJones(sigma=2.0, epsilon=0.01, rc=5.0)
    calc.potential_name = POTENTIAL
    calc.energy_scale = "mp_raw"  # what the MP hull accepts; the energies themselves mean nothing here
    out = folder / "report"
    result = evaluate(path, out, data_dir=data_dir, potential=calc, fmax=0.5, steps=5, coverage_size=5,
                      cache=tmp_path_factory.getbasetemp() / "fp-cache", progress=False, plots=False)
    return path, out, result


def test_generation_runs_are_complete(generated):
    crystals, stats = generated
    assert [s.requested for s in stats] == [r["n"] for r in RUNS]
    assert [s.gave_up for s in stats] == [0, 0, 0] and len(crystals) == sum(r["n"] for r in RUNS)
    assert len({c.info["run_id"] for c in crystals}) == 3


def test_extxyz_keeps_the_contract_keys(generated, evaluated):
    crystals, _ = generated
    path, _, _ = evaluated
    back = ase.io.read(path, ":")
    keys = ("run_id", "sample_index", "attempts", "generated_text", "condition_formula", "condition_spacegroup",
            "formula_constrained")
    for before, after in zip(crystals, back, strict=True):
        for key in keys:
            assert (key in after.info) == (key in before.info), key
            if key in before.info:
                assert after.info[key] == before.info[key], key  # (ints come back as numpy integers)
    assert [c.info.get("formula_constrained") for c in back] == [True] * 4 + [False] * 2 + [None] * 2


def test_conditions_reach_conditional_accuracy(generated, evaluated):
    crystals, _ = generated
    _, _, result = evaluated
    cond = result["conditional"]
    # formula: the 4 held rows and the 2 prompt-only rows; the free rows asked nothing
    asked = [(c, c.info["condition_formula"]) for c in crystals if "condition_formula" in c.info]
    assert [f for _, f in asked] == ["NaCl", "MgO", "NaCl", "MgO", "NaCl", "NaCl"]
    hits = [_reduced(c.get_chemical_formula()) == _reduced(f) for c, f in asked]
    assert all(hits[:4])  # decoding held to the formula cannot miss it
    assert cond["formula"] == {"n": 6, "match": pytest.approx(sum(hits) / 6)}
    assert cond["spacegroup"]["n"] == 2  # only the prompt-only NaCl rows asked for 225
    assert 0 <= cond["spacegroup"]["match_symprec_0.1"] <= 1


def test_attempts_and_constraint_reach_emitted_validity(generated, evaluated):
    crystals, stats = generated
    _, _, result = evaluated
    emitted = result["validity"]["emitted"]
    # no run record beside the file: the per-sample attempts are the only record of failed outputs
    assert emitted["all"]["source"] == "samples"
    assert emitted["all"]["emitted"] == sum(s.attempts for s in stats)
    assert emitted["all"]["returned"] == len(crystals)
    held, prompt_only, _ = stats
    assert (emitted["constrained"]["returned"], emitted["constrained"]["emitted"]) == (4, held.attempts)
    assert (emitted["unconstrained"]["returned"], emitted["unconstrained"]["emitted"]) == (2, prompt_only.attempts)
    # rock salt and periclase, re-sampled until no atoms are too close: every returned one is valid
    assert emitted["constrained"]["valid_over_returned"] == 1.0


def test_rows_carry_the_sample_indexes(generated, evaluated):
    crystals, _ = generated
    _, out, result = evaluated
    assert result["samples"]["n"] == len(crystals)
    with open(out / "samples.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows] == list(range(len(crystals)))
    assert [r["formula"] for r in rows] == [c.get_chemical_formula() for c in crystals]
    valid = [r for r in rows if r["structure_valid"] == r["composition_valid"] == "True"]
    assert len(valid) == result["samples"]["n_valid"] >= 4
    assert all(r["potential"] == POTENTIAL for r in valid)
    assert json.loads((out / "metrics.json").read_text())["conditional"] == result["conditional"]
    # relaxed structures point back at their sample, and keep generation's identifiers
    relaxed = ase.io.read(out / "relaxed.extxyz", ":")
    assert [a.info["input_index"] for a in relaxed] == [int(r["index"]) for r in valid]
    for atoms in relaxed:
        sample = crystals[atoms.info["input_index"]]
        for key in ("run_id", "sample_index"):
            assert atoms.info[key] == sample.info[key], key
        assert atoms.get_chemical_formula() == sample.get_chemical_formula()
        assert atoms.info["potential"] == POTENTIAL
