"""The objective contract: an objective owns the forward it needs and turns it into a loss.

``Objective.loss(module, batch) -> LossOutput(loss, logs, predictions)``:

* ``module`` is the LightningModule (``CausalLM`` / ``SequenceClassifier``): ``module(batch)`` runs the
  backbone with its head, ``module.head.disabled(module.model)`` runs it with the head switched off
  (a reference forward), ``module.model`` is the attached model (hidden states, extra heads);
* ``loss`` is the scalar to minimise (the head's regularisation term is added by the module);
* ``logs`` are scalars the module logs every training step under their own names;
* ``predictions`` are what the evaluation metrics need: the logits aligned with the labels, or, for a
  causal LM whose objective never builds the whole logits (segmented loss), the next-token argmax ids
  ``[B, N-1]`` (an integer tensor). An objective may leave them None while gradients are enabled when
  producing them costs extra (the segmented loss computes them only under ``torch.no_grad()``).

:class:`LogitsObjective` is the plain single-forward case (one ``module(batch)`` → logits → loss); a
subclass implements :meth:`LogitsObjective.from_logits`. Heads that compute their own loss (peft CPT,
``head.own_loss``) are honoured here: the forward's own ``loss`` is returned.

**Token weights and token selection: one channel.** The batch holds plain tensors only. Per-token
weights travel as ``batch["token_weights"]`` (same shape as ``labels``; a pruner that decides before
the forward, such as QTuning, writes them). A method that selects tokens from the training forward's
own per-token losses (ssToken) is a :class:`TokenSelector` registered as ``module.token_selector``
(the DataModule does this for its pruner); a token-level objective calls
:func:`select_tokens` with the detached per-token losses, and the selector's weights multiply into the
loss and its statistics go to ``logs``. A selector with nothing pending for the batch (validation,
or no pruner step before this forward) returns None and the batch's own weights apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """What :meth:`Objective.loss` returns (see the module docstring)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    predictions: torch.Tensor | None = None


class Objective:
    """Base of every objective: ``loss(module, batch) -> LossOutput``."""

    def loss(self, module: Any, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement loss(module, batch) -> LossOutput.")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def label_logits(module: Any, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The forward's logits aligned with ``batch["labels"]`` (the module's ``label_logits`` when it has one)."""
    align = getattr(module, "label_logits", None)
    return align(logits, batch) if align is not None else logits


class LogitsObjective(Objective):
    """The plain single-forward case: ``module(batch)`` → logits → :meth:`from_logits`.

    ``objective(logits, batch)`` computes the loss from given logits (no module, no token selector).
    """

    def from_logits(self, logits: torch.Tensor, batch: dict[str, Any], module: Any = None
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(loss, logs)`` from logits aligned with the labels."""
        raise NotImplementedError

    def loss(self, module: Any, batch: dict[str, Any]) -> LossOutput:
        out = module(batch)
        logits = label_logits(module, out.logits, batch)
        if getattr(getattr(module, "head", None), "own_loss", False):
            return LossOutput(out.loss, {}, logits)
        value, logs = self.from_logits(logits, batch, module)
        return LossOutput(value, logs, logits)

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.from_logits(logits, batch)[0]


# ---------------------------------------------------------------------------------------- shared pieces
def per_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                            with_entropy: bool = False):
    """Cross-entropy of every row of ``logits`` (``[..., V]``) against ``targets`` (``[...]``), unreduced.

    Computed in fp32 at least; 0 where the target is ``IGNORE_INDEX``. With ``with_entropy`` also the
    entropy of each row's softmax, from the same ``log_softmax`` (returns ``(ce, entropy)``). The one
    per-token cross-entropy of the package: objectives, pruners and scoring passes all call it.
    """
    flat = logits.reshape(-1, logits.size(-1))
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    tgt = targets.reshape(-1)
    if not with_entropy:
        ce = F.cross_entropy(flat, tgt, ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing)
        return ce.view(targets.shape)
    lp = torch.log_softmax(flat, dim=-1)
    ce = F.nll_loss(lp, tgt, ignore_index=IGNORE_INDEX, reduction="none")
    if label_smoothing:
        smooth = -lp.mean(-1) * (tgt != IGNORE_INDEX).to(lp.dtype)
        ce = (1.0 - label_smoothing) * ce + label_smoothing * smooth
    ent = -(lp.exp() * lp).sum(-1)
    return ce.view(targets.shape), ent.view(targets.shape)


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                             label_aligned: bool = False) -> torch.Tensor:
    """Per-position loss of predicting ``labels[:, t]`` from ``logits[:, t-1]`` (0 where the label is -100).

    Shape ``[B, N-1]`` (entry ``t-1`` is token ``t``), or with ``label_aligned`` ``[B, N]`` with column 0 = 0
    (index ``t`` is token ``t``, the layout pruners use).
    """
    ce = per_token_cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing)
    if label_aligned:
        ce = torch.cat([torch.zeros_like(ce[:, :1]), ce], dim=1)
    return ce


class TokenSelector:
    """Chooses per-token weights from the training forward's own per-token losses (e.g. ssToken).

    Registered as ``module.token_selector`` (the DataModule registers its pruner when the pruner is one);
    token-level objectives call :func:`select_tokens`. ``select_tokens`` gets the detached per-token
    losses aligned with ``labels`` (column 0 is 0) and the batch, and returns ``(weights, stats)`` —
    ``weights`` a float tensor shaped like ``labels`` (replacing the batch's ``token_weights``), ``stats``
    plain numbers logged as ``pruning/<name>`` — or None when it has nothing to select for this batch.
    """

    def select_tokens(self, token_loss: torch.Tensor, batch: dict[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, float]] | None:
        raise NotImplementedError


def select_tokens(module: Any, token_loss: torch.Tensor, batch: dict[str, Any]
                  ) -> tuple[torch.Tensor, dict[str, float]] | None:
    """Ask ``module.token_selector`` (if any) for token weights; None when there is no selection."""
    selector = getattr(module, "token_selector", None) if module is not None else None
    if selector is None:
        return None
    return selector.select_tokens(token_loss.detach(), batch)


def weighted_token_mean(ce: torch.Tensor, batch: dict[str, Any], weights_key: str = "token_weights",
                        module: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``sum_t w_t ce_t / sum_t w_t`` over valid next-token positions; ``ce`` is ``[B, N-1]``.

    ``w`` is 1 on labels other than -100, times ``batch[weights_key]`` (aligned with labels), or the
    weights of the module's token selector when it selects for this batch. Returns ``(loss, logs)``.
    """
    shift_labels = batch["labels"][:, 1:]
    valid = (shift_labels != IGNORE_INDEX).to(ce.dtype)
    weights = batch.get(weights_key)
    logs: dict[str, Any] = {}
    chosen = select_tokens(module, torch.cat([torch.zeros_like(ce[:, :1]), ce], dim=1), batch)
    if chosen is not None:
        weights, stats = chosen
        logs = {f"pruning/{k}": v for k, v in stats.items()}
    if weights is not None:
        valid = valid * weights[:, 1:].to(ce.dtype)
    denom = valid.sum()
    if denom == 0:
        return (ce * 0.0).sum(), logs  # keeps the graph (DDP) but contributes nothing
    return (ce * valid).sum() / denom, logs


__all__ = ["IGNORE_INDEX", "LogitsObjective", "LossOutput", "Objective", "TokenSelector", "label_logits",
           "next_token_cross_entropy", "per_token_cross_entropy", "select_tokens", "weighted_token_mean"]
