"""Sample crystals from a trained model as :class:`ase.Atoms`.

>>> from ase_crystal_llm import CrystalGenerator                  # doctest: +SKIP
>>> gen = CrystalGenerator.from_pretrained("models/my-model")     # doctest: +SKIP
>>> structures = gen.generate(10, formula="LiFePO4", seed=0)      # doctest: +SKIP

Every sample is decoded under the crystal grammar of :mod:`.constraints`
(real element symbols, well-formed numbers, end only after a complete atom;
with a formula condition, only whole multiples of that formula), parsed by
:func:`~ase_crystal_llm.text.text_to_atoms`, and re-sampled when it
does not parse or has atoms closer than ``min_distance``, at most
``max_attempts`` times per requested crystal.

Two decoding paths give the same tokens for the same logits (greedy decoding
is identical; tests check it):

* :func:`fast_sample` (default): the prompt prefix is run once per distinct
  prompt and its KV cache shared by all rows, keys and values are written
  into preallocated buffers instead of being concatenated every step, and
  finished rows are dropped so the batch stays dense;
* :func:`plain_sample`: ``model.generate`` with the same logits processors,
  as a user of the reference code would call it.
"""

from __future__ import annotations

import math
import os
import re
import time
import uuid
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import settings
from .constraints import FIELDS, CrystalGrammar, FormulaTarget, formula_composition
from .metrics import MIN_DISTANCE, structure_valid
from .prompts import CONDITION_KEYS, spacegroup_number
from .text import CrystalTextError, is_element, one_line, text_to_atoms

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_ATOMS = 30
DEFAULT_MAX_ATTEMPTS = 5


# -- decoding --------------------------------------------------------------------------


class _BufferLayer(DynamicLayer):
    """A KV-cache layer writing into preallocated buffers (no per-step concatenation)."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, _ = key_states.shape
        shape_k = (batch, heads, self.capacity, key_states.shape[-1])
        shape_v = (batch, heads, self.capacity, value_states.shape[-1])
        self.device = key_states.device
        self.kbuf = torch.empty(shape_k, dtype=key_states.dtype, device=self.device)
        self.vbuf = torch.empty(shape_v, dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV buffer full: {self.length + n} > {self.capacity} positions")
        self.kbuf[:, :, self.length:self.length + n] = key_states
        self.vbuf[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys = self.kbuf[:, :, :self.length]
        self.values = self.vbuf[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self):
        return self.length

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.kbuf = self.kbuf[indices]
            self.vbuf = self.vbuf[indices]
            self.keys = self.kbuf[:, :, :self.length]
            self.values = self.vbuf[:, :, :self.length]


def _cache_kwarg(model):
    """``cache`` (transformers >= 5.x) or the older ``past_key_values``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _buffer_cache(model, capacity):
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_BufferLayer(capacity) for _ in range(n_layers)])


def _filter_top_p(logits, top_p):
    """Nucleus filtering exactly as transformers' ``TopPLogitsWarper`` (keeps >= 1 token)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def _choose(scores, temperature, top_p, generator):
    """Next tokens from masked scores: greedy when ``temperature`` is 0."""
    if not temperature:
        return scores.argmax(dim=-1)
    logits = _filter_top_p(scores / temperature, top_p)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _left_pad(tokenizer, prompts, device):
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.inference_mode()
def fast_sample(model, tokenizer, prompts, processor, *, max_new_tokens, temperature=0.0, top_p=1.0,
                generator=None, compact_fraction=0.25, min_new_tokens=0):
    """Sample one continuation per prompt with the lean decoding loop.

    Parameters
    ----------
    prompts : list of str
        One per row; identical prompts share one prefix computation.
    processor : CrystalLogitsProcessor
        Masks forbidden tokens (driven directly: reset/advance/select/mask).
    max_new_tokens : int
        Hard bound on generated tokens per row.
    temperature, top_p : float
        ``temperature=0`` is greedy decoding.
    generator : torch.Generator, optional
        Random stream of the sampling (seed reproducibility).
    compact_fraction : float
        Drop finished rows from the batch (and KV cache) once this fraction
        of the live rows has finished.
    min_new_tokens : int
        End-of-sequence is forbidden before this many tokens (benchmarks
        force a length; the grammar must then allow enough atoms).

    Returns
    -------
    list of list of int
        Generated token ids per row, end-of-sequence excluded, and a list of
        booleans: whether each row ended with end-of-sequence.
    """
    device = next(model.parameters()).device
    unique = list(dict.fromkeys(prompts))
    ids, attn = _left_pad(tokenizer, unique, device)
    rows = torch.tensor([unique.index(p) for p in prompts], device=device)
    padded = bool((attn == 0).any())
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = _buffer_cache(model, ids.shape[1] + max_new_tokens)
    key = _cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=attn if padded else None, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{key: cache})
    logits = out.logits[:, -1].float()[rows]
    cache.batch_select_indices(rows)  # share the prefix: one copy per row
    attn = attn[rows]
    next_pos = positions[rows, -1] + 1

    eos_ids = processor.grammar.eos_ids
    eos = torch.tensor(sorted(eos_ids), device=device)
    n = len(prompts)
    live = list(range(n))  # batch row -> original row
    tokens = [[] for _ in range(n)]
    ended = [False] * n
    done = [False] * n  # per live row: ended, kept in the batch until the next compaction
    processor.reset(n)
    for step in range(max_new_tokens):
        scores = processor.mask(logits)
        if step < min_new_tokens:
            scores[:, eos] = float("-inf")
        chosen = _choose(scores, temperature, top_p, generator)
        picked = chosen.tolist()  # the one device sync of the step
        processor.advance(picked)
        for b, tok in enumerate(picked):
            if done[b]:
                continue
            if tok in eos_ids:
                ended[live[b]] = True
            else:
                tokens[live[b]].append(tok)
        done = [d or f for d, f in zip(done, processor.finished)]
        n_done = sum(done)
        if n_done == len(live) or step == max_new_tokens - 1:
            break
        if n_done >= max(1, compact_fraction * len(live)):
            kept = [b for b, d in enumerate(done) if not d]
            keep = torch.tensor(kept, device=device)
            cache.batch_select_indices(keep)
            processor.select(kept)
            attn, next_pos, chosen = attn[keep], next_pos[keep], chosen[keep]
            live = [live[b] for b in kept]
            done = [False] * len(live)
        if padded:
            attn = torch.cat([attn, attn.new_ones(len(live), 1)], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=attn if padded else None,
                    position_ids=next_pos[:, None], use_cache=True, **{key: cache})
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return tokens, ended


@torch.inference_mode()
def plain_sample(model, tokenizer, prompts, processor, *, max_new_tokens, temperature=0.0, top_p=1.0,
                 generator=None, min_new_tokens=0):
    """The same sampling through ``model.generate`` (the reference-style path).

    ``processor=None`` samples without the grammar, as the reference code
    does.  The grammar runs first, then temperature and nucleus filtering, as in
    :func:`fast_sample`.  ``generate`` has no generator argument, so sampling
    uses torch's global random state (seeded from ``generator`` when given).
    """
    from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    device = next(model.parameters()).device
    ids, attn = _left_pad(tokenizer, prompts, device)
    processors = [processor] if processor is not None else []
    sample = bool(temperature)
    if sample:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        if generator is not None:
            torch.manual_seed(int(generator.initial_seed()))
    eos = sorted(processor.grammar.eos_ids) if processor is not None else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # A fresh config: the model's saved sampling defaults must not add warpers.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos,
                              pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
                              min_new_tokens=min_new_tokens or None)
    out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config,
                         logits_processor=LogitsProcessorList(processors))
    tokens, ended = [], []
    for row in out[:, ids.shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        tokens.append(row[:stop] if stop is not None else row)
        ended.append(stop is not None)
    return tokens, ended


# -- failure bookkeeping --------------------------------------------------------------------


def failure_reason(message):
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
    rejected: int = 0  # parsed, but atoms closer than min_distance
    gave_up: int = 0
    tokens_generated: int = 0
    seconds: float = 0.0
    seed: int | None = None

    @property
    def raw_parse_rate(self):
        """Parsed fraction of all attempts (before re-sampling)."""
        return (self.attempts - sum(self.parse_failures.values())) / self.attempts if self.attempts else 0.0

    @property
    def final_parse_rate(self):
        """Returned fraction of the requested crystals (after re-sampling)."""
        return self.returned / self.requested if self.requested else 0.0

    @property
    def crystals_per_second(self):
        return self.returned / self.seconds if self.seconds else 0.0

    def as_dict(self):
        return {
            "requested": self.requested, "returned": self.returned, "attempts": self.attempts,
            "parse_failures": dict(self.parse_failures), "rejected": self.rejected, "gave_up": self.gave_up,
            "raw_parse_rate": self.raw_parse_rate, "final_parse_rate": self.final_parse_rate,
            "tokens_generated": self.tokens_generated, "seconds": self.seconds,
            "crystals_per_second": self.crystals_per_second, "seed": self.seed,
        }


# -- conditions ---------------------------------------------------------------------------


def condition_sets(n, **conditions):
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


def seen_in_training(keys, card=None):
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


# -- the generator ------------------------------------------------------------------------------


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def whole_number(value, name: str) -> int:
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

    def __init__(self, model, tokenizer, card=None, *, template=None, model_dir=None, threads=None):
        self.model = model
        self.tokenizer = tokenizer
        self.card = card
        if threads is None and next(model.parameters()).device.type == "cpu":
            threads = settings.default_threads(sum(p.numel() for p in model.parameters()))
        self.threads = threads
        if template is None:
            template = _card_get(card, "template")
        if template is None:
            from .prompts import PromptTemplate

            template = PromptTemplate()
        self.template = template
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.stats = GenerationStats()
        self._grammars = {}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path=None, device=None, base=None, quantize=None, threads=None):
        """Load a model directory written by ``crystal-llm train``.

        Parameters
        ----------
        path : str or Path, optional
            Model directory (full weights, or a peft adapter whose base the
            card names).  ``None``: the default model shipped with the package.
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
        if path is None:
            path = settings.DEFAULT_MODEL_DIR
            if not (Path(path) / "crystal_llm.json").is_file():
                raise FileNotFoundError(
                    "no default model is shipped with this version of ase-crystal-llm yet: "
                    "pass a model directory written by 'crystal-llm train' (--model DIR)"
                )
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        from .training import load_trained

        # The card's weight hashes are checked before anything is loaded.
        model, tokenizer, card = load_trained(path, base=base, device=device or _default_device(),
                                              quantize=quantize)
        if hasattr(model, "merge_and_unload") and not quantize:
            model = model.merge_and_unload()  # merged LoRA weights decode faster
        model.eval()
        return cls(model, tokenizer, card, model_dir=path, threads=threads)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def weights_sha256(self):
        """Hashes of the weight files as recorded in the card (computed when absent)."""
        recorded = _card_get(self.card, "weights")
        if recorded:
            return dict(recorded)
        if self.model_dir is None:
            return {}
        from .modelcard import sha256_file, weight_files

        return {name: sha256_file(self.model_dir / name) for name in weight_files(self.model_dir)}

    # -- sampling settings -----------------------------------------------------------------
    def _sampling_defaults(self, formula_constrained=False):
        """The card's ``(temperature, top_p)``; its ``formula_constrained`` entry, where it has one,
        for runs whose every crystal is held to a formula."""
        sampling = _card_get(self.card, "sampling") or {}
        if formula_constrained:
            sampling = {**sampling, **(sampling.get("formula_constrained") or {})}
        return (sampling.get("temperature", DEFAULT_TEMPERATURE), sampling.get("top_p", DEFAULT_TOP_P))

    def grammar(self, elements=None, max_atoms=DEFAULT_MAX_ATOMS):
        """The (cached) crystal grammar for this tokenizer and element set."""
        key = (tuple(sorted(set(elements))) if elements else None, int(max_atoms))
        if key not in self._grammars:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._grammars[key] = CrystalGrammar(self.tokenizer, elements=key[0], max_atoms=max_atoms,
                                                 vocab_size=vocab)
        return self._grammars[key]

    @staticmethod
    def max_new_tokens(max_atoms):
        """Tokens a crystal of ``max_atoms`` atoms can need under the grammar (one token >= one char)."""
        lattice = 2 * (3 * (FIELDS["lengths"][0] + 1 + FIELDS["lengths"][1]) + 3)
        atom = 2 + 1 + 3 * (FIELDS["coords"][0] + 1 + FIELDS["coords"][1]) + 3
        return lattice + max_atoms * atom + 1

    # -- generation --------------------------------------------------------------------------
    def generate(self, n, **kwargs):
        """Sample ``n`` crystals; returns a list of periodic :class:`ase.Atoms`.

        Parameters
        ----------
        n : int
            Number of crystals requested.
        formula, spacegroup, e_above_hull, band_gap, formation_energy : optional
            Conditions written into the prompt as in training (energies in
            eV/atom, band gap in eV).  A list cycles over the crystals, so
            several prompts share a batch.
        elements : sequence of str, optional
            Only these elements may appear (constrained decoding).  With a
            formula, they must include the formula's elements.
        constrain_formula : bool
            With a formula condition, decode only crystals whose composition
            is a whole number of formula units (``k`` times the formula,
            ``k >= 1``, at most ``max_atoms`` atoms); rows without a formula
            are free.  ``False``: the formula is only written into the prompt
            (to measure the model's own formula skill).  Recorded per
            crystal as ``info["formula_constrained"]``.
        temperature, top_p : float, optional
            Default: the card's recommended values, else 0.7 / 0.9; when
            every crystal is held to a formula, the card's
            ``sampling["formula_constrained"]`` values where it has them.
            ``temperature=0`` is greedy decoding.
        batch_size : int, optional
            Rows per batch (default 64 on CPU, the best in benchmarks/generation_cpu.py; 256 on GPU).
        seed : int, optional
            Seed of the sampling; the same seed gives the same crystals on
            the same device.  ``None`` draws one (recorded in ``stats``).
        max_attempts : int
            Samples drawn at most per requested crystal before giving up on it.
        symmetrize : float, optional
            ``symprec``: snap every sample to its detected space group.
        max_atoms : int
            Most atoms per crystal (bounds ``max_new_tokens``).
        min_distance : float or None
            Re-sample crystals with two atoms (or an atom and its own
            periodic image) closer than this many angstrom, or a cell under
            0.1 A^3: CDVAE's structural validity, 0.5 A by default.  They
            count as attempts, so validity over all attempts stays
            measurable.  ``None`` or 0 keeps every parsed crystal.
        spacing_guard : bool
            While decoding, refuse coordinate tokens that would put an atom
            closer than ``min_distance`` to one already written (see
            :mod:`.spacing`), so that few samples are wasted.  ``False``:
            the model places atoms alone (to measure its own validity).
            Off when ``min_distance`` is off, and in formula-constrained
            rows (held to a formula, the guard let the model pack extra
            formula units into far too small cells).
        charge_guard : bool
            While decoding, refuse to end a crystal whose composition is not
            charge balanced (SMACT's test, as compositional validity), for at
            most ``constraints.EXTRA_ATOMS`` more atoms: the model writes
            another atom instead.  ``False``: the model ends crystals alone.
            Rows held to a formula are not affected.
        fast : bool
            Use the lean decoding loop (default) or ``model.generate``.

        Returns
        -------
        list of ase.Atoms
            Ordered by request; fewer than ``n`` when some crystals hit
            ``max_attempts`` (a warning says so).  ``self.stats`` holds the
            run statistics.
        """
        out = list(self.iter_generate(n, **kwargs))
        return sorted(out, key=lambda a: a.info["sample_index"])

    def iter_generate(self, n, *, formula=None, spacegroup=None, e_above_hull=None, band_gap=None,
                      formation_energy=None, elements=None, constrain_formula=True, temperature=None,
                      top_p=None, batch_size=None, seed=None, max_attempts=DEFAULT_MAX_ATTEMPTS, symmetrize=None,
                      max_atoms=DEFAULT_MAX_ATOMS, min_distance=MIN_DISTANCE, spacing_guard=True, charge_guard=True,
                      fast=True, start_index=0,
                      run_id=None, rank=0, indices=None):
        """Like :meth:`generate`, but yield each crystal as soon as its batch finishes.

        Memory does not grow with ``n``.  ``indices`` (default
        ``start_index .. start_index + n - 1``) name the requested crystals
        (``info["sample_index"]``), so a resumed or multi-process run can ask
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
        if isinstance(elements, str):
            elements = [e.strip() for e in elements.split(",") if e.strip()]
        conditions = condition_sets(n, formula=formula, spacegroup=spacegroup, e_above_hull=e_above_hull,
                                    band_gap=band_gap, formation_energy=formation_energy)
        held = bool(constrain_formula and conditions and all(c.get("formula") for c in conditions))
        t_default, p_default = self._sampling_defaults(formula_constrained=held)
        temperature = t_default if temperature is None else float(temperature)
        top_p = p_default if top_p is None else float(top_p)
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
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
            batch_size = 256 if self.device.type == "cuda" else 64
        seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)
        run_id = run_id or new_run_id()
        indices = list(range(start_index, start_index + n)) if indices is None else list(indices)
        if len(indices) != n:
            raise ValueError(f"got {len(indices)} indices for {n} crystals")
        sampler = fast_sample if fast else plain_sample

        self.stats = GenerationStats(requested=n, seed=seed)
        job = dict(conditions=conditions, prompts=prompts, formulas=formulas, grammar=grammar, max_new=max_new,
                   sampler=sampler, params={"temperature": temperature, "top_p": top_p}, batch_size=batch_size,
                   seed=seed, max_attempts=max_attempts, max_atoms=max_atoms, symmetrize=symmetrize, elements=elements,
                   min_distance=min_distance or None, guard=(min_distance or None) if spacing_guard else None,
                   charge_guard=bool(charge_guard), run_id=run_id, rank=rank, indices=indices)
        # Arguments are checked above, when called; sampling starts on iteration.
        return self._run(n, **job)

    def _run(self, n, *, conditions, prompts, formulas, grammar, max_new, sampler, params, batch_size, seed,
             max_attempts, max_atoms, symmetrize, elements, min_distance, guard, charge_guard, run_id, rank,
             indices):
        stats = self.stats
        temperature, top_p = params["temperature"], params["top_p"]
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
                                                         charge_guard),
                                       max_new_tokens=max_new, temperature=temperature,
                                       top_p=top_p, generator=gen)
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
                if atoms is not None and min_distance and not structure_valid(atoms, min_distance=min_distance):
                    stats.rejected += 1
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
                          f"rejected for atoms too close: {stats.rejected})", stacklevel=2)

    @staticmethod
    def _info(conditions, elements, text, params, attempts, run_id, rank, index, seed, constrained_to=None):
        info = {f"condition_{k}": v for k, v in conditions.items()}
        if elements:
            info["condition_elements"] = ",".join(elements)
        if "formula" in conditions:
            info["formula_constrained"] = constrained_to is not None
        info.update(params)
        info.update(generated_text=one_line(text), attempts=attempts, seed=seed, run_id=run_id, rank=int(rank),
                    sample_index=int(index))
        return info

    # -- infill ------------------------------------------------------------------------------
    def propose_elements(self, atoms, element, *, candidates=None, temperature=1.0):
        """Probabilities of elements that could replace ``element`` in ``atoms``.

        Delegates to :func:`ase_crystal_llm.infill.propose_elements`.
        """
        from .infill import propose_elements

        return propose_elements(self, atoms, element, candidates=candidates, temperature=temperature)

    def run_record(self, **settings_):
        """What to store with an output: model, weight hashes, package version, settings."""
        from . import __version__

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
    atoms.info["spacegroup_number"] = int(dataset.number)
    atoms.info["symprec"] = float(symprec)
    atoms.wrap()
    if not math.isfinite(atoms.cell.volume):
        atoms.info["symmetrize_error"] = "degenerate cell"


# -- the command-line workflow -------------------------------------------------------------


class _Processes:
    """The processes of ``accelerate launch`` / ``torchrun`` (torch.distributed, env:// rendezvous)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        self.process_index = dist.get_rank()
        self.num_processes = dist.get_world_size()
        self.device = torch.device("cuda", local) if cuda else torch.device("cpu")

    def wait_for_everyone(self):
        self.dist.barrier()

    def broadcast(self, values):
        values = list(values)
        self.dist.broadcast_object_list(values, src=0)
        return values


def _distributed():
    """The process group under ``accelerate launch`` / ``torchrun`` (several processes), else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return _Processes()


def _broadcast(state, values):
    return values if state is None else state.broadcast(values)


def _part_path(output, rank, world):
    if world == 1:
        return output
    return output.with_name(f"{output.stem}.part{rank}{output.suffix}")


def _summary(output, records):
    stats = [r.get("stats", {}) for r in records]
    attempts = sum(s.get("attempts", 0) for s in stats)
    returned = sum(s.get("returned", 0) for s in stats)
    failures = sum(sum(s.get("parse_failures", {}).values()) for s in stats)
    gave_up = sum(s.get("gave_up", 0) for s in stats)
    rejected = sum(s.get("rejected", 0) for s in stats)
    seconds = sum(s.get("seconds", 0.0) for s in stats) / max(1, len({r.get("rank") for r in records}))
    rate = failures / attempts if attempts else 0.0
    speed = returned / seconds if seconds else 0.0
    return (f"wrote {returned} crystals to {output}: parse failures {rate:.1%} of {attempts} samples"
            + (f", {rejected} rejected for atoms too close" if rejected else "")
            + (f", {gave_up} requested crystals gave up after max_attempts" if gave_up else "")
            + f"; {seconds:.1f} s, {speed:.2f} crystals/s")


def generate_to_file(output, n, *, model=None, base=None, device=None, seed=None, resume=False, overwrite=False,
                     fast=True, progress=False, max_attempts=None, max_atoms=None, generator=None, threads=None,
                     **kwargs):
    """Sample ``n`` crystals into ``output`` as they come (the ``crystal-llm generate`` workflow).

    Every structure is durable once written, so an interrupted run keeps what
    it finished; ``resume=True`` adds only the crystals the output lacks
    (same run id and seed, taken from ``<output>.run.json``); an existing
    output is otherwise refused unless ``overwrite=True``.  Under
    ``accelerate launch`` the crystals are split over the processes (each
    with its own random stream) and gathered into ``output`` at the end.

    Returns
    -------
    str or None
        A one-line summary (on the main process).
    """
    from .outputs import (StructureWriter, check_output, is_db_url, merge_outputs, output_format,
                          read_run_records, run_record_path)

    server = is_db_url(str(output))  # a database server: every process writes into it directly
    output = str(output) if server else Path(output)
    output_format(output)
    state = _distributed()
    # Every process checks (so all fail alike) before the main one may change the output.
    check_output(output, overwrite=overwrite, resume=resume)
    if state is not None:
        state.wait_for_everyone()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    main = rank == 0
    if device is None and state is not None:
        device = state.device
    max_attempts = DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts
    max_atoms = DEFAULT_MAX_ATOMS if max_atoms is None else max_atoms
    run_settings = {"n": int(n), **{k: v for k, v in kwargs.items() if v is not None},
                    "max_attempts": max_attempts, "max_atoms": max_atoms, "fast": fast}

    existing, run_id = set(), None
    if main:
        parts = [_part_path(output, r, world) for r in range(world)] if world > 1 and not server else []
        if resume:
            records = read_run_records(output) + [r for p in parts for r in read_run_records(p)]
            if not records:
                raise FileNotFoundError(f"cannot resume: no run record {run_record_path(output)}")
            previous = records[-1]
            changed = sorted(k for k in set(run_settings) | set(previous.get("settings", {}))
                             if k not in ("fast", "batch_size")
                             and run_settings.get(k) != previous.get("settings", {}).get(k))
            if changed:
                raise ValueError(f"cannot resume with different settings: {', '.join(changed)} changed")
            run_id, seed = previous["run_id"], previous["seed"]
            merge_outputs([p for p in parts if p.exists()], output)
            if server or output.exists():
                with StructureWriter(output, append=True) as w:
                    existing = {i for r, i in w.existing if r == run_id}
        else:
            seed = int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)
            run_id = new_run_id()
            # A server keeps other runs' rows: the new run id keeps them apart.
            for path in [] if server else [output, run_record_path(output), Path(str(output) + ".ids"), *parts]:
                path.unlink(missing_ok=True)
        if server:  # create the tables once, before the other processes connect (they race otherwise)
            StructureWriter(output, append=True).close()
    run_id, seed, existing = _broadcast(state, [run_id, seed, existing])

    _check_request(n, kwargs, max_atoms)  # before the (slow) model load
    gen = generator or CrystalGenerator.from_pretrained(model, device=device, base=base, threads=threads)
    todo = [i for i in range(rank, int(n), world) if i not in existing]
    part = output if server else _part_path(output, rank, world)
    stream = gen.iter_generate(len(todo), indices=todo, run_id=run_id, rank=rank, seed=seed,
                               max_attempts=max_attempts, max_atoms=max_atoms, fast=fast, **kwargs)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="crystal", desc="generate", disable=not todo)
    status, session = "interrupted", uuid.uuid4().hex[:8]

    def record(status):
        entry = gen.run_record(**run_settings)
        entry.update(run_id=run_id, rank=rank, session=session, world_size=world, seed=seed, status=status,
                     output=str(output))
        return entry

    with StructureWriter(part, append=server or resume or world == 1 and output.exists()) as writer:
        # Written first, so that a killed run (no chance to clean up) can be resumed.
        writer.write_run_record(record("running"))
        try:
            last = time.monotonic()
            written = 0
            for atoms in stream:
                writer.write(atoms)
                written += 1
                if bar is not None and written == gen.stats.returned:
                    # A batch arrives all at once: count it in one update, so the first
                    # rate and time estimate are per batch, not one crystal per batch time.
                    bar.update(written - bar.n)
                if time.monotonic() - last > 10:  # statistics survive a kill, up to 10 s old
                    writer.write_run_record(record("running"))
                    last = time.monotonic()
            status = "complete"
        finally:
            if bar is not None:
                bar.close()
            writer.write_run_record(record(status))
    if state is not None:
        state.wait_for_everyone()
    if not main:
        return None
    if world > 1 and not server:
        merge_outputs([_part_path(output, r, world) for r in range(world)], output)
    records = [r for r in read_run_records(output) if r.get("run_id") == run_id]
    return _summary(output, records)
