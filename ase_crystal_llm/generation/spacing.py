"""Atom spacing while decoding: no atom is written too close to one already written.

Fractional coordinates have two decimals, so every atom sits on one of the
100 x 100 x 100 sites of its cell.  Once a crystal's lattice lines are
written, :class:`RowSpacing` keeps the sites still free: those at least
``min_distance`` from every atom written so far, periodic images included
(CDVAE's structural validity, :func:`ase_crystal_llm.chemistry.validity.structure_valid`).
While a coordinate line is being written it tells which next tokens can still
end on a free site, so the sampler draws among those only: a digit is refused
when no completion of the coordinates it starts is free.  This is the same
distribution the model gives, conditioned on the crystal being valid at each
atom; nothing is moved after sampling.

The guard is approximate in two harmless ways: a third decimal (the text
format writes two) is ignored, and a token that spans two lines is only
checked up to its first newline.  Generated crystals are still checked with
``structure_valid`` afterwards.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from ase.geometry import cellpar_to_cell

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "FreeSites", "GRID", "MARGIN", "MAX_STEPS", "RowSpacing", "blocked_steps", "coordinate_sites",
]


GRID = 100  # sites per axis: fractional coordinates have two decimals


MARGIN = 1e-6  # angstrom


MAX_STEPS = 2_000_000  # larger search boxes (nearly flat cells) leave the guard off


def blocked_steps(cell: ArrayLike, min_distance: float) -> tuple[np.ndarray | None, bool]:
    """Site offsets closer than ``min_distance`` (angstrom) under ``cell``.

    Returns
    -------
    steps : numpy.ndarray of int, shape (k, 3), or None
        Offsets modulo :data:`GRID` (periodic images included, zero
        included); ``None`` when the cell is degenerate or so flat that the
        search is too large.
    self_image : bool
        True when an atom is closer than ``min_distance`` to its own image
        (a lattice vector is too short): no site is usable.
    """
    cell = np.asarray(cell, dtype=float)
    if not np.isfinite(cell).all() or abs(np.linalg.det(cell)) < 1e-6:
        return None, False
    # |fractional component i| <= |r| * |column i of the inverse cell|.
    reach = np.ceil(min_distance * GRID * np.linalg.norm(np.linalg.inv(cell), axis=0)).astype(int)
    if np.prod(2 * reach + 1) > MAX_STEPS:
        return None, False
    axes = [np.arange(-r, r + 1) for r in reach]
    steps = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    # A hair of margin: a site exactly min_distance away can compute as closer in the validity check.
    steps = steps[np.linalg.norm(steps @ cell / GRID, axis=1) < min_distance + MARGIN]
    wrapped = steps % GRID
    self_image = bool((~wrapped.any(axis=1) & steps.any(axis=1)).any())
    flat = np.unique(np.ravel_multi_index(wrapped.T, (GRID,) * 3))  # 1-D unique: far quicker than by rows
    return np.stack(np.unravel_index(flat, (GRID,) * 3), axis=1), self_image


class FreeSites:
    """The free sites of one cell, with their projections for quick prefix checks.

    Parameters
    ----------
    steps : numpy.ndarray
        From :func:`blocked_steps`.
    full : bool
        No site is usable (an atom would touch its own image).
    """

    def __init__(self, steps: np.ndarray, full: bool = False) -> None:
        self.steps = steps
        self.free = np.full((GRID, GRID, GRID), not full)
        self.free_xy = self.free.any(axis=2)
        self.free_x = self.free_xy.any(axis=1)

    def place(self, site: ArrayLike) -> None:
        """Block the sites around an atom at ``site`` (three grid indices)."""
        idx = (np.asarray(site) + self.steps) % GRID
        self.free[idx[:, 0], idx[:, 1], idx[:, 2]] = False
        xs = np.unique(idx[:, 0])
        self.free_xy[xs] = self.free[xs].any(axis=2)
        self.free_x[xs] = self.free_xy[xs].any(axis=1)

    def any_free(self, x: int | slice | None = None, y: int | slice | None = None,
                 z: int | slice | None = None) -> bool:
        """True when some free site matches: each axis an index, a slice or ``None`` (any)."""
        if not isinstance(x, (int, np.integer)):
            return bool(self.free_x[_axis(x)].any())
        if not isinstance(y, (int, np.integer)):
            return bool(self.free_xy[x, _axis(y)].any())
        return bool(self.free[x, y, _axis(z)].any())


def _axis(value):
    return slice(None) if value is None else value


@lru_cache(maxsize=1 << 16)  # partial lines repeat across rows and atoms
def coordinate_sites(line: str, complete: bool) -> tuple[int | slice | None, ...]:
    """Site index, slice of indices, or ``None`` (undecided) for each of the 3 numbers of ``line``.

    ``line`` is a (partial) coordinate line such as ``"0.25 0.5"``;
    ``complete`` says whether its last number has ended.  A number with
    one decimal so far can still reach ten sites.  Returns a tuple.
    """
    parts = line.lstrip(" ").split(" ")
    sites = []
    for k in range(3):
        part = parts[k] if k < len(parts) else ""
        ended = k < len(parts) - 1 or complete
        decimals = part.partition(".")[2]
        if part and ended:
            sites.append(int((decimals + "00")[:2]))  # "0.5" is 0.50; "1" is 1.00, site 0
        elif len(decimals) >= 2:
            sites.append(int(decimals[:2]))
        elif len(decimals) == 1:
            tenth = int(decimals)
            sites.append(slice(10 * tenth, 10 * tenth + 10))
        else:
            sites.append(None)
    return tuple(sites)


class RowSpacing:
    """Reads one row's generated text and keeps its free sites.

    Lines 0 and 1 are the lattice; then symbol and coordinate lines
    alternate (see :mod:`ase_crystal_llm.text`).  Until the lattice is read,
    or when it cannot be used (degenerate, nearly flat), every token fits.
    """

    __slots__ = ("min_distance", "line", "n_lines", "lengths", "sites")

    def __init__(self, min_distance: float) -> None:
        self.min_distance = float(min_distance)
        self.line = ""
        self.n_lines = 0
        self.lengths = None
        self.sites = None

    def feed(self, text: str) -> None:
        """Read generated ``text``."""
        for char in text:
            if char == "\n":
                self._end_line()
            else:
                self.line += char

    def _end_line(self):
        line, n = self.line.strip(" "), self.n_lines
        self.line, self.n_lines = "", n + 1
        try:
            if n == 0:
                self.lengths = [float(v) for v in line.split()]
            elif n == 1:
                self._start(self.lengths + [float(v) for v in line.split()])
            elif n % 2 == 1 and self.sites is not None:
                self.sites.place(coordinate_sites(line, complete=True))
        except (ValueError, TypeError, IndexError):
            self.sites = None  # unreadable text: the grammar or the parser deals with it

    def _start(self, cellpar):
        if len(cellpar) != 6:
            return
        try:
            with np.errstate(all="ignore"):
                cell = cellpar_to_cell(cellpar)
        except AssertionError:  # impossible angles: the parser rejects the crystal
            return
        steps, self_image = blocked_steps(cell, self.min_distance)
        if steps is not None:
            self.sites = FreeSites(steps, full=self_image)

    def fits(self, text: str) -> bool:
        """False when ``text``, generated next, starts an atom with no free site or heads for a taken one."""
        if self.sites is None or not text:
            return True
        if self.n_lines % 2 == 0:  # a symbol line: a new atom needs some free site
            return self.line != "" or text[0] == "\n" or bool(self.sites.free_x.any())
        line, newline, _ = text.partition("\n")
        try:
            return self.sites.any_free(*coordinate_sites(self.line + line, complete=bool(newline)))
        except ValueError:
            return True

    @property
    def active(self) -> bool:
        return self.sites is not None
