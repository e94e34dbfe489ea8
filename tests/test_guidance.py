"""Classifier-free guidance of text conditions: the mixing, both decoding paths, the defaults."""

from __future__ import annotations

import json
import warnings

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from test_generation import reduced, tiny_config
from transformers import LlamaForCausalLM

from ase_crystal_llm import cli
from ase_crystal_llm.generation.decoding import fast_sample, guide, plain_sample
from ase_crystal_llm.generation.generator import CrystalGenerator
from ase_crystal_llm.text.prompts import GENERATION, make_example

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_gen(tok):
    torch.manual_seed(1)
    return CrystalGenerator(LlamaForCausalLM(tiny_config(tok)).eval(), tok)


def test_scale_one_is_exactly_the_unguided_logits():
    cond, uncond = torch.randn(3, 11), torch.randn(3, 11)
    assert guide(cond, uncond, 1.0) is cond
    lp_c, lp_u = torch.log_softmax(cond, -1), torch.log_softmax(uncond, -1)
    torch.testing.assert_close(guide(cond, uncond, 0.0), lp_u)  # scale 0: the unconditioned model
    torch.testing.assert_close(guide(cond, uncond, 3.0), lp_u + 3.0 * (lp_c - lp_u))


@pytest.mark.parametrize("elements, formulas", [
    (None, [None, None, None, None]),
    (["Li", "Fe", "P", "O", "Na", "Cl"], ["NaCl", None, "LiFePO4", "FeO"]),  # constrained rows between free ones
])
def test_guided_fast_path_equals_transformers_guidance(random_gen, elements, formulas):
    """The fast path's twins in one batch give the tokens of transformers' own guidance processor."""
    gen = random_gen
    t = gen.template
    prompts = [t.generation_prompt({"formula": "NaCl"}), t.generation_prompt({"spacegroup": 225}),
               t.generation_prompt({"formula": "LiFePO4", "band_gap": 1.5}), t.generation_prompt({"formula": "FeO"})]
    grammar = gen.grammar(elements, max_atoms=8)
    limit = gen.max_new_tokens(8)
    guided = dict(guidance_scale=3.0, unconditional_prompt=t.generation_prompt({}))
    fast, fast_end = fast_sample(gen.model, gen.tokenizer, prompts, grammar.processor(formulas),
                                 max_new_tokens=limit, compact_fraction=0.01, **guided)
    plain, plain_end = plain_sample(gen.model, gen.tokenizer, prompts, grammar.processor(formulas),
                                    max_new_tokens=limit, **guided)
    assert fast == plain and fast_end == plain_end
    assert all(fast_end)
    for ids, formula in zip(fast, formulas):
        assert grammar.accepts(gen.tokenizer.decode(ids), formula=formula)
    unguided, _ = fast_sample(gen.model, gen.tokenizer, prompts, grammar.processor(formulas), max_new_tokens=limit)
    assert unguided != fast, "guidance changed nothing: the twins are not in play"


@pytest.mark.filterwarnings("ignore:.*no usable sample")  # T = 1 on a tiny model: some give up
@pytest.mark.parametrize("fast", [True, False])
def test_scale_one_generates_exactly_the_unguided_crystals(crystal_model, fast):
    gen = CrystalGenerator.from_pretrained(crystal_model, device="cpu")
    kwargs = dict(formula=["NaCl", "KCl"], seed=3, temperature=1.0, max_atoms=4, fast=fast)
    plain = gen.generate(4, **kwargs)
    one = gen.generate(4, guidance_scale=1.0, **kwargs)
    two = gen.generate(4, guidance_scale=2.0, **kwargs)
    text = [a.info["generated_text"] for a in plain]
    assert text and text == [a.info["generated_text"] for a in one]
    assert text != [a.info["generated_text"] for a in two]
    assert {a.info["guidance_scale"] for a in one} == {1.0} and {a.info["guidance_scale"] for a in two} == {2.0}


def test_guided_rows_keep_the_formula_constraint_and_the_guards(crystal_model):
    gen = CrystalGenerator.from_pretrained(crystal_model, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some crystals may give up: the test is about those returned
        out = gen.generate(6, formula=["NaCl", "MgO"], guidance_scale=2.0, seed=0, max_atoms=8)
    assert len(out) >= 2  # not vacuous; how many of six the over-fitted model returns depends on its seed
    for atoms in out:
        assert atoms.info["formula_constrained"] and atoms.info["guidance_scale"] == 2.0
        assert reduced(atoms.get_chemical_formula()) == atoms.info["condition_formula"]
        d = atoms.get_all_distances(mic=True)
        assert len(atoms) == 1 or d[np.triu_indices(len(atoms), 1)].min() >= 0.5


def test_card_default_per_condition_kind(random_gen):
    gen = CrystalGenerator(random_gen.model, random_gen.tokenizer, card={"sampling": {
        "temperature": 1.0, "top_p": 1.0, "guidance_scale": {"spacegroup": 2.0, "formula": 1.5}}})
    assert gen._guidance_default([{"formula": "NaCl", "spacegroup": 225}]) == 1.5  # formula first
    assert gen._guidance_default([{"spacegroup": 225}]) == 2.0
    assert gen._guidance_default([{"band_gap": 1.0}]) == 1.0
    with pytest.warns(UserWarning):
        out = gen.generate(2, spacegroup=225, seed=0, max_atoms=3, max_attempts=1)
        free = gen.generate(2, seed=0, max_atoms=3, max_attempts=1)
    assert all(a.info["guidance_scale"] == 2.0 for a in out)
    assert all("guidance_scale" not in a.info for a in free)  # nothing to guide


def test_the_unconditioned_prompt_is_one_training_writes(random_gen):
    """Guidance's twin prompt must be one the model learned: training drops every condition for some crystals."""
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.info.update({"pretty_formula": "NaCl", "spacegroup_number": 225, "band_gap": 5.0})
    prompts = [make_example(atoms, random_gen.template, index=i, infill_fraction=0.0) for i in range(200)]
    assert {p.task for p in prompts} == {GENERATION}
    unconditioned = sum(p.prompt == random_gen.template.generation_prompt({}) for p in prompts)
    assert 20 <= unconditioned <= 70  # one in five


def test_cli_guidance_scale(crystal_model, tmp_path):
    out = tmp_path / "g.extxyz"
    assert cli.main(["generate", "-n", "2", "--model", crystal_model, "-o", str(out), "--seed", "0",
                     "--formula", "NaCl", "--guidance-scale", "2", "--max-atoms", "4"]) == 0
    assert [a.info["guidance_scale"] for a in ase.io.read(out, ":")] == [2.0, 2.0]
    record = json.loads((tmp_path / "g.extxyz.run.json").read_text())["runs"][0]
    assert record["settings"]["guidance_scale"] == 2.0


def test_cli_refuses_a_negative_scale(crystal_model, tmp_path, capsys):
    assert cli.main(["generate", "-n", "1", "--model", crystal_model, "-o", str(tmp_path / "x.extxyz"),
                     "--guidance-scale", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--guidance-scale" in err[-1] and "Traceback" not in "".join(err)
