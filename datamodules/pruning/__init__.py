"""Batch pruners: per-batch data selection composed into a DataModule.

A pruner is given to a DataModule (``pruner=...``) and acts on every **training** batch after it
reaches the device, from the DataModule's ``on_after_batch_transfer`` hook. Validation and test
batches are never pruned. Each pruner has its own file:

* :class:`~.qtuning.QTuning` — joint sample + token pruning on the Error-Uncertainty plane
  (costs one extra no-grad forward; the training forward then runs on the kept rows only);
* :class:`~.sstoken.SSToken` — per-sample token selection by retrospective excess loss and
  last-layer attention to the prompt (reuses the training forward's per-token losses through the
  objective's ``token_selector`` hook; no second forward with gradients).

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

from typing import Any

PRUNING_STATS_KEY = "pruning_stats"


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

    def __call__(self, batch: dict[str, Any], model: Any = None) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(batch, model=None).")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


from .qtuning import QTuning  # noqa: E402
from .sstoken import SSToken  # noqa: E402

__all__ = ["BatchPruner", "QTuning", "SSToken", "check_ratio"]
