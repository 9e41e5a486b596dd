"""Importable pieces for the selector DDP test (the CLI subprocess imports them by class_path)."""

from __future__ import annotations

import os
import random

import lightning as L
import torch

from lightning_peft.datamodules.selection import DatasetSelector


class PidSubset(DatasetSelector):
    """Draws ``budget`` rows seeded by the process id: ranks would disagree unless rank 0's choice is broadcast."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def select(self, rows, datamodule):
        return random.Random(os.getpid()).sample(range(len(rows)), self.budget)


class DumpSelection(L.Callback):
    """Writes each rank's ``selected_indices`` and the training rows it read in its first batches."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.extend(batch["input_ids"].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        pool = [row["input_ids"] for row in dm._train_pool]
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save({"selected": list(dm.selected_indices), "pool": pool, "seen": self.seen,
                    "state": dm.state_dict()}, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
