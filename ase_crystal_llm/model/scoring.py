"""Log-likelihoods of answers under a model: validation NLL and IPT.

:func:`answer_nll` scores answers after their prompts in batches (the loss of
training, per example, in nats); :func:`ipt` is the paper's increase in
perplexity of a crystal's text under random translations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ase_crystal_llm.chemistry.validity import as_atoms

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch
    from ase import Atoms
    from transformers import PreTrainedTokenizerBase

    from ase_crystal_llm.text.prompts import PromptTemplate

__all__ = [
    "answer_nll", "answer_perplexities", "ipt",
]


# -- IPT -------------------------------------------------------------------------
def answer_nll(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
               answers: Sequence[str], batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats) of each answer (+ EOS) given its own prompt, and its token count.

    Examples are encoded and masked exactly as in training
    (:func:`ase_crystal_llm.model.encoding.encode_examples`, :func:`~ase_crystal_llm.model.encoding.collate`).
    """
    import torch

    from ase_crystal_llm.model.encoding import collate, encode_examples

    ids, n_prompt = encode_examples(tokenizer, prompts, answers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    step = batch_size or len(ids)
    sums, counts = [], []
    for start in range(0, len(ids), step):
        batch = collate(list(zip(ids[start : start + step], n_prompt[start : start + step])), int(pad))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()  # fmt: skip
        targets = batch["labels"][:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                reduction="none")
        sums.append(nll.sum(dim=1).cpu())
        counts.append((targets != -100).sum(dim=1).cpu())
    return torch.cat(sums).numpy(), torch.cat(counts).numpy()


def answer_perplexities(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str,
                        answers: Sequence[str]) -> np.ndarray:
    """Perplexity of each answer given ``prompt``: exp of the mean NLL over answer tokens (+ EOS) only."""
    nll, counts = answer_nll(model, tokenizer, [prompt] * len(answers), answers)
    return np.exp(nll / np.maximum(counts, 1))


def ipt(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: PromptTemplate,
        structures: Sequence[Atoms], *, n_translations: int = 20, seed: int = 0,
        progress: bool = False) -> dict[str, Any]:
    """Increase in perplexity under translation (the paper's symmetry metric).

    For each crystal, the text of ``n_translations`` random translations is
    scored; IPT = mean(PPL) - min(PPL), normalised by mean(PPL).

    Returns
    -------
    dict
        ``ipt`` and ``ipt_normalized`` (means over crystals), per-crystal
        ``values`` (normalised) and ``mean_perplexity``.
    """
    from tqdm.auto import tqdm

    from ase_crystal_llm.text.format import atoms_to_text

    rng = np.random.default_rng(seed)
    prompt = template.generation_prompt(None)
    raw, norm, mean_ppl = [], [], []
    model.eval()
    for atoms in tqdm([as_atoms(s) for s in structures], desc="IPT", disable=not progress, leave=False):
        texts = [atoms_to_text(atoms, translate=True, rng=rng) for _ in range(n_translations)]
        ppl = answer_perplexities(model, tokenizer, prompt, texts)
        raw.append(ppl.mean() - ppl.min())
        norm.append(raw[-1] / ppl.mean())
        mean_ppl.append(ppl.mean())
    if not raw:
        return {"ipt": None, "ipt_normalized": None, "values": [], "mean_perplexity": None}
    return {"ipt": float(np.mean(raw)), "ipt_normalized": float(np.mean(norm)),
            "values": [float(v) for v in norm], "mean_perplexity": float(np.mean(mean_ppl)),
            "n_structures": len(raw), "n_translations": n_translations}
