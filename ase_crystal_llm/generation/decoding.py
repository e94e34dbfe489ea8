"""The sampling loops: the same tokens from two decoding paths.

* :func:`fast_sample` (default): the prompt prefix is run once per distinct
  prompt and its KV cache shared by all rows; keys and values are written into
  preallocated buffers (:class:`_BufferLayer`) instead of being concatenated
  every step, and finished rows are dropped so the batch stays dense;
* :func:`plain_sample`: ``model.generate`` with the same logits processors, as
  a user of the reference code would call it.

Greedy decoding is identical on both paths (tested).  Temperature and top-p
are transformers' own ``TemperatureLogitsWarper`` / ``TopPLogitsWarper``.

Classifier-free guidance (``guidance_scale != 1``) decodes each row beside a
twin that has the unconditioned prompt and the same generated tokens, and
mixes their log-probabilities as transformers'
``UnbatchedClassifierFreeGuidanceLogitsProcessor`` does (which the plain path
uses): ``uncond + scale * (cond - uncond)``, before the grammar masks them.
The fast path runs the twins in the same batch (their shared prompt prefix is
computed once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DynamicLayer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase

    from ase_crystal_llm.generation.constraints import CrystalLogitsProcessor

__all__ = [
    "fast_sample", "guide", "plain_sample",
]


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
        if not self.is_initialized:
            return
        # Gather only the written positions (not the whole capacity), into the buffers' first rows
        # when the batch shrinks: no new buffer, and a fraction of the copying.
        keys, values = self.kbuf[indices, :, :self.length], self.vbuf[indices, :, :self.length]
        n = len(indices)
        if n > self.kbuf.shape[0]:
            self.kbuf = self.kbuf.new_empty((n, *self.kbuf.shape[1:]))
            self.vbuf = self.vbuf.new_empty((n, *self.vbuf.shape[1:]))
        else:
            self.kbuf, self.vbuf = self.kbuf[:n], self.vbuf[:n]
        self.kbuf[:, :, :self.length] = keys
        self.vbuf[:, :, :self.length] = values
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


class CoordinateTemperatureWarper:
    """Temperature per row: ``coordinate_temperature`` where the row is writing fractional coordinates.

    The grammar ``processor`` says which rows are inside a coordinate line;
    the others are divided by ``temperature``, as
    ``transformers.TemperatureLogitsWarper`` does.  Colder coordinates keep
    the exact relations between positions that make a crystal symmetric (at
    the model's temperature most samples come out P1), while elements and
    cells are drawn at the model's own temperature.

    Parameters
    ----------
    processor : CrystalLogitsProcessor
        The run's grammar processor, already applied to the scores.
    temperature, coordinate_temperature : float
        Both > 0.
    """

    def __init__(self, processor: CrystalLogitsProcessor, temperature: float, coordinate_temperature: float) -> None:
        if not (temperature > 0 and coordinate_temperature > 0):
            raise ValueError(f"need temperatures > 0, got {temperature} and {coordinate_temperature}")
        self.processor = processor
        self.temperature = float(temperature)
        self.coordinate_temperature = float(coordinate_temperature)

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        coords = torch.tensor(self.processor.in_coordinates, device=scores.device)
        divisor = torch.where(coords, self.coordinate_temperature, self.temperature).to(scores.dtype)
        return scores / divisor[:, None]


def _warpers(temperature, top_p, processor=None, coordinate_temperature=None):
    """transformers' temperature and nucleus warpers, in ``generate``'s order (none when greedy).

    ``top_p >= 1`` adds no nucleus warper, as ``generate`` does: the warper
    would refuse ``top_p > 1``.  A ``coordinate_temperature`` other than
    ``temperature`` replaces the temperature warper with
    :class:`CoordinateTemperatureWarper` (it needs the grammar ``processor``).
    """
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = []
    if temperature:
        if coordinate_temperature is None or coordinate_temperature == temperature:
            warpers.append(TemperatureLogitsWarper(float(temperature)))
        elif processor is None:
            raise ValueError("coordinate_temperature needs the crystal grammar (a processor)")
        else:
            warpers.append(CoordinateTemperatureWarper(processor, temperature, coordinate_temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    return warpers


def _choose(scores, warpers, generator, candidates=None):
    """Next tokens from masked scores: greedy without ``warpers`` (temperature 0).

    ``candidates`` bounds how many tokens any row allows (the grammar's widest
    mask): the warpers and the draw then run on each row's ``candidates`` best
    scores, the same distribution (every other token is masked), where a
    32,000-49,152-token vocabulary would be sorted in full by the nucleus warper.
    """
    if not warpers:
        return scores.argmax(dim=-1)
    index = None
    if candidates and 4 * candidates < scores.shape[-1]:
        scores, index = scores.topk(candidates, dim=-1)
    # Called one by one: LogitsProcessorList inspects signatures on every call (~15% of this
    # function); these warpers ignore input_ids.
    for warp in warpers:
        scores = warp(None, scores)
    probs = torch.softmax(scores.float(), dim=-1)
    picked = torch.multinomial(probs, 1, generator=generator)
    return (picked if index is None else index.gather(1, picked)).squeeze(1)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` on log-probabilities.

    ``scale == 1`` returns ``cond`` itself (the unguided logits, untouched).
    """
    if scale == 1:
        return cond
    cond, uncond = torch.log_softmax(cond, dim=-1), torch.log_softmax(uncond, dim=-1)
    return scale * (cond - uncond) + uncond


def _left_pad(tokenizer, prompts, device):
    # Per call: the tokenizer's own padding side (right, for training) stays as it is.
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.inference_mode()
def fast_sample(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                processor: CrystalLogitsProcessor, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None, compact_fraction: float = 0.25,
                min_new_tokens: int = 0, guidance_scale: float = 1.0,
                unconditional_prompt: str | None = None,
                coordinate_temperature: float | None = None) -> tuple[list[list[int]], list[bool]]:
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
    coordinate_temperature : float, optional
        Temperature of the tokens of fractional coordinates
        (:class:`CoordinateTemperatureWarper`); default ``temperature``.
    compact_fraction : float
        Drop finished rows from the batch (and KV cache) once this fraction
        of the live rows has finished.
    min_new_tokens : int
        End-of-sequence is forbidden before this many tokens (benchmarks
        force a length; the grammar must then allow enough atoms).
    guidance_scale : float
        Classifier-free guidance against ``unconditional_prompt``; 1 (or no
        ``unconditional_prompt``) decodes without it.
    unconditional_prompt : str, optional
        The prompt without conditions, as training writes it.

    Returns
    -------
    list of list of int
        Generated token ids per row, end-of-sequence excluded, and a list of
        booleans: whether each row ended with end-of-sequence.
    """
    device = next(model.parameters()).device
    n = len(prompts)
    guided = guidance_scale != 1 and unconditional_prompt is not None
    # Cache rows: the n rows, then (guided) their n unconditioned twins, in the same order.
    cache_prompts = list(prompts) + ([unconditional_prompt] * n if guided else [])
    unique = list(dict.fromkeys(cache_prompts))
    ids, attn = _left_pad(tokenizer, unique, device)
    rows = torch.tensor([unique.index(p) for p in cache_prompts], device=device)
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
    live = list(range(n))  # batch row -> original row
    tokens = [[] for _ in range(n)]
    ended = [False] * n
    done = [False] * n  # per live row: ended, kept in the batch until the next compaction
    warpers = _warpers(temperature, top_p, processor, coordinate_temperature)
    processor.reset(n)
    for step in range(max_new_tokens):
        m = len(live)
        scores = processor.mask(guide(logits[:m], logits[m:], guidance_scale) if guided else logits)
        if step < min_new_tokens:
            scores[:, eos] = float("-inf")
        chosen = _choose(scores, warpers, generator, candidates=processor.widest)
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
            keep = torch.tensor(kept + ([m + b for b in kept] if guided else []), device=device)
            cache.batch_select_indices(keep)
            processor.select(kept)
            attn, next_pos, chosen = attn[keep], next_pos[keep], chosen[keep[:len(kept)]]
            live = [live[b] for b in kept]
            done = [False] * len(live)
        if padded:
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        fed = torch.cat([chosen, chosen]) if guided else chosen  # a twin continues with its row's token
        out = model(input_ids=fed[:, None], attention_mask=attn if padded else None,
                    position_ids=next_pos[:, None], use_cache=True, **{key: cache})
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return tokens, ended


@torch.inference_mode()
def plain_sample(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 processor: CrystalLogitsProcessor | None, *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 min_new_tokens: int = 0, guidance_scale: float = 1.0,
                 unconditional_prompt: str | None = None,
                 coordinate_temperature: float | None = None) -> tuple[list[list[int]], list[bool]]:
    """The same sampling through ``model.generate`` (the reference-style path).

    ``processor=None`` samples without the grammar, as the reference code
    does.  The grammar runs first, then temperature and nucleus filtering, as in
    :func:`fast_sample`.  ``generate`` has no generator argument, so sampling
    uses torch's global random state (seeded from ``generator`` when given).
    Guidance is transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
    (the twins run in a second forward pass).
    """
    from transformers import GenerationConfig, LogitsProcessorList, UnbatchedClassifierFreeGuidanceLogitsProcessor

    device = next(model.parameters()).device
    ids, attn = _left_pad(tokenizer, prompts, device)
    processors = []
    if guidance_scale != 1 and unconditional_prompt is not None:
        uncond, uncond_attn = _left_pad(tokenizer, [unconditional_prompt] * len(prompts), device)
        processors.append(UnbatchedClassifierFreeGuidanceLogitsProcessor(
            guidance_scale, model, unconditional_ids=uncond, unconditional_attention_mask=uncond_attn))
    processors += [processor] if processor is not None else []
    processors += _warpers(temperature, top_p, processor, coordinate_temperature)
    sample = bool(temperature)
    if sample and generator is not None:
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
