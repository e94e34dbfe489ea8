"""Constrained decoding: only text that can still become a crystal is sampled.

A small state machine reads the crystal text format (see :mod:`.text`) one
*character* at a time::

    5.7 5.7 5.7        lengths: 3 numbers, one space between, newline
    90 90 90           angles: 3 numbers, newline
    Na                 a real element symbol (or one of ``elements``), newline
    0.00 0.50 0.50     fractional coordinates: 3 numbers
    ...                then newline and the next symbol, or end-of-sequence

A token is allowed in a state when every character of its decoded string is
accepted in turn, so the machine works for any vocabulary: one token per
digit, byte-level BPE tokens with a leading space, SentencePiece pieces that
span a separator (``".5"``, ``"0\\nNa"``).  End-of-sequence is allowed only
after a complete atom.

Per-step cost is low: each token's string is computed once per tokenizer,
the allowed-token mask of every state is computed once (first characters
filtered with numpy, survivors simulated) and cached as a boolean tensor, and
a step stacks the cached masks of the rows.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from transformers import LogitsProcessor

from .text import ELEMENTS

DIGITS = frozenset("0123456789")

# Field specs: (max integer digits, max decimals).  atoms_to_text writes one
# decimal for lengths, none for angles, two for coordinates; one spare digit
# is allowed so that a slightly different number formatting still parses.
FIELDS = {
    "lengths": (3, 2),
    "angles": (3, 2),
    "coords": (1, 3),
}
_NEXT_LINE = {"lengths": "angles"}  # after angles and coords comes a symbol line

# Machine states are small tuples:
#   ("num", field, value_index, in_decimals, n_digits)
#   ("sym", prefix)
#   ("lead",)      before the first character: one leading space is allowed,
#                  since tokenizers that add a prefix space (SentencePiece)
#                  start the answer with one and the parser strips it
#   ("done",)      after end-of-sequence
START = ("lead",)
DONE = ("done",)
_FIRST_NUMBER = ("num", "lengths", 0, False, 0)


def _number_complete(state):
    return state[4] >= 1


def step_char(state, char, symbols, prefixes):
    """The state after reading ``char``, or ``None`` when it is not allowed.

    Returns a pair ``(state, atoms_started)``: ``atoms_started`` is 1 when the
    character begins a new atom's symbol line.
    """
    kind = state[0]
    if kind == "lead":
        if char == " ":
            return _FIRST_NUMBER, 0
        return step_char(_FIRST_NUMBER, char, symbols, prefixes)
    if kind == "num":
        _, field, index, decimals, n = state
        max_int, max_dec = FIELDS[field]
        if char in DIGITS:
            if n < (max_dec if decimals else max_int):
                return ("num", field, index, decimals, n + 1), 0
            return None
        if char == ".":
            if not decimals and n >= 1 and max_dec > 0:
                return ("num", field, index, True, 0), 0
            return None
        if not _number_complete(state):
            return None
        if char == " " and index < 2:
            return ("num", field, index + 1, False, 0), 0
        if char == "\n" and index == 2:
            nxt = _NEXT_LINE.get(field)
            return (("num", nxt, 0, False, 0) if nxt else ("sym", "")), 0
        return None
    if kind == "sym":
        prefix = state[1]
        if char == "\n":
            return (("num", "coords", 0, False, 0), 0) if prefix in symbols else None
        candidate = prefix + char
        if candidate in prefixes:
            return ("sym", candidate), int(prefix == "")
        return None
    return None


def can_end(state, n_atoms):
    """True where a crystal may end: after the last coordinate of an atom."""
    if n_atoms < 1:
        return False
    if state == ("sym", ""):
        return True
    return state[0] == "num" and state[1] == "coords" and state[2] == 2 and _number_complete(state)


# -- per-tokenizer token strings ---------------------------------------------------

_TOKEN_STRINGS = weakref.WeakKeyDictionary()


def token_strings(tokenizer):
    """The decoded string of every token id, as it reads *inside* a text.

    SentencePiece drops a piece's leading space when it starts a text, so
    each token is decoded behind an anchor token and the anchor's own text is
    cut off.  Special tokens give ``""`` (never allowed as text).
    """
    try:
        return _TOKEN_STRINGS[tokenizer]
    except (KeyError, TypeError):
        pass
    size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    anchor = _anchor_id(tokenizer)
    head = tokenizer.decode([anchor], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    strings = []
    for i in range(size):
        if i in special:
            strings.append("")
            continue
        both = tokenizer.decode([anchor, i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if both.startswith(head):
            strings.append(both[len(head):])
        else:
            strings.append(tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    try:
        _TOKEN_STRINGS[tokenizer] = strings
    except TypeError:
        pass
    return strings


def _anchor_id(tokenizer):
    ids = tokenizer.encode("0", add_special_tokens=False)
    return ids[-1] if ids else 0


# -- the grammar: cached masks and transitions ------------------------------------


class CrystalGrammar:
    """The crystal-text state machine bound to one tokenizer.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Its tokens are matched character by character.
    elements : sequence of str, optional
        Allowed element symbols (chemical-system conditioning); default: all
        real elements (:data:`ase_crystal_llm.text.ELEMENTS`).
    max_atoms : int
        After this many atoms only end-of-sequence is allowed.
    vocab_size : int, optional
        Width of the model's logits (may exceed ``len(tokenizer)``).
    """

    def __init__(self, tokenizer, *, elements=None, max_atoms=64, vocab_size=None):
        symbols = ELEMENTS if elements is None else tuple(elements)
        unknown = [s for s in symbols if s not in ELEMENTS]
        if unknown:
            raise ValueError(f"unknown element symbol(s) in elements: {', '.join(map(repr, unknown))}")
        if not symbols:
            raise ValueError("elements must name at least one element")
        if max_atoms < 1:
            raise ValueError(f"max_atoms must be at least 1, got {max_atoms}")
        self.symbols = frozenset(symbols)
        self.prefixes = frozenset(s[:k] for s in self.symbols for k in range(1, len(s) + 1))
        self.max_atoms = int(max_atoms)
        self.eos_ids = _eos_ids(tokenizer)
        self.strings = token_strings(tokenizer)
        self.vocab_size = max(vocab_size or 0, len(self.strings))
        self._first = np.array([s[0] if s else "" for s in self.strings], dtype=object)
        # A token can start at most this many atoms (one per newline).
        self._atom_cap = 1 + max((s.count("\n") for s in self.strings), default=0)
        self._masks = {}
        self._moves = {}
        self._rows = {}  # device -> {mask key: row of the device table}
        self._tables = {}  # device -> (n_keys, vocab) bool tensor

    # A state's mask depends on the state and on how many atoms may still
    # start, clipped to what one token can start: the cache stays small.
    def _key(self, state, n_atoms):
        left = min(self.max_atoms - n_atoms, self._atom_cap)
        return state, left, n_atoms > 0

    def run(self, state, n_atoms, text):
        """Feed ``text`` from ``(state, n_atoms)``; ``None`` when not allowed."""
        for char in text:
            moved = step_char(state, char, self.symbols, self.prefixes)
            if moved is None:
                return None
            state, started = moved
            n_atoms += started
            if n_atoms > self.max_atoms:
                return None
        return state, n_atoms

    def allowed(self, state, n_atoms, device="cpu"):
        """Boolean mask over the vocabulary for one state (cached)."""
        key = (*self._key(state, n_atoms), str(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.from_numpy(self._allowed_numpy(state, n_atoms)).to(device)
            self._masks[key] = mask
        return mask

    def rows_mask(self, states, n_atoms, device):
        """Stacked masks of many rows: one gather from a per-device table of state masks."""
        device = str(device)
        rows = self._rows.setdefault(device, {})
        index = []
        new = []
        for state, n in zip(states, n_atoms):
            key = self._key(state, n)
            row = rows.get(key)
            if row is None:
                row = rows[key] = len(rows)
                new.append(self._allowed_numpy(state, n))
            index.append(row)
        if new:
            fresh = torch.from_numpy(np.stack(new)).to(device)
            old = self._tables.get(device)
            self._tables[device] = fresh if old is None else torch.cat([old, fresh])
        return self._tables[device][torch.tensor(index, device=device)]

    def _allowed_numpy(self, state, n_atoms):
        mask = np.zeros(self.vocab_size, dtype=bool)
        if state == DONE:
            mask[list(self.eos_ids)] = True
            return mask
        firsts = {c for c in set(self._first) if c and step_char(state, c, self.symbols, self.prefixes)}
        candidates = np.flatnonzero(np.isin(self._first, list(firsts)))
        for i in candidates:
            if self.run(state, n_atoms, self.strings[i]) is not None:
                mask[i] = True
        if can_end(state, n_atoms):
            mask[list(self.eos_ids)] = True
        return mask

    def advance(self, state, n_atoms, token_id):
        """State after emitting ``token_id`` (cached per state and token)."""
        if state == DONE or token_id in self.eos_ids:
            return DONE, n_atoms
        key = (state, n_atoms, token_id)
        moved = self._moves.get(key)
        if moved is None:
            text = self.strings[token_id] if token_id < len(self.strings) else ""
            moved = self.run(state, n_atoms, text) if text else None
            # A forbidden token (only possible when the mask was bypassed)
            # ends the row: nothing after it can become a crystal.
            moved = moved or (DONE, n_atoms)
            self._moves[key] = moved
        return moved

    def accepts(self, text, *, complete=True):
        """True when ``text`` is allowed by the machine (and may end there)."""
        result = self.run(START, 0, text)
        if result is None:
            return False
        return can_end(*result) if complete else True

    def processor(self):
        """A fresh :class:`CrystalLogitsProcessor` for one generation run."""
        return CrystalLogitsProcessor(self)


def _eos_ids(tokenizer):
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-sequence token")
    return frozenset(eos if isinstance(eos, (list, tuple)) else [eos])


class CrystalLogitsProcessor(LogitsProcessor):
    """Masks the logits of tokens the crystal grammar does not allow.

    Works inside ``model.generate(logits_processor=[...])``: the first call
    records the prompt length, later calls read the token generated since.
    The fast sampler drives it directly with :meth:`reset`, :meth:`advance`,
    :meth:`select` and :meth:`mask`.
    """

    def __init__(self, grammar):
        self.grammar = grammar
        self.states = None
        self.n_atoms = None
        self._length = None

    def reset(self, batch_size):
        self.states = [START] * batch_size
        self.n_atoms = [0] * batch_size

    def advance(self, tokens):
        """Move every row on by its newly generated token (tensor or list)."""
        tokens = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
        g = self.grammar
        for row, token in enumerate(tokens):
            self.states[row], self.n_atoms[row] = g.advance(self.states[row], self.n_atoms[row], token)

    def select(self, rows):
        """Keep only ``rows`` (finished rows dropped from the batch)."""
        rows = rows.tolist() if torch.is_tensor(rows) else list(rows)
        self.states = [self.states[r] for r in rows]
        self.n_atoms = [self.n_atoms[r] for r in rows]

    @property
    def finished(self):
        return [s == DONE for s in self.states]

    def mask(self, scores):
        """``scores`` with forbidden tokens set to ``-inf`` (a new tensor)."""
        allowed = self.grammar.rows_mask(self.states, self.n_atoms, scores.device)[:, : scores.shape[-1]]
        if allowed.shape[-1] < scores.shape[-1]:
            pad = torch.zeros(allowed.shape[0], scores.shape[-1] - allowed.shape[-1], dtype=torch.bool,
                              device=scores.device)
            allowed = torch.cat([allowed, pad], dim=-1)
        return scores.masked_fill(~allowed, float("-inf"))

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        if self.states is None or len(self.states) != input_ids.shape[0] or self._length is None \
                or length != self._length + 1:
            self.reset(input_ids.shape[0])
        else:
            self.advance(input_ids[:, -1])
        self._length = length
        return self.mask(scores)
