"""Continual learning with Half Fine-Tuning: two tasks in sequence, one HFT round per task.

    python examples/hft_continual.py            # about 15 s on 2 CPU cores

Task 1 teaches a tiny Llama to copy digit strings, task 2 to add numbers. Before the second fit,
``hft.new_round()`` starts round 1: a new half of every block is chosen (the other half keeps the
values it has after task 1). The script prints, per round, the trained fraction, the mask change and
the copy-task accuracy, which shows what task 2 does to task 1.
"""

from __future__ import annotations

import glob
import os
import tempfile

import lightning as L
import torch

from lightning_peft import CausalLM
from lightning_peft.callbacks import HalfFineTuning
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.heads import FullFineTune


def trainer(root: str, max_steps: int, hft: HalfFineTuning) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=root, callbacks=[hft],
                     logger=L.pytorch.loggers.CSVLogger(root, name="hft_continual"), enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0)


def copy_accuracy(model: CausalLM, data: SyntheticSFTDataModule, root: str) -> float:
    t = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=root)
    return float(t.validate(model, datamodule=data, verbose=False)[0]["val/token_acc"])


def main() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    L.seed_everything(0)
    root = tempfile.mkdtemp(prefix="hft_continual_")
    model = CausalLM(backbone="tiny-llama", head=FullFineTune())
    model.set_optimizer("torch.optim.AdamW", lr=3e-3, weight_decay=0.01)
    hft = HalfFineTuning(seed=0)  # round_every="fit": one round per task, new_round() between tasks
    tasks = [
        ("copy", SyntheticSFTDataModule(task="copy", num_digits=6, num_train=1000, num_val=64, batch_size=32)),
        ("addition", SyntheticSFTDataModule(task="addition", num_digits=2, num_train=1000, num_val=64, batch_size=32)),
    ]
    copy_data = tasks[0][1]
    previous: set[str] | None = None
    for i, (name, data) in enumerate(tasks):
        if i:
            hft.new_round()
        trainer(root, 100, hft).fit(model, datamodule=data)
        mask = set(hft.trainable_names or [])
        changed = "-" if previous is None else f"{len(mask ^ previous)} of {hft.report['tensors']} tensors"
        print(f"round {hft.round} ({name}): trained {hft.report['trainable_fraction']:.1%} of the parameters "
              f"({hft.report['block_trainable_fraction']:.1%} of the block tensors); "
              f"status changed since the previous round: {changed}; "
              f"copy-task token accuracy {copy_accuracy(model, copy_data, root):.2f}")
        previous = mask
    print("mask pictures:", *sorted(glob.glob(os.path.join(root, "hft_continual", "version_*", "hft_round*.png"))))


if __name__ == "__main__":
    main()
