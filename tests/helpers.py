"""Builders shared by the tests: generated batches and a bare training loop (no Trainer overhead)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def causal_batch(n: int = 8, length: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A counting task over the digit bytes: each digit is followed by the next one (mod 10).

    The first 3 digits are prompt (labels -100), the rest are response.
    """
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 10, (n, 1), generator=g)
    digits = (start + torch.arange(length)) % 10 + 19  # byte tokenizer: "0" is id 19
    ids = torch.cat([torch.ones(n, 1, dtype=torch.long), digits], dim=1)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def class_batch(n: int = 8, length: int = 12, num_labels: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (n, length), generator=g)
    ids[:, 0] = 1
    labels = torch.arange(n) % num_labels
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def batch_for(module, seed: int = 0) -> dict[str, torch.Tensor]:
    return causal_batch(seed=seed) if module.task == "causal-lm" else class_batch(seed=seed)


def train_steps(module, batch, steps: int, lr: float = 1e-2, weight_decay: float = 0.01) -> list[float]:
    """Optimizer steps exactly as the module would take them under the Trainer (hooks included)."""
    module.set_optimizer("torch.optim.AdamW", lr=lr, weight_decay=weight_decay)
    opt = module.configure_optimizers()
    module.head.on_fit_start(module.model, max(steps, 100))
    module.train()
    losses = []
    for step in range(steps):
        loss, _ = module.compute_loss(batch)
        reg = module.head.regularization_loss(module.model)
        (loss if reg is None else loss + reg).backward()
        opt.step()
        module.head.on_optimizer_step(module.model, step + 1)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    module.eval()
    return losses


def logits(module_or_model, batch) -> torch.Tensor:
    from lightning_peft.modules import PeftModule

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        if isinstance(module_or_model, PeftModule):  # through the head: some heads build their own inputs
            out = module_or_model.head.forward(module_or_model.model, inputs).logits
        else:
            out = module_or_model(**inputs).logits
    if out.dim() == 3 and out.shape[1] > batch["input_ids"].shape[1]:
        out = out[:, -batch["input_ids"].shape[1]:]
    return out


def cpu_trainer(root, max_steps: int, callbacks=(), **kw) -> L.Trainer:
    """A quiet single-process CPU Trainer for tests (no logger, no validation, no progress bar)."""
    args = {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "default_root_dir": str(root), "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "callbacks": list(callbacks)}
    args.update(kw)
    return L.Trainer(**args)


def trainable_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def fit_interrupted_and_whole(build, data, root: Path, total: int, cut: int, callbacks=lambda: []):
    """Fit ``total`` steps in one go, and ``cut`` steps then resume to ``total`` from the step-``cut``
    checkpoint (global seed changed before resuming). Returns ``(whole, resumed)`` as (module, callbacks)."""
    import glob

    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    whole = (build(), callbacks())
    cpu_trainer(root / "a", total, whole[1]).fit(whole[0], datamodule=data())
    L.seed_everything(0)
    first = build()
    ckpt = ModelCheckpoint(dirpath=str(root / "b"), every_n_train_steps=cut, save_top_k=-1)
    cpu_trainer(root / "b", cut, [*callbacks(), ckpt]).fit(first, datamodule=data())
    path = glob.glob(str(root / "b" / f"*step={cut}*.ckpt"))[0]
    L.seed_everything(123)  # the resumed run must not depend on the global seed
    resumed = (build(), callbacks())
    cpu_trainer(root / "c", total, resumed[1]).fit(resumed[0], datamodule=data(), ckpt_path=path)
    return whole, resumed


def cpu_threads() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class DumpTrainable(L.Callback):
    """Writes each rank's parameters (and which are trainable) at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        state = {n: p.detach().cpu() for n, p in pl_module.model.named_parameters()}
        trainable = sorted(n for n, p in pl_module.model.named_parameters() if p.requires_grad)
        callbacks = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks
                     if type(cb).__module__.startswith("lightning_peft")}
        torch.save({"params": state, "trainable": trainable, "step": trainer.global_step, "callbacks": callbacks},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def run_cli_ranks(args: list[str], cwd: Path, dump_dir: Path) -> tuple[dict, dict]:
    """Run ``lightning-peft fit <args>`` in a subprocess (tests/ importable, for ``helpers.DumpTrainable``)
    and return the two ranks' dumps written to ``dump_dir``."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the CLI launches its own ranks; inherited ones would make rank 0 wait forever
    proc = subprocess.run([sys.executable, "-m", "lightning_peft.cli", "fit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (torch.load(dump_dir / "rank0.pt", weights_only=True), torch.load(dump_dir / "rank1.pt", weights_only=True))


def fit_under_one_process_ddp(root, module, callback, datamodule, **trainer_kw) -> L.Trainer:
    """``fit`` under ``strategy="ddp"`` (find_unused_parameters=False) in this process (one CPU rank, gloo),
    so the model really is wrapped in DistributedDataParallel; the process group is torn down afterwards."""
    import torch.distributed as dist

    trainer = cpu_trainer(root, 1, [callback], strategy="ddp", **trainer_kw)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return trainer
