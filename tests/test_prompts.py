"""Prompts of the multitask curriculum: exact wording, condition sampling, task mix."""

from collections import Counter

import numpy as np
import pytest
from ase.build import bulk

from ase_crystal_llm.text.format import MASK, text_to_atoms
from ase_crystal_llm.text.prompts import (
    CONDITION_KEYS,
    GENERATION,
    INFILL,
    PromptTemplate,
    conditions_from_info,
    example_rng,
    format_number,
    make_example,
)

ALL_INFO = {
    "pretty_formula": "NaCl",
    "formation_energy_per_atom": -2.123456,
    "band_gap": 5.0,
    "e_above_hull": 0.01234567,
    "spacegroup_number": 225,
}


@pytest.fixture
def nacl():
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.info.update(ALL_INFO)
    return atoms


def test_generation_prompt_wording():
    t = PromptTemplate()
    assert t.generation_prompt() == (
        "Below is a description of a bulk material. "
        "Generate a description of the lengths and angles of the lattice vectors and then the "
        "element type and coordinates for each atom within the lattice:\n"
    )
    conditions = {"spacegroup": 225, "band_gap": 5.0, "formula": "NaCl", "e_above_hull": 0.0123456,
                  "formation_energy": -2.123456}  # fmt: skip
    assert t.generation_prompt(conditions) == (
        "Below is a description of a bulk material. The chemical formula is NaCl. "
        "The formation energy per atom is -2.1235. The band gap is 5.0. "
        "The energy above the convex hull is 0.0123. The spacegroup number is 225. "
        "Generate a description of the lengths and angles of the lattice vectors and then the "
        "element type and coordinates for each atom within the lattice:\n"
    )


def test_infill_prompt_wording():
    t = PromptTemplate()
    masked = "4.0 4.0 4.0\n60 60 60\n[MASK]\n0.00 0.00 0.00\nCl\n0.50 0.50 0.50"
    assert t.infill_prompt(masked) == (
        'Below is a partial description of a bulk material where one element has been replaced '
        'with the string "[MASK]":\n' + masked
        + "\nGenerate an element that could replace [MASK] in the bulk material:\n"
    )
    with pytest.raises(ValueError, match="MASK"):
        t.infill_prompt("4.0 4.0 4.0\n60 60 60\nNa\n0.00 0.00 0.00")


def test_condition_values_and_errors():
    t = PromptTemplate()
    assert format_number(-0.00001) == "0.0"  # no "-0.0"
    assert format_number(1e-4) == "0.0001"  # no scientific notation
    assert format_number(2) == "2.0"
    assert t.condition_text({"band_gap": float("nan"), "formula": None}) == ""
    with pytest.raises(ValueError, match="unknown condition"):
        t.condition_text({"bandgap": 1.0})
    with pytest.raises(ValueError, match="space group"):
        t.condition_text({"spacegroup": 231})


def test_conditions_from_info_skips_missing():
    info = {**ALL_INFO, "e_above_hull": float("nan"), "band_gap": None, "material_id": "mp-1"}
    assert conditions_from_info(info) == {"formula": "NaCl", "formation_energy": -2.123456, "spacegroup": 225}


def test_template_round_trip():
    t = PromptTemplate()
    assert PromptTemplate.from_dict(t.to_dict()) == t
    custom = PromptTemplate(preamble="Crystal. ")
    assert PromptTemplate.from_dict(custom.to_dict()).generation_prompt().startswith("Crystal. ")
    with pytest.raises(ValueError, match="unknown prompt template"):
        PromptTemplate.from_dict({**t.to_dict(), "code": "import os"})


def test_sample_conditions_statistics():
    t = PromptTemplate()
    rng = np.random.default_rng(0)
    n = 10_000
    sizes, pairs = Counter(), Counter()
    for _ in range(n):
        chosen = t.sample_conditions(ALL_INFO, rng)
        keys = list(chosen)
        sizes[len(keys)] += 1
        # fixed order; formula first whenever anything is written
        assert keys == [k for k in CONDITION_KEYS if k in chosen]
        assert not keys or keys[0] == "formula"
        if len(keys) == 2:
            pairs[keys[1]] += 1
    # k uniform on 0..4 (formula + k-1 others): each count within 5 sigma of n/5
    sigma = np.sqrt(n * 0.2 * 0.8)
    for k in range(5):
        assert abs(sizes[k] - n / 5) < 5 * sigma, sizes
    # the k-1 others are drawn uniformly from the four present
    assert set(pairs) == set(CONDITION_KEYS[1:])
    m = sum(pairs.values())
    for key in CONDITION_KEYS[1:]:
        assert abs(pairs[key] - m / 4) < 5 * np.sqrt(m * 0.25 * 0.75)


def test_max_conditions_five_writes_every_condition_sometimes():
    rng = np.random.default_rng(2)
    sizes = {n: Counter(len(PromptTemplate(max_conditions=n).sample_conditions(ALL_INFO, rng)) for _ in range(6000))
             for n in (4, 5)}  # fmt: skip
    assert max(sizes[4]) == 4 and sizes[5][5] > 0
    for k in range(6):  # uniform on 0..5
        assert abs(sizes[5][k] / 6000 - 1 / 6) < 0.03, sizes[5]
    for bad in (0, 6):
        with pytest.raises(ValueError, match="max_conditions"):
            PromptTemplate(max_conditions=bad)


def test_template_of_earlier_cards_keeps_its_dict():
    # Cards and resume fingerprints written before max_conditions existed must compare equal.
    assert "max_conditions" not in PromptTemplate().to_dict()
    five = PromptTemplate(max_conditions=5)
    assert five.to_dict()["max_conditions"] == 5
    assert PromptTemplate.from_dict(five.to_dict()) == five


def test_spacegroup_sentence_can_name_symbol_and_system():
    t = PromptTemplate(sentences={"spacegroup": "The space group is {symbol} (number {}, {system}). "})
    assert t.condition_text({"spacegroup": 194}) == "The space group is P6_3/mmc (number 194, hexagonal). "
    assert t.condition_text({"spacegroup": "Fm-3m"}) == "The space group is Fm-3m (number 225, cubic). "
    # the other sentences keep the paper's wording
    assert t.condition_text({"formula": "NaCl"}) == "The chemical formula is NaCl. "
    with pytest.raises(ValueError, match="placeholder"):
        PromptTemplate(sentences={"band_gap": "The band gap is {gap}. "})
    with pytest.raises(ValueError, match="unknown condition"):
        PromptTemplate(sentences={"bandgap": "{}"})


def test_template_from_json_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('{"max_conditions": 5, "sentences": {"spacegroup": "Group {symbol}. "}}')
    t = PromptTemplate.from_json_file(path)
    assert t.max_conditions == 5 and t.condition_text({"spacegroup": 225}) == "Group Fm-3m. "
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        PromptTemplate.from_json_file(path)


def test_sample_conditions_never_writes_missing():
    t = PromptTemplate()
    rng = np.random.default_rng(1)
    info = {"pretty_formula": "NaCl", "band_gap": 1.5, "e_above_hull": float("nan")}
    sizes = Counter()
    for _ in range(2000):
        chosen = t.sample_conditions(info, rng)
        assert set(chosen) <= {"formula", "band_gap"}
        sizes[len(chosen)] += 1
    # k = 0 -> none, k = 1 -> formula, k >= 2 -> formula + band gap
    assert abs(sizes[0] / 2000 - 0.2) < 0.05
    assert abs(sizes[1] / 2000 - 0.2) < 0.05
    assert abs(sizes[2] / 2000 - 0.6) < 0.05
    assert t.sample_conditions({}, rng) == {}


@pytest.mark.slow
def test_task_mix_and_examples(nacl):
    t = PromptTemplate()
    n = 3000
    tasks = Counter()
    for i in range(n):
        ex = make_example(nacl, t, seed=3, epoch=0, index=i)
        tasks[ex.task] += 1
        if ex.task == INFILL:
            assert ex.answer in ("Na", "Cl")
            assert ex.prompt.count(f"\n{MASK}\n") == 1  # one atom of each element in this cell
            assert f"\n{ex.answer}\n" not in ex.prompt  # every atom of that element masked
        else:
            assert ex.prompt.startswith(t.preamble) and ex.prompt.endswith(t.instruction)
            atoms = text_to_atoms(ex.answer)
            assert sorted(atoms.get_chemical_symbols()) == ["Cl", "Na"]
    frac = tasks[INFILL] / n
    assert abs(frac - 1 / 3) < 5 * np.sqrt(1 / 3 * 2 / 3 / n), tasks
    assert set(tasks) == {GENERATION, INFILL}


def test_examples_reproducible_and_fresh_per_epoch(nacl):
    t = PromptTemplate()
    a = make_example(nacl, t, seed=0, epoch=2, index=7)
    assert make_example(nacl, t, seed=0, epoch=2, index=7) == a
    answers = {make_example(nacl, t, seed=0, epoch=e, index=7, infill_fraction=0).answer for e in range(20)}
    assert len(answers) > 15  # a fresh random translation per epoch
    assert example_rng(0, 1, 2).random() == example_rng(0, 1, 2).random()
    assert make_example(nacl, t, seed=0, epoch=0, index=0, infill_fraction=1).task == INFILL
