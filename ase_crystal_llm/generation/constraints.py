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
span a separator (``".5"``, ``"0\nNa"``).  End-of-sequence is allowed only
after a complete atom.

A row may also carry a formula target (:class:`FormulaTarget`): its symbol
lines may then only name the formula's elements, only while the counts can
still become ``k`` times the formula (``1 <= k``, ``k`` formula units within
``max_atoms``), and end-of-sequence needs counts of exactly such a ``k``.
Targets are per row, so one batch can mix formulas and free rows.

A free row may also be held to a charge-balanced end (:class:`RowComposition`):
end-of-sequence is refused while its composition fails SMACT's
charge-neutrality test, for at most :data:`EXTRA_ATOMS` more atoms.

Per-step cost is low: each token's string is computed once per tokenizer,
the allowed-token mask of every state is computed once (first characters
filtered with numpy, survivors simulated) and cached as a boolean tensor, and
a step stacks the cached masks of the rows.  A formula row's mask depends on
its counts only through which elements may still be added (clipped to what
one token can add) and whether the counts are complete, so the cache stays
small.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import LogitsProcessor

from ase_crystal_llm.chemistry.validity import VOLUME_RATIO, counts_valid, covalent_volume

# EXTRA_ATOMS: atoms a row may add, past its first refused end, while its composition is not
# charge balanced (RowComposition); then it may end anyway.  Its home is .options (help quotes it).
from ase_crystal_llm.generation.options import EXTRA_ATOMS
from ase_crystal_llm.generation.spacing import RowSpacing
from ase_crystal_llm.text.format import ELEMENTS

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Sequence

    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CrystalGrammar", "CrystalLogitsProcessor", "DIGITS", "DONE", "FIELDS", "FormulaTarget", "RowComposition",
    "START", "can_end", "formula_composition", "reads_symbol", "step_char", "token_strings",
]


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


def step_char(state: tuple, char: str, symbols: Collection[str], prefixes: Collection[str]) -> tuple[tuple, int] | None:
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


def can_end(state: tuple, n_atoms: int) -> bool:
    """True where a crystal may end: after the last coordinate of an atom."""
    if n_atoms < 1:
        return False
    if state == ("sym", ""):
        return True
    return state[0] == "num" and state[1] == "coords" and state[2] == 2 and _number_complete(state)


def reads_symbol(state: tuple, text: str, symbols: Collection[str], prefixes: Collection[str]) -> bool:
    """True when ``text``, read from ``state``, reads a character of a symbol line (before any refusal)."""
    for char in text:
        if state[0] == "sym":
            return True
        moved = step_char(state, char, symbols, prefixes)
        if moved is None:
            return False
        state = moved[0]
    return False


def formula_composition(formula: str, elements: Collection[str] | None = None) -> dict[str, int]:
    """Element counts of one formula unit of ``formula`` (``ase.formula.Formula``).

    Raises a one-line ``ValueError`` for an unparsable formula, a zero count,
    or (with ``elements``) an element outside ``elements``.
    """
    from ase.formula import Formula

    try:
        count = Formula(str(formula), strict=True).count()
    except ValueError as err:
        raise ValueError(f"invalid formula {formula!r}: {str(err) or _formula_reason(str(formula))}") from None
    if not count:
        raise ValueError(f"invalid formula {formula!r}: no elements")
    unknown = [s for s in count if s not in ELEMENTS]
    if unknown:
        raise ValueError(f"invalid formula {formula!r}: unknown element(s) {', '.join(unknown)}")
    zero = [s for s, c in count.items() if c < 1]
    if zero:
        raise ValueError(f"invalid formula {formula!r}: zero count of {', '.join(zero)}")
    if elements is not None:
        missing = sorted(set(count) - set(elements))
        if missing:
            raise ValueError(f"formula {formula!r} needs {', '.join(missing)}, not in elements "
                             f"({', '.join(sorted(elements))})")
    return count


def _formula_reason(text):
    """Why ``text`` is no formula, with the one capitalised reading where there is one ('nacl': 'NaCl')."""
    if text and text == text.lower():
        readings = _capitalised(text.strip(), limit=2)
        hint = f": did you mean {readings[0]!r}?" if len(readings) == 1 else " (e.g. 'NaCl', 'LiFePO4')"
        return "element symbols start with a capital letter" + hint
    return "write element symbols with their counts, e.g. 'NaCl', 'Li2FeSiO4', 'Ca(OH)2'"


def _capitalised(text, limit):
    """Up to ``limit`` ways to read lower-case ``text`` as element symbols, digits and brackets."""
    if not text:
        return [""]
    if text[0].isdigit() or text[0] in "()":
        return [text[0] + rest for rest in _capitalised(text[1:], limit)][:limit]
    found = []
    for size in (2, 1):
        symbol = text[:size].capitalize()
        if len(symbol) == size and symbol in ELEMENTS:
            found += [symbol + rest for rest in _capitalised(text[size:], limit - len(found))]
        if len(found) >= limit:
            break
    return found[:limit]


class FormulaTarget:
    """A formula condition as a decoding target: counts ``k`` times the formula.

    Counts are tuples aligned with :attr:`symbols`.  ``k`` runs from 1 to
    :attr:`k_max`, the most formula units that fit in ``max_atoms``.

    Parameters
    ----------
    formula : str
        One formula unit as written (``"Na2Cl2"`` allows Na2Cl2, Na4Cl4, ...).
    max_atoms : int
        Most atoms per crystal.
    elements : collection of str, optional
        Elements the formula must stay within.
    """

    def __init__(self, formula: str, max_atoms: int, elements: Collection[str] | None = None) -> None:
        count = formula_composition(formula, elements)
        per_unit = sum(count.values())
        if per_unit > max_atoms:
            raise ValueError(f"formula {formula!r} has {per_unit} atoms per formula unit, "
                             f"more than max_atoms={max_atoms}")
        self.formula = str(formula)
        self.symbols = tuple(sorted(count))
        self.units = tuple(int(count[s]) for s in self.symbols)
        self.k_max = int(max_atoms) // per_unit
        self.limits = tuple(self.k_max * u for u in self.units)
        self.zero = (0,) * len(self.symbols)
        self.unit_volume = covalent_volume(count)
        self._index = {s: i for i, s in enumerate(self.symbols)}

    def __repr__(self):
        return f"FormulaTarget({self.formula!r}, k_max={self.k_max})"

    def add(self, counts: tuple[int, ...], symbol: str) -> tuple[int, ...]:
        """``counts`` with one more ``symbol``."""
        i = self._index[symbol]
        return counts[:i] + (counts[i] + 1,) + counts[i + 1:]

    def open_symbols(self, counts: tuple[int, ...]) -> frozenset[str]:
        """Elements that may still be added: some allowed ``k`` stays reachable."""
        return frozenset(s for s, c, m in zip(self.symbols, counts, self.limits) if c < m)

    def complete(self, counts: tuple[int, ...]) -> bool:
        """True when ``counts`` are exactly ``k`` formula units, ``k >= 1``."""
        k, rest = divmod(counts[0], self.units[0])
        return k >= 1 and rest == 0 and all(c == k * u for c, u in zip(counts, self.units))


_TOKEN_STRINGS = weakref.WeakKeyDictionary()


def token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
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


class CrystalGrammar:
    """The crystal-text state machine bound to one tokenizer.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Its tokens are matched character by character.
    elements : sequence of str, optional
        Allowed element symbols (chemical-system conditioning); default: all
        real elements (:data:`ase_crystal_llm.text.format.ELEMENTS`).
    max_atoms : int
        After this many atoms only end-of-sequence is allowed.
    vocab_size : int, optional
        Width of the model's logits (may exceed ``len(tokenizer)``).

    Notes
    -----
    Rows with a formula target (:meth:`target`, :meth:`processor`) also
    carry their element counts; the methods taking ``target`` and
    ``counts`` then return ``(state, n_atoms, counts)`` instead of
    ``(state, n_atoms)``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, elements: Iterable[str] | None = None,
                 max_atoms: int = 64, vocab_size: int | None = None) -> None:
        symbols = ELEMENTS if elements is None else tuple(elements)
        unknown = [s for s in symbols if s not in ELEMENTS]
        if unknown:
            raise ValueError(f"unknown element symbol(s) in elements: {', '.join(map(repr, unknown))}")
        if not symbols:
            raise ValueError("elements must name at least one element")
        if max_atoms < 1:
            raise ValueError(f"max_atoms must be at least 1, got {max_atoms}")
        self.symbols = frozenset(symbols)
        self.prefixes = _prefixes(self.symbols)
        self.restricted = elements is not None
        self.max_atoms = int(max_atoms)
        self.eos_ids = _eos_ids(tokenizer)
        self.strings = token_strings(tokenizer)
        self.vocab_size = max(vocab_size or 0, len(self.strings))
        self._first = np.array([s[0] if s else "" for s in self.strings], dtype=object)
        self._first_chars = sorted(set(self._first) - {""})
        # A token can start at most this many atoms (one per newline).
        self._atom_cap = 1 + max((s.count("\n") for s in self.strings), default=0)
        self._masks = {}
        self._moves = {}  # (state, n_atoms, token) -> free move and whether the token reads a symbol
        self._formula_moves = {}  # the same with (target, counts), for tokens reading a symbol
        self._targets = {}  # formula -> FormulaTarget
        self._live = {}  # symbol -> prefixes from which this tokenizer can finish the symbol's line
        self._views = {}  # (target, counts) -> (open symbols, their prefixes, mask-key part)
        self._matter = {}  # free mask key -> what of a formula row's counts its mask depends on
        self._rows = {}  # device -> {mask key: row of the device table}
        self._tables = {}  # device -> (n_keys, vocab) bool tensor
        self._widths = {}  # device -> allowed tokens of each table row

    def target(self, formula: str, max_units: int | None = None) -> FormulaTarget:
        """The (cached) :class:`FormulaTarget` of ``formula`` under this grammar's elements and ``max_atoms``.

        ``max_units`` lowers the most formula units a row may write (never below 1).
        """
        if max_units is not None:
            full = self.target(formula)
            units = max(1, min(int(max_units), full.k_max))
            if units == full.k_max:
                return full
            key = (str(formula), units)
            if key not in self._targets:
                self._targets[key] = FormulaTarget(full.formula, units * sum(full.units),
                                                   self.symbols if self.restricted else None)
            return self._targets[key]
        key = str(formula)
        if key not in self._targets:
            target = FormulaTarget(key, self.max_atoms, self.symbols if self.restricted else None)
            # A formula row must be able to write every element it still needs.
            missing = [s for s in target.symbols if "" not in self._live_prefixes(s)]
            if missing:
                raise ValueError(f"formula {key!r}: the tokenizer cannot write {', '.join(missing)}")
            self._targets[key] = target
        return self._targets[key]

    def _live_prefixes(self, symbol):
        """Prefixes of ``symbol`` (``""`` included) from which some tokens finish its line (cached)."""
        live = self._live.get(symbol)
        if live is None:
            live = self._live[symbol] = self._find_live_prefixes(symbol)
        return live

    def _find_live_prefixes(self, symbol):
        one, prefixes = frozenset([symbol]), _prefixes([symbol])
        finishes, leads = set(), {}
        for prefix in ["", *prefixes]:
            state = ("sym", prefix)
            firsts = [c for c in self._first_chars if step_char(state, c, one, prefixes)]
            leads[prefix] = set()
            for i in np.flatnonzero(np.isin(self._first, firsts)):
                moved, crossed = state, False
                for char in self.strings[i]:
                    crossed |= moved[0] == "sym" and char == "\n"
                    moved = step_char(moved, char, one, prefixes)
                    if moved is None:
                        break
                    moved = moved[0]
                else:
                    if crossed:
                        finishes.add(prefix)
                    elif moved[0] == "sym":
                        leads[prefix].add(moved[1])
        live = set(finishes)
        while True:  # a prefix is live when one of its tokens leads to a live prefix
            more = {p for p, nxt in leads.items() if p not in live and nxt & live}
            if not more:
                return frozenset(live)
            live |= more

    def _view(self, target, counts):
        """A formula row's open symbols, their prefixes, the prefixes a token may end on, and
        what its mask depends on."""
        key = (target, counts)
        view = self._views.get(key)
        if view is None:
            symbols = target.open_symbols(counts)
            live = frozenset().union(*(self._live_prefixes(s) for s in symbols))
            # One token adds fewer than _atom_cap atoms: room beyond that cannot change its mask.
            room = tuple(min(m - c, self._atom_cap) for c, m in zip(counts, target.limits))
            view = (symbols, _prefixes(symbols), live, (target.symbols, room, target.complete(counts)))
            self._views[key] = view
        return view

    # A state's mask depends on the state and on how many atoms may still
    # start, clipped to what one token can start: the cache stays small.  A
    # formula row's mask depends on its counts only where a token can read a
    # symbol line (then: open symbols and room) or end the crystal (then:
    # whether the counts are complete); elsewhere it is the free row's mask.
    def _key(self, state, n_atoms, target=None, counts=None):
        free = (state, min(self.max_atoms - n_atoms, self._atom_cap), n_atoms > 0)
        if target is None:
            return (*free, None)
        symbols, room, complete = self._view(target, counts)[3]
        matter = self._matter.get(free)
        if matter is None:
            matter = self._matter[free] = self._counts_matter(state, n_atoms)
        if matter == "symbols":
            return (*free, (symbols, room, complete))
        return (*free, complete if matter == "end" else None)  # "free": the free row's mask

    def _counts_matter(self, state, n_atoms):
        """``"symbols"`` when a token may read a symbol line here, else ``"end"`` (may end) or ``"free"``."""
        firsts = [c for c in self._first_chars if step_char(state, c, self.symbols, self.prefixes)]
        for i in np.flatnonzero(np.isin(self._first, firsts)):
            if reads_symbol(state, self.strings[i], self.symbols, self.prefixes):
                return "symbols"
        return "end" if can_end(state, n_atoms) else "free"

    def _feed(self, state, n_atoms, counts, target, text):
        """Feed ``text``: ``(state, n_atoms, counts)``, or ``None`` when not allowed.

        A formula row may not stop inside a symbol it cannot finish with this
        tokenizer's tokens (it would have no allowed token left).
        """
        symbols, prefixes = (self.symbols, self.prefixes) if target is None else self._view(target, counts)[:2]
        for char in text:
            moved = step_char(state, char, symbols, prefixes)
            if moved is None:
                return None
            if target is not None and char == "\n" and state[0] == "sym":  # a symbol line is complete
                counts = target.add(counts, state[1])
                symbols, prefixes = self._view(target, counts)[:2]
            state, started = moved
            n_atoms += started
            if n_atoms > self.max_atoms:
                return None
        inside = state[1] if state[0] == "sym" else ""  # a token may end inside a symbol ...
        if target is not None and inside and inside not in self._view(target, counts)[2]:
            return None  # ... only where some tokens can finish it
        return state, n_atoms, counts

    def run(self, state: tuple, n_atoms: int, text: str, target: FormulaTarget | None = None,
            counts: tuple[int, ...] | None = None) -> tuple | None:
        """Feed ``text`` from ``(state, n_atoms)``; ``None`` when not allowed.

        With a formula ``target`` (and its ``counts``, default none yet),
        returns ``(state, n_atoms, counts)``.
        """
        if target is not None and counts is None:
            counts = target.zero
        result = self._feed(state, n_atoms, counts, target, text)
        return result if result is None or target is not None else result[:2]

    def allowed(self, state: tuple, n_atoms: int, device: str | torch.device = "cpu",
                target: FormulaTarget | None = None, counts: tuple[int, ...] | None = None) -> torch.Tensor:
        """Boolean mask over the vocabulary for one state (cached)."""
        if target is not None and counts is None:
            counts = target.zero
        key = (*self._key(state, n_atoms, target, counts), str(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.from_numpy(self._allowed_numpy(state, n_atoms, target, counts)).to(device)
            self._masks[key] = mask
        return mask

    def rows_mask(self, states: Sequence[tuple], n_atoms: Sequence[int], device: str | torch.device,
                  targets: Sequence[FormulaTarget | None] | None = None,
                  counts: Sequence[tuple[int, ...] | None] | None = None) -> tuple[torch.Tensor, int]:
        """Stacked masks of many rows: one gather from a per-device table of state masks.

        Also returns the most tokens any of these rows allows (known on the host,
        no device sync): samplers draw from that many candidates only.
        """
        device = str(device)
        targets = targets or [None] * len(states)
        counts = counts or [None] * len(states)
        rows = self._rows.setdefault(device, {})
        widths = self._widths.setdefault(device, [])
        index = []
        new = []
        for state, n, target, c in zip(states, n_atoms, targets, counts):
            key = self._key(state, n, target, c)
            row = rows.get(key)
            if row is None:
                row = rows[key] = len(rows)
                new.append(self._allowed_numpy(state, n, target, c))
                widths.append(int(new[-1].sum()))
            index.append(row)
        if new:
            fresh = torch.from_numpy(np.stack(new)).to(device)
            old = self._tables.get(device)
            self._tables[device] = fresh if old is None else torch.cat([old, fresh])
        return self._tables[device][torch.tensor(index, device=device)], max((widths[i] for i in index), default=0)

    def _allowed_numpy(self, state, n_atoms, target=None, counts=None):
        mask = np.zeros(self.vocab_size, dtype=bool)
        if state == DONE:
            mask[list(self.eos_ids)] = True
            return mask
        symbols, prefixes = (self.symbols, self.prefixes) if target is None else self._view(target, counts)[:2]
        firsts = [c for c in self._first_chars if step_char(state, c, symbols, prefixes)]
        candidates = np.flatnonzero(np.isin(self._first, firsts))
        for i in candidates:
            if self._feed(state, n_atoms, counts, target, self.strings[i]) is not None:
                mask[i] = True
        if can_end(state, n_atoms) and (target is None or target.complete(counts)):
            mask[list(self.eos_ids)] = True
        return mask

    def advance(self, state: tuple, n_atoms: int, token_id: int, target: FormulaTarget | None = None,
                counts: tuple[int, ...] | None = None) -> tuple:
        """State after emitting ``token_id`` (cached per state and token)."""
        if target is not None and counts is None:
            counts = target.zero
        moved = self._advance(state, n_atoms, counts, target, token_id)
        return moved if target is not None else moved[:2]

    def _advance(self, state, n_atoms, counts, target, token_id):
        if state == DONE or token_id in self.eos_ids:
            return DONE, n_atoms, counts
        text = self.strings[token_id] if token_id < len(self.strings) else ""
        # The free move, and whether the token reads a symbol line.
        key = (state, n_atoms, token_id)
        moved = self._moves.get(key)
        if moved is None:
            free = self._feed(state, n_atoms, None, None, text) if text else None
            # A forbidden token (only possible when the mask was bypassed)
            # ends the row: nothing after it can become a crystal.
            moved = (*(free[:2] if free else (DONE, n_atoms)), reads_symbol(state, text, self.symbols, self.prefixes))
            self._moves[key] = moved
        if target is None or not moved[2] or moved[0] == DONE:
            return moved[0], moved[1], counts  # counts only change on symbol lines
        key = (*key, target, counts)
        moved = self._formula_moves.get(key)
        if moved is None:
            moved = self._feed(state, n_atoms, counts, target, text) or (DONE, n_atoms, counts)
            self._formula_moves[key] = moved
        return moved

    def accepts(self, text: str, *, complete: bool = True, formula: str | None = None) -> bool:
        """True when ``text`` is allowed by the machine (and may end there).

        With ``formula``, its element counts must also be (complete: exactly,
        else still able to become) a whole number of formula units.
        """
        target = None if formula is None else self.target(formula)
        result = self._feed(START, 0, None if target is None else target.zero, target, text)
        if result is None:
            return False
        state, n_atoms, counts = result
        if not complete:
            return True
        return can_end(state, n_atoms) and (target is None or target.complete(counts))

    def processor(self, formulas: Sequence[str | None] | None = None, min_distance: float | None = None,
                  charge_guard: bool = False, covalent_ratio: float | None = None,
                  volume_ratio: float | None = VOLUME_RATIO) -> CrystalLogitsProcessor:
        """A fresh :class:`CrystalLogitsProcessor` for one generation run.

        ``formulas`` (optional) gives one formula or ``None`` per batch row:
        rows with a formula are held to whole multiples of it.
        ``min_distance`` (angstrom, optional) keeps new atoms that far from
        those already written (:mod:`.spacing`), and ``covalent_ratio`` that
        fraction of the two covalent radii too; ``charge_guard`` holds the
        end of free rows until their composition is charge balanced
        (:class:`RowComposition`); ``volume_ratio`` holds guarded formula rows
        to the formula units their cell has room for.
        """
        targets = None if formulas is None else [None if f is None else self.target(f) for f in formulas]
        return CrystalLogitsProcessor(self, targets, min_distance=min_distance, charge_guard=charge_guard,
                                      covalent_ratio=covalent_ratio, volume_ratio=volume_ratio)


def _prefixes(symbols):
    return frozenset(s[:k] for s in symbols for k in range(1, len(s) + 1))


def _eos_ids(tokenizer):
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-sequence token")
    return frozenset(eos if isinstance(eos, (list, tuple)) else [eos])


class RowComposition:
    """Counts the element symbols one row has written, to hold its end until they are charge balanced.

    Lines 0 and 1 are the lattice, then symbol and coordinate lines
    alternate (see :mod:`ase_crystal_llm.text`).  "Charge balanced" is
    compositional validity (:func:`ase_crystal_llm.chemistry.validity.counts_valid`:
    SMACT charge neutrality with the Pauling test; single elements and
    all-metal alloys pass).  A row that fails it may not end, but only for
    ``extra_atoms`` atoms past its first refused end: a composition that
    cannot be balanced must not grow without bound.
    """

    __slots__ = ("extra_atoms", "counts", "line", "n_lines", "held_at")

    def __init__(self, extra_atoms: int = EXTRA_ATOMS) -> None:
        self.extra_atoms = int(extra_atoms)
        self.counts = {}
        self.line = ""
        self.n_lines = 0
        self.held_at = None  # atom count at the first refused end

    def feed(self, text: str) -> None:
        """Read generated ``text``."""
        for char in text:
            if char != "\n":
                self.line += char
                continue
            if self.n_lines >= 2 and self.n_lines % 2 == 0:  # a symbol line is complete
                symbol = self.line.strip(" ")
                self.counts[symbol] = self.counts.get(symbol, 0) + 1
            self.line, self.n_lines = "", self.n_lines + 1

    def holds_end(self, n_atoms: int) -> bool:
        """True when the row, able to end with ``n_atoms`` atoms, should write another atom instead."""
        if counts_valid(self.counts):
            return False
        if self.held_at is None:
            self.held_at = n_atoms
        return n_atoms < self.held_at + self.extra_atoms


class CrystalLogitsProcessor(LogitsProcessor):
    """Masks the logits of tokens the crystal grammar does not allow.

    Works inside ``model.generate(logits_processor=[...])``: the first call
    records the prompt length, later calls read the token generated since.
    The fast sampler drives it directly with :meth:`reset`, :meth:`advance`,
    :meth:`select` and :meth:`mask`.

    Parameters
    ----------
    grammar : CrystalGrammar
    targets : list of FormulaTarget or None, optional
        One per batch row (``None``: a free row); the batch must have that
        many rows.  Default: every row free.
    min_distance : float, optional
        Also refuse coordinate tokens that put an atom closer than this
        (angstrom) to an atom already written, periodic images included
        (:class:`~ase_crystal_llm.generation.spacing.RowSpacing`), in rows without a
        formula target (in every row with ``covalent_ratio``).  A row with
        no allowed token left keeps the grammar's mask.
    charge_guard : bool
        Refuse end-of-sequence in rows without a formula target while their
        composition is not charge balanced (:class:`RowComposition`), when
        other tokens are allowed.
    covalent_ratio : float, optional
        With ``min_distance``: each pair of atoms also needs this fraction of
        the sum of their covalent radii
        (:func:`~ase_crystal_llm.chemistry.validity.pair_floors`).
    volume_ratio : float, optional
        In spacing-guarded formula rows, once the cell is written: at most
        as many formula units as fit in it with ``volume_ratio`` times their
        covalent-sphere volume each
        (:data:`~ase_crystal_llm.chemistry.validity.VOLUME_RATIO`; at least
        one), so a row stops instead of crowding more units into its cell.
    """

    def __init__(self, grammar: CrystalGrammar, targets: Sequence[FormulaTarget | None] | None = None,
                 min_distance: float | None = None, charge_guard: bool = False,
                 covalent_ratio: float | None = None, volume_ratio: float | None = VOLUME_RATIO) -> None:
        self.grammar = grammar
        self.min_distance = min_distance or None
        self.covalent_ratio = covalent_ratio or None
        self.volume_ratio = volume_ratio or None
        self.charge_guard = bool(charge_guard)
        self.spacing = None
        self.charge = None
        self._row_targets = None if targets is None else list(targets)
        self.states = None
        self.n_atoms = None
        self.targets = None
        self.counts = None
        self._length = None
        self.widest = None  # after mask(): the most tokens any row allows (samplers draw from that many)

    def reset(self, batch_size: int) -> None:
        if self._row_targets is not None and len(self._row_targets) != batch_size:
            raise ValueError(f"the processor has formula targets for {len(self._row_targets)} rows, "
                             f"got a batch of {batch_size}")
        self.states = [START] * batch_size
        self.n_atoms = [0] * batch_size
        self.targets = list(self._row_targets) if self._row_targets is not None else [None] * batch_size
        self.counts = [None if t is None else t.zero for t in self.targets]
        self.sized = [t is None for t in self.targets]  # formula rows: held to the units their cell holds
        if self.min_distance:
            # A formula row cannot end at will: under the flat floor alone, guarded, it packs whole
            # extra formula units into cells far too small (absurd densities), so it is left alone;
            # covalent floors bound how close its atoms come (docs/generation.md).
            guard_formula_rows = bool(self.covalent_ratio)
            self.spacing = [RowSpacing(self.min_distance, self.covalent_ratio)
                            if t is None or guard_formula_rows else None for t in self.targets]
        if self.charge_guard:  # a formula row's composition is fixed by its target
            self.charge = [RowComposition() if t is None else None for t in self.targets]

    def advance(self, tokens: torch.Tensor | Iterable[int]) -> None:
        """Move every row on by its newly generated token (tensor or list)."""
        tokens = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
        g = self.grammar
        for row, token in enumerate(tokens):
            if self.states[row] != DONE and token not in g.eos_ids:
                text = g.strings[token] if token < len(g.strings) else ""
                for readers in (self.spacing, self.charge):
                    if readers is not None and readers[row] is not None:
                        readers[row].feed(text)
                if not self.sized[row] and self.spacing is not None:
                    self._size_formula_row(row)
            self.states[row], self.n_atoms[row], self.counts[row] = g._advance(
                self.states[row], self.n_atoms[row], self.counts[row], self.targets[row], token)

    def _size_formula_row(self, row):
        """Once a formula row's cell is read, hold it to the formula units that fit in that volume."""
        spacing, target = self.spacing[row], self.targets[row]
        if spacing is None or not self.volume_ratio:
            self.sized[row] = True
        elif spacing.volume is not None:
            units = int(spacing.volume // (self.volume_ratio * target.unit_volume))
            self.targets[row] = self.grammar.target(target.formula, max_units=units)
            self.sized[row] = True

    def select(self, rows: torch.Tensor | Iterable[int]) -> None:
        """Keep only ``rows`` (finished rows dropped from the batch)."""
        rows = rows.tolist() if torch.is_tensor(rows) else list(rows)
        self.sized = [self.sized[r] for r in rows]
        self.states = [self.states[r] for r in rows]
        self.n_atoms = [self.n_atoms[r] for r in rows]
        self.targets = [self.targets[r] for r in rows]
        self.counts = [self.counts[r] for r in rows]
        if self.spacing is not None:
            self.spacing = [self.spacing[r] for r in rows]
        if self.charge is not None:
            self.charge = [self.charge[r] for r in rows]

    @property
    def finished(self) -> list[bool]:
        return [s == DONE for s in self.states]

    @property
    def in_coordinates(self) -> list[bool]:
        """Per row: its next token continues a line of fractional coordinates."""
        return [s[0] == "num" and s[1] == "coords" for s in self.states]

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` with forbidden tokens set to ``-inf`` (a new tensor)."""
        allowed, self.widest = self.grammar.rows_mask(self.states, self.n_atoms, scores.device, self.targets,
                                                      self.counts)
        allowed = allowed[:, : scores.shape[-1]]
        if self.spacing is not None:
            self._refuse_crowded(allowed)
        if self.charge is not None:
            self._hold_unbalanced_ends(allowed)
        if allowed.shape[-1] < scores.shape[-1]:
            pad = torch.zeros(allowed.shape[0], scores.shape[-1] - allowed.shape[-1], dtype=torch.bool,
                              device=scores.device)
            allowed = torch.cat([allowed, pad], dim=-1)
        return scores.masked_fill(~allowed, float("-inf"))

    def _refuse_crowded(self, allowed):
        """Clear, in place, the tokens that would write an atom onto a taken site."""
        strings = self.grammar.strings
        table = allowed.cpu().numpy()  # one transfer, not one per row
        rows, tokens = [], []
        for row, spacing in enumerate(self.spacing):
            if spacing is None or not spacing.active or self.states[row] == DONE:
                continue
            candidates = np.flatnonzero(table[row])
            refused = [t for t in candidates.tolist() if t < len(strings) and not spacing.fits(strings[t])]
            if refused and len(refused) < len(candidates):  # else the row keeps the grammar's mask
                rows += [row] * len(refused)
                tokens += refused
        if rows:
            allowed[rows, tokens] = False

    def _hold_unbalanced_ends(self, allowed):
        """Clear, in place, end-of-sequence in rows whose composition is not yet charge balanced."""
        eos = sorted(self.grammar.eos_ids)
        for row, composition in enumerate(self.charge):
            if composition is None or not can_end(self.states[row], self.n_atoms[row]):
                continue
            if composition.holds_end(self.n_atoms[row]) and allowed[row].sum() > allowed[row, eos].sum():
                allowed[row, eos] = False  # another atom can still be written

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        if self.states is None or len(self.states) != input_ids.shape[0] or self._length is None \
                or length != self._length + 1:
            self.reset(input_ids.shape[0])
        else:
            self.advance(input_ids[:, -1])
        self._length = length
        return self.mask(scores)
