"""Element infill: the language model as a mutation operator for ASE's genetic algorithm.

Every atom of one element is masked in the crystal text, the model is asked
which element fits (the infill prompt of :class:`~ase_crystal_llm.prompts.PromptTemplate`),
and the answer is swapped in.  Two :class:`OffspringCreator` operators share the
swap mechanics and differ only in how the replacement is chosen:

* :class:`TemplateElementMutation`: the paper's baseline (Gruver et al., 2024,
  Appendix C): uniform over the elements that share an oxidation state with
  the masked element at an ionic radius within ``tolerance``.
* :class:`LLMElementMutation`: drawn from :func:`propose_elements`, the model's
  exact (tempered) distribution over the candidates.

Both work next to ASE's own operators in an ``OperationSelector``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from ase.data import atomic_masses, atomic_numbers

from . import settings
from .text import ELEMENTS, atoms_to_text, is_element, mask_element

try:  # ase_ga is the GA's home since ASE 3.26; older ASE ships it as ase.ga
    from ase_ga.offspring_creator import OffspringCreator
except ImportError:  # pragma: no cover - depends on the installed ASE
    from ase.ga.offspring_creator import OffspringCreator

__all__ = [
    "LLMElementMutation",
    "swap_element",
    "TemplateElementMutation",
    "element_log_likelihoods",
    "infill_prompt",
    "mutate_structures",
    "oxidation_states",
    "propose_elements",
    "substitutes",
    "swap_table",
    "template_candidates",
]


# --------------------------------------------------------------------------
# The template swap table (paper, Appendix C)


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


@functools.lru_cache(maxsize=None)
def _all_ionic_radii():
    return {symbol: _ionic_radii(symbol) for symbol in ELEMENTS}


@functools.lru_cache(maxsize=8)
def swap_table(tolerance=0.1):
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


@functools.lru_cache(maxsize=None)
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


@functools.lru_cache(maxsize=None)
def _is_metal(symbol):
    from pymatgen.core import Element

    return bool(Element(symbol).is_metal)


@functools.lru_cache(maxsize=None)
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


def substitutes(atoms, element: str, tolerance: float = 0.1, nearest: int = 3) -> tuple[str, ...]:
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


def template_candidates(element, tolerance=0.1):
    """The swap-table entry of one element (see :func:`swap_table`)."""
    _check_element(element)
    return swap_table(tolerance)[element]


def _check_element(symbol):
    if not is_element(symbol):
        raise ValueError(f"unknown element symbol {symbol!r}")


# --------------------------------------------------------------------------
# Scoring candidates with the model


def _candidate_list(atoms, element, candidates):
    if candidates is None:
        candidates = substitutes(atoms, element) or tuple(e for e in ELEMENTS if e != element)
    elif isinstance(candidates, str):
        candidates = [candidates]
    candidates = list(dict.fromkeys(candidates))  # drop duplicates, keep order
    if not candidates:
        raise ValueError("no candidate elements to score")
    for symbol in candidates:
        _check_element(symbol)
    return candidates


def _encode(tokenizer, text, special):
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def infill_prompt(generator, atoms, element):
    """The infill prompt for ``atoms`` with every ``element`` atom masked.

    The crystal is written in its canonical cell (primitive, Niggli-reduced),
    the convention the model was trained on; a structure that cannot be
    canonicalized (not periodic in 3D) is written as given.
    """
    from .datasets import canonicalize

    if element not in set(atoms.get_chemical_symbols()):
        raise ValueError(f"element {element} does not occur in {atoms.get_chemical_formula()}")
    try:
        atoms = canonicalize(atoms)
    except ValueError:
        pass
    return generator.template.infill_prompt(mask_element(atoms_to_text(atoms), element))


def _forward_kwargs(model, keep):
    # Computing logits only where answers are scored keeps memory at
    # batch x answer length x vocabulary instead of the whole prompt.
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        return {"logits_to_keep": keep}
    return {}


def element_log_likelihoods(generator, atoms, element, candidates=None):
    """Log-likelihood of each candidate as the answer to the infill prompt.

    Each candidate is scored as ``log p(symbol tokens, EOS | prompt)``, summed
    over all its tokens; the end token makes ``N`` and ``Na`` different
    answers even when ``N`` is a token prefix of ``Na``.  All candidates go
    through the model in one batched forward pass (right-padded, so every
    sequence keeps the positions it had in training).

    Parameters
    ----------
    generator : CrystalGenerator
        Anything with ``.model`` (a causal LM), ``.tokenizer`` and
        ``.template`` (a :class:`~ase_crystal_llm.prompts.PromptTemplate`).
    atoms : ase.Atoms
        The crystal; every atom of ``element`` is masked.
    element : str
        The element to replace.
    candidates : sequence of str, optional
        Elements to score; default: :func:`substitutes` of the element in
        ``atoms``, or every element when there is none.

    Returns
    -------
    dict[str, float]
        Candidate -> natural-log likelihood, in candidate order.
    """
    import torch

    candidates = _candidate_list(atoms, element, candidates)
    model, tokenizer = generator.model, generator.tokenizer
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-sequence token: cannot score infill answers")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    # Prompt and answer are tokenised separately and concatenated, as in training.
    prompt = _encode(tokenizer, infill_prompt(generator, atoms, element), True)
    answers = [_encode(tokenizer, symbol, False) + [eos] for symbol in candidates]
    width = max(len(a) for a in answers)
    ids = torch.full((len(answers), len(prompt) + width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, answer in enumerate(answers):
        n = len(prompt) + len(answer)
        ids[row, :n] = torch.tensor(prompt + answer)
        mask[row, :n] = 1

    device = next(model.parameters()).device
    keep = width + 1  # logits at positions len(prompt)-1 ... end
    with torch.no_grad(), settings.torch_threads(getattr(generator, "threads", None)):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), **_forward_kwargs(model, keep))
    logits = out.logits[:, -keep:-1].float()  # logits[:, j] predicts answer token j
    logp = torch.log_softmax(logits, dim=-1).cpu()

    scores = {}
    for row, (symbol, answer) in enumerate(zip(candidates, answers)):
        target = torch.tensor(answer)
        token_logp = logp[row, torch.arange(len(answer)), target]
        scores[symbol] = float(token_logp.sum())
    return scores


def _tempered_softmax(logp, temperature):
    logp = np.asarray(logp, dtype=float)
    if temperature == 0:  # the greedy limit: all mass on the best (ties shared)
        weights = (logp == logp.max()).astype(float)
    else:
        z = logp / temperature
        weights = np.exp(z - z.max())
    return weights / weights.sum()


def _check_temperature(temperature):
    temperature = float(temperature)
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    return temperature


def propose_elements(generator, atoms, element, *, candidates=None, temperature=1.0):
    """The model's distribution over replacements for every atom of ``element``.

    Exact, not estimated from samples: each candidate is scored by
    :func:`element_log_likelihoods` and the scores go through a softmax at
    ``temperature`` (``p ~ exp(log p / T)``; ``T = 0`` puts all mass on the
    most likely candidate).

    Parameters
    ----------
    generator : CrystalGenerator
        Model, tokenizer and prompt template.
    atoms : ase.Atoms
        The crystal.
    element : str
        The element to replace; it must occur in ``atoms``.
    candidates : sequence of str, optional
        Allowed replacements; default: :func:`substitutes` of ``element`` in
        ``atoms``, or every other element when there is none.
    temperature : float
        Softmax temperature (>= 0).

    Returns
    -------
    dict[str, float]
        Candidate -> probability; the values sum to 1.
    """
    temperature = _check_temperature(temperature)
    scores = element_log_likelihoods(generator, atoms, element, candidates)
    probs = _tempered_softmax(list(scores.values()), temperature)
    return {symbol: float(p) for symbol, p in zip(scores, probs)}


# --------------------------------------------------------------------------
# GA operators


def swap_element(atoms, old, new):
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

    def get_new_individual(self, parents):
        """Return ``(child, description)``, or ``(None, reason)`` when no swap exists."""
        parent = parents[0]
        present = list(dict.fromkeys(parent.get_chemical_symbols()))
        options = {el: c for el in present if (c := tuple(x for x in self.candidates(parent, el) if x != el))}
        if not options:
            formula = parent.get_chemical_formula()
            return None, f"mutation: {self.descriptor} found no allowed swap for {formula}"

        # Uniform over the parent's elements that can be replaced at all.
        element = str(self.rng.choice(sorted(options, key=atomic_numbers.get)))
        new, data = self.choose(parent, element, options[element])

        child = self.initialize_individual(parent, swap_element(parent, element, new))
        child.info["data"]["parents"] = [parent.info["confid"]] if "confid" in parent.info else []
        child.info["data"]["element_swap"] = [element, new]
        child.info["data"].update(data)
        description = f"mutation: {self.descriptor} {element}->{new}"
        if self.verbose:
            print(description)
        return self.finalize_individual(child), description

    def mutate(self, atoms):
        """The swapped structure alone (for ASE's ``CombinationMutation``), or None."""
        child, _ = self.get_new_individual([atoms])
        return child


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

    def __init__(self, element_pool=None, tolerance=0.1, rng=np.random, verbose=False):
        super().__init__(element_pool, rng=rng, verbose=verbose)
        self.tolerance = float(tolerance)
        swap_table(self.tolerance)  # checks the tolerance now, not at the first swap
        self.descriptor = "TemplateElementMutation"

    def candidates(self, atoms, element):
        return self._alike(atoms, element)

    def choose(self, atoms, element, candidates):
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

    def __init__(self, generator, element_pool=None, temperature=1.0, restrict_to_template=True,
                 tolerance=0.1, rng=np.random, verbose=False):
        super().__init__(element_pool, rng=rng, verbose=verbose)
        self.generator = generator
        self.temperature = _check_temperature(temperature)
        self.restrict_to_template = bool(restrict_to_template)
        self.tolerance = float(tolerance)
        swap_table(self.tolerance)  # checks the tolerance now, not at the first swap
        self.descriptor = "LLMElementMutation"

    def candidates(self, atoms, element):
        if self.restrict_to_template:
            return self._alike(atoms, element)
        group = self.group(element)
        return ELEMENTS if group is None else group

    def choose(self, atoms, element, candidates):
        probs = propose_elements(self.generator, atoms, element, candidates=candidates,
                                 temperature=self.temperature)
        symbols = list(probs)
        p = np.array([probs[s] for s in symbols])
        new = str(symbols[int(self.rng.choice(len(symbols), p=p / p.sum()))])
        return new, {"swap_probability": probs[new]}


# --------------------------------------------------------------------------
# Many children outside a GA (the ``crystal-llm mutate`` engine)


def _child_info(child, parent, index):
    """Flat, file-format-safe provenance of one child (no nested GA dicts)."""
    old, new = child.info["data"]["element_swap"]
    info = {
        "parent_index": int(index),
        "parent_formula": parent.get_chemical_formula(mode="metal"),
        "mutation": f"{old}->{new}",
        "origin": child.info["key_value_pairs"]["origin"],
    }
    if "material_id" in parent.info:
        info["parent_material_id"] = parent.info["material_id"]
    if "swap_probability" in child.info["data"]:
        info["swap_probability"] = float(child.info["data"]["swap_probability"])
    return info


def mutate_structures(parents, n, operator):
    """Yield ``n`` children of ``parents``, one mutation each, parents taken in turn.

    Every parent must be a crystal (periodic in 3D).  A parent the operator
    cannot mutate (no allowed swap) leaves the rotation with a warning; when none is left a ``ValueError`` says so.  Children carry
    flat ``info``: ``parent_index``, ``parent_formula``, ``parent_material_id``
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
        if parent.cell.rank < 3 or not parent.pbc.all():
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
