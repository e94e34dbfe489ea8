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

With a covalent ratio the floor depends on the pair of elements
(:func:`~ase_crystal_llm.chemistry.validity.pair_floors`), so the free sites
depend on the element being placed: :class:`CovalentSites` keeps a coarse
distance field for the first digits and checks the last ones exactly.

The guard is approximate in harmless ways: a third decimal (the text format
writes two) is ignored, a token that spans two lines is only checked up to
its first newline, and with a covalent ratio the first digits are only
refused where no site can be free (a row whose last digits then find none
keeps the grammar's mask).  Generated crystals are still checked with
``structure_valid`` afterwards.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from ase.data import atomic_numbers, covalent_radii
from ase.geometry import cellpar_to_cell
from scipy.spatial.distance import cdist

from ase_crystal_llm.chemistry.validity import pair_floor, reduced_cell

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "CovalentSites", "FreeSites", "GRID", "MARGIN", "MAX_STEPS", "RowSpacing", "blocked_steps", "coordinate_sites",
]


GRID = 100  # sites per axis: fractional coordinates have two decimals


MARGIN = 1e-6  # angstrom


MAX_STEPS = 2_000_000  # larger search boxes (nearly flat cells) leave the guard off


MAX_IMAGES = 216  # covalent floors: more images per atom in reach (nearly flat cells) leave the guard off


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
    if _degenerate(cell):
        return None, False
    # |fractional component i| <= |r| * |column i of the inverse cell|.
    reach = np.ceil(min_distance * GRID * np.linalg.norm(np.linalg.inv(cell), axis=0)).astype(int)
    if np.prod(2 * reach + 1) > MAX_STEPS:
        return None, False
    steps = _grid(*[np.arange(-r, r + 1) for r in reach])
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

    def select(self, symbol: str) -> None:
        """The element written next (the flat floor does not depend on it)."""

    def has_room(self, symbol: str = "", complete: bool = False) -> bool:
        """True when some site is free (for any element)."""
        return bool(self.free_x.any())

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


# The largest covalent radius (Fr, 2.6 A) sets how far a floor can reach; the smallest (H) is the default.
_MAX_RADIUS = float(covalent_radii[1:95].max())
_MIN_RADIUS = float(covalent_radii[1:95].min())


class CovalentSites:
    """The free sites of one cell when each pair needs ``max(min_distance, ratio * (r_i + r_j))``.

    Which sites are free depends on the element placed next (:meth:`select`).
    A blocked region reaches up to 3 A, too far for :class:`FreeSites`'s
    site offsets, so two distance fields are kept on a coarse grid (boxes of
    about 0.5 A): the distance to the nearest atom, and the least
    ``distance - ratio * r_j``.  A coarse box is called free when some point
    within its half-diagonal could be.  Once ``x`` is fixed, the 100 x 100
    sites of its plane are checked exactly.

    Parameters
    ----------
    cell : array_like
        3 x 3 lattice (rows are vectors), non-degenerate.
    min_distance, ratio : float
        The flat floor (angstrom) and the covalent ratio.
    """

    def __init__(self, cell: ArrayLike, min_distance: float, ratio: float) -> None:
        self.cell = np.asarray(cell, dtype=float)
        self.min_distance, self.ratio = float(min_distance or 0.0), float(ratio)
        # How far (fractional, per axis) beyond the cell an atom image can still block a site.
        inverse = np.linalg.inv(self.cell)
        self.pad = _reach(min_distance, ratio) * np.linalg.norm(inverse, axis=0)
        # Boxes of about 0.5 A, at most 25 per axis (the fields cost boxes x images per atom).
        lengths = np.linalg.norm(self.cell, axis=1)
        self.shape = tuple(next((g for g in (10, 20) if length / g <= 0.5), 25) for length in lengths)
        step = GRID // np.array(self.shape)
        # Coarse box i holds sites i*step .. i*step + step - 1: its centre and half-diagonal.
        axes = [(np.arange(g) * s + (s - 1) / 2) / GRID for g, s in zip(self.shape, step)]
        self.centres = _grid(*axes) @ self.cell
        corners = np.array([[1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]]) * (step - 1) / (2 * GRID)
        self.slack = float(np.linalg.norm(corners @ self.cell, axis=1).max()) + MARGIN
        self.nearest = np.full(len(self.centres), np.inf)  # distance to the nearest atom
        self.room = np.full(len(self.centres), np.inf)  # least distance - ratio * r_j
        self.points = np.empty((0, 3))  # atoms and their images near the cell, cartesian
        self.point_radii = np.empty(0)
        self.shortest = float(reduced_cell(self.cell).lengths().min())
        self.normal = inverse[:, 0]  # cartesian -> fractional x
        self.plane_gap = 1 / np.linalg.norm(self.normal)  # angstrom between the planes x = 0 and x = 1
        self.yz = _grid(np.arange(GRID), np.arange(GRID)) / GRID
        self.radius = _MIN_RADIUS
        self._refresh()

    def select(self, symbol: str) -> None:
        """The element whose atom is written next."""
        number = atomic_numbers.get(symbol)
        self.radius = float(covalent_radii[number]) if number else _MIN_RADIUS
        self._refresh()

    def has_room(self, symbol: str = "", complete: bool = False) -> bool:
        """True when an atom of ``symbol`` (not ``complete``: of some element whose symbol starts so) may fit."""
        return _smallest_radius(symbol, complete) <= self.largest_radius

    def place(self, site: ArrayLike) -> None:
        """Add an atom of the selected element at ``site`` (three grid indices)."""
        points = self._images_near_cell(np.asarray(site, dtype=float) / GRID)
        d = _cdist(self.centres, points).min(axis=1, initial=np.inf)
        self.nearest = np.minimum(self.nearest, d)
        self.room = np.minimum(self.room, d - self.ratio * self.radius)
        self.points = np.vstack([self.points, points])
        self.point_radii = np.append(self.point_radii, np.full(len(points), self.radius))
        self._refresh()

    def any_free(self, x: int | slice | None = None, y: int | slice | None = None,
                 z: int | slice | None = None) -> bool:
        """True when some free site matches: each axis an index, a slice or ``None`` (any)."""
        if isinstance(x, (int, np.integer)) and y is not None:
            return bool(self._plane(int(x))[_axis(y), _axis(z)].any())
        free = self.free[_coarse(x, self.shape[0])][:, _coarse(y, self.shape[1])][:, :, _coarse(z, self.shape[2])]
        return bool(free.any())

    def _coarse_free(self, radius):
        if self.shortest < pair_floor(radius, radius, self.min_distance, self.ratio):  # touches its own image
            return np.zeros(self.shape, dtype=bool)
        free = (self.nearest + self.slack >= self.min_distance) & (self.room + self.slack >= self.ratio * radius)
        return free.reshape(self.shape)

    def _refresh(self):
        self.free = self._coarse_free(self.radius)
        self._planes = {}
        # Free for radius r: nearest + slack >= min_distance, room + slack >= ratio * r, no touching image.
        room = self.room[self.nearest + self.slack >= self.min_distance] + self.slack
        largest = min(room.max(initial=-np.inf), self.shortest / 2) / self.ratio
        self.largest_radius = largest if self.shortest >= self.min_distance else -np.inf

    def _plane(self, x):
        """Exact free flags of the 100 x 100 sites at ``x``."""
        plane = self._planes.get(x)
        if plane is None:
            plane = np.zeros((GRID, GRID), dtype=bool)
            if self.free.any():
                floor = pair_floor(self.radius, self.point_radii, self.min_distance, self.ratio) + MARGIN
                # Only atoms closer to the plane than their floor can block a site of it.
                near = np.abs(self.points @ self.normal - x / GRID) * self.plane_gap < floor
                sites = np.column_stack([np.full(GRID * GRID, x / GRID), self.yz]) @ self.cell
                distances = _cdist(sites, self.points[near])
                plane = (distances >= floor[near]).all(axis=1).reshape(GRID, GRID)
            self._planes[x] = plane
        return plane

    def _images_near_cell(self, frac):
        """Cartesian positions of the atom at ``frac`` and of its images that can block a site of the cell."""
        lo = np.ceil(-self.pad - frac).astype(int)
        hi = np.floor(1 + self.pad - frac).astype(int)
        return (frac + _grid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)])) @ self.cell


def _reach(min_distance, ratio):
    """The largest floor any pair can need (angstrom)."""
    return max(float(min_distance or 0.0), 2 * ratio * _MAX_RADIUS)


def _grid(*axes):
    """Every combination of the values on ``axes``, one row each."""
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))


def _degenerate(cell):
    return not np.isfinite(cell).all() or abs(np.linalg.det(cell)) < 1e-6


def _cdist(a, b):
    """Distances between the rows of ``a`` and of ``b`` (both cartesian)."""
    return cdist(a, b) if len(b) else np.empty((len(a), 0))


@lru_cache(maxsize=512)
def _smallest_radius(symbol, complete):
    """Smallest covalent radius of ``symbol``'s element, or (not complete) of those it starts (inf: none)."""
    radii = [covalent_radii[z] for name, z in atomic_numbers.items()
             if 0 < z < 95 and (name == symbol if complete else name.startswith(symbol))]
    return float(min(radii, default=np.inf))


def _covalent_sites(cell, min_distance, ratio):
    """:class:`CovalentSites` of ``cell``, or None when it is degenerate or too flat for the guard."""
    cell = np.asarray(cell, dtype=float)
    if _degenerate(cell):
        return None
    images = np.prod(2 * _reach(min_distance, ratio) * np.linalg.norm(np.linalg.inv(cell), axis=0) + 2)
    if images > MAX_IMAGES:
        return None
    return CovalentSites(cell, min_distance, ratio)


def _coarse(value, size):
    """Coarse boxes (of ``size`` per axis) covering a site index, slice of sites or ``None``."""
    if value is None:
        return slice(None)
    if isinstance(value, slice):
        return slice(value.start * size // GRID, -(-value.stop * size // GRID))
    return slice(int(value) * size // GRID, int(value) * size // GRID + 1)


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

    __slots__ = ("min_distance", "covalent_ratio", "line", "n_lines", "lengths", "sites", "volume")

    def __init__(self, min_distance: float, covalent_ratio: float | None = None) -> None:
        self.min_distance = float(min_distance)
        self.covalent_ratio = covalent_ratio or None
        self.line = ""
        self.n_lines = 0
        self.lengths = None
        self.sites = None
        self.volume = None  # of the cell, once the lattice is read

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
            elif n % 2 == 0 and self.sites is not None:
                self.sites.select(line)
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
        self.volume = abs(float(np.linalg.det(cell)))
        if self.covalent_ratio:
            self.sites = _covalent_sites(cell, self.min_distance, self.covalent_ratio)
            return
        steps, self_image = blocked_steps(cell, self.min_distance)
        if steps is not None:
            self.sites = FreeSites(steps, full=self_image)

    def fits(self, text: str) -> bool:
        """False when ``text``, generated next, starts an atom with no free site or heads for a taken one."""
        if self.sites is None or not text:
            return True
        if self.n_lines % 2 == 0:  # a symbol line: a new atom needs some free site
            symbol, newline, _ = (self.line + text).partition("\n")
            if newline and not symbol.strip():
                return True
            return self.sites.has_room(symbol.strip(), complete=bool(newline))
        line, newline, _ = text.partition("\n")
        try:
            return self.sites.any_free(*coordinate_sites(self.line + line, complete=bool(newline)))
        except ValueError:
            return True

    @property
    def active(self) -> bool:
        return self.sites is not None
