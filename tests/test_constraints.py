"""The crystal grammar: character state machine, per-token masks, three kinds of tokenizer.

* the project's tokenizer (one token per digit and per element symbol);
* a byte-level BPE (GPT-2 style: tokens carry a leading space, merge digits);
* a SentencePiece-style BPE (Metaspace: "▁" prefix, pieces spanning newlines).

The BPE tokenizers are trained here with the ``tokenizers`` library (no hub).
"""

import numpy as np
import pytest
import torch
from ase.build import bulk
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ase_crystal_llm.constraints import DONE, START, CrystalGrammar, can_end, token_strings
from ase_crystal_llm.prompts import PromptTemplate
from ase_crystal_llm.text import CrystalTextError, atoms_to_text, text_to_atoms
from ase_crystal_llm.tokenizer import tokenizer_for_template

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def crystals():
    rng = np.random.default_rng(0)
    out = [
        bulk("NaCl", "rocksalt", a=5.64),
        bulk("Si", "diamond", a=5.43),
        bulk("Fe", "bcc", a=2.87, cubic=True),
        bulk("ZnO", "wurtzite", a=3.25, c=5.2),
        bulk("MgO", "rocksalt", a=4.2, cubic=True),
        bulk("Cu", "fcc", a=3.6, cubic=True),
    ]
    return [atoms_to_text(a, translate=True, rng=rng) for a in out]


def corpus():
    template = PromptTemplate()
    texts = crystals()
    # A fake element that BPE learns as one token (the paper's models invent "Ln").
    fakes = [t.replace("Na", "Ln") for t in texts] * 20
    return [template.generation_prompt({"formula": "NaCl"}) + t for t in texts * 20] + fakes


def _wrap(tok):
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def byte_level_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return _wrap(tok)


def sentencepiece_bpe():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL)
    tok.train_from_iterator(corpus(), trainer)
    return _wrap(tok)


TOKENIZERS = {
    "project": lambda: tokenizer_for_template(PromptTemplate()),
    "bpe": byte_level_bpe,
    "sentencepiece": sentencepiece_bpe,
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def walk(grammar, tokenizer, text):
    """Feed the tokens of ``text`` through a processor, checking each is allowed when emitted."""
    proc = grammar.processor()
    proc.reset(1)
    for token in tokenizer.encode(text, add_special_tokens=False):
        mask = grammar.allowed(proc.states[0], proc.n_atoms[0])
        assert mask[token], f"{tokenizer.convert_ids_to_tokens([token])} refused in state {proc.states[0]}"
        proc.advance([token])
    return proc


def test_token_strings_read_inside_text(tokenizer):
    strings = token_strings(tokenizer)
    ids = tokenizer.encode(crystals()[0], add_special_tokens=False)
    assert "".join(strings[i] for i in ids).strip() == crystals()[0]
    assert strings[tokenizer.eos_token_id] == ""


def test_real_crystals_are_accepted_token_by_token(tokenizer):
    grammar = CrystalGrammar(tokenizer, max_atoms=20)
    for text in crystals():
        proc = walk(grammar, tokenizer, text)
        assert grammar.allowed(proc.states[0], proc.n_atoms[0])[tokenizer.eos_token_id]


def test_tokenizers_exercise_the_character_machine():
    # The BPE vocabularies really have multi-character tokens across separators.
    bpe = token_strings(byte_level_bpe())
    assert any(s.startswith(" ") and s[1:].isdigit() for s in bpe)
    sp = token_strings(sentencepiece_bpe())
    assert any("\n" in s and len(s) > 1 for s in sp)


def test_fake_symbol_token_is_masked():
    tok = byte_level_bpe()
    fake = [i for i, s in enumerate(token_strings(tok)) if s.strip() == "Ln"]
    assert fake, "the BPE corpus should make 'Ln' one token"
    grammar = CrystalGrammar(tok, max_atoms=10)
    state = ("sym", "")
    mask = grammar.allowed(state, 1)
    assert not mask[fake].any()
    na = [i for i, s in enumerate(token_strings(tok)) if s == "Na"]
    assert na and mask[na].all()  # a real symbol token is allowed
    assert mask[tok.convert_tokens_to_ids("L")]  # "L" may still become "Li"
    assert not grammar.accepts(crystals()[0].replace("Na", "Ln"))


def test_project_tokenizer_blocks_fake_symbols_by_characters():
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok)
    ell = tok.convert_tokens_to_ids("L")
    n = tok.convert_tokens_to_ids("n")
    after_l = grammar.advance(("sym", ""), 1, ell)[0]
    assert after_l == ("sym", "L")
    mask = grammar.allowed(after_l, 1)
    assert not mask[n]  # "Ln" is no element
    assert mask[tok.convert_tokens_to_ids("i")]  # "Li" is


def test_end_of_sequence_only_after_complete_atom(tokenizer):
    grammar = CrystalGrammar(tokenizer, max_atoms=10)
    eos = tokenizer.eos_token_id
    text = crystals()[0]
    lines = text.split("\n")
    for prefix, ok in [("", False), (lines[0] + "\n", False), ("\n".join(lines[:2]) + "\n", False),
                       ("\n".join(lines[:3]), False), ("\n".join(lines[:4])[:-1], True),
                       ("\n".join(lines[:4]) + "\n", True), ("\n".join(lines[:4])[:-2], False)]:
        state, n_atoms = grammar.run(START, 0, prefix)
        assert bool(grammar.allowed(state, n_atoms)[eos]) == ok, repr(prefix)


def test_elements_restrict_symbols(tokenizer):
    grammar = CrystalGrammar(tokenizer, elements=["Li", "O"], max_atoms=10)
    assert grammar.accepts("5.0 5.0 5.0\n90 90 90\nLi\n0.00 0.00 0.00\nO\n0.50 0.50 0.50")
    assert not grammar.accepts("5.0 5.0 5.0\n90 90 90\nLi\n0.00 0.00 0.00\nNa\n0.50 0.50 0.50")
    strings = token_strings(tokenizer)
    mask = grammar.allowed(("sym", ""), 1)
    for i in np.flatnonzero(mask.numpy()):
        if i in grammar.eos_ids:
            continue
        head = strings[i].split("\n")[0]
        assert any(e.startswith(head) for e in ("Li", "O")), repr(strings[i])


def test_bad_elements_argument():
    tok = tokenizer_for_template(PromptTemplate())
    with pytest.raises(ValueError, match="unknown element"):
        CrystalGrammar(tok, elements=["Ln"])
    with pytest.raises(ValueError, match="at least one"):
        CrystalGrammar(tok, elements=[])


def test_max_atoms_forces_the_end():
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=2)
    text = "5.0 5.0 5.0\n90 90 90\nLi\n0.00 0.00 0.00\nO\n0.50 0.50 0.50\n"
    state, n_atoms = grammar.run(START, 0, text)
    allowed = np.flatnonzero(grammar.allowed(state, n_atoms).numpy())
    assert set(allowed) == set(grammar.eos_ids)


def test_number_positions_admit_only_digits_and_separators(tokenizer):
    grammar = CrystalGrammar(tokenizer)
    strings = token_strings(tokenizer)
    for state in [START, ("num", "lengths", 1, False, 1), ("num", "angles", 2, False, 0),
                  ("num", "coords", 0, True, 1)]:
        for i in np.flatnonzero(grammar.allowed(state, 1).numpy()):
            s = strings[i]
            if i in grammar.eos_ids:
                continue
            first_line = s.split("\n")[0]
            assert set(first_line) <= set("0123456789. "), (state, repr(s))


def test_random_walks_only_fail_for_physical_reasons():
    """Whatever the grammar lets through parses, or fails only on the cell's geometry."""
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=6)
    strings = token_strings(tok)
    rng = np.random.default_rng(1)
    parsed = 0  # most random walks draw impossible angles; the point is *why* they fail
    for _ in range(150):
        state, n_atoms, text = START, 0, ""
        while state != DONE:
            choices = np.flatnonzero(grammar.allowed(state, n_atoms).numpy())
            token = int(rng.choice(choices))
            state, n_atoms = grammar.advance(state, n_atoms, token)
            text += strings[token]
        try:
            atoms = text_to_atoms(text)
        except CrystalTextError as err:
            assert any(k in str(err) for k in ("degenerate cell", "impossible lattice angles", "absurd cell")), err
            continue
        parsed += 1
        assert 1 <= len(atoms) <= 6


def test_processor_masks_per_row_and_drops_rows():
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=4)
    proc = grammar.processor()
    proc.reset(2)
    digit = tok.convert_tokens_to_ids("5")
    proc.advance([digit, tok.eos_token_id])  # the second row emitted EOS (a forced end)
    scores = torch.zeros(2, len(tok) + 3)  # logits may be wider than the tokenizer
    masked = proc.mask(scores)
    assert torch.isinf(masked[0, len(tok):]).all()
    assert masked[0, tok.convert_tokens_to_ids(".")] == 0
    assert proc.finished == [False, True]
    assert torch.isfinite(masked[1]).sum() == 1  # a finished row may only repeat EOS
    proc.select([0])
    assert proc.states == [("num", "lengths", 0, False, 1)]


def test_can_end_needs_an_atom():
    assert not can_end(("sym", ""), 0)
    assert can_end(("sym", ""), 1)


def test_mp20_texts_are_accepted(mp20_test_sample):
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=30)
    for atoms in mp20_test_sample[:100]:
        text = atoms_to_text(atoms)
        assert grammar.accepts(text), text
    walk(grammar, tok, atoms_to_text(mp20_test_sample[0]))
