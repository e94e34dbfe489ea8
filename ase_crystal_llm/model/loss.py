"""The training loss: cross-entropy of the answer tokens, weighted per token or per example.

A causal LM's forward applies its output layer at every position, but only the
answer positions have labels.  An infill example is a whole crystal of prompt
and a two-token answer, and a generation prompt is ~40 tokens, so most of that
work (the vocabulary-sized matmul and softmax) is thrown away.
:class:`AnswerLoss` runs the decoder, then the output layer on the labelled
positions only: the same loss, less time and memory.  It is one module, so a
data-parallel wrapper (DDP through Accelerate) sees the whole computation.

Models whose causal-LM head is more than ``lm_head(hidden)`` (logit scaling or
soft-capping) would score differently that way; :func:`answer_loss_for` checks
on a short input that both paths give the same logits and otherwise keeps the
plain full-logits forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ase_crystal_llm.model.encoding import IGNORE_INDEX

__all__ = ["AnswerLoss", "answer_loss_for", "answer_positions", "token_weights"]


def token_weights(labels: torch.Tensor, averaging: str) -> torch.Tensor:
    """Weight of each next-token label: 1 (``per_token``) or 1 / answer length (``per_example``)."""
    mask = (labels[:, 1:] != IGNORE_INDEX).float()
    if averaging == "per_token":
        return mask
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)


class AnswerLoss(nn.Module):
    """Weighted sum of the answer tokens' cross-entropy of a causal LM.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        The causal LM being trained (its parameters are this module's).
    answer_only : bool
        Apply the output layer to the labelled positions only (True) or run the
        model's own forward over every position (False).
    """

    def __init__(self, model: nn.Module, answer_only: bool = True):
        super().__init__()
        self.model = model
        self.answer_only = answer_only

    def _causal_lm(self) -> nn.Module:
        get_base = getattr(self.model, "get_base_model", None)  # a peft model wraps the causal LM
        return get_base() if callable(get_base) else self.model

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits at ``positions``: flat indices into the ``(batch, length - 1)`` predictions."""
        if not self.answer_only:
            logits = self.model(input_ids=input_ids, use_cache=False).logits[:, :-1]
            return logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
        lm = self._causal_lm()
        # No KV cache: nothing decodes after this forward (and each layer's cache would cost a compiled
        # layer its own graph).
        hidden = lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        return lm.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted loss sum; ``positions`` (:func:`answer_positions` of ``labels``, computed where the
        batch was built) spares a GPU the host-device sync of finding them on the device."""
        # Right padding under causal attention: no real token attends to padding,
        # so the attention mask is left out (with it, CPU attention is ~10x slower).
        if positions is None:
            positions = answer_positions(labels)
        logits = self.logits(input_ids, positions).float()
        targets = labels[:, 1:].reshape(-1).index_select(0, positions)
        ce = F.cross_entropy(logits, targets, reduction="none")
        return (ce * weights.reshape(-1).index_select(0, positions)).sum()


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the labelled next-token predictions, ``(batch, length - 1)`` row-major."""
    return (labels[:, 1:] != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)


def answer_loss_for(model: nn.Module, device: torch.device | str = "cpu") -> AnswerLoss:
    """An :class:`AnswerLoss` on the answer-only path when it matches the model's own logits."""
    fast = AnswerLoss(model, answer_only=True)
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, min(model.config.vocab_size, 1000), (1, 8), generator=generator).to(device)
        positions = torch.arange(7, device=device)
        with torch.no_grad():
            same = torch.allclose(fast.logits(ids, positions).float(), model(input_ids=ids).logits[0, :-1].float(),
                                  rtol=1e-3, atol=1e-3)  # fmt: skip
    except (AttributeError, NotImplementedError, TypeError):
        same = False  # no separate decoder / output layer to call
    finally:
        model.train(was_training)
    return fast if same else AnswerLoss(model, answer_only=False)
