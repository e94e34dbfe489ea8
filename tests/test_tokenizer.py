"""The from-scratch tokenizer: one token per digit, per element symbol, per prompt word."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from ase_crystal_llm.text.format import ELEMENTS, MASK
from ase_crystal_llm.text.prompts import PromptTemplate
from ase_crystal_llm.text.tokenizer import build_tokenizer, corpus_words, tokenizer_for_template


def pieces(tok, text):
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def test_digits_and_punctuation_are_single_tokens(tok):
    assert pieces(tok, "12.50 0.07") == ["1", "2", ".", "5", "0", " ", "0", ".", "0", "7"]
    assert pieces(tok, "-3.1\n") == ["-", "3", ".", "1", "\n"]


@pytest.mark.parametrize("symbol", ELEMENTS)
def test_every_element_is_one_token_on_a_crystal_line(tok, symbol):
    assert pieces(tok, f"90 90 90\n{symbol}\n0.00") == ["9", "0", " ", "9", "0", " ", "9", "0", "\n", symbol, "\n",
                                                       "0", ".", "0", "0"]  # fmt: skip


def test_prompt_words_stay_whole(tok):
    t = PromptTemplate()
    ids = tok(t.generation_prompt(), add_special_tokens=False)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == "Below"  # not "Be" + "low"
    assert " description" in toks and " Generate" in toks and " lattice" in toks
    assert tok.unk_token_id not in ids
    # prompts are cheap: about one token per word
    assert len(ids) <= len(t.generation_prompt().split()) + 4
    assert pieces(tok, "The Be") == ["The", " ", "Be"]


def test_formula_splits_into_elements(tok):
    assert pieces(tok, "formula is LiFePO4.") == ["formula", " is", " ", "Li", "Fe", "P", "O", "4", "."]
    assert pieces(tok, "Ba2YCu3O7") == ["Ba", "2", "Y", "Cu", "3", "O", "7"]


def test_mask_is_one_token(tok):
    assert pieces(tok, f"\n{MASK}\n") == ["\n", MASK, "\n"]


def test_special_tokens(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    ids = tok("Na")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 2
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4


def test_unknown_characters_do_not_crash(tok):
    ids = tok("Héllo ✓ 4", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id in ids
    assert tok.decode(ids) == "H<unk>llo <unk> 4"
    # unknown ASCII words fall back to single characters, exactly decoded
    assert tok.decode(tok("Xylophone quux", add_special_tokens=False)["input_ids"]) == "Xylophone quux"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("\n\t"), max_size=80))
def test_decode_reproduces_ascii_text(text):
    tok = _shared_tok()
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text


_CACHE = {}


def _shared_tok():
    if "tok" not in _CACHE:
        _CACHE["tok"] = tokenizer_for_template(PromptTemplate())
    return _CACHE["tok"]


def test_corpus_words_come_from_the_corpus():
    assert corpus_words(["Below is NaCl and LiFePO4 in Bexx"]) == {"Below", "is", "and", "in", "Bexx"}
    tok = build_tokenizer(["a zircon crystal"])
    assert pieces(tok, "zircon") == ["zircon"]
    assert pieces(tok, " zircon") == [" zircon"]


def test_save_and_load_pretrained(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    prompt = PromptTemplate().generation_prompt({"formula": "SrTiO3", "band_gap": 1.7})
    text = prompt + "3.9 3.9 3.9\n90 90 90\nSr\n0.00 0.00 0.00"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id
