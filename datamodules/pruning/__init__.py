"""Batch pruners: per-batch data selection composed into a DataModule.

A pruner is given to a DataModule (``pruner=...``) and acts on every **training** batch after it
reaches the device, from the DataModule's ``on_after_batch_transfer`` hook. Validation and test
batches are never pruned. Each pruner has its own file:

* :class:`~.qtuning.QTuning` — joint sample + token pruning on the Error-Uncertainty plane
  (costs one extra no-grad forward; the training forward then runs on the kept rows only);
* :class:`~.sstoken.SSToken` — per-sample token selection by retrospective excess loss and
  last-layer attention to the prompt (a :class:`~lightning_peft.objectives.TokenSelector`: the objective
  asks it for token weights with the training forward's own per-token losses; no second forward with
  gradients).

**What a pruner is given (the documented hook).** Before each training batch the DataModule calls
``pruner.bind(PrunerContext(...))`` with the module, the trainer's precision (its name and the
precision plugin's ``forward_context``) and the current optimizer step and epoch length, then
``pruner(batch, model=module)``. A pruner that is a ``TokenSelector`` is registered as
``module.token_selector``. At each training epoch end (on every rank) the DataModule calls
``pruner.on_train_epoch_end(trainer)``; the DataModule's ``state_dict`` keeps ``pruner.state_dict()``
and restores it on resume. A pruner never reaches into the trainer or the module's private state.

A pruner may put plain numbers under ``batch["pruning_stats"]``; the module logs them as
``pruning/<name>`` every training step. :mod:`.scoring` computes a model's per-token losses and
entropies for a no-grad scoring pass cheaply (decoder body, LM head only where needed).

Bad input, handled the same way by every pruner here: a ratio outside (0, 1] (or not a number) raises
``ValueError`` naming it; a training batch without any response token is passed through unchanged with
a warning (a row without response tokens is never kept or selected from); a tokenizer without a pad
token needs nothing, because pruners find padding through ``attention_mask``, never through the pad id
(the collators pad with EOS then, and an EOS inside a response still counts as a response token).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PRUNING_STATS_KEY = "pruning_stats"


@dataclass
class PrunerContext:
    """What the DataModule tells a pruner before each training batch (see the package docstring).

    Attributes:
        module: the LightningModule being trained.
        precision: the trainer's precision name (``"32-true"``, ``"bf16-mixed"``, ...).
        forward_context: a zero-argument callable returning the training forward's autocast context
            (the trainer's ``precision_plugin.forward_context``); the DataModule hook runs outside it.
        global_step: optimizer steps taken so far (``trainer.global_step``; equal on resume).
        epoch: the current training epoch (``trainer.current_epoch``).
        num_training_batches: batches per training epoch (``inf`` when unknown).
        accumulate_grad_batches: micro-batches per optimizer step.
    """

    module: Any = None
    precision: str | None = None
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None
    global_step: int = 0
    epoch: int = 0
    num_training_batches: float = math.inf
    accumulate_grad_batches: int = 1

    @classmethod
    def of(cls, trainer: Any, module: Any) -> PrunerContext:
        """The context of the current training batch, from the trainer's public attributes."""
        plugin = getattr(trainer, "precision_plugin", None)
        return cls(
            module=module,
            precision=getattr(trainer, "precision", None),
            forward_context=plugin.forward_context if plugin is not None else None,
            global_step=int(getattr(trainer, "global_step", 0)),
            epoch=int(getattr(trainer, "current_epoch", 0)),
            num_training_batches=getattr(trainer, "num_training_batches", math.inf),
            accumulate_grad_batches=int(getattr(trainer, "accumulate_grad_batches", 1)),
        )


def check_ratio(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 < value <= 1``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be in (0, 1]; e.g. {name}: 0.5 keeps half.")


class BatchPruner:
    """Base class of batch pruners.

    Pruners are composed into a DataModule and act on each batch after it reaches the device via
    ``on_after_batch_transfer`` (training only). The DataModule calls
    ``pruner(batch, model=trainer.lightning_module)``; a pruner may

    * ask ``model`` for scores (per-token losses, gradients, ...) when its method needs them
      (wrap such calls in ``torch.no_grad()`` unless the method needs gradients);
    * add ``batch["token_weights"]``, a float tensor with the same shape as ``batch["labels"]``
      that the objective multiplies into the per-token loss (0 removes a token);
    * drop rows, returning a batch whose tensors all have the same, smaller first dimension.

    It returns the (possibly new) batch. Keep its configuration in plain ``__init__`` values so a
    YAML ``class_path`` / ``init_args`` maps onto it one to one. Under DDP every rank prunes its own
    batch; a pruner that draws random numbers must draw them from a seed shared by all ranks.
    """

    #: the context of the current training batch (None until the DataModule binds one)
    context: PrunerContext | None = None

    def bind(self, context: PrunerContext) -> None:
        """Receive the current training batch's context (called by the DataModule before ``__call__``)."""
        self.context = context

    def __call__(self, batch: dict[str, Any], model: Any = None) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(batch, model=None).")

    def on_train_epoch_end(self, trainer: Any) -> None:
        """Called by the DataModule at each training epoch end, on every rank (collectives are safe)."""

    def state_dict(self) -> dict[str, Any]:
        """State kept in checkpoints by the DataModule (plain values and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


from .qtuning import QTuning  # noqa: E402
from .sstoken import SSToken  # noqa: E402

__all__ = ["BatchPruner", "PrunerContext", "QTuning", "SSToken", "check_ratio"]
