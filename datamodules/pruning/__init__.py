"""Batch pruners: per-batch data selection composed into a DataModule.

A pruner is given to a DataModule (``pruner=...``) and acts on every **training** batch after it
reaches the device, from the DataModule's ``on_after_batch_transfer`` hook. Validation and test
batches are never pruned. No concrete pruners live here yet; each one will get its own file.
"""

from __future__ import annotations

from typing import Any


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


__all__ = ["BatchPruner"]
