"""Every head side by side: MiniLM on SST-2 (same steps, seed, batches and schedule), one JSON per head.

For each selected head, a fresh subprocess (so that its peak memory is its own) builds
``SequenceClassifier(backbone="all-minilm-l6-v2")`` with that head, trains it for ``--steps``
optimizer steps on the SST-2 training split (``../shared/data/sst2``; batch ``--batch``, ``max_length``
64, seed 0, the same data order for every head), AdamW without weight decay, gradient clipping 1.0,
a linear warm-up over the first 10% of the steps then a cosine decay to 0 (the schedule of peft's
method-comparison suite), and evaluates accuracy on the dev split (872 sentences) and the labelled
test split (1821). Only the learning rate differs per head: each head's entry in :data:`HEADS` carries
its own (tuned for this short run, see its ``note``); ``--lr NAME=VALUE`` overrides one.

It writes ``<out>/<head>.json`` with the fields peft's method-comparison suite records (``run_info``,
``train_info`` with the accuracy, the train-loss curve, train time, peak memory, adapter file size and
parameter counts, ``meta_info`` with package versions, git commit and machine), then a tiny-llama
step-time pass in the parent process (every head on tiny-llama scaled to hidden 256, 4 layers, batch
8 x 128 tokens; interleaved rounds; median step time relative to LoRA) so per-head overheads are
visible side by side, and prints one table.

Heads written for issue 13 (Propulsion, ShareLoRA, GOFT/qGOFT, BottleneckAdapter, SparseAdapter) are
looked up by name in :mod:`lightning_peft.heads`; a head that is not there (or rejects its settings)
is skipped with a printed note, so the script runs before and after they land.

    python benchmarks/heads.py                          # every head (the full table; see README)
    python benchmarks/heads.py --heads lora,ia3 --steps 20 --no-llama   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
BACKBONE = "all-minilm-l6-v2"
LLAMA_CONFIG = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
                "num_key_value_heads": 4}
# query/value projections by family (the only per-family detail here; heads resolve everything else)
QV = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
# peft's own IA3 defaults for these families, written out (PeftHead's IA3 formula needs explicit targets)
IA3 = {"bert": {"peft_type": "IA3", "target_modules": ["key", "value", "output.dense"],
                "feedforward_modules": ["output.dense"]},
       "llama": {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                 "feedforward_modules": ["down_proj"]}}
PLACEHOLDERS = {"$QV": QV, "$IA3": IA3}


@dataclasses.dataclass
class HeadSpec:
    """One row of the table: a head class (by name in ``lightning_peft.heads``), its settings, its lr."""

    cls: str
    kwargs: dict[str, Any]
    lr: float
    note: str = ""

    def build(self, family: str):
        """The head, or a one-sentence reason why it cannot be built here."""
        module = importlib.import_module("lightning_peft.heads")
        cls = getattr(module, self.cls, None)
        if cls is None:
            return f"lightning_peft.heads.{self.cls} is not importable (not merged yet?)"
        kwargs = {k: (PLACEHOLDERS[v][family] if isinstance(v, str) and v in PLACEHOLDERS else v)
                  for k, v in self.kwargs.items()}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            return f"{self.cls}({kwargs}) rejected its settings: {err}"


ADAPTER = {"bottleneck": 64}  # activation: the placement's default (Houlsby swish, Pfeiffer ReLU)
HEADS: dict[str, HeadSpec] = {
    "lora": HeadSpec("LoRA", {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "$QV"}, 2e-3,
                     "query/value as examples/minilm_sst2_lora.yaml"),
    "ia3": HeadSpec("PeftHead", {"config": "$IA3"}, 1e-2, "peft's IA3 targets: key, value, FFN output"),
    "full": HeadSpec("FullFineTune", {}, 5e-5, "every weight"),
    "full-frozen-emb": HeadSpec("FullFineTune", {"freeze_embeddings": True}, 5e-5, "embeddings frozen"),
    "propulsion": HeadSpec("Propulsion", {"degree": 15, "targets": "all"}, 5e-3, "all Linears"),
    "sharelora": HeadSpec("ShareLoRA", {"r": 8, "alpha": 16, "share": "A", "target_modules": "$QV"}, 2e-3,
                          "A shared across layers, query/value"),
    "goft": HeadSpec("GOFT", {"variant": "strict"}, 2e-3, "default targets"),
    "qgoft": HeadSpec("GOFT", {"variant": "quasi"}, 2e-3, "default targets"),
    "houlsby": HeadSpec("BottleneckAdapter", {"placement": "houlsby", **ADAPTER}, 1e-3, "m = 64"),
    "pfeiffer": HeadSpec("BottleneckAdapter", {"placement": "pfeiffer", **ADAPTER}, 1e-3, "m = 64"),
    "sparseadapter": HeadSpec("SparseAdapter", {"base": {"placement": "pfeiffer", **ADAPTER}, "sparsity": 0.4,
                                                "criterion": "snip"}, 1e-3, "Pfeiffer m = 64, SNIP, keep 60% (paper)"),
}


# ----------------------------------------------------------------------------- measuring helpers
def _vm(field: str) -> int | None:
    """A ``/proc/self/status`` memory field in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.check_output(["git", *args], cwd=REPO, stderr=subprocess.DEVNULL).decode().strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def meta_info() -> dict[str, Any]:
    import lightning
    import peft
    import transformers

    import lightning_peft

    accel = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "package_info": {"torch-version": torch.__version__, "lightning-version": lightning.__version__,
                         "transformers-version": transformers.__version__, "peft-version": peft.__version__,
                         "lightning_peft-version": getattr(lightning_peft, "__version__", None)},
        "git": git_commit(),
        "system_info": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                        "processor": platform.processor(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "accelerator": accel},
    }


def _adapter_bytes(head, model) -> dict[str, int]:
    """Save the head as a user would (``Head.save``) and measure what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        head.save(model, tmp)
        sizes = {f: os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)}
    weights = sum(v for f, v in sizes.items() if f.endswith((".safetensors", ".bin", ".pt")))
    return {"file_size": weights, "file_size_all_files": sum(sizes.values())}


# ----------------------------------------------------------------------------- the SST-2 run (core)
def train_and_eval(name: str, spec: HeadSpec, *, backbone: str = BACKBONE, data: Path = SST2, steps: int = 300,
                   batch: int = 32, max_length: int = 64, seed: int = 0, lr: float | None = None,
                   accelerator: str = "auto", test: bool = True, eval_batch: int = 128) -> dict[str, Any]:
    """Train ``spec`` on ``data`` (``stsa.binary.{train,dev,test}``) and return the result record."""
    from lightning_peft import SequenceClassifier
    from lightning_peft.datamodules import ClassificationDataModule

    started = datetime.now(UTC).isoformat(timespec="seconds")
    t_total = time.perf_counter()
    lr = spec.lr if lr is None else lr
    warmup = max(1, int(0.1 * steps))
    train_config = {"backbone": backbone, "data": str(data), "max_steps": steps, "batch_size": batch,
                    "batch_size_eval": eval_batch, "max_seq_length": max_length, "seed": seed,
                    "optimizer_type": "AdamW", "optimizer_kwargs": {"lr": lr, "weight_decay": 0.0},
                    "lr_scheduler": "cosine", "warmup_steps": warmup, "grad_norm_clip": 1.0}
    record: dict[str, Any] = {"run_info": {"created_at": started, "experiment_name": name, "train_config": train_config,
                                           "head_config": None, "note": spec.note, "error_msg": ""},
                              "train_info": {"status": "failed"}}
    L.seed_everything(seed, verbose=False)
    head = spec.build("bert")
    if isinstance(head, str):
        record["train_info"]["status"] = "skipped"
        record["run_info"]["error_msg"] = head
        return record
    record["run_info"]["head_config"] = head.config()
    module = SequenceClassifier(backbone=backbone, num_labels=2, head=head)
    module.set_optimizer("torch.optim.AdamW", lr=lr, weight_decay=0.0, lr_scheduler={
        "class_path": "transformers.get_cosine_schedule_with_warmup",
        "init_args": {"num_warmup_steps": warmup, "num_training_steps": steps}})
    dm = ClassificationDataModule(str(data / "stsa.binary.train"), val_file=str(data / "stsa.binary.dev"),
                                  test_file=str(data / "stsa.binary.test") if test else None,
                                  label_names=["negative", "positive"], max_length=max_length, batch_size=batch,
                                  eval_batch_size=eval_batch, seed=seed)
    curve = _LossCurve(every=50)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, max_epochs=-1, limit_val_batches=0,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[curve])
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = _vm("VmRSS")
    hwm_reset = _reset_peak_rss()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_time = time.perf_counter() - t0
    rss_peak = _vm("VmHWM")
    mem = {"peak_rss": rss_peak, "rss_before_train": rss_before,
           "peak_rss_increase": (rss_peak - rss_before) if hwm_reset and rss_peak and rss_before else None}
    if cuda:
        mem.update(accelerator_memory_max=torch.cuda.max_memory_allocated(),
                   accelerator_memory_reserved_max=torch.cuda.max_memory_reserved())
    t1 = time.perf_counter()
    evaluator = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False)
    val = evaluator.validate(module, datamodule=dm, verbose=False)[0]
    test_out = evaluator.test(module, datamodule=dm, verbose=False)[0] if test else {}
    eval_time = time.perf_counter() - t1
    model = module.model
    record["train_info"] = {
        "status": "success",
        "dev_accuracy": float(val["val/acc"]), "dev_loss": float(val["val/loss"]),
        "test_accuracy": float(test_out["test/acc"]) if test else None,
        "train_loss_curve": curve.losses,
        "train_loss_final": statistics.fmean(curve.losses[-10:]) if curve.losses else None,
        "train_time": train_time, "eval_time": eval_time,
        "median_step_time": statistics.median(curve.steps) if curve.steps else None,
        **mem,
        **_adapter_bytes(module.head, model),
        "num_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "num_total_params": sum(p.numel() for p in model.parameters()),
        "expected_trainable_params": module.expected_trainable_parameters,
    }
    record["run_info"]["total_time"] = time.perf_counter() - t_total
    return record


class _LossCurve(L.Callback):
    """Records the objective's loss (``train/loss``) and the wall time of every training step."""

    def __init__(self, every: int = 0) -> None:
        self.every = every  # print the mean loss every this many steps (0: never)
        self.losses: list[float] = []
        self.steps: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, *args: Any) -> None:
        self.steps.append(time.perf_counter() - self._t)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(round(float(loss), 5))
        if self.every and len(self.losses) % self.every == 0:
            print(f"  step {len(self.losses)}: loss {statistics.fmean(self.losses[-self.every:]):.4f}, "
                  f"{statistics.median(self.steps[-self.every:]):.2f} s/step", flush=True)


# ----------------------------------------------------------------------------- tiny-llama step time
def llama_step_times(names: list[str], rounds: int, steps: int, warmup: int, batch: int = 8,
                     length: int = 128) -> dict[str, list[float] | str]:
    """Per-head step times on tiny-llama in interleaved rounds (the order rotates every round)."""
    from torch.utils.data import DataLoader

    from lightning_peft import CausalLM

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range((steps + warmup) * batch):
        ids = torch.randint(4, 260, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    out: dict[str, list[float] | str] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if isinstance(out[name], str):
                continue
            head = HEADS[name].build("llama")
            if isinstance(head, str):
                out[name] = head
                continue
            timer = _LossCurve()
            try:
                module = CausalLM(backbone="tiny-llama", backbone_config=LLAMA_CONFIG, head=head)
                module.set_optimizer("torch.optim.AdamW", lr=1e-4)
                trainer = L.Trainer(accelerator="auto", devices=1, max_steps=steps + warmup, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
                trainer.fit(module, DataLoader(rows, batch_size=batch, shuffle=False))
            except Exception as err:  # a head that does not apply to decoders: recorded, not fatal
                out[name] = f"{type(err).__name__}: {err}"
                continue
            out[name].extend(timer.steps[warmup:])  # type: ignore[union-attr]
    return out


# ----------------------------------------------------------------------------- driver
def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(records: dict[str, dict[str, Any]], llama: dict[str, Any]) -> None:
    base = llama.get("lora")
    base_med = statistics.median(base) if isinstance(base, list) and base else None
    print("| head | lr | dev acc | test acc | final train loss | trainable params | adapter file (KiB) | "
          "train time (s) | SST-2 step (s) | peak memory (MiB) | tiny-llama step (ms) | tiny-llama / LoRA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rec in records.items():
        ti, cfg = rec["train_info"], rec["run_info"]["train_config"]
        ts = llama.get(name)
        med = statistics.median(ts) if isinstance(ts, list) and ts else None
        if ti.get("status") != "success":
            print(f"| {name} | {cfg['optimizer_kwargs']['lr']:g} | {ti.get('status')}: "
                  f"{rec['run_info']['error_msg'][:80]} |  |  |  |  |  |  |  |  |  |")
            continue
        peak = ti.get("accelerator_memory_max") or ti.get("peak_rss")
        print(f"| {name} | {cfg['optimizer_kwargs']['lr']:g} | {ti['dev_accuracy']:.4f} | "
              f"{_fmt(ti['test_accuracy'], '.4f')} | {_fmt(ti['train_loss_final'], '.4f')} | "
              f"{ti['num_trainable_params']:,} | {ti['file_size'] / 1024:.1f} | {ti['train_time']:.1f} | "
              f"{_fmt(ti['median_step_time'], '.3f')} | {_fmt(peak and peak / 2**20, '.0f')} | "
              f"{_fmt(med and med * 1e3, '.1f')} | {_fmt(med and base_med and med / base_med, '.2f')} |")
    for name, ts in llama.items():
        if isinstance(ts, str):
            print(f"note: tiny-llama step time for {name}: {ts}")


def child(args: argparse.Namespace) -> None:
    name = args.child
    try:
        rec = train_and_eval(name, HEADS[name], backbone=args.backbone, data=Path(args.data), steps=args.steps,
                             batch=args.batch, seed=args.seed, lr=_lr_overrides(args.lr).get(name),
                             accelerator=args.accelerator, test=not args.no_test)
    except Exception as err:  # one head's failure is a row of the table, not the end of the run
        import traceback

        traceback.print_exc()
        lr = _lr_overrides(args.lr).get(name, HEADS[name].lr)
        rec = {"run_info": {"experiment_name": name, "train_config": {"optimizer_kwargs": {"lr": lr}},
                            "error_msg": f"{type(err).__name__}: {err}"}, "train_info": {"status": "failed"}}
    rec["meta_info"] = meta_info()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{name}.json").write_text(json.dumps(rec, indent=2))


def _lr_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in HEADS:
            raise SystemExit(f"--lr {item!r} must be NAME=VALUE with NAME one of {', '.join(HEADS)}.")
        out[key] = float(value)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated, from {', '.join(HEADS)}")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE", help="override one head's lr")
    ap.add_argument("--backbone", default=BACKBONE)
    ap.add_argument("--data", default=str(SST2))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "heads"))
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--no-test", action="store_true", help="skip the test-split accuracy (dev only)")
    ap.add_argument("--no-llama", action="store_true", help="skip the tiny-llama step-time column")
    ap.add_argument("--llama-rounds", type=int, default=2)
    ap.add_argument("--llama-steps", type=int, default=6)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    names = [n.strip() for n in args.heads.split(",") if n.strip()]
    unknown = [n for n in names if n not in HEADS]
    if unknown:
        raise SystemExit(f"--heads names {unknown} are unknown; choose from {', '.join(HEADS)}.")
    _lr_overrides(args.lr)
    if not (Path(args.data) / "stsa.binary.train").is_file():
        raise SystemExit(f"SST-2 not found under {args.data}; pass --data to the folder of stsa.binary.*.")
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", name]
        proc = subprocess.run(cmd, cwd=REPO)
        path = Path(args.out) / f"{name}.json"
        if proc.returncode != 0 or not path.is_file():
            print(f"note: {name} failed (exit {proc.returncode}); see the output above")
            continue
        records[name] = json.loads(path.read_text())
        ti = records[name]["train_info"]
        if ti["status"] != "success":
            print(f"note: {ti['status']} {name}: {records[name]['run_info']['error_msg']}")
        else:
            print(f"{name}: dev acc {ti['dev_accuracy']:.4f} in {time.perf_counter() - t0:.0f} s", flush=True)
    llama: dict[str, Any] = {}
    runnable = [n for n in records if records[n]["train_info"]["status"] == "success"]
    if not args.no_llama and runnable:
        llama = llama_step_times(runnable, args.llama_rounds, args.llama_steps, warmup=2)
        base = llama.get("lora")
        base_med = statistics.median(base) if isinstance(base, list) and base else None
        for name in runnable:  # add the column to each head's JSON
            ts = llama.get(name)
            med = statistics.median(ts) if isinstance(ts, list) and ts else None
            records[name]["train_info"]["tiny_llama"] = {
                "config": LLAMA_CONFIG, "batch": 8, "length": 128, "step_times": ts if isinstance(ts, list) else [],
                "median_step_time": med, "ratio_to_lora": med / base_med if med and base_med else None,
                "error": ts if isinstance(ts, str) else None}
            (Path(args.out) / f"{name}.json").write_text(json.dumps(records[name], indent=2))
    m = meta_info()
    print(f"machine: {platform.machine()} {platform.processor() or ''} · {os.cpu_count()} CPUs · torch threads "
          f"{torch.get_num_threads()} · accelerator {m['system_info']['accelerator'] or 'none'} · "
          f"torch {torch.__version__} · peft {m['package_info']['peft-version']} · commit "
          f"{(m['git']['commit'] or '?')[:10]}{' (dirty)' if m['git']['dirty'] else ''}")
    print(f"SST-2 on {args.backbone}: {args.steps} steps, batch {args.batch}, seed {args.seed}, AdamW (wd 0), "
          f"warm-up 10% + cosine, clip 1.0; per-head lr in the table; JSON in {args.out}")
    print_table(records, llama)


if __name__ == "__main__":
    main()
