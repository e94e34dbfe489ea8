"""The crystal text format of Gruver et al. (ICLR 2024).

A crystal is written as::

    5.7 5.7 5.7          <- lattice lengths a b c in Angstrom, one decimal
    90 90 90             <- angles alpha beta gamma in degrees, rounded to integers
    Na                   <- element symbol of atom 1
    0.00 0.00 0.00       <- its fractional coordinates, two decimals, in [0, 1)
    Cl
    0.50 0.50 0.50
    ...

Numbers are rounded first and wrapped into [0, 1) afterwards, so a coordinate
never prints as ``1.00`` and ``-0.00`` never appears.  Angles are *rounded*
(the reference implementation truncated, turning 119.9999 into 119).

Parsing rule for trailing text: a crystal ends at the end of the text or at the
first blank line.  Whatever follows a blank line is ignored (model output often
carries such garbage after a complete crystal; multi-crystal files use the
blank line as separator).  Every non-blank line before it must belong to the
crystal, so a half-written atom is an error, never silently dropped.  Line
numbers in error messages count the crystal's lines, from its first non-blank
line.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms
from ase.cell import Cell
from ase.data import chemical_symbols

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "CrystalTextError", "ELEMENTS", "LINE_SEPARATOR", "MASK", "MAX_ATOMS", "MAX_LENGTH", "MIN_VOLUME",
    "atoms_to_text", "cell_volume", "is_element", "is_periodic", "mask_element", "one_line", "split_crystals",
    "text_to_atoms", "wrap_fractional",
]


MASK = "[MASK]"
FRACTIONAL_DECIMALS = 2
# How training texts are translated (model cards and run fingerprints record it):
# by whole grid steps of the coordinates; cards without it were trained with continuous shifts.
TRANSLATION = "grid"


MAX_ATOMS = 1000


MIN_VOLUME = 0.1  # Angstrom^3


MAX_LENGTH = 1000.0  # Angstrom: anything longer is not a crystal cell we can use


# Real elements only: ASE's symbol table also holds "X" (a dummy atom, Z=0).
ELEMENTS = tuple(chemical_symbols[1:])


_ELEMENT_SET = frozenset(ELEMENTS)


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


class CrystalTextError(ValueError):
    """Text that is not a valid crystal; the message says precisely why."""


def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _fmt(values, decimals):
    # "+ 0.0" turns a negative zero into a plain zero.
    return " ".join(f"{v + 0.0:.{decimals}f}" for v in values)


def wrap_fractional(frac: ArrayLike, decimals: int = FRACTIONAL_DECIMALS) -> np.ndarray:
    """Round fractional coordinates to ``decimals`` and wrap them into [0, 1).

    Rounding comes first so that 0.996 becomes 0.00, not 1.00.
    """
    frac = np.round(np.asarray(frac, dtype=float), decimals) % 1.0
    return np.round(frac, decimals) % 1.0


def atoms_to_text(atoms: Atoms, *, translate: bool = False, rng: np.random.Generator | int | None = None,
                  group_by_element: bool = False) -> str:
    """Write a periodic structure in the crystal text format.

    Parameters
    ----------
    atoms : ase.Atoms
        A structure with a full 3D cell.
    translate : bool
        Shift all fractional coordinates by one random vector (the paper's
        translation augmentation) before writing.  The shift is a whole
        number of hundredths on each axis, so the text is the untranslated
        text moved as a block: a continuous shift would round every atom
        differently and break symmetry the crystal has (MP-20 val, symprec
        0.1: 69% keep their space group under continuous shifts, 86.5% on
        the grid, the same as untranslated; ``benchmarks/text_symmetry.py``).
    rng : numpy.random.Generator or int, optional
        Source of the random shift.
    group_by_element : bool
        Write atoms grouped by element (in order of first appearance) instead
        of in the order given.

    Returns
    -------
    str
        The text, without a trailing newline.
    """
    if atoms.cell.rank != 3:
        raise CrystalTextError("structure has no full 3D cell (not periodic)")
    cellpar = atoms.cell.cellpar()
    frac = wrap_fractional(atoms.get_scaled_positions(wrap=False))
    if translate:
        steps = 10**FRACTIONAL_DECIMALS
        frac = wrap_fractional(frac + _as_rng(rng).integers(0, steps, 3) / steps)
    symbols = atoms.get_chemical_symbols()
    order = range(len(atoms))
    if group_by_element:
        first = {s: i for i, s in reversed(list(enumerate(symbols)))}
        order = sorted(order, key=lambda i: first[symbols[i]])
    lines = [_fmt(cellpar[:3], 1), _fmt(np.rint(cellpar[3:]), 0)]
    for i in order:
        lines += [symbols[i], _fmt(frac[i], FRACTIONAL_DECIMALS)]
    return "\n".join(lines)


def _numbers(line, what, lineno):
    fields = line.split()
    if len(fields) != 3:
        raise CrystalTextError(f"line {lineno}: {what} needs 3 numbers, got {len(fields)}: {line!r}")
    values = []
    for field in fields:
        try:
            value = float(field)
        except ValueError:
            value = None
        if value is not None and not np.isfinite(value):  # nan, inf, 1e999
            raise CrystalTextError(f"line {lineno}: {what} has a non-finite value: {field!r}")
        # float() also takes "1_0" and non-ASCII digits; the format does not.
        if value is None or not _NUMBER.fullmatch(field):
            raise CrystalTextError(f"line {lineno}: {what} has a value that is not a number: {field!r}")
        values.append(value)
    return values


#: How crystal text is kept on one line (``atoms.info["generated_text"]``): every
#: ASE format that stores ``info`` (extxyz comment lines above all) takes it as is.
LINE_SEPARATOR = " | "


def one_line(text: str) -> str:
    """Crystal text on one line, lines joined by :data:`LINE_SEPARATOR`; :func:`text_to_atoms` reads it."""
    return LINE_SEPARATOR.join(line.strip() for line in text.strip().splitlines())


def _crystal_lines(text):
    """Non-blank lines up to the first blank line after the crystal starts."""
    if "\n" not in text and LINE_SEPARATOR in text:
        text = text.replace(LINE_SEPARATOR, "\n")  # the one-line form of :func:`one_line`
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            lines.append(line)
        elif lines:
            break
    return lines


def cell_volume(lengths: ArrayLike, angles: ArrayLike) -> float:
    """Volume of a cell from its parameters, or 0 for impossible angles."""
    cos = np.cos(np.radians(angles))
    arg = 1 - np.sum(cos**2) + 2 * np.prod(cos)
    if arg <= 0:
        return 0.0
    return float(np.prod(lengths) * np.sqrt(arg))


def _check_cell(lengths, angles):
    if min(lengths) <= 0:
        raise CrystalTextError(f"degenerate cell: lattice lengths must be positive, got {lengths}")
    if max(lengths) > MAX_LENGTH:
        raise CrystalTextError(f"absurd cell: a lattice length exceeds {MAX_LENGTH:g} A: {lengths}")
    a, b, g = angles
    if min(angles) <= 0 or max(angles) >= 180 or a + b + g >= 360 or a + b <= g or a + g <= b or b + g <= a:
        raise CrystalTextError(f"impossible lattice angles: {angles}")
    # Measure the cell ASE will build: the closed formula loses digits on nearly
    # flat cells, and ASE asserts on some that pass it.
    try:
        volume = abs(Cell.new(list(lengths) + list(angles)).volume)
    except AssertionError:
        volume = 0.0
    if not volume >= MIN_VOLUME:  # also catches NaN
        raise CrystalTextError(f"degenerate cell: volume {volume:.3g} A^3 is below {MIN_VOLUME} A^3")


def text_to_atoms(text: str, *, max_atoms: int = MAX_ATOMS) -> Atoms:
    """Parse one crystal from text into a periodic ``ase.Atoms``.

    Raises
    ------
    CrystalTextError
        With the precise reason: malformed lattice lines, unparseable or
        non-finite numbers, unknown element symbols, a symbol line without
        coordinates, a degenerate cell or more than ``max_atoms`` atoms.
    """
    if not isinstance(text, str):
        raise CrystalTextError(f"expected a string, got {type(text).__name__}")
    lines = _crystal_lines(text)
    if len(lines) < 2:
        raise CrystalTextError("missing lattice lines: need lengths and angles")
    lengths = _numbers(lines[0], "lattice lengths", 1)
    angles = _numbers(lines[1], "lattice angles", 2)
    _check_cell(lengths, angles)
    body = lines[2:]
    if not body:
        raise CrystalTextError("no atoms after the lattice lines")
    if len(body) // 2 > max_atoms:
        raise CrystalTextError(f"too many atoms: more than {max_atoms}")
    symbols, frac = [], []
    for k in range(0, len(body), 2):
        symbol = body[k]
        if symbol not in _ELEMENT_SET:
            raise CrystalTextError(f"line {k + 3}: unknown element symbol {symbol!r}")
        if k + 1 == len(body) or body[k + 1] in _ELEMENT_SET or body[k + 1] == MASK:
            raise CrystalTextError(f"line {k + 3}: element {symbol} has no coordinate line")
        symbols.append(symbol)
        frac.append(_numbers(body[k + 1], "fractional coordinates", k + 4))
    frac = np.asarray(frac) % 1.0
    return Atoms(symbols=symbols, scaled_positions=frac, cell=lengths + angles, pbc=True)


def mask_element(text: str, symbol: str, mask: str = MASK) -> str:
    """Replace every atom of one element by the line ``[MASK]``.

    Only whole symbol lines are matched, so masking N leaves Na and Nb alone.
    """
    if symbol not in _ELEMENT_SET:
        raise CrystalTextError(f"unknown element symbol {symbol!r}")
    lines = text.split("\n")
    hits = 0
    # Symbol lines are every other line after the two lattice lines.
    for i in range(2, len(lines), 2):
        if lines[i].strip() == symbol:
            lines[i] = mask
            hits += 1
    if not hits:
        raise CrystalTextError(f"element {symbol} does not occur in the crystal")
    return "\n".join(lines)


def split_crystals(text: str) -> list[str]:
    """Split a multi-crystal text (blank-line separated) into single texts."""
    blocks = re.split(r"\n\s*\n", text.strip())
    return [b.strip("\n") for b in blocks if b.strip()]


def is_element(symbol: str) -> bool:
    """True for the symbol of a real element (H to Og)."""
    return symbol in _ELEMENT_SET


def is_periodic(atoms: Atoms) -> bool:
    """True for a crystal: periodic along all three axes (``pbc``) with a full, rank-3 cell."""
    return bool(atoms.pbc.all()) and atoms.cell.rank == 3
