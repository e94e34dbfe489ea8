"""Structural and compositional validity (CDVAE's definitions).

* **structural**: every periodic interatomic distance >= 0.5 A and cell volume
  >= 0.1 A^3 (a benchmark convention; :data:`COVALENT_RATIO` adds the
  element-aware floor that ``generate`` holds its crystals to);
* **compositional**: SMACT charge neutrality with the Pauling electronegativity
  test (SMACT's 2014 oxidation-state table, as CDVAE); single elements and
  all-metal alloys are valid.

Decoding (the charge guard, re-sampling of too-close atoms) and the metrics
both use these kernels, so a guard and the number it is judged by agree.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms
from ase.cell import Cell

from ase_crystal_llm import settings
from ase_crystal_llm.text.format import is_periodic

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from numpy.typing import ArrayLike
    from pymatgen.core import Structure

__all__ = [
    "COVALENT_RATIO", "MIN_DISTANCE", "MIN_VOLUME", "OXIDATION_STATES", "as_atoms", "as_structure",
    "composition_valid", "counts_valid", "pair_floor", "pair_floors", "reduced_cell", "reduced_formula",
    "structure_valid", "validity_flags", "validity_rates",
]


MIN_DISTANCE = 0.5  # Angstrom


MIN_VOLUME = 0.1  # Angstrom^3


#: Closest pair allowed, as a fraction of the sum of the two covalent radii (the rule of ase_ga's
#: ``closest_distances_generator``).  No MP-20 crystal is closer: 3,000 train and 3,000 val crystals
#: measured, the closest 0.653 (benchmarks/results/covalent_spacing.json).
COVALENT_RATIO = 0.6


#: Smallest cell volume a formula-constrained crystal may grow into, as a multiple of the summed
#: covalent-sphere volumes of its atoms (:func:`covalent_volume`).  MP-20 crystals sit at 0.68 or more,
#: 0.5th percentile 0.91, median 1.49 (benchmarks/results/formula_room.json).
VOLUME_RATIO = 0.9


#: smact oxidation-state table used by CDVAE (smact 2.x's default).
OXIDATION_STATES = "smact14"


# -- conversions ---------------------------------------------------------------
def as_structure(obj: Atoms | Structure) -> Structure:
    """A pymatgen ``Structure`` from ``Atoms`` or a ``Structure``."""
    from pymatgen.core import Structure

    if isinstance(obj, Structure):
        return obj
    if isinstance(obj, Atoms):
        from pymatgen.core import Lattice

        return Structure(Lattice(np.array(obj.cell)), obj.get_chemical_symbols(), obj.get_positions(),
                         coords_are_cartesian=True)
    raise TypeError(f"expected ase.Atoms or pymatgen Structure, got {type(obj).__name__}")


def as_atoms(obj: Atoms | Structure) -> Atoms:
    """``ase.Atoms`` from ``Atoms`` or a pymatgen ``Structure``."""
    if isinstance(obj, Atoms):
        return obj
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_atoms(as_structure(obj))


def reduced_formula(obj: Atoms | Structure | str) -> str | None:
    """pymatgen's reduced formula of a structure or a formula string (``None`` if unreadable)."""
    from pymatgen.core import Composition

    try:
        if isinstance(obj, str):
            return Composition(obj).reduced_formula
        return Composition(as_atoms(obj).get_chemical_formula()).reduced_formula
    except Exception:  # an unparsable formula matches nothing
        return None


def _mean(flags):
    flags = list(flags)
    return float(np.mean(flags)) if flags else None


# -- validity ------------------------------------------------------------------
def structure_valid(structure: Atoms | Structure, min_distance: float = MIN_DISTANCE,
                    min_volume: float = MIN_VOLUME, covalent_ratio: float | None = None) -> bool:
    """CDVAE's structural validity: all periodic distances >= ``min_distance``, volume >= ``min_volume``.

    Distances include an atom's own periodic images, so a lattice vector
    shorter than ``min_distance`` is invalid too.  With ``covalent_ratio``
    each pair must also be at least that fraction of the sum of its two
    covalent radii apart (:func:`pair_floors`).
    """
    from ase.neighborlist import neighbor_list

    atoms = as_atoms(structure)
    if len(atoms) == 0 or not is_periodic(atoms):
        return False
    if not (np.isfinite(atoms.cell.array).all() and np.isfinite(atoms.positions).all()):
        return False
    if abs(atoms.cell.volume) < min_volume:
        return False
    floors = pair_floors(atoms.numbers, min_distance, covalent_ratio)
    # The same lattice in its shortest basis: on a nearly flat cell (a sampler can
    # write one) neighbor_list loops over thousands of images and takes minutes.
    reduced = reduced_cell(atoms.cell)
    if min(reduced.lengths()) < floors.diagonal().max():  # an atom touches its own image
        return False
    atoms = Atoms(atoms.numbers, positions=atoms.positions, cell=reduced, pbc=True)
    i, j, d = neighbor_list("ijd", atoms, floors.max())
    return bool((d >= floors[i, j]).all())


def pair_floors(numbers: Sequence[int], min_distance: float = MIN_DISTANCE,
                covalent_ratio: float | None = None) -> np.ndarray:
    """Closest distance allowed between each pair of atoms (angstrom), an ``(n, n)`` array (:func:`pair_floor`)."""
    from ase.data import covalent_radii

    radii = covalent_radii[np.asarray(numbers, dtype=int)]
    return pair_floor(radii[:, None], radii[None, :], min_distance, covalent_ratio)


def pair_floor(radius_a: ArrayLike, radius_b: ArrayLike, min_distance: float | None = MIN_DISTANCE,
               covalent_ratio: float | None = None) -> np.ndarray:
    """``max(min_distance, covalent_ratio * (r_a + r_b))`` (angstrom); just ``min_distance`` without a ratio."""
    total = np.add(radius_a, radius_b)
    return np.maximum(float(min_distance or 0.0), (covalent_ratio or 0.0) * total)


def covalent_volume(symbols: Mapping[str, int]) -> float:
    """Summed volume of the atoms' covalent spheres (cubic angstrom), from element counts."""
    from ase.data import atomic_numbers, covalent_radii

    return float(sum(n * 4 / 3 * np.pi * covalent_radii[atomic_numbers[s]] ** 3 for s, n in symbols.items()))


def cell_volume_ratio(atoms: Atoms) -> float:
    """Cell volume over the summed covalent-sphere volumes of the atoms."""
    symbols, counts = np.unique(atoms.get_chemical_symbols(), return_counts=True)
    return abs(atoms.cell.volume) / covalent_volume(dict(zip(symbols, counts.tolist())))


def too_dense(atoms: Atoms, volume_ratio: float = VOLUME_RATIO) -> bool:
    """True when the cell is smaller than ``volume_ratio`` times its atoms' covalent-sphere volume."""
    return bool(cell_volume_ratio(atoms) < volume_ratio)


def reduced_cell(cell: ArrayLike) -> Cell:
    """The lattice in its shortest (Minkowski) basis; the cell as given when the reduction does not converge."""
    cell = Cell(np.asarray(cell, dtype=float))
    try:
        return cell.minkowski_reduce()[0]
    except RuntimeError:
        return cell


def composition_valid(structure: Atoms | Structure) -> bool:
    """CDVAE's SMACT validity: some charge-neutral oxidation-state assignment passes the Pauling test.

    Single elements and alloys of metals only are valid; compositions with
    elements unknown to SMACT are invalid.  The answer is exactly that of
    ``smact.screening.smact_validity(..., use_pauling_test=True,
    include_alloys=True, oxidation_states_set=OXIDATION_STATES)``, computed
    by :func:`_smact_valid_reduced` (memoised, pruned) instead of smact's
    enumeration of every oxidation-state combination.
    """
    atoms = as_atoms(structure)
    return counts_valid(Counter(atoms.get_chemical_symbols()))


def counts_valid(counts: Mapping[str, int]) -> bool:
    """:func:`composition_valid` of element counts, e.g. ``{"Na": 1, "Cl": 1}`` (``False`` when empty)."""
    settings.require("smact")
    from pymatgen.core import Composition

    counts = {el: c for el, c in counts.items() if c}
    if not counts:
        return False
    key = _reduced_key(counts)
    answer = _smact_valid_reduced(key) if key is not None else None
    return _smact_validity(Composition(counts)) if answer is None else answer


def _smact_validity(comp):
    """smact's own ``smact_validity`` with CDVAE's arguments; smact errors (unknown element) count as invalid."""
    from smact.screening import smact_validity

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no Pauling electronegativity for He" and the like
            return bool(smact_validity(comp, use_pauling_test=True, include_alloys=True,
                                       oxidation_states_set=OXIDATION_STATES))
    except (KeyError, TypeError, ValueError):
        return False


def _reduced_key(counts):
    """``((symbol, count // gcd), ...)`` sorted, as smact reduces stoichiometry; ``None`` for non-integer counts."""
    if any(c != int(c) or c < 1 for c in counts.values()):
        return None  # smact truncates fractional counts; leave such input to smact itself
    ints = {el: int(c) for el, c in counts.items()}
    g = math.gcd(*ints.values())
    return tuple(sorted((el, c // g) for el, c in ints.items()))


@functools.cache
def _smact_element(symbol):
    """``(oxidation states, Pauling electronegativity)`` of ``symbol`` in SMACT's ``OXIDATION_STATES`` table."""
    from smact import Element

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        element = Element(symbol)  # KeyError when smact does not know the element
    return tuple(getattr(element, f"oxidation_states_{OXIDATION_STATES}") or ()), element.pauling_eneg


@functools.lru_cache(maxsize=1 << 16)
def _smact_valid_reduced(key):
    """smact's validity of a reduced composition, or ``None`` when only smact itself can decide.

    smact accepts an oxidation state per element when the charges sum to zero
    with the reduced counts and every cation (state > 0) has a strictly lower
    Pauling electronegativity than every anion (state < 0); a missing
    electronegativity fails the test.  An assignment passes exactly when, for
    some cut ``t`` in {-inf} and the electronegativities present, elements with
    electronegativity <= t take states >= 0 and the others states <= 0 (take
    ``t`` = the largest cation electronegativity).  Each cut is a signed
    charge-reachability problem, solved with bounded sets of partial sums.
    """
    from smact import metals

    symbols = [el for el, _ in key]
    if len(symbols) == 1 or all(el in metals for el in symbols):
        return True  # smact's fast paths: single element, alloy of metals
    try:
        data = [_smact_element(el) for el in symbols]
    except KeyError:
        return None
    if any(not states for states, _ in data):
        return False
    enegs = [eneg for _, eneg in data]
    if any(eneg is None for eneg in enegs):
        return False
    if not all(math.isfinite(eneg) for eneg in enegs):
        return None  # NaN compares false in smact's test; not modelled by the cut argument
    counts = [c for _, c in key]
    for cut in [-math.inf, *sorted(set(enegs))]:
        allowed = [[s for s in states if (s >= 0 if eneg <= cut else s <= 0)] for states, eneg in data]
        if all(allowed) and _neutral_reachable(allowed, counts):
            return True
    return False


def _neutral_reachable(allowed, counts):
    """Whether ``sum(count_i * state_i) == 0`` for some choice of ``state_i`` in ``allowed[i]``."""
    lo = [c * min(states) for states, c in zip(allowed, counts)]
    hi = [c * max(states) for states, c in zip(allowed, counts)]
    rest_lo = np.cumsum(lo[::-1])[::-1].tolist()[1:] + [0]  # bounds of the charge still to come
    rest_hi = np.cumsum(hi[::-1])[::-1].tolist()[1:] + [0]
    sums = {0}
    for states, c, low, high in zip(allowed, counts, rest_lo, rest_hi):
        sums = {q for q in (r + c * s for r in sums for s in states) if low <= -q <= high}
        if not sums:
            return False
    return 0 in sums


def validity_flags(structures: Sequence[Atoms | Structure]) -> dict[str, list[bool]]:
    """Per-sample ``{"structure": [...], "composition": [...], "valid": [...]}`` booleans."""
    struct = [structure_valid(s) for s in structures]
    comp = [composition_valid(s) for s in structures]
    return {"structure": struct, "composition": comp, "valid": [a and b for a, b in zip(struct, comp)]}


def validity_rates(flags: Mapping[str, Sequence[bool]], n_total: int | None = None) -> dict[str, float | None]:
    """Fractions of valid samples from :func:`validity_flags`; ``n_total`` counts unparsed output as invalid."""
    n = len(flags["valid"]) if n_total is None else n_total
    if n == 0:
        return {"structure": None, "composition": None, "valid": None}
    return {key: sum(values) / n for key, values in flags.items()}
