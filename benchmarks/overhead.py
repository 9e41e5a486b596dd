"""Framework overhead: ``CausalLM`` + ``LoRA`` under the Lightning Trainer vs a plain PyTorch loop.

Same model (tiny-llama scaled to hidden 256, 4 layers), same data (batch 8 x 256 tokens), same
optimizer (AdamW); the two variants run in alternating rounds in one process so that machine noise
hits both alike. Step time is wall time from the start of one training step to the start of the next
(Trainer: measured by a callback, so data fetching and Lightning's loop are included; the first
``--warmup`` steps of every round are dropped).

    python benchmarks/overhead.py            # prints a table; target: ratio <= 1.05
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft import CausalLM
from lightning_peft.backbones import load_backbone
from lightning_peft.heads import LoRA

CONFIG = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4}
LORA = dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"])


def make_data(n_batches: int, batch: int, length: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n_batches * batch):
        ids = torch.randint(4, 260, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args) -> None:
        self.starts.append(time.perf_counter())


def lightning_round(rows, batch: int, steps: int, warmup: int) -> list[float]:
    module = CausalLM(backbone="tiny-llama", backbone_config=CONFIG, head=LoRA(**LORA))
    module.set_optimizer("torch.optim.AdamW", lr=1e-4)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps + warmup, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, DataLoader(rows, batch_size=batch, shuffle=False))
    s = timer.starts
    return [b - a for a, b in zip(s[warmup:-1], s[warmup + 1:])]


def plain_round(rows, batch: int, steps: int, warmup: int) -> list[float]:
    from peft import LoraConfig, get_peft_model

    model, _ = load_backbone("tiny-llama", config_overrides=CONFIG)
    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = DataLoader(rows, batch_size=batch, shuffle=False)
    times, it = [], iter(loader)
    start = time.perf_counter()
    for _ in range(steps + warmup):
        b = next(it)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the Trainer also synchronises on the loss every step (logging)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = make_data(args.steps + args.warmup + 1, args.batch, args.length)
    results: dict[str, list[float]] = {"plain PyTorch + peft": [], "Lightning CausalLM + LoRA": []}
    for r in range(args.rounds):
        order = [("plain PyTorch + peft", plain_round), ("Lightning CausalLM + LoRA", lightning_round)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            results[name].extend(fn(rows, args.batch, args.steps, args.warmup))
    base = statistics.median(results["plain PyTorch + peft"])
    print(f"machine: {platform.machine()} {platform.processor() or ''} · torch threads {torch.get_num_threads()} · "
          f"torch {torch.__version__} · lightning {L.__version__}")
    print(f"model: tiny-llama {CONFIG} + LoRA {LORA}; batch {args.batch} x {args.length}; "
          f"{args.rounds} interleaved rounds x {args.steps} timed steps")
    print("| variant | median step (ms) | p10 (ms) | p90 (ms) | ratio to plain |")
    print("|---|---|---|---|---|")
    for name, ts in results.items():
        q = statistics.quantiles(ts, n=10)
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {q[0] * 1e3:.1f} | {q[-1] * 1e3:.1f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
