"""Which elements may replace an element: oxidation states and ionic radii.

The paper's template baseline swaps an element for one that shares an
oxidation state at an ionic radius within ``tolerance`` (:func:`swap_table`).
:func:`substitutes` makes that charge-aware for a given crystal: the element's
oxidation state in the crystal's charge-balanced assignment
(:func:`oxidation_states`), then the nearest radii, with group neighbours for
metals and anything without a known state.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

from ase_crystal_llm.text.format import ELEMENTS, is_element

if TYPE_CHECKING:
    from ase import Atoms

__all__ = [
    "oxidation_states", "substitutes", "swap_table", "template_candidates",
]


def _ionic_radii(symbol):
    """{oxidation state: ionic radius in Angstrom} from pymatgen's tables."""
    from pymatgen.core import Element, Species

    element = Element(symbol)
    states = set(element.oxidation_states) | set(element.ionic_radii)
    radii = {}
    with warnings.catch_warnings():
        # pymatgen warns when it falls back to low-spin data or has no radius.
        warnings.simplefilter("ignore")
        for state in sorted(states):
            if state == 0:
                continue
            radius = Species(symbol, state).ionic_radius
            if radius is not None:
                radii[state] = float(radius)
    return radii


@functools.cache
def _all_ionic_radii():
    return {symbol: _ionic_radii(symbol) for symbol in ELEMENTS}


@functools.lru_cache(maxsize=8)
def swap_table(tolerance: float = 0.1) -> dict[str, tuple[str, ...]]:
    """The template swap table: element -> elements it may be replaced by.

    An element ``B`` is a partner of ``A`` when both have an ionic radius for
    some common oxidation state and the two radii differ by at most
    ``tolerance`` Angstrom.  Radii come from pymatgen (``Species(el, oxi).ionic_radius``,
    which falls back to low-spin data where no default radius is tabulated).
    Each entry lists every partner once, in order of atomic number, and never
    the element itself; elements without ionic radii (noble gases, most
    super-heavy elements) have an empty entry.

    Parameters
    ----------
    tolerance : float
        Largest allowed radius difference in Angstrom (paper: 0.1).

    Returns
    -------
    dict[str, tuple[str, ...]]
        Cached per tolerance; do not modify.
    """
    tolerance = float(tolerance)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number of Angstrom, got {tolerance}")
    radii = _all_ionic_radii()
    table = {}
    for symbol, mine in radii.items():
        table[symbol] = tuple(
            other
            for other, theirs in radii.items()
            if other != symbol
            # round(): 1.16 - 1.06 must count as 0.1, not 0.10000000000000009
            and any(s in theirs and round(abs(theirs[s] - r), 6) <= tolerance for s, r in mine.items())
        )
    return table


@functools.lru_cache(maxsize=4096)
def oxidation_states(formula: str) -> dict[str, int]:
    """The oxidation state of each element of a composition: pymatgen's most likely
    charge-balanced guess; ``{}`` when there is none (intermetallics, elements)."""
    from pymatgen.core import Composition

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            guesses = Composition(formula).oxi_state_guesses(max_sites=-1)
        except ValueError:
            guesses = ()
    # A zero state (an element, an alloy) says nothing about charge: no entry.
    return {el: int(round(v)) for el, v in guesses[0].items() if round(v)} if guesses else {}


def _radius(symbol, state):
    return _all_ionic_radii()[symbol].get(state)


@functools.cache
def _common_states():
    """Common oxidation states of each element, kept only where they make chemical sense
    as a substitute: no positive states for halogens and noble gases (Br+5 is no cation
    for Ga3+ or P5+ sites), no negative states for metals."""
    from pymatgen.core import Element

    states = {}
    for symbol in ELEMENTS:
        element = Element(symbol)
        common = set(element.common_oxidation_states)
        if element.is_halogen or element.is_noble_gas:
            common = {s for s in common if s < 0}
        if element.is_metal:
            common = {s for s in common if s > 0}
        states[symbol] = common
    return states


@functools.cache
def _is_metal(symbol):
    from pymatgen.core import Element

    return bool(Element(symbol).is_metal)


@functools.cache
def _usable(candidate, element):
    """No radioactive substitute (Tc, Pm, Po and heavier) for a stable element."""
    from pymatgen.core import Element

    return not Element(candidate).is_radioactive or Element(element).is_radioactive


def _group_neighbours(symbol):
    """Elements of the same periodic-table group one period above or below."""
    from pymatgen.core import Element

    me = Element(symbol)
    if me.is_lanthanoid or me.is_actinoid or symbol == "H":
        return ()
    return tuple(s for s in ELEMENTS if s not in (symbol, "H") and (e := Element(s)).group == me.group
                 and abs(e.row - me.row) == 1 and not (e.is_lanthanoid or e.is_actinoid))


def substitutes(atoms: Atoms | str, element: str, tolerance: float = 0.1, nearest: int = 3) -> tuple[str, ...]:
    """Elements that may replace every ``element`` atom of ``atoms``, most alike first.

    The oxidation state ``element`` has *in this compound* (:func:`oxidation_states`)
    decides, so Cl in NaCl (-1) pairs with F, Br, never with N (which shares only
    Cl's +5).  In order: elements that commonly take that state with an ionic radius
    within ``tolerance`` (the paper's template rule), nearest radius first; then the
    element's group neighbours (one period up or down) that commonly take the state;
    when both are empty, the ``nearest`` same-charge elements by radius.  A compound
    without a charge-balanced guess falls back to the :func:`swap_table` entry, and
    then to the group neighbours.
    """
    formula = atoms.get_chemical_formula() if hasattr(atoms, "get_chemical_formula") else str(atoms)
    return _substitutes(formula, element, float(tolerance), int(nearest))


@functools.lru_cache(maxsize=4096)
def _substitutes(formula, element, tolerance, nearest):
    _check_element(element)
    state = oxidation_states(formula).get(element)
    if state is None:  # metals stay metals, non-metals non-metals
        metal = _is_metal(element)
        return tuple(s for s in swap_table(tolerance)[element] + _group_neighbours(element)
                     if _is_metal(s) == metal and _usable(s, element))
    common = _common_states()
    mine = _radius(element, state)
    charged = [s for s in ELEMENTS if s != element and state in common[s] and _usable(s, element)]
    by_radius = sorted((abs(_radius(s, state) - mine), s) for s in charged
                       if mine is not None and _radius(s, state) is not None)
    close = [s for d, s in by_radius if round(d, 6) <= tolerance]
    group = [s for s in _group_neighbours(element) if s in charged and s not in close]
    found = close + group or [s for _, s in by_radius[:nearest]]
    return tuple(found)


def template_candidates(element: str, tolerance: float = 0.1) -> tuple[str, ...]:
    """The swap-table entry of one element (see :func:`swap_table`)."""
    _check_element(element)
    return swap_table(tolerance)[element]


def _check_element(symbol):
    if not is_element(symbol):
        raise ValueError(f"unknown element symbol {symbol!r}")
