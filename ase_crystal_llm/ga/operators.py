"""Element infill as mutation operators for ASE's genetic algorithm.

Every atom of one element is masked in the crystal text, the model is asked
which element fits (:mod:`ase_crystal_llm.generation.infill`), and the answer
is swapped in.  Two :class:`OffspringCreator` operators share the swap
mechanics and differ only in how the replacement is chosen:

* :class:`TemplateElementMutation`: the paper's baseline (Gruver et al., 2024,
  Appendix C): uniform over the elements that share an oxidation state with
  the masked element at an ionic radius within ``tolerance``.
* :class:`LLMElementMutation`: drawn from :func:`~ase_crystal_llm.generation.infill.propose_elements`,
  the model's exact (tempered) distribution over the candidates.

Both work next to ASE's own operators in an ``OperationSelector``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
from ase.data import atomic_masses, atomic_numbers

from ase_crystal_llm.chemistry.substitution import (
    _check_element,
    _common_states,
    oxidation_states,
    substitutes,
    swap_table,
)
from ase_crystal_llm.generation.infill import _check_temperature, propose_elements
from ase_crystal_llm.info_keys import MATERIAL_ID
from ase_crystal_llm.text.format import ELEMENTS, is_periodic

# Proposal distributions an LLMElementMutation keeps (a search's parents and their elements).
_PROPOSALS_KEPT = 512

try:  # ase_ga is the GA's home since ASE 3.26; older ASE ships it as ase.ga
    from ase_ga.offspring_creator import OffspringCreator
except ImportError:  # pragma: no cover - depends on the installed ASE
    from ase.ga.offspring_creator import OffspringCreator

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence
    from types import ModuleType

    from ase import Atoms

    from ase_crystal_llm.generation.generator import CrystalGenerator

__all__ = [
    "LLMElementMutation",
    "swap_element",
    "TemplateElementMutation",
    "mutate_structures",
    "oxidation_states",
    "propose_elements",
    "substitutes",
    "swap_table",
]


def swap_element(atoms: Atoms, old: str, new: str) -> Atoms:
    """A copy of ``atoms`` with every ``old`` atom turned into ``new``.

    Only whole symbols are compared, so swapping N never touches Na.  Per-atom
    masses of the swapped atoms are reset to the new element's standard mass;
    ``info`` and any calculator are dropped (they describe the old structure).
    """
    _check_element(new)
    symbols = np.array(atoms.get_chemical_symbols())
    hit = symbols == old
    if not hit.any():
        raise ValueError(f"element {old} does not occur in {atoms.get_chemical_formula()}")
    child = atoms.copy()
    child.info = {}
    child.numbers[hit] = atomic_numbers[new]
    if child.has("masses"):
        child.arrays["masses"][hit] = atomic_masses[atomic_numbers[new]]
    return child


def _element_groups(element_pool):
    """``element_pool`` as ASE's element mutations take it: one list, or a list of lists."""
    if element_pool is None:
        return None
    pool = list(element_pool)
    groups = [pool] if not pool or isinstance(pool[0], str) else [list(g) for g in pool]
    for group in groups:
        if not group:
            raise ValueError("element_pool has an empty group")
        for symbol in group:
            if not isinstance(symbol, str):
                raise ValueError(f"element_pool must hold symbols or lists of symbols, got {symbol!r}")
            _check_element(symbol)
    return tuple(tuple(dict.fromkeys(g)) for g in groups)


class _ElementSwapMutation(OffspringCreator):
    """Shared mechanics: pick an element of the parent, pick its replacement, swap all.

    Subclasses implement :meth:`candidates` (allowed replacements of one
    element) and :meth:`choose` (draw one of them; returns the symbol and a
    dict of extra ``info['data']`` for the child).
    """

    def __init__(self, element_pool=None, rng=np.random, verbose=False):
        super().__init__(verbose=verbose, rng=rng)
        self.min_inputs = 1
        self.element_pool = element_pool
        self.groups = _element_groups(element_pool)

    def candidates(self, atoms, element):
        raise NotImplementedError

    def choose(self, atoms, element, candidates):
        raise NotImplementedError

    def _alike(self, atoms, element):
        """Chemically alike replacements (:func:`substitutes`); with a pool, those in the
        element's group and every group member that takes its oxidation state (most alike
        first), and the whole group when none of them is in it."""
        alike = substitutes(atoms, element, self.tolerance)
        group = self.group(element)
        if group is None:
            return alike
        others = [s for s in group if s != element]
        state = oxidation_states(atoms.get_chemical_formula()).get(element)
        charged = [s for s in others if state is not None and state in _common_states()[s]]
        ranked = [s for s in alike if s in others] + [s for s in charged if s not in alike]
        return tuple(ranked or others)

    def group(self, element):
        """Elements that may replace ``element`` under the pool (``None``: any)."""
        if self.groups is None:
            return None
        return next((g for g in self.groups if element in g), ())

    def mutate(self, atoms):
        """A copy of ``atoms`` with every atom of one element swapped, or None when no swap exists.

        The swap is recorded in the child's ``info``: ``element_swap`` (old,
        new) and what :meth:`choose` adds (e.g. ``swap_probability``).
        """
        present = list(dict.fromkeys(atoms.get_chemical_symbols()))
        options = {el: c for el in present if (c := tuple(x for x in self.candidates(atoms, el) if x != el))}
        if not options:
            return None
        # Uniform over the parent's elements that can be replaced at all.
        element = str(self.rng.choice(sorted(options, key=atomic_numbers.get)))
        new, data = self.choose(atoms, element, options[element])
        child = swap_element(atoms, element, new)
        child.info.update(element_swap=[element, new], **data)
        return child

    def get_new_individual(self, parents):
        """Return ``(child, description)``, or ``(None, reason)`` when no swap exists (ase_ga's order:
        :meth:`mutate`, then ``initialize_individual`` / ``finalize_individual``)."""
        parent = parents[0]
        swapped = self.mutate(parent)
        if swapped is None:
            return None, f"mutation: {self.descriptor} found no allowed swap for {parent.get_chemical_formula()}"
        record = dict(swapped.info)
        swapped.info.clear()
        child = self.initialize_individual(parent, swapped)
        child.info["data"]["parents"] = [parent.info["confid"]] if "confid" in parent.info else []
        child.info["data"].update(record)
        element, new = record["element_swap"]
        description = f"mutation: {self.descriptor} {element}->{new}"
        if self.verbose:
            print(description)
        return self.finalize_individual(child), description


class TemplateElementMutation(_ElementSwapMutation):
    """The paper's template baseline: a uniform swap between ionic look-alikes.

    An element of the parent is picked uniformly (among those with at least
    one allowed replacement), its replacement uniformly from its
    :func:`substitutes` in the parent (same oxidation state as in this
    compound, similar ionic radius, or group neighbours), and every atom of
    that element is swapped.

    Parameters
    ----------
    element_pool : list of str, or list of lists of str, optional
        The chemical space, as for ASE's ``RandomElementMutation``: only
        elements of the pool are swapped, and only for elements of the same
        group (``[["Ca", "Sr"], ["Ti", "Zr"]]`` keeps A and B sites apart);
        within a group, every member that takes the element's oxidation state
        is allowed.  Default: any element for any element.
    tolerance : float
        Ionic radius tolerance, Angstrom (paper: 0.1).
    rng : numpy.random, RandomState or Generator
        Source of randomness (ASE GA convention).
    verbose : bool
        Print each mutation.
    """

    def __init__(self, element_pool: Sequence[str] | Sequence[Sequence[str]] | None = None, tolerance: float = 0.1,
                 rng: ModuleType | np.random.RandomState | np.random.Generator = np.random,
                 verbose: bool = False) -> None:
        super().__init__(element_pool, rng=rng, verbose=verbose)
        self.tolerance = float(tolerance)
        swap_table(self.tolerance)  # checks the tolerance now, not at the first swap
        self.descriptor = "TemplateElementMutation"

    def candidates(self, atoms: Atoms, element: str) -> Sequence[str]:
        return self._alike(atoms, element)

    def choose(self, atoms: Atoms, element: str, candidates: Sequence[str]) -> tuple[str, dict[str, Any]]:
        return str(self.rng.choice(list(candidates))), {}


class LLMElementMutation(_ElementSwapMutation):
    """Element swap drawn from the language model's infill distribution.

    An element of the parent is picked uniformly (among those with at least
    one allowed replacement); the replacement is drawn from
    :func:`propose_elements` over the allowed candidates at ``temperature``;
    every atom of that element is swapped.  The child's
    ``info['data']['swap_probability']`` records the probability of the
    drawn replacement.

    Parameters
    ----------
    generator : CrystalGenerator
        The infill model (``.model``, ``.tokenizer``, ``.template``).
    element_pool : list of str, or list of lists of str, optional
        The chemical space (see :class:`TemplateElementMutation`).
    temperature : float
        Softmax temperature of the proposal: lower is more conservative,
        higher more diverse, 0 is greedy.
    restrict_to_template : bool
        Score only the chemically alike replacements of the template operator
        (:func:`substitutes`, or the same-charge members of the element's
        ``element_pool`` group); otherwise score the whole group (or every
        element: the model alone decides).
    tolerance : float
        Ionic radius tolerance used for the restriction, Angstrom.
    rng : numpy.random, RandomState or Generator
        Source of randomness (ASE GA convention).
    verbose : bool
        Print each mutation.
    """

    def __init__(self, generator: CrystalGenerator, element_pool: Sequence[str] | Sequence[Sequence[str]] | None = None,
                 temperature: float = 1.0, restrict_to_template: bool = True, tolerance: float = 0.1,
                 rng: ModuleType | np.random.RandomState | np.random.Generator = np.random,
                 verbose: bool = False) -> None:
        super().__init__(element_pool, rng=rng, verbose=verbose)
        self.generator = generator
        self.temperature = _check_temperature(temperature)
        self.restrict_to_template = bool(restrict_to_template)
        self.tolerance = float(tolerance)
        swap_table(self.tolerance)  # checks the tolerance now, not at the first swap
        self.descriptor = "LLMElementMutation"
        self._proposals: OrderedDict = OrderedDict()

    def _proposal(self, atoms, element, candidates):
        """:func:`propose_elements`, remembered for the last parents: a search draws from the same
        parent many times (most draws of a well-explored parent are duplicates), one forward pass each."""
        key = (atoms.numbers.tobytes(), np.round(atoms.positions, 6).tobytes(),
               np.round(atoms.cell.array, 6).tobytes(), element, candidates)
        if key in self._proposals:
            self._proposals.move_to_end(key)
            return self._proposals[key]
        probs = propose_elements(self.generator, atoms, element, candidates=candidates,
                                 temperature=self.temperature)
        self._proposals[key] = probs
        if len(self._proposals) > _PROPOSALS_KEPT:
            self._proposals.popitem(last=False)
        return probs

    def candidates(self, atoms: Atoms, element: str) -> Sequence[str]:
        if self.restrict_to_template:
            return self._alike(atoms, element)
        group = self.group(element)
        return ELEMENTS if group is None else group

    def choose(self, atoms: Atoms, element: str, candidates: Sequence[str]) -> tuple[str, dict[str, Any]]:
        probs = self._proposal(atoms, element, tuple(candidates))
        symbols = list(probs)
        p = np.array([probs[s] for s in symbols])
        new = str(symbols[int(self.rng.choice(len(symbols), p=p / p.sum()))])
        return new, {"swap_probability": probs[new]}


def _child_info(child, parent, index):
    """Flat, file-format-safe provenance of one child (no nested GA dicts)."""
    old, new = child.info["data"]["element_swap"]
    info = {
        "parent_index": int(index),
        "parent_formula": parent.get_chemical_formula(mode="metal"),
        "mutation": f"{old}->{new}",
        "origin": child.info["key_value_pairs"]["origin"],
    }
    if MATERIAL_ID in parent.info:
        info["parent_material_id"] = parent.info[MATERIAL_ID]
    if "swap_probability" in child.info["data"]:
        info["swap_probability"] = float(child.info["data"]["swap_probability"])
    return info


def mutate_structures(parents: Iterable[Atoms], n: int,
                      operator: TemplateElementMutation | LLMElementMutation) -> Iterator[Atoms]:
    """Yield ``n`` children of ``parents``, one mutation each, parents taken in turn.

    Every parent must be a crystal (periodic in 3D).  A parent the operator
    cannot mutate (no allowed swap) leaves the rotation with a warning; when
    none is left a ``ValueError`` says so.  Children carry flat ``info``:
    ``parent_index``, ``parent_formula``, ``parent_material_id``
    (when the parent has one), ``mutation`` (``"Na->K"``), ``origin`` and, for
    the model, ``swap_probability``.

    Parameters
    ----------
    parents : sequence of ase.Atoms
    n : int
        Number of children.
    operator : TemplateElementMutation or LLMElementMutation
        Any operator whose children record ``info['data']['element_swap']``.
    """
    parents = list(parents)
    if int(n) != n or n < 0:
        raise ValueError(f"number of children must be a non-negative integer, got {n!r}")
    if n and not parents:
        raise ValueError("no parent structures to mutate")
    for index, parent in enumerate(parents):
        if not is_periodic(parent):
            raise ValueError(f"parent {index} ({parent.get_chemical_formula()}) is not periodic in 3D: "
                             "a crystal needs pbc=True and a full cell")
    active = list(range(len(parents)))
    made = turn = 0
    while made < n:
        if not active:
            raise ValueError(
                f"no parent allows a swap with {operator.descriptor} (made {made} of {n} children); "
                "widen the tolerance or the element pool"
            )
        index = active[turn % len(active)]
        child, reason = operator.get_new_individual([parents[index]])
        if child is None:
            warnings.warn(f"parent {index}: {reason.split(':', 1)[1].strip()}", stacklevel=2)
            active.remove(index)
            continue
        turn += 1
        child.info = _child_info(child, parents[index], index)
        made += 1
        yield child
