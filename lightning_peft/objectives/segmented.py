"""Segmented next-token cross-entropy: the ``[batch, length, vocab]`` logits never exist whole.

LeMo/JENGA §3.6, usable on its own (``SegmentedTokenCrossEntropy(segment_size=2048)``, or
``TokenCrossEntropy(segment_size=2048)``, which delegates here). The objective runs the decoder body
itself to get the final hidden states, and the LM head plus cross-entropy run one chunk of
``segment_size`` positions at a time inside activation checkpointing. With a frozen ``nn.Linear`` LM
head (LoRA and most PEFT heads) each chunk's gradient with respect to its hidden states is formed in the
forward (a token's loss depends on its own hidden state only) and kept instead of the logits, so the
backward recomputes nothing; a trainable LM head (full fine-tuning) takes the checkpointed chunk, whose
backward recomputes one chunk's logits at a time. The chunk losses are summed and divided by the number
of valid labels (the standard mean; the released code divides by the length), so value and gradient
equal the plain loss. Token weights and token selection go through the same channel as
:class:`~lightning_peft.objectives.losses.TokenCrossEntropy`.

Evaluation predictions are the next-token argmax ids ``[B, N-1]`` (computed chunk by chunk without
gradients), since there are no whole logits to return.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lightning_peft.heads.base import HeadError
from lightning_peft.objectives.base import (
    IGNORE_INDEX,
    LogitsObjective,
    LossOutput,
    per_token_cross_entropy,
    weighted_token_mean,
)


class SegmentError(HeadError):
    """A model the segmented loss cannot run on (its logits are not ``lm_head(hidden)``)."""


class SegmentedTokenCrossEntropy(LogitsObjective):
    """Next-token cross-entropy from final hidden states, one checkpointed chunk of positions at a time.

    Args:
        label_smoothing: standard label smoothing.
        weights_key: the batch key holding per-token weights (aligned with ``labels``).
        segment_size: positions per chunk (causal LMs whose logits are ``lm_head(hidden)``).
    """

    def __init__(self, label_smoothing: float = 0.0, weights_key: str = "token_weights",
                 segment_size: int = 2048) -> None:
        if segment_size is None or isinstance(segment_size, bool) or int(segment_size) < 1:
            raise ValueError(f"segment_size={segment_size} must be a positive number of positions (e.g. 2048).")
        self.label_smoothing = label_smoothing
        self.weights_key = weights_key
        self.segment_size = int(segment_size)

    # ---------------------------------------------------------------- the forward this objective owns
    def hidden_and_head(self, module: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.nn.Module]:
        """Final hidden states of the decoder body and the LM head of ``module``'s attached model."""
        from lightning_peft.backbones import unwrap_hf

        model = module.model
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            raise SegmentError(f"segment_size={self.segment_size} cannot be used with {module.head!r}: its virtual "
                               "tokens are added by the PEFT wrapper; use segment_size: null with this head.")
        hf = unwrap_hf(model)
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(hf.config, attr, None):
                raise SegmentError(f"segment_size needs logits = lm_head(hidden), but this backbone applies {attr}; "
                                   "use segment_size: null.")
        body = getattr(hf, hf.base_model_prefix)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        return body(**inputs).last_hidden_state, hf.get_output_embeddings()

    def loss(self, module: Any, batch: dict[str, Any]) -> LossOutput:
        if getattr(getattr(module, "head", None), "own_loss", False):
            return super().loss(module, batch)  # the head's own loss needs the wrapper's full forward
        hidden, lm_head = self.hidden_and_head(module, batch)
        ce, preds = self.segmented_token_losses(hidden, lm_head, batch["labels"],
                                                with_predictions=not torch.is_grad_enabled())
        value, logs = weighted_token_mean(ce, batch, self.weights_key, module)
        return LossOutput(value, logs, preds)

    def from_logits(self, logits, batch, module=None):  # ``objective(logits, batch)``: the plain formula
        ce = per_token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:], self.label_smoothing)
        return weighted_token_mean(ce, batch, self.weights_key, module)

    # ---------------------------------------------------------------- chunks
    def segmented_token_losses(self, hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                               with_predictions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-position losses ``[B, N-1]`` from final hidden states, one checkpointed chunk at a time.

        Returns the losses and, with ``with_predictions``, the argmax predictions ``[B, N-1]`` (computed
        chunk by chunk without gradients, for evaluation metrics).
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
        return per_token_cross_entropy(lm_head(h).float(), y, self.label_smoothing)


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
        ce = per_token_cross_entropy(flat, target, label_smoothing)
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


__all__ = ["SegmentError", "SegmentedTokenCrossEntropy"]
