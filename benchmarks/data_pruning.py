"""Data pruners: cost per step and tokens trained per step, full data vs QTuning vs SSToken.

tiny-llama scaled to hidden 256, 4 layers, LoRA (r 8, all linear layers), batch 16 x 256 tokens
(a 64-token prompt, labels on the 192 response tokens); the variants run in alternating rounds in
one process. "Cost per step" is wall time from one training-batch start to the next, so every pass a
pruner adds (QTuning's no-grad scoring forward, SSToken's history forward and last-layer attention
recompute) is included. Target: a QTuning(0.25, 0.5) step costs <= 0.6 x a full-batch step.

    python benchmarks/data_pruning.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft import CausalLM
from lightning_peft.datamodules.pruning import QTuning, SSToken
from lightning_peft.heads import LoRA

TINY = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 4}


class PrunedData(L.LightningDataModule):
    """Fixed generated rows; the pruner runs on training batches after transfer, as in the library."""

    def __init__(self, rows, batch: int, pruner=None) -> None:
        super().__init__()
        self.rows, self.batch, self.pruner = rows, batch, pruner

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.batch, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.pruner is not None and self.trainer.training:
            batch = self.pruner(batch, model=self.trainer.lightning_module)
        return batch


class Meter(L.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        valid = batch["labels"][:, 1:] != -100
        weights = batch.get("token_weights")
        if weights is not None:
            valid = valid & (weights[:, 1:] > 0)
        self.tokens.append(int(valid.sum()))

    def on_train_end(self, *args) -> None:
        self.starts.append(time.perf_counter())


def rows(n: int, length: int, prompt: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 260, (length,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    data = rows(args.batch * args.steps, args.length, prompt=64)
    variants = {
        "full data": lambda: None,
        "QTuning(0.25, 0.5)": lambda: QTuning(sample_ratio=0.25, token_ratio=0.5),
        "SSToken(0.6)": lambda: SSToken(rho=0.6),
    }
    times: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            L.seed_everything(0)
            module = CausalLM(backbone="tiny-llama", backbone_config=TINY, head=LoRA(r=8, alpha=16))
            module.set_optimizer("torch.optim.AdamW", lr=1e-3)
            meter = Meter()
            trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_val_batches=0, callbacks=[meter],
                                default_root_dir=tempfile.mkdtemp(prefix="lp-bench-"))
            trainer.fit(module, datamodule=PrunedData(data, args.batch, variants[name]()))
            s = meter.starts
            times.setdefault(name, []).extend(b - a for a, b in zip(s[args.warmup:-1], s[args.warmup + 1:]))
            tokens.setdefault(name, []).extend(meter.tokens[args.warmup:])
    base_t = statistics.median(times["full data"])
    base_k = statistics.mean(tokens["full data"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, lightning {L.__version__}")
    print(f"tiny-llama {TINY} + LoRA(r 8, all-linear); batch {args.batch} x {args.length} (64 prompt tokens); "
          f"{args.rounds} interleaved rounds x {args.steps - args.warmup} timed steps")
    print("| variant | median step (s) | cost / full | tokens trained per step | tokens / full |")
    print("|---|---|---|---|---|")
    for name in variants:
        t, k = statistics.median(times[name]), statistics.mean(tokens[name])
        print(f"| {name} | {t:.3f} | {t / base_t:.3f} | {k:.0f} | {k / base_k:.3f} |")


if __name__ == "__main__":
    main()
