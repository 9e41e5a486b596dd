"""Token and sequence cross-entropy.

``TokenCrossEntropy`` predicts token ``t+1`` from position ``t``, ignores ``labels == -100`` and, when
the batch carries ``token_weights`` (same shape as ``labels``, produced by data pruners), computes
``sum_t w_t * ce_t / sum_t w_t`` over the valid positions. A pruner that selects tokens from the
training forward's own per-token losses (ssToken) puts a callable under ``batch["token_selector"]``:
it is called with the detached per-token losses (aligned with ``labels``; column 0 is 0) and the
batch, and returns the ``token_weights`` to use, so no second forward is needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class Objective:
    """Turns logits and a batch into a scalar loss."""

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


class TokenCrossEntropy(Objective):
    """Next-token cross-entropy honouring ``-100`` labels and optional per-token weights.

    Args:
        label_smoothing: standard label smoothing.
        weights_key: the batch key holding per-token weights (aligned with ``labels``).
    """

    def __init__(self, label_smoothing: float = 0.0, weights_key: str = "token_weights") -> None:
        self.label_smoothing = label_smoothing
        self.weights_key = weights_key

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        labels = batch["labels"]
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:]
        ce = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=self.label_smoothing,
        ).view_as(shift_labels)
        valid = (shift_labels != IGNORE_INDEX).to(ce.dtype)
        selector = batch.get("token_selector")
        if selector is not None:
            token_loss = torch.cat([torch.zeros_like(ce[:, :1]), ce.detach()], dim=1)
            batch[self.weights_key] = selector(token_loss, batch)
        weights = batch.get(self.weights_key)
        if weights is not None:
            valid = valid * weights[:, 1:].to(ce.dtype)
        denom = valid.sum()
        if denom == 0:
            return (ce * 0.0).sum()  # keeps the graph (DDP) but contributes nothing
        return (ce * valid).sum() / denom


class ClassificationCrossEntropy(Objective):
    """Cross-entropy over class logits ``(batch, num_labels)`` against integer ``labels``."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
