"""The ``DatasetSelector`` contract: decide once, over the whole training set, which rows to train on.

A selector runs once over the training rows *after* tokenisation (each row a dict with ``input_ids``
and ``labels`` or ``label``): in the DataModule's ``setup("fit")`` when there is no trainer, else in the
first ``train_dataloader()``, which Lightning calls on every rank after restoring a checkpoint (so a
resumed run can take the saved indices instead of selecting again). Rank 0 decides; the chosen row
indices are broadcast with the trainer strategy's public ``broadcast`` (called on every rank, since it
is a collective) so every rank trains on the same subset. The DataModule keeps them as
``datamodule.selected_indices`` and in its ``state_dict``, so a resumed run reuses them and selects
nothing again.

Adding a selector: subclass :class:`DatasetSelector`, take plain ``__init__`` values (they appear in
YAML as ``selector: {class_path: ..., init_args: {...}}``) and implement :meth:`DatasetSelector.select`.
Per-batch pruning stays in :mod:`lightning_peft.datamodules.pruning`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_peft.datamodules.common import DataError


class SelectionError(DataError):
    """A selector setting or result that leaves no usable training rows; the message says the fix."""


class DatasetSelector:
    """Chooses the training rows once, before training (optimal-transport selection, static filters).

    Subclasses implement :meth:`select`; :meth:`run` wraps it with the checks and the cross-rank
    agreement, and is what the DataModule calls.
    """

    def select(self, rows: Sequence[dict[str, Any]], datamodule: Any) -> list[int]:
        """Indices (into ``rows``) of the rows to keep. Called on rank 0 only."""
        raise NotImplementedError

    def run(self, rows: Sequence[dict[str, Any]], datamodule: Any, trainer: Any = None) -> list[int]:
        """Select on rank 0, check, and broadcast the result to every rank (collective: call on all ranks).

        A selection error raised on rank 0 travels with the broadcast and is raised on every rank, so no
        rank waits forever for a result that never comes.
        """
        strategy = getattr(trainer, "strategy", None)
        rank = int(getattr(trainer, "global_rank", 0)) if trainer is not None else 0
        result: tuple[list[int] | None, str | None] = (None, None)
        if rank == 0:
            try:
                result = (self._checked(self.select(rows, datamodule), len(rows)), None)
            except SelectionError as err:
                result = (None, str(err))
        if strategy is not None:
            result = strategy.broadcast(result, src=0)
        indices, error = result
        if error is not None:
            raise SelectionError(error)
        return list(indices)

    def _checked(self, indices: Sequence[int], n_rows: int) -> list[int]:
        name = type(self).__name__
        kept = sorted({int(i) for i in indices})
        if not kept:
            raise SelectionError(f"{name} kept no rows out of {n_rows}; loosen its settings so at least one row "
                                 "is left.")
        if kept[0] < 0 or kept[-1] >= n_rows:
            bad = kept[0] if kept[0] < 0 else kept[-1]
            raise SelectionError(f"{name} returned row index {bad}, outside the {n_rows} training rows; return "
                                 f"indices in range(0, {n_rows}).")
        return kept

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
