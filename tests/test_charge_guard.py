"""The charge guard holds a crystal's end until its composition is charge balanced."""

import pytest
import torch

from ase_crystal_llm.chemistry.validity import composition_valid, counts_valid
from ase_crystal_llm.generation.constraints import EXTRA_ATOMS, CrystalGrammar, RowComposition
from ase_crystal_llm.text.prompts import PromptTemplate
from ase_crystal_llm.text.tokenizer import tokenizer_for_template

LATTICE = "5.0 5.0 5.0\n90 90 90\n"
SITES = ["0.00 0.00 0.00", "0.50 0.50 0.50", "0.25 0.25 0.25", "0.75 0.75 0.75", "0.50 0.00 0.00",
         "0.00 0.50 0.00", "0.00 0.00 0.50", "0.50 0.50 0.00", "0.50 0.00 0.50", "0.00 0.50 0.50",
         "0.25 0.75 0.25", "0.75 0.25 0.75"]


def crystal_text(symbols):
    return LATTICE + "\n".join(f"{s}\n{xyz}" for s, xyz in zip(symbols, SITES))


@pytest.fixture(scope="module")
def tok():
    return tokenizer_for_template(PromptTemplate())


@pytest.mark.parametrize("counts, valid", [({"Na": 1, "Cl": 1}, True), ({"Cs": 1, "F": 2}, False),
                                           ({"Fe": 2, "O": 3}, True), ({"Cu": 3, "Zn": 1}, True),
                                           ({"Si": 1}, True), ({}, False), ({"Na": 0, "Cl": 1}, True)])
def test_counts_valid_is_compositional_validity(counts, valid):
    from ase import Atoms

    assert counts_valid(counts) is valid
    symbols = [el for el, n in counts.items() for _ in range(n)]
    if symbols:
        assert composition_valid(Atoms(symbols, cell=[6, 6, 6], pbc=True)) is valid


def test_row_composition_reads_symbol_lines_only():
    row = RowComposition()
    text = crystal_text(["Cs", "F", "F"])
    for i in range(0, len(text), 3):  # in arbitrary pieces
        row.feed(text[i:i + 3])
    assert row.counts == {"Cs": 1, "F": 2}
    assert row.holds_end(3)
    row.feed("\nCs\n")
    assert row.counts == {"Cs": 2, "F": 2}
    assert not row.holds_end(4)


def test_a_row_is_held_for_at_most_extra_atoms():
    row = RowComposition()
    row.feed(crystal_text(["Cs", "F", "F"]))
    assert row.holds_end(3)
    assert row.holds_end(3 + EXTRA_ATOMS - 1)
    assert not row.holds_end(3 + EXTRA_ATOMS)  # a composition that cannot balance must not grow forever


def _masked(tok, texts, formulas=None, charge_guard=True, max_atoms=8):
    """The masked scores after feeding ``texts`` (of equal token length) row by row."""
    proc = CrystalGrammar(tok, max_atoms=max_atoms).processor(formulas, charge_guard=charge_guard)
    rows = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert len({len(r) for r in rows}) == 1
    proc.reset(len(rows))
    for tokens in zip(*rows):
        proc.advance(list(tokens))
    return proc.mask(torch.zeros(len(rows), len(tok))), proc


def test_processor_refuses_the_end_of_an_unbalanced_row_only(tok):
    eos = tok.eos_token_id
    masked, _ = _masked(tok, [crystal_text(["Cs", "F", "F"])])
    assert torch.isinf(masked[0, eos])  # CsF2: write another atom first
    assert torch.isfinite(masked[0]).any()
    masked, _ = _masked(tok, [crystal_text(["Cs", "F", "F"])], charge_guard=False)
    assert torch.isfinite(masked[0, eos])  # the model alone may end there
    masked, _ = _masked(tok, [crystal_text(["Cs", "F"])])
    assert torch.isfinite(masked[0, eos])  # CsF is balanced


def test_rows_keep_their_counts_through_compaction(tok):
    masked, proc = _masked(tok, [crystal_text(["Cs", "F", "F"]), crystal_text(["Na", "Cl", "K"])])
    proc.select([1])
    assert proc.charge[0].counts == {"Na": 1, "Cl": 1, "K": 1}
    assert counts_valid({"Na": 1, "Cl": 1, "K": 1}) is False
    assert torch.isinf(proc.mask(torch.zeros(1, len(tok)))[0, tok.eos_token_id])


def test_a_full_row_may_end_anyway(tok):
    """At max_atoms only end-of-sequence is left: the guard never leaves a row without a token."""
    masked, _ = _masked(tok, [crystal_text(["Cs", "F", "F"]) + "\n"], max_atoms=3)
    assert torch.isfinite(masked[0, tok.eos_token_id])


def test_formula_rows_are_not_held(tok):
    proc = CrystalGrammar(tok, max_atoms=8).processor(["CsF2", None], charge_guard=True)
    proc.reset(2)
    assert proc.charge[0] is None and proc.charge[1] is not None
