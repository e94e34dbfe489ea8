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

from ase_crystal_llm.generation.constraints import DONE, START, CrystalGrammar, can_end, reads_symbol, token_strings
from ase_crystal_llm.text.format import CrystalTextError, atoms_to_text, text_to_atoms
from ase_crystal_llm.text.prompts import PromptTemplate
from ase_crystal_llm.text.tokenizer import tokenizer_for_template

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


CELL = "5.0 5.0 5.0\n90 90 90\n"  # a sensible cell: what follows it is the atoms alone
GEOMETRY = ("degenerate cell", "impossible lattice angles", "absurd cell")


def random_walk(grammar, strings, rng, prefix=""):
    """Uniformly random allowed tokens after ``prefix`` (run through the grammar) until the grammar ends."""
    state, n_atoms = grammar.run(START, 0, prefix)
    text = prefix
    while state != DONE:
        choices = np.flatnonzero(grammar.allowed(state, n_atoms).numpy())
        token = int(rng.choice(choices))
        state, n_atoms = grammar.advance(state, n_atoms, token)
        text += strings[token]
    return text


def test_random_walks_only_fail_for_physical_reasons():
    """Whatever the grammar lets through parses, or fails only on the cell's geometry."""
    from collections import Counter

    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=6)
    strings = token_strings(tok)
    rng = np.random.default_rng(1)
    failures = Counter()  # random digits almost never make three angles that close a cell
    for _ in range(150):
        text = random_walk(grammar, strings, rng)
        try:
            atoms = text_to_atoms(text)
        except CrystalTextError as err:
            reasons = [k for k in GEOMETRY if k in str(err)]
            assert reasons, err
            failures[reasons[0]] += 1
            continue
        assert 1 <= len(atoms) <= 6
    assert failures["impossible lattice angles"] and failures["degenerate cell"]
    # After a sensible cell every walk is a crystal: the atom lines the grammar allows always parse.
    sizes, symbols = Counter(), set()
    rng = np.random.default_rng(2)
    for _ in range(50):
        atoms = text_to_atoms(random_walk(grammar, strings, rng, prefix=CELL))
        assert atoms.pbc.all() and 1 <= len(atoms) <= 6
        sizes[len(atoms)] += 1
        symbols |= set(atoms.get_chemical_symbols())
    assert sizes[1] and sizes[6]  # walks ended at once and were stopped by max_atoms
    assert len(symbols) > 20  # the symbol lines reached many elements


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


# -- formula targets ----------------------------------------------------------------


def lines(*symbols):
    """A crystal text with one atom per symbol (geometry irrelevant to the grammar)."""
    return "5.0 5.0 5.0\n90 90 90\n" + "\n".join(f"{s}\n0.00 0.50 0.25" for s in symbols)


def symbol_counts(text):
    """Element counts of the symbol lines of a crystal text."""
    from collections import Counter

    rows = text.strip().split("\n")[2:]
    return Counter(rows[0::2])


@pytest.mark.parametrize("symbols, complete, partial", [
    (("Na", "Cl"), True, True),
    (("Cl", "Na"), True, True),
    (("Na", "Cl", "Cl", "Na"), True, True),        # Z = 2
    (("Na", "Cl") * 4, True, True),                 # Z = 4 = max_atoms // 2
    (("Na",), False, True),                         # may still become NaCl
    (("Na", "Na", "Cl"), False, True),              # may still become Na2Cl2
    (("Na", "Cl", "Na"), False, True),
    (("K", "Cl"), False, False),                    # K is not in the formula
    (("Na",) * 5, False, False),                    # 5 Na: Na5Cl5 exceeds max_atoms=8
])
def test_formula_accepts_whole_multiples_only(tokenizer, symbols, complete, partial):
    grammar = CrystalGrammar(tokenizer, max_atoms=8)
    text = lines(*symbols)
    assert grammar.accepts(text)  # free rows accept any element and any count
    assert grammar.accepts(text, formula="NaCl") == complete
    assert grammar.accepts(text, formula="NaCl", complete=False) == partial


def test_formula_units_are_taken_as_written():
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=12)
    assert grammar.accepts(lines("Ti", "O", "O"), formula="TiO2")
    assert not grammar.accepts(lines("Ti", "O"), formula="TiO2")
    assert not grammar.accepts(lines("Na", "Cl"), formula="Na2Cl2")  # one unit is Na2Cl2
    assert grammar.accepts(lines("Na", "Cl", "Na", "Cl"), formula="Na2Cl2")
    phosphate = lines(*["Ca"] * 3, *["P"] * 2, *["O"] * 8)
    assert CrystalGrammar(tok, max_atoms=13).accepts(phosphate, formula="Ca3(PO4)2")
    with pytest.raises(ValueError, match="13 atoms per formula unit, more than max_atoms=12"):
        grammar.target("Ca3(PO4)2")


def test_formula_masks_symbols_and_end(tokenizer):
    grammar = CrystalGrammar(tokenizer, max_atoms=8)
    target = grammar.target("NaCl")
    strings = token_strings(tokenizer)
    eos = tokenizer.eos_token_id
    state, n_atoms, counts = grammar.run(START, 0, lines("Na") + "\n", target=target)
    assert state == ("sym", "") and counts == (0, 1)  # counts follow target.symbols: ("Cl", "Na")
    mask = grammar.allowed(state, n_atoms, target=target, counts=counts)
    assert not mask[eos]  # NaCl is not complete yet
    heads = {strings[i].split("\n")[0] for i in np.flatnonzero(mask.numpy()) if i != eos}
    assert heads and all(any(e.startswith(h) for e in ("Na", "Cl")) for h in heads), heads
    state, n_atoms, counts = grammar.run(START, 0, lines("Na", "Cl"), target=target)
    assert grammar.allowed(state, n_atoms, target=target, counts=counts)[eos]
    assert grammar.allowed(*grammar.run(START, 0, lines("Na", "Cl")))[eos]  # free row, same text


def test_formula_at_max_units_forces_the_end():
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=5)  # NaCl: k_max = 2
    target = grammar.target("NaCl")
    state, n_atoms, counts = grammar.run(START, 0, lines("Na", "Cl", "Cl", "Na") + "\n", target=target)
    allowed = np.flatnonzero(grammar.allowed(state, n_atoms, target=target, counts=counts).numpy())
    assert set(allowed) == set(grammar.eos_ids)  # a fifth atom is within max_atoms, but no Na3Cl3


# Elements the small test BPE vocabularies can spell (their corpus has no "P", for one).
@pytest.mark.parametrize("formula, max_atoms", [("MgFe2O4", 14), ("Na2O", 9), ("SiO2", 30), ("ZnCl2", 12)])
def test_random_walks_under_a_formula_end_on_whole_units(tokenizer, formula, max_atoms):
    """Whatever a formula row samples, it never gets stuck and ends on k formula units."""
    from ase.formula import Formula

    grammar = CrystalGrammar(tokenizer, max_atoms=max_atoms)
    target = grammar.target(formula)
    unit = Formula(formula).count()
    strings = token_strings(tokenizer)
    rng = np.random.default_rng(2)
    for _ in range(25):
        state, n_atoms, counts, text = START, 0, target.zero, ""
        while state != DONE:
            choices = np.flatnonzero(grammar.allowed(state, n_atoms, target=target, counts=counts).numpy())
            assert len(choices), f"stuck after {text!r}"
            ends = [c for c in choices if c in grammar.eos_ids]
            token = int(ends[0] if ends and rng.random() < 0.5 else rng.choice(choices))  # end early too
            state, n_atoms, counts = grammar.advance(state, n_atoms, token, target=target, counts=counts)
            text += strings[token]
        found = symbol_counts(text)
        z = found[target.symbols[0]] // unit[target.symbols[0]]
        assert z >= 1 and z * sum(unit.values()) <= max_atoms
        assert found == {s: z * c for s, c in unit.items()}, text
        # The atoms a formula row writes parse, under a sensible cell (random cell digits are
        # geometry, see test_random_walks_only_fail_for_physical_reasons), into z formula units.
        atoms = text_to_atoms(CELL + text.strip().split("\n", 2)[2])
        assert len(atoms) == z * sum(unit.values())
        assert Formula(atoms.get_chemical_formula()).reduce()[0] == Formula(formula).reduce()[0], text


def test_processor_rows_carry_their_own_formula():
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, max_atoms=8)
    proc = grammar.processor(["NaCl", None, "KBr"])
    proc.reset(3)
    head = tok.encode(lines("Na") + "\n", add_special_tokens=False)
    for token in head[:-1]:  # the last token is "\n": all rows at a symbol line after one atom
        proc.advance([token] * 3)
    proc.advance([head[-1]] * 3)
    assert proc.finished == [False, False, True]  # Na was forbidden for KBr: that row ended
    masked = proc.mask(torch.zeros(3, len(tok)))
    strings = token_strings(tok)
    allowed = [{strings[i] for i in np.flatnonzero(torch.isfinite(row).numpy())} for row in masked]
    assert {"Na", "Cl", "N", "C"} & allowed[0] and not {"K", "O", "Li"} & allowed[0]
    assert {"K", "O", "Li"} <= allowed[1]
    proc.select([1, 0])
    assert [t and t.formula for t in proc.targets] == [None, "NaCl"] and proc.counts[1] == (0, 1)
    with pytest.raises(ValueError, match="targets for 3 rows, got a batch of 2"):
        grammar.processor(["NaCl", None, "KBr"]).reset(2)


def test_formula_rows_share_masks_away_from_symbol_lines(tokenizer):
    grammar = CrystalGrammar(tokenizer, max_atoms=60)
    target = grammar.target("MgFe2O4")  # k_max = 8
    text = lines("Mg", "Fe", "Fe", "O")
    checked = 0
    for cut in (4, len(text) - 9, len(text) - 6):  # inside the lengths, inside the last coordinates
        state, n_atoms, counts = grammar.run(START, 0, text[:cut], target=target)
        if not any(reads_symbol(state, t, grammar.symbols, grammar.prefixes) for t in grammar.strings):
            checked += 1
            # No token reaches a symbol line from here: the mask cannot depend on the counts.
            assert grammar._key(state, n_atoms, target, counts) == grammar._key(state, n_atoms)
            assert grammar._key(state, n_atoms, target, counts) == grammar._key(state, n_atoms, target, target.zero)
            same = grammar._allowed_numpy(state, n_atoms, target, counts) == grammar._allowed_numpy(state, n_atoms)
            assert same.all()
    assert checked
    state, n_atoms, counts = grammar.run(START, 0, text + "\n", target=target)
    # At a symbol line they do: Mg used up, complete, or neither (counts follow Fe, Mg, O).
    keys = {grammar._key(state, n_atoms, target, c) for c in (counts, (2, 8, 4), (2, 1, 4))}
    assert len(keys) == 3
    # Room beyond what one token can use does not matter.
    assert grammar._key(state, n_atoms, target, (3, 1, 2)) == grammar._key(state, n_atoms, target, counts)
    # Masks are computed once per key, not per step.
    proc = grammar.processor(["MgFe2O4"] * 8)
    proc.reset(8)
    for token in tokenizer.encode(text, add_special_tokens=False):
        proc.mask(torch.zeros(8, grammar.vocab_size))
        proc.advance([token] * 8)
    assert len(grammar._rows["cpu"]) <= len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("formula, elements, message", [
    ("NaCl", ["Na", "O"], "formula 'NaCl' needs Cl, not in elements"),
    ("NaXy", None, "invalid formula"),
    ("Na0Cl", None, "zero count of Na"),
    ("", None, "no elements"),
])
def test_bad_formula_targets(formula, elements, message):
    tok = tokenizer_for_template(PromptTemplate())
    grammar = CrystalGrammar(tok, elements=elements)
    with pytest.raises(ValueError, match=message):
        grammar.processor([formula])



def test_formula_elements_the_tokenizer_cannot_write():
    grammar = CrystalGrammar(sentencepiece_bpe(), max_atoms=14)
    assert not any("P" in t for t in grammar.strings)  # its corpus never has a capital P
    with pytest.raises(ValueError, match="the tokenizer cannot write P"):
        grammar.processor(["LiFePO4"])


def test_formula_rows_never_enter_a_prefix_they_cannot_finish():
    # "N" is a token but "a" is not: "N" could only become "Na" through the token "Na".
    vocab = {t: i for i, t in enumerate(SPECIAL + list("0123456789. \n") + ["N", "Na", "Cl", "C"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok = _wrap(tok)
    grammar = CrystalGrammar(tok, max_atoms=3)  # NaCl: one formula unit
    n, na, cl = (tok.convert_tokens_to_ids(t) for t in ("N", "Na", "Cl"))
    state, n_atoms, counts = grammar.run(START, 0, lines("Cl") + "\n", target=grammar.target("NaCl"))
    mask = grammar.allowed(state, n_atoms, target=grammar.target("NaCl"), counts=counts)
    assert mask[na] and not mask[n] and not mask[cl]
    assert grammar.allowed(state, n_atoms)[n]  # a free row may write nitrogen
