"""The tokenizer of from-scratch models: one token per digit and per element symbol.

The paper chose LLaMA because its tokenizer writes every digit as its own
token.  A from-scratch model gets a tokenizer with the same property, derived
from the training corpus (prompt wording plus crystal texts):

* every digit, space, newline and punctuation character is one token;
* every element symbol (all 118, also those absent from the corpus) is one
  token, also inside formulas (``LiFePO4`` is ``Li Fe P O 4``);
* every word of the prompts is one token (with or without its leading
  space), and element tokens never split an
  ordinary word (``Below`` is one token, not ``Be`` + ``low``) because a
  symbol only matches when no lowercase letter follows it;
* ``[MASK]`` is one token;
* words never seen in the corpus fall back to single characters, so decoding
  reproduces any ASCII text exactly; other characters become ``<unk>``.

It is built with the ``tokenizers`` library (a regex pre-tokenizer, a
word-level vocabulary and a concatenating decoder) and wrapped as a
:class:`transformers.PreTrainedTokenizerFast`, so ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` work as for any Hugging Face model.
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING

from ase_crystal_llm.text.format import ELEMENTS, MASK

if TYPE_CHECKING:
    from collections.abc import Iterable

    from transformers import PreTrainedTokenizerFast

    from ase_crystal_llm.text.prompts import PromptTemplate

__all__ = [
    "SPECIAL_TOKENS", "build_tokenizer", "corpus_words", "tokenizer_for_template",
]


BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


# Single characters that always have a token: printable ASCII plus tab and newline.
_CHARS = tuple(c for c in string.printable if c not in "\r\x0b\x0c")


_WORD = re.compile(r"[A-Za-z]+")


# An element symbol not followed by a lowercase letter (so "Below" and "The"
# stay words); two-letter symbols first so that "Na" is not "N" + "a".
_SYMBOL_PATTERN = "(?:" + "|".join(sorted(ELEMENTS, key=lambda s: (-len(s), s))) + ")(?![a-z])"


def corpus_words(texts: Iterable[str]) -> set[str]:
    """Words of ``texts`` that become single tokens (element-like pieces excluded)."""
    words = set()
    symbol = re.compile(_SYMBOL_PATTERN)
    for text in texts:
        for word in _WORD.findall(text):
            # Formulas such as "LiFePO" are element pieces, not words.
            if symbol.sub("", word) == "":
                continue
            words.add(word)
    return words


def _pattern(words):
    # Longest first so that "description" wins over "de..." prefixes.
    known = "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))
    alternatives = [re.escape(MASK)]
    if known:
        # A word carries its leading space: prompts cost half the tokens.
        alternatives.append(rf" ?\b(?:{known})\b")
    alternatives += [_SYMBOL_PATTERN, r"[\s\S]"]  # last: any single character
    return "|".join(alternatives)


def build_tokenizer(texts: Iterable[str] = (), *, extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Derive a crystal tokenizer from a corpus.

    Parameters
    ----------
    texts : iterable of str
        Corpus texts (prompts, crystal texts); their words become tokens.
        Pass the prompt template strings at least.
    extra_words : iterable of str
        Further words to keep whole.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        Adds ``<s>`` in front of every encoded text (``add_special_tokens``);
        ``</s>`` ends answers, ``<pad>`` pads batches.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = corpus_words(texts) | set(extra_words)
    words -= set(ELEMENTS)
    words = sorted(words)
    vocab = {}
    spaced = [" " + w for w in words]
    for token in (*SPECIAL_TOKENS, MASK, *_CHARS, *ELEMENTS, *words, *spaced):
        vocab.setdefault(token, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_pattern(words)), behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos_id = vocab[BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,  # training.MAX_POSITIONS
    )
    fast.padding_side = "right"  # the saved default; decoding pads left per call (padding_side=)
    return fast


def tokenizer_for_template(template: PromptTemplate, texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """The tokenizer of a from-scratch model trained with ``template``."""
    data = template.to_dict()
    prompt_strings = [v for v in data.values() if isinstance(v, str)]
    prompt_strings += list(data.get("sentences", {}).values())
    return build_tokenizer([*prompt_strings, *texts])
