"""The model's answer to an infill prompt: which element is behind ``[MASK]``.

Every atom of one element is masked in the crystal text and the model scores
each candidate element's tokens after the infill prompt (one batched forward
pass per parent).  :func:`propose_elements` turns the scores into a tempered
distribution; the GA operators of :mod:`ase_crystal_llm.ga` draw from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ase_crystal_llm import settings
from ase_crystal_llm.chemistry.substitution import _check_element, substitutes
from ase_crystal_llm.text.format import ELEMENTS, atoms_to_text, mask_element

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ase import Atoms

__all__ = [
    "InfillModel", "element_log_likelihoods", "infill_prompt", "propose_elements",
]


class InfillModel(Protocol):
    """What infilling needs of a model: a :class:`~.generator.CrystalGenerator` is one."""

    model: Any  # a transformers causal LM
    tokenizer: Any
    template: Any  # a PromptTemplate


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


def infill_prompt(generator: InfillModel, atoms: Atoms, element: str) -> str:
    """The infill prompt for ``atoms`` with every ``element`` atom masked.

    The crystal is written in its canonical cell (primitive, Niggli-reduced),
    the convention the model was trained on; a structure that cannot be
    canonicalized (not periodic in 3D) is written as given.
    """
    from ase_crystal_llm.data.datasets import canonicalize

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


def _cache_kwargs(model, cache):
    # transformers renamed past_key_values to cache (5.2x); older releases know only the first.
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {name: cache}


def element_log_likelihoods(generator: InfillModel, atoms: Atoms, element: str,
                            candidates: Iterable[str] | None = None) -> dict[str, float]:
    """Log-likelihood of each candidate as the answer to the infill prompt.

    Each candidate is scored as ``log p(symbol tokens, EOS | prompt)``, summed
    over all its tokens; the end token makes ``N`` and ``Na`` different
    answers even when ``N`` is a token prefix of ``Na``.  All candidates go
    share one pass over the prompt, whose key-value cache then scores every
    answer in one batched pass (right-padded, so every sequence keeps the
    positions it had in training).

    Parameters
    ----------
    generator : InfillModel
        Anything with ``.model`` (a causal LM), ``.tokenizer`` and
        ``.template`` (a :class:`~ase_crystal_llm.text.prompts.PromptTemplate`).
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
    ids = torch.full((len(answers), width), pad, dtype=torch.long)
    mask = torch.zeros((len(answers), len(prompt) + width), dtype=torch.long)
    mask[:, : len(prompt)] = 1
    for row, answer in enumerate(answers):
        ids[row, : len(answer)] = torch.tensor(answer)  # right-padded: positions as in training
        mask[row, len(prompt) : len(prompt) + len(answer)] = 1

    device = next(model.parameters()).device
    with torch.no_grad(), settings.torch_threads(getattr(generator, "threads", None)):
        # The prompt is shared by every candidate: one pass over it, its cache copied to each answer.
        first = model(input_ids=torch.tensor([prompt], device=device), use_cache=True,
                      **_forward_kwargs(model, 1))
        cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
        cache.batch_repeat_interleave(len(answers))
        rest = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                     **_cache_kwargs(model, cache))
    # logits[:, j] predicts answer token j: the prompt's last position, then the answer's own.
    logits = torch.cat([first.logits[:, -1:].expand(len(answers), -1, -1), rest.logits[:, :-1]], dim=1).float()
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


def propose_elements(generator: InfillModel, atoms: Atoms, element: str, *,
                     candidates: Iterable[str] | None = None, temperature: float = 1.0) -> dict[str, float]:
    """The model's distribution over replacements for every atom of ``element``.

    Exact, not estimated from samples: each candidate is scored by
    :func:`element_log_likelihoods` and the scores go through a softmax at
    ``temperature`` (``p ~ exp(log p / T)``; ``T = 0`` puts all mass on the
    most likely candidate).

    Parameters
    ----------
    generator : InfillModel
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
