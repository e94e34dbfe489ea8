"""CrystalGenerator: sampling, re-sampling bounds, constraints, info, seeds, the fast path, the CLI.

Models here are tiny random LLaMAs (a few thousand weights).  ``ScriptedLM``
adds a large bias that makes it write a given text after the prompt, so tests
can ask for a model that writes a valid crystal, garbage, or a fake element.
"""

import json
import warnings

import ase.formula
import ase.io
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ase_crystal_llm import cli
from ase_crystal_llm.chemistry.validity import COVALENT_RATIO, structure_valid
from ase_crystal_llm.generation.decoding import (
    CoordinateTemperatureWarper,
    _choose,
    _warpers,
    fast_sample,
    plain_sample,
)
from ase_crystal_llm.generation.generator import CrystalGenerator, condition_sets, failure_reason, seen_in_training
from ase_crystal_llm.generation.workflow import generate_to_file
from ase_crystal_llm.text.format import ELEMENTS, one_line

NACL = "4.0 4.0 4.0\n60 60 60\nNa\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50"


class ScriptedLM(LlamaForCausalLM):
    """A tiny LLaMA pushed to write ``script`` after its prompt (all rows share one prompt)."""

    script = None
    strength = 0.0
    prompt_len = 0

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              **kwargs)
        if self.script is None:
            return out
        steps = out.logits.shape[1]
        if position_ids is None:
            raise AssertionError("the decoding paths must pass position_ids")
        if input_ids.shape[1] > 1:  # prefill: the prompt ends here
            self.prompt_len = int(position_ids[0, -1]) + 1
        pos = position_ids[:, -steps:]
        idx = (pos + 1 - self.prompt_len).clamp(0, len(self.script) - 1)
        bias = F.one_hot(self.script.to(idx.device)[idx], out.logits.shape[-1]).to(out.logits.dtype)
        out.logits = out.logits + self.strength * bias
        return out


def tiny_config(tok, layers=2, hidden=32):
    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_gen(tok):
    torch.manual_seed(0)
    return CrystalGenerator(LlamaForCausalLM(tiny_config(tok)).eval(), tok)


def script_ids(tok, text):
    """Token ids writing ``text`` one character per token (also fake symbols such as "Ln")."""
    return tok.convert_tokens_to_ids(list(text)) + [tok.eos_token_id]


def scripted(tok, text, strength=30.0, seed=0):
    torch.manual_seed(seed)
    model = ScriptedLM(tiny_config(tok)).eval()
    model.script = torch.tensor(script_ids(tok, text))
    model.strength = strength
    return CrystalGenerator(model, tok)


# -- the fast path against model.generate ------------------------------------------------


@pytest.mark.parametrize("elements, formulas, max_atoms", [
    (None, None, 4),
    (["Li", "Fe", "P", "O"], None, 4),
    (None, [None, "NaCl", "LiFePO4", None], 8),              # per-row formula constraint, free rows between
    (["Li", "Fe", "P", "O", "Na", "Cl"], [None, "NaCl", "LiFePO4", "FeO"], 8),
])
def test_fast_path_equals_generate_greedy(random_gen, elements, formulas, max_atoms):
    gen = random_gen
    t = gen.template
    prompts = [t.generation_prompt({}), t.generation_prompt({"formula": "NaCl"}),
               t.generation_prompt({"formula": "LiFePO4", "band_gap": 1.5}), t.generation_prompt({})]
    grammar = gen.grammar(elements, max_atoms=max_atoms)
    limit = gen.max_new_tokens(max_atoms)
    fast, fast_end = fast_sample(gen.model, gen.tokenizer, prompts, grammar.processor(formulas),
                                 max_new_tokens=limit)
    plain, plain_end = plain_sample(gen.model, gen.tokenizer, prompts, grammar.processor(formulas),
                                    max_new_tokens=limit)
    assert fast == plain
    assert fast_end == plain_end
    assert all(fast_end)  # the grammar bounds the length: every row ends with EOS
    for ids, formula in zip(fast, formulas or [None] * len(fast)):
        assert grammar.accepts(gen.tokenizer.decode(ids), formula=formula)


def test_fast_path_drops_finished_rows_without_changing_others(tok):
    # Rows of different lengths: the short ones finish early and are dropped.
    gen = scripted(tok, NACL)
    prompts = [gen.template.generation_prompt({})] * 5
    g = gen.grammar(None, 3)
    a, _ = fast_sample(gen.model, tok, prompts, g.processor(), max_new_tokens=gen.max_new_tokens(3),
                       compact_fraction=0.01)
    b, _ = plain_sample(gen.model, tok, prompts, g.processor(), max_new_tokens=gen.max_new_tokens(3))
    assert a == b
    assert tok.decode(a[0]) == NACL


def test_sampling_from_the_widest_mask_is_the_full_vocabulary_distribution():
    # Six allowed tokens per row in a 1,000-token vocabulary; temperature and nucleus warpers on.
    g = torch.Generator().manual_seed(0)
    scores = torch.full((4, 1000), float("-inf"))
    scores.scatter_(1, torch.randperm(1000, generator=g)[:24].view(4, 6), 2 * torch.randn(4, 6, generator=g))
    warpers = _warpers(0.8, 0.9)

    def frequencies(candidates):
        draws_from = torch.Generator().manual_seed(1)
        draws = torch.stack([_choose(scores.clone(), warpers, draws_from, candidates) for _ in range(3000)])
        return torch.stack([torch.bincount(draws[:, r], minlength=1000) for r in range(4)]) / 3000

    full, narrow = frequencies(None), frequencies(6)
    assert not narrow[scores == float("-inf")].any()
    assert (full > 0).sum() < 24  # the nucleus cut some allowed tokens: the warpers did act
    assert torch.allclose(full, narrow, atol=0.04)


def test_coordinate_temperature_divides_only_rows_inside_coordinates(tok):
    processor = CrystalGenerator(LlamaForCausalLM(tiny_config(tok)).eval(), tok).grammar().processor()
    processor.reset(3)
    processor.states = [("num", "coords", 1, True, 1), ("num", "lengths", 0, False, 0), ("sym", "N")]
    scores = torch.tensor([[1.0, 2.0, float("-inf")], [1.0, 2.0, 3.0], [4.0, 0.0, -2.0]])
    warped = CoordinateTemperatureWarper(processor, 2.0, 0.25)(None, scores)
    assert torch.equal(warped[0], scores[0] / 0.25)  # masked tokens stay masked
    assert torch.equal(warped[1:], scores[1:] / 2.0)
    assert processor.in_coordinates == [True, False, False]
    # The same temperature everywhere: transformers' own warper, exactly as before.
    assert type(_warpers(2.0, 1.0, processor, 2.0)[0]).__name__ == "TemperatureLogitsWarper"
    assert _warpers(0, 1.0, processor, 0.25) == []  # greedy
    with pytest.raises(ValueError, match="grammar"):
        _warpers(1.0, 1.0, None, 0.5)


def test_coordinate_temperature_is_recorded_and_defaults_from_the_card(tok):
    gen = scripted(tok, NACL, strength=4.0)  # weak push: samples vary with the seed
    texts = lambda out: [a.info["generated_text"] for a in out]  # noqa: E731
    kwargs = dict(seed=3, temperature=1.0, top_p=1.0, batch_size=8, max_attempts=3)
    plain = gen.generate(8, **kwargs)
    assert texts(gen.generate(8, coordinate_temperature=1.0, **kwargs)) == texts(plain)
    assert all("coordinate_temperature" not in a.info for a in plain)
    cold = gen.generate(8, coordinate_temperature=0.05, **kwargs)
    assert texts(cold) != texts(plain)
    assert all(a.info["coordinate_temperature"] == 0.05 and a.info["temperature"] == 1.0 for a in cold)
    assert all(gen.grammar().accepts(a.info["generated_text"].replace(" | ", "\n")) for a in cold)
    assert all(a.info["coordinate_temperature"] == 0.05 for a in gen.generate(4, coordinate_temperature=0.05,
                                                                                fast=False, **kwargs))
    gen.card = {"sampling": {"temperature": 1.0, "top_p": 1.0, "coordinate_temperature": 0.3}}
    assert gen.generate(1, seed=0)[0].info["coordinate_temperature"] == 0.3
    # A run that sets the temperature alone draws everything at it.
    assert "coordinate_temperature" not in gen.generate(1, seed=0, temperature=0.8)[0].info
    assert "coordinate_temperature" not in gen.generate(1, seed=0, temperature=0)[0].info  # greedy
    with pytest.raises(ValueError, match="coordinate_temperature must be > 0"):
        gen.generate(1, coordinate_temperature=0)


# -- returned structures ---------------------------------------------------------------------


def test_generate_returns_periodic_atoms_with_info(tok):
    gen = scripted(tok, NACL)
    out = gen.generate(3, formula="NaCl", seed=0, temperature=0.7, top_p=0.9, batch_size=2)
    assert len(out) == 3
    for i, atoms in enumerate(out):
        assert atoms.pbc.all() and len(atoms) == 2
        assert sorted(atoms.get_chemical_symbols()) == ["Cl", "Na"]
        info = atoms.info
        assert info["condition_formula"] == "NaCl"
        assert info["generated_text"] == one_line(NACL) and "\n" not in info["generated_text"]
        assert info["temperature"] == 0.7 and info["top_p"] == 0.9
        assert info["attempts"] == 1 and info["sample_index"] == i and info["seed"] == 0
        assert info["rank"] == 0 and info["run_id"]
        np.testing.assert_allclose(atoms.cell.cellpar(), [4, 4, 4, 60, 60, 60])
    s = gen.stats
    assert s.requested == 3 and s.returned == 3 and s.attempts == 3
    assert s.raw_parse_rate == 1.0 and s.final_parse_rate == 1.0
    assert s.tokens_generated == 3 * len(script_ids(tok, NACL))
    assert s.seconds > 0


def test_card_sampling_defaults_are_used(tok):
    gen = scripted(tok, NACL)
    gen.card = {"sampling": {"temperature": 0.5, "top_p": 0.8}}
    atoms = gen.generate(1, seed=0)[0]
    assert (atoms.info["temperature"], atoms.info["top_p"]) == (0.5, 0.8)
    gen.card = None
    atoms = gen.generate(1, seed=0)[0]
    assert (atoms.info["temperature"], atoms.info["top_p"]) == (0.7, 0.9)


def test_card_sampling_defaults_for_conditioned_runs(tok):
    gen = scripted(tok, NACL)
    gen.card = {"sampling": {"temperature": 1.0, "top_p": 1.0, "conditioned": {"temperature": 0.6, "top_p": 0.8},
                             "formula_constrained": {"temperature": 0.9}}}
    free = gen.generate(1, seed=0)[0]
    assert (free.info["temperature"], free.info["top_p"]) == (1.0, 1.0)
    asked = gen.generate(1, formula="NaCl", constrain_formula=False, seed=0)[0]
    assert (asked.info["temperature"], asked.info["top_p"]) == (0.6, 0.8)
    # every crystal held to a formula: the conditioned entry, then the formula_constrained one over it
    assert gen._sampling_defaults(conditioned=True, formula_constrained=True) == (0.9, 0.8)


def test_garbage_model_stops_after_max_attempts(tok):
    # Always a zero-length cell: parses never succeed; the run must end and report.
    gen = scripted(tok, "0.0 0.0 0.0\n90 90 90\nNa\n0.00 0.00 0.00")
    with pytest.warns(UserWarning, match="no usable sample within max_attempts=3"):
        out = gen.generate(4, seed=0, max_attempts=3, batch_size=3)
    assert out == []
    s = gen.stats
    assert s.attempts == 12 and s.gave_up == 4 and s.returned == 0
    assert s.parse_failures == {"degenerate cell": 12}
    assert s.raw_parse_rate == 0.0 and s.final_parse_rate == 0.0


def test_fake_symbol_impossible_with_constraint(tok):
    text = NACL.replace("Cl", "Ln")
    gen = scripted(tok, text)
    # Unconstrained, the model writes the fake element ...
    ids = tok([gen.template.generation_prompt({})], return_tensors="pt")["input_ids"]
    raw = gen.model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "\nLn\n" in tok.decode(raw[0, ids.shape[1]:], skip_special_tokens=True)
    # ... under the grammar it cannot.
    out = gen.generate(6, seed=1, temperature=1.0, top_p=1.0)
    assert len(out) == 6
    for atoms in out:
        assert "Ln" not in atoms.info["generated_text"]
        assert set(atoms.get_chemical_symbols()) <= set(ELEMENTS)


def test_elements_respected_in_every_sample(tok):
    gen = scripted(tok, NACL)  # pushed towards Na and Cl, which are not allowed
    out = gen.generate(6, elements=["Li", "O"], seed=2, temperature=1.0)
    assert out
    for atoms in out:
        assert set(atoms.get_chemical_symbols()) <= {"Li", "O"}
        assert atoms.info["condition_elements"] == "Li,O"


def test_elements_must_be_real(random_gen):
    with pytest.raises(ValueError, match="unknown element"):
        random_gen.generate(1, elements=["Ln"])


def reduced(formula):
    from pymatgen.core import Composition

    return Composition(formula).reduced_formula


@pytest.mark.slow
def test_formula_constraint_overrides_a_model_that_ignores_the_prompt(tok):
    gen = scripted(tok, NACL)  # writes NaCl whatever the prompt asks for
    free = gen.generate(3, formula="KCl", constrain_formula=False, seed=0)
    assert [a.get_chemical_formula() for a in free] == ["ClNa"] * 3
    assert all(a.info["formula_constrained"] is False for a in free)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pushed off its script, the model may write atoms too close
        held = gen.generate(3, formula="KCl", seed=0, max_attempts=10)
    assert held
    for atoms in held:
        assert reduced(atoms.get_chemical_formula()) == "KCl"
        assert atoms.info["formula_constrained"] is True and atoms.info["condition_formula"] == "KCl"


def test_formula_constraint_gives_the_formula_per_row(tok):
    # A fixed sane lattice, then the random model's own atoms: mixed formulas and a free row.
    gen = scripted(tok, "6.0 6.0 6.0\n90 90 90\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random atoms are sometimes too close
        out = gen.generate(9, formula=["NaCl", "KBr2", None], seed=0, temperature=1.0, top_p=1.0, max_atoms=9,
                           max_attempts=8)
    asked = {"NaCl": 0, "KBr2": 0, None: 0}
    for atoms in out:
        formula = atoms.info.get("condition_formula")
        asked[formula] += 1
        if formula is None:
            assert "formula_constrained" not in atoms.info
            continue
        assert atoms.info["formula_constrained"] is True
        assert reduced(atoms.get_chemical_formula()) == reduced(formula)
        assert len(atoms) % len(ase.formula.Formula(formula)) == 0  # whole formula units
    assert asked["NaCl"] and asked["KBr2"], asked


def test_formula_and_elements_must_agree(random_gen):
    with pytest.raises(ValueError, match="formula 'NaCl' needs Cl, not in elements"):
        random_gen.generate(1, formula="NaCl", elements=["Na", "O"])
    with pytest.raises(ValueError, match="formula 'NaCl' needs Cl"):  # also when not constrained
        random_gen.generate(1, formula="NaCl", elements=["Na", "O"], constrain_formula=False)



def test_formula_within_elements(tok):
    out = scripted(tok, NACL).generate(2, formula="NaCl", elements=["Na", "Cl", "K"], seed=0)
    assert [a.get_chemical_formula() for a in out] == ["ClNa"] * 2
    assert out[0].info["condition_elements"] == "Na,Cl,K" and out[0].info["formula_constrained"] is True


def test_formula_larger_than_max_atoms(random_gen):
    with pytest.raises(ValueError, match="13 atoms per formula unit, more than max_atoms=10"):
        random_gen.generate(1, formula="Ca3(PO4)2", max_atoms=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        random_gen.generate(1, formula="Ca3(PO4)2", max_atoms=10, constrain_formula=False, max_attempts=1)


@pytest.mark.slow
def test_seed_reproducibility_on_cpu(tok):
    gen = scripted(tok, NACL, strength=4.0)  # weak push: samples vary with the seed

    def run(seed):
        out = gen.generate(6, seed=seed, temperature=1.0, top_p=1.0, batch_size=4, max_attempts=2)
        stats = gen.stats.as_dict()
        return [a.info["generated_text"] for a in out], {k: v for k, v in stats.items() if "second" not in k}

    first, again, other = run(5), run(5), run(6)
    assert first == again
    assert first[0] != other[0]


def test_plain_path_same_structures_as_fast_when_greedy(random_gen):
    a = random_gen.generate(3, seed=0, temperature=0, max_atoms=3, max_attempts=1, fast=True)
    b = random_gen.generate(3, seed=0, temperature=0, max_atoms=3, max_attempts=1, fast=False)
    assert [x.info["generated_text"] for x in a] == [x.info["generated_text"] for x in b]


def test_plain_path_same_structures_as_fast_under_formula_constraint(crystal_model):
    gen = CrystalGenerator.from_pretrained(crystal_model, device="cpu")
    kwargs = dict(formula=["NaCl", "KCl", "MgO", None], seed=0, temperature=0, max_atoms=8, max_attempts=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # greedy samples may put atoms on top of each other
        a = gen.generate(8, fast=True, **kwargs)
        b = gen.generate(8, fast=False, **kwargs)
    assert a, "nothing returned: the comparison would be empty"
    assert [x.info["generated_text"] for x in a] == [x.info["generated_text"] for x in b]
    for atoms in a:
        formula = atoms.info.get("condition_formula")
        assert formula is None or reduced(atoms.get_chemical_formula()) == formula


def test_symmetrize_snaps_to_space_group(tok):
    gen = scripted(tok, "4.0 4.0 4.0\n60 60 60\nNa\n0.00 0.00 0.00\nCl\n0.49 0.50 0.51")
    atoms = gen.generate(1, seed=0, symmetrize=0.1)[0]
    assert atoms.info["spacegroup_number"] == 225 and atoms.info["symprec"] == 0.1
    frac = atoms.get_scaled_positions()
    np.testing.assert_allclose(frac[1] - frac[0], [0.5, 0.5, 0.5], atol=1e-6)


# -- conditions -----------------------------------------------------------------------------


def test_condition_lists_cycle_and_share_batches(random_gen):
    sets = condition_sets(5, formula=["NaCl", "KCl"], spacegroup=225)
    assert [s["formula"] for s in sets] == ["NaCl", "KCl", "NaCl", "KCl", "NaCl"]
    assert all(s["spacegroup"] == 225 for s in sets)
    with pytest.raises(ValueError, match="same length"):
        condition_sets(2, formula=["NaCl", "KCl"], band_gap=[1.0])
    out = random_gen.generate(4, formula=["NaCl", "KCl"], seed=0, temperature=0, max_atoms=2, max_attempts=1)
    for atoms in out:
        assert atoms.info["condition_formula"] == ["NaCl", "KCl"][atoms.info["sample_index"] % 2]


def test_unseen_condition_combination_warns(random_gen):
    assert seen_in_training([]) and seen_in_training(["formula", "band_gap"])
    assert not seen_in_training(["spacegroup"])
    assert not seen_in_training(["formula", "formation_energy", "band_gap", "e_above_hull", "spacegroup"])
    assert seen_in_training(["spacegroup"], {"condition_combinations": [["spacegroup"]]})
    with pytest.warns(UserWarning, match="never seen in training"):
        random_gen.generate(1, spacegroup=225, seed=0, max_atoms=2, max_attempts=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"formula": "NaXy"}, "invalid formula"),
    ({"formula": "NaCl", "spacegroup": 231}, "space group"),
    ({"temperature": -1}, "temperature"),
    ({"max_attempts": 0}, "max_attempts"),
])
def test_bad_arguments_are_clear_errors(random_gen, kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_gen.generate(1, **kwargs)


def test_failure_reason_buckets():
    assert failure_reason("line 3: unknown element symbol 'Ln'") == "unknown element symbol"
    assert failure_reason("degenerate cell: volume 0 A^3 is below 0.1 A^3") == "degenerate cell"
    assert failure_reason("impossible lattice angles: [1, 2, 3]") == "impossible lattice angles"


# -- loading ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """A tiny full-weights model directory with a card (what 'crystal-llm train' writes)."""
    from ase_crystal_llm.model.modelcard import ModelCard

    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    card = ModelCard(kind="full", base_model="from-scratch:test", sampling={"temperature": 0.8, "top_p": 0.95})
    card.record_weights(path)
    card.save_pretrained(path)
    return path


def test_from_pretrained_loads_model_dir(model_dir):
    gen = CrystalGenerator.from_pretrained(model_dir, device="cpu")
    assert gen.card.kind == "full" and gen.template.generation_prompt({}).endswith("\n")
    assert gen.model.device.type == "cpu" and len(gen.tokenizer) == gen.model.config.vocab_size
    gen.generate(2, seed=0, max_atoms=2, max_attempts=1)
    assert gen.stats.attempts == 2
    assert gen._sampling_defaults() == (0.8, 0.95)
    assert set(gen.weights_sha256()) == {"model.safetensors"}


def test_from_pretrained_rejects_changed_weights(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    with open(copy / "model.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="sha256"):
        CrystalGenerator.from_pretrained(copy)


def test_default_model_missing_is_clear(monkeypatch, tmp_path):
    from ase_crystal_llm import settings


    monkeypatch.setattr(settings, "DEFAULT_MODEL_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no default model is shipped"):
        CrystalGenerator.from_pretrained()
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        CrystalGenerator.from_pretrained(tmp_path / "missing")


def test_propose_elements_delegates(monkeypatch, random_gen):
    from ase_crystal_llm.generation import infill

    seen = {}

    def fake(gen, atoms, element, candidates=None, temperature=1.0):
        seen.update(gen=gen, element=element, candidates=candidates, temperature=temperature)
        return {"K": 1.0}

    monkeypatch.setattr(infill, "propose_elements", fake)
    assert random_gen.propose_elements("atoms", "Na", candidates=["K"], temperature=0.5) == {"K": 1.0}
    assert seen == {"gen": random_gen, "element": "Na", "candidates": ["K"], "temperature": 0.5}


# -- writing runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["extxyz", "cif", "traj", "db", "crystxt"])
def test_generate_to_file_round_trips(tok, tmp_path, ext):
    gen = scripted(tok, NACL)
    out = tmp_path / f"samples.{ext}"
    summary = generate_to_file(out, 3, generator=gen, seed=0, formula="NaCl", batch_size=2)
    assert summary.startswith(f"wrote 3 crystals to {out}")
    back = ase.io.read(out, ":")
    assert len(back) == 3
    assert all(sorted(a.get_chemical_symbols()) == ["Cl", "Na"] for a in back)
    if ext in ("extxyz", "traj"):  # info read back (.db: key_value_pairs, tested below; cif, crystxt: ids only)
        assert all(a.info["formula_constrained"] is True for a in back), back[0].info
    record = json.loads((tmp_path / f"samples.{ext}.run.json").read_text())["runs"][0]
    assert record["seed"] == 0 and record["status"] == "complete" and record["stats"]["returned"] == 3
    assert record["settings"]["formula"] == "NaCl" and record["package_version"]


def test_db_output_has_valid_key_value_pairs(tok, tmp_path):
    import ase.db

    gen = scripted(tok, NACL)
    out = tmp_path / "s.db"
    generate_to_file(out, 2, generator=gen, seed=0, formula="NaCl", spacegroup=225, symmetrize=0.1)
    db = ase.db.connect(out)
    rows = list(db.select())
    assert len(rows) == 2
    kvp = rows[0].key_value_pairs
    assert kvp["condition_formula"] == "NaCl" and kvp["condition_spacegroup"] == 225
    assert kvp["spacegroup_number"] == 225 and kvp["sample_index"] in (0, 1)
    assert kvp["formula_constrained"] is True
    assert rows[0].data["generated_text"].startswith("4.0 4.0 4.0 | ")
    assert db.metadata["runs"][0]["seed"] == 0
    assert len(list(db.select(condition_formula="NaCl"))) == 2


def test_resume_adds_only_missing_crystals(tok, tmp_path):
    gen = scripted(tok, NACL)
    out = tmp_path / "s.extxyz"
    generate_to_file(out, 2, generator=gen, seed=3)
    # An interrupted run of 5 had written 2: resume finishes it without duplicates.
    record = json.loads((tmp_path / "s.extxyz.run.json").read_text())["runs"][0]
    record["settings"]["n"] = 5
    (tmp_path / "s.extxyz.run.json").write_text(json.dumps({"runs": [record]}))
    summary = generate_to_file(out, 5, generator=gen, resume=True)
    back = ase.io.read(out, ":")
    assert sorted(int(a.info["sample_index"]) for a in back) == [0, 1, 2, 3, 4]
    assert {a.info["run_id"] for a in back} == {record["run_id"]}
    assert "wrote 5 crystals" in summary
    with pytest.raises(ValueError, match="different settings"):
        generate_to_file(out, 5, generator=gen, resume=True, formula="NaCl")


def test_interrupted_run_keeps_finished_structures(tok, tmp_path, monkeypatch):
    gen = scripted(tok, NACL)
    out = tmp_path / "s.extxyz"
    original = gen.iter_generate

    def interrupted(*args, **kwargs):
        for k, atoms in enumerate(original(*args, **kwargs)):
            if k == 3:
                raise KeyboardInterrupt
            yield atoms

    monkeypatch.setattr(gen, "iter_generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_to_file(out, 6, generator=gen, seed=0, batch_size=2)
    assert len(ase.io.read(out, ":")) == 3
    record = json.loads((tmp_path / "s.extxyz.run.json").read_text())["runs"][0]
    assert record["status"] == "interrupted"


def test_cli_generate(model_dir, tmp_path, capsys):
    out = tmp_path / "cli.extxyz"
    code = cli.main(["generate", "-n", "2", "--model", str(model_dir), "-o", str(out), "--seed", "1",
                     "--max-atoms", "2", "--max-attempts", "1", "--elements", "Na,Cl"])
    assert code == 0
    err = capsys.readouterr().err
    assert "parse failures" in err and "crystals/s" in err
    record = json.loads((tmp_path / "cli.extxyz.run.json").read_text())["runs"][0]
    assert record["model"] == str(model_dir) and record["weights_sha256"]["model.safetensors"]
    assert record["settings"]["elements"] == ["Na", "Cl"] and record["seed"] == 1


@pytest.mark.parametrize("free", [False, True])
def test_cli_generate_formula_constraint(crystal_model, tmp_path, capsys, free):
    out = tmp_path / "kcl.extxyz"
    argv = ["generate", "-n", "3", "--model", crystal_model, "-o", str(out), "--seed", "0", "--formula", "KCl",
            "--temperature", "0", "--max-atoms", "2", "--max-attempts", "3",
            "--covalent-ratio", "0"]  # the test model writes NaCl's cell, too tight for K by covalent radii
    assert cli.main(argv + ["--free-formula"] * free) == 0
    record = json.loads((tmp_path / "kcl.extxyz.run.json").read_text())["runs"][0]
    assert record["settings"]["constrain_formula"] is not free
    back = ase.io.read(out, ":")
    assert back, capsys.readouterr().err
    for atoms in back:
        assert atoms.info["formula_constrained"] is not free and atoms.info["condition_formula"] == "KCl"
        # The model was trained on NaCl, Si, Cu and MgO only: left free, it never writes KCl.
        assert (reduced(atoms.get_chemical_formula()) == "KCl") is not free


@pytest.mark.parametrize("argv, message", [
    (["-n", "2", "-o", "x.mp4"], "unsupported output extension"),
    (["-n", "0", "-o", "x.extxyz"], "argument -n: must be a positive integer"),
    (["-n", "1", "-o", "x.extxyz", "--elements", "Na,Xx"], "unknown element"),
    (["-n", "1", "-o", "x.extxyz", "--formula", "NaCl", "--elements", "Na,O"], "formula 'NaCl' needs Cl"),
    (["-n", "1", "-o", "x.extxyz", "--formula", "Ca3(PO4)2", "--max-atoms", "10"], "more than max_atoms=10"),
])
def test_cli_generate_errors_are_one_line(model_dir, tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["generate", "--model", str(model_dir), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err


def test_no_warning_for_seen_conditions(random_gen):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        random_gen.generate(1, formula="NaCl", band_gap=1.0, seed=0, max_atoms=2, max_attempts=1)
    assert not [w for w in caught if "never seen" in str(w.message)]


# -- a trained model (the shared tiny fixture: trained for 60 steps in the session) ----------------


def test_trained_tiny_model_generates(tiny_model_dir):
    gen = CrystalGenerator.from_pretrained(tiny_model_dir, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = gen.generate(3, seed=0, max_atoms=8, max_attempts=3, batch_size=3)
    s = gen.stats
    assert s.returned == len(out) and s.returned + s.gave_up == 3
    assert s.attempts <= 9 and sum(s.parse_failures.values()) + s.rejected == s.attempts - s.returned
    for atoms in out:
        assert atoms.pbc.all() and 1 <= len(atoms) <= 8
        assert atoms.info["attempts"] <= 3 and atoms.info["generated_text"]
        assert structure_valid(atoms)  # min_distance=0.5 by default: too-close atoms are re-sampled
        assert structure_valid(atoms, covalent_ratio=COVALENT_RATIO)  # and so are pairs closer than 0.6 (r_i + r_j)


def test_the_covalent_floor_is_applied_and_can_be_lifted(crystal_model):
    gen = CrystalGenerator.from_pretrained(crystal_model, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = gen.generate(6, seed=3, max_atoms=8, max_attempts=1, covalent_ratio=None, spacing_guard=False)
        strict = gen.generate(6, seed=3, max_atoms=8, max_attempts=1, covalent_ratio=1.2, spacing_guard=False)
    assert flat and all(structure_valid(a) for a in flat)
    assert all(structure_valid(a, covalent_ratio=1.2) for a in strict)
    # The same draws: what the strict floor keeps, the flat one kept too, and it refused some.
    assert {a.info["sample_index"] for a in strict} < {a.info["sample_index"] for a in flat}
    with pytest.raises(ValueError, match="covalent_ratio"):
        gen.generate(1, covalent_ratio=-0.1)


def test_too_dense_formula_cells_are_resampled_and_counted(crystal_model, monkeypatch):
    from ase_crystal_llm.generation import generator as generation

    gen = CrystalGenerator.from_pretrained(crystal_model, device="cpu")
    judged = []
    monkeypatch.setattr(generation, "too_dense", lambda atoms: judged.append(len(atoms)) or True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Every spaced formula crystal is judged too dense: re-sampled, counted, and given up on.
        assert gen.generate(2, formula="NaCl", seed=0, max_atoms=8, max_attempts=2, batch_size=2) == []
        assert gen.stats.too_dense == len(judged) > 0 and gen.stats.as_dict()["too_dense"] == len(judged)
        judged.clear()
        free = gen.generate(2, seed=0, max_atoms=8, max_attempts=2, batch_size=2)  # free rows: not judged
        gen.generate(2, formula="NaCl", seed=0, max_atoms=8, max_attempts=2, batch_size=2,
                     covalent_ratio=None)  # formula rows unguarded under the flat floor: not judged
    assert judged == [] and free and gen.stats.too_dense == 0


def test_too_close_atoms_are_resampled_and_counted(crystal_model, monkeypatch):
    from ase_crystal_llm.generation import generator as generation

    gen = CrystalGenerator.from_pretrained(crystal_model, device="cpu")
    asked = []
    monkeypatch.setattr(generation, "structure_valid",
                        lambda atoms, min_distance, covalent_ratio: asked.append(min_distance))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Every parsed sample is judged too close: each is re-sampled and counts as an attempt.
        assert gen.generate(2, seed=0, max_atoms=8, max_attempts=2, batch_size=2, min_distance=0.7) == []
        stats = gen.stats
        assert stats.gave_up == 2 and stats.attempts == 4
        assert stats.rejected == len(asked) > 0 and stats.rejected + sum(stats.parse_failures.values()) == 4
        assert set(asked) <= {0.7} and stats.as_dict()["rejected"] == stats.rejected
        asked.clear()
        kept = gen.generate(2, seed=0, max_atoms=8, max_attempts=2, batch_size=2, min_distance=None)
    assert asked == [] and gen.stats.rejected == 0 and len(kept) > 0
    with pytest.raises(ValueError, match="min_distance"):
        gen.generate(1, min_distance=-1.0)


@pytest.mark.parametrize("formulas", [None, [None, "NaCl"]])
def test_trained_tiny_model_fast_equals_generate(tiny_model_dir, formulas):
    gen = CrystalGenerator.from_pretrained(tiny_model_dir, device="cpu")
    prompts = [gen.template.generation_prompt({}), gen.template.generation_prompt({"formula": "NaCl"})]
    grammar = gen.grammar(None, 6)
    limit = gen.max_new_tokens(6)
    a = fast_sample(gen.model, gen.tokenizer, prompts, grammar.processor(formulas), max_new_tokens=limit)
    b = plain_sample(gen.model, gen.tokenizer, prompts, grammar.processor(formulas), max_new_tokens=limit)
    assert a == b
    if formulas:
        assert grammar.accepts(gen.tokenizer.decode(a[0][1]), formula="NaCl")


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_generate_splits_over_processes(model_dir, tmp_path):
    """torchrun (what ``accelerate launch`` runs) with two processes: one output, one record per rank."""
    import os
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    out = tmp_path / "multi.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "-m", "ase_crystal_llm.cli", "generate", "-n", "5", "--model",
           str(model_dir), "-o", str(out), "--seed", "7", "--max-atoms", "2", "--max-attempts", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "parse failures" in done.stderr
    runs = json.loads((tmp_path / "multi.db.run.json").read_text())["runs"]
    assert sorted(r["rank"] for r in runs) == [0, 1] and {r["world_size"] for r in runs} == {2}
    assert sum(r["stats"]["requested"] for r in runs) == 5 and len({r["run_id"] for r in runs}) == 1
    assert not list(tmp_path.glob("multi.part*"))
    assert len(ase.io.read(out, ":")) == sum(r["stats"]["returned"] for r in runs)


@pytest.mark.slow
def test_spacegroup_symbols_and_whole_numbers(random_gen):
    from ase_crystal_llm.text.prompts import spacegroup_number

    assert spacegroup_number("Fm-3m") == 225 and spacegroup_number("P6_3/mmc") == 194 and spacegroup_number("14") == 14
    assert condition_sets(2, spacegroup="Fm-3m") == [{"spacegroup": 225}] * 2
    out = random_gen.generate(1, spacegroup="Fm-3m", seed=0, max_atoms=2, max_attempts=1, min_distance=None)
    assert all(a.info["condition_spacegroup"] == 225 for a in out)
    with pytest.raises(ValueError, match="unknown space group 'Fm3x'.*'Fm-3m'"):
        random_gen.generate(1, spacegroup="Fm3x")
    for bad in (2.5, "3", True):
        with pytest.raises(TypeError, match="whole number"):
            random_gen.generate(bad)
    with pytest.raises(ValueError, match="capital letter: did you mean 'NaCl'"):
        random_gen.generate(1, formula="nacl")
