"""Token and sequence cross-entropy (single-forward objectives).

``TokenCrossEntropy`` predicts token ``t+1`` from position ``t``, ignores ``labels == -100`` and, when
the batch carries ``token_weights`` (same shape as ``labels``, produced by data pruners), computes
``sum_t w_t * ce_t / sum_t w_t`` over the valid positions. A token selector registered on the module
(ssToken; see :mod:`lightning_peft.objectives.base`, *one channel*) is asked for the weights with the
training forward's own detached per-token losses, so no second forward is needed.

``TokenCrossEntropy(segment_size=N)`` is the segmented loss: it delegates to
:class:`~lightning_peft.objectives.segmented.SegmentedTokenCrossEntropy` (same arguments), so YAML
files written for it keep working.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_peft.objectives.base import (
    IGNORE_INDEX,
    LogitsObjective,
    LossOutput,
    next_token_cross_entropy,
    per_token_cross_entropy,
    weighted_token_mean,
)


class TokenCrossEntropy(LogitsObjective):
    """Next-token cross-entropy honouring ``-100`` labels and optional per-token weights.

    Args:
        label_smoothing: standard label smoothing.
        weights_key: the batch key holding per-token weights (aligned with ``labels``).
        segment_size: compute the LM head and the loss in checkpointed chunks of this many positions
            (the segmented loss, :class:`~lightning_peft.objectives.segmented.SegmentedTokenCrossEntropy`);
            None computes them at once.
    """

    def __init__(self, label_smoothing: float = 0.0, weights_key: str = "token_weights",
                 segment_size: int | None = None) -> None:
        self.label_smoothing = label_smoothing
        self.weights_key = weights_key
        self.segment_size = None if segment_size is None else int(segment_size)
        self._segmented = None
        if segment_size is not None:
            from lightning_peft.objectives.segmented import SegmentedTokenCrossEntropy

            self._segmented = SegmentedTokenCrossEntropy(label_smoothing, weights_key, segment_size)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-position loss ``[B, N-1]`` of predicting ``labels[:, 1:]`` from ``logits[:, :-1]`` (0 where -100)."""
        return next_token_cross_entropy(logits, labels, self.label_smoothing)

    def reduce(self, ce: torch.Tensor, batch: dict[str, Any], module: Any = None) -> torch.Tensor:
        """Mean of per-position losses over valid (and weighted) labels."""
        return weighted_token_mean(ce, batch, self.weights_key, module)[0]

    def from_logits(self, logits, batch, module=None):
        return weighted_token_mean(self.token_losses(logits, batch["labels"]), batch, self.weights_key, module)

    def loss(self, module: Any, batch: dict[str, Any]) -> LossOutput:
        if self._segmented is not None:
            return self._segmented.loss(module, batch)
        return super().loss(module, batch)


class ClassificationCrossEntropy(LogitsObjective):
    """Cross-entropy over class logits ``(batch, num_labels)`` against integer ``labels``."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def from_logits(self, logits, batch, module=None):
        labels = batch["labels"]
        ce = per_token_cross_entropy(logits, labels, self.label_smoothing)
        valid = (labels != IGNORE_INDEX).to(ce.dtype)
        return (ce * valid).sum() / valid.sum().clamp(min=1), {}


def __getattr__(name: str):  # the segmented pieces moved to .segmented; keep the old import path
    if name in ("_FusedChunkCE", "_frozen_linear", "SegmentedTokenCrossEntropy"):
        from lightning_peft.objectives import segmented

        return getattr(segmented, name)
    raise AttributeError(name)


__all__ = ["IGNORE_INDEX", "ClassificationCrossEntropy", "TokenCrossEntropy"]
