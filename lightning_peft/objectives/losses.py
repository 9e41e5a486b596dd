"""Token and sequence cross-entropy.

``TokenCrossEntropy`` predicts token ``t+1`` from position ``t``, ignores ``labels == -100`` and, when
the batch carries ``token_weights`` (same shape as ``labels``, produced by data pruners), computes
``sum_t w_t * ce_t / sum_t w_t`` over the valid positions. A pruner that selects tokens from the
training forward's own per-token losses (ssToken) puts a callable under ``batch["token_selector"]``:
it is called with the detached per-token losses (aligned with ``labels``; column 0 is 0) and the
batch, and returns the ``token_weights`` to use, so no second forward is needed.

**Segmented loss** (``TokenCrossEntropy(segment_size=2048)``; LeMo/JENGA §3.6, usable on its own): the
module hands the objective the final hidden states instead of logits, and the LM head plus
cross-entropy run one chunk of ``segment_size`` positions at a time inside activation checkpointing,
so the ``[batch, length, vocab]`` logits (and their gradient) never exist for the whole sequence. With
a frozen ``nn.Linear`` LM head (LoRA and most PEFT heads) each chunk's gradient with respect to its
hidden states is formed in the forward (a token's loss depends on its own hidden state only) and kept
instead of the logits, so the backward recomputes nothing; a trainable LM head (full fine-tuning) takes
the checkpointed chunk, whose backward recomputes one chunk's logits at a time. The chunk losses are summed and divided by the
number of valid labels (the standard mean; the released code divides by the length), so value and
gradient equal the plain loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
        segment_size: compute the LM head and the loss in checkpointed chunks of this many positions
            (segmented loss; causal LMs whose logits are ``lm_head(hidden)``); None computes them at once.
    """

    def __init__(self, label_smoothing: float = 0.0, weights_key: str = "token_weights",
                 segment_size: int | None = None) -> None:
        if segment_size is not None and int(segment_size) < 1:
            raise ValueError(f"segment_size={segment_size} must be a positive number of positions (e.g. 2048).")
        self.label_smoothing = label_smoothing
        self.weights_key = weights_key
        self.segment_size = None if segment_size is None else int(segment_size)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-position loss ``[B, N-1]`` of predicting ``labels[:, 1:]`` from ``logits[:, :-1]`` (0 where -100)."""
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:]
        return F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=self.label_smoothing,
        ).view_as(shift_labels)

    def segmented_token_losses(self, hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                               with_predictions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`token_losses` from final hidden states, one checkpointed chunk of positions at a time.

        Returns the per-position losses and, with ``with_predictions``, the argmax predictions
        ``[B, N-1]`` (computed chunk by chunk without gradients, for evaluation metrics).
        """
        n = hidden.shape[1] - 1
        size = self.segment_size or n
        losses, preds = [], []
        for start in range(0, n, size):
            stop = min(n, start + size)
            h, y = hidden[:, start:stop], labels[:, start + 1:stop + 1]
            if torch.is_grad_enabled() and h.requires_grad and _frozen_linear(lm_head):
                ce = _FusedChunkCE.apply(h, lm_head.weight, lm_head.bias, y, self.label_smoothing)
            elif torch.is_grad_enabled() and h.requires_grad:
                ce = checkpoint(self._chunk_loss, h, y, lm_head, use_reentrant=False)
            else:
                ce = self._chunk_loss(h, y, lm_head)
            losses.append(ce)
            if with_predictions:
                with torch.no_grad():
                    preds.append(lm_head(h).argmax(-1))
        return torch.cat(losses, dim=1), (torch.cat(preds, dim=1) if with_predictions else None)

    def _chunk_loss(self, h: torch.Tensor, y: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        logits = lm_head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="none", label_smoothing=self.label_smoothing).view_as(y)

    def reduce(self, ce: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Mean of per-position losses over valid (and weighted) labels."""
        shift_labels = batch["labels"][:, 1:]
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

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.reduce(self.token_losses(logits, batch["labels"]), batch)


def _frozen_linear(module: torch.nn.Module) -> bool:
    """True for a plain ``nn.Linear`` LM head whose parameters take no gradient (LoRA and most PEFT heads)."""
    return type(module) is torch.nn.Linear and not any(p.requires_grad for p in module.parameters())


class _FusedChunkCE(torch.autograd.Function):
    """Per-token cross-entropy of one chunk through a frozen linear LM head, gradient computed in the forward.

    A token's loss depends on its own hidden state only, so ``d ce_t / d h_t = (softmax(z_t) - q_t) W``
    (``q_t`` the one-hot target, label-smoothed) can be formed right after the loss, chunk by chunk, and
    kept as a ``[B, c, hidden]`` tensor; the backward multiplies it by the incoming per-token gradient.
    Exact (same value and gradient as the plain loss), and unlike a checkpointed chunk it never
    recomputes the ``hidden x vocab`` product. Used only when the LM head is frozen (no weight gradient).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, label_smoothing):  # noqa: D102
        logits = F.linear(h, weight, bias)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
        flat, target = logits.reshape(-1, logits.size(-1)), y.reshape(-1)
        ce = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="none",
                             label_smoothing=label_smoothing)
        grad = torch.softmax(flat, dim=-1)  # d ce / d logits = softmax - smoothed one-hot (0 on ignored rows)
        if label_smoothing:
            grad.sub_(label_smoothing / grad.size(-1))
        valid = (target != IGNORE_INDEX).to(grad.dtype)[:, None]
        grad.scatter_add_(1, target.clamp(min=0)[:, None], valid * -(1.0 - label_smoothing))  # no host sync
        grad.mul_(valid)
        ctx.save_for_backward((grad.to(weight.dtype) @ weight).view_as(h).to(h.dtype))
        return ce.view_as(y)

    @staticmethod
    def backward(ctx, grad_ce):  # noqa: D102
        (dh,) = ctx.saved_tensors
        return dh * grad_ce.unsqueeze(-1).to(dh.dtype), None, None, None, None


class ClassificationCrossEntropy(Objective):
    """Cross-entropy over class logits ``(batch, num_labels)`` against integer ``labels``."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
