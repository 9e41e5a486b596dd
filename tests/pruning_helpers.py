"""Builders shared by the pruning tests (tests/test_pruning_*.py)."""

from __future__ import annotations

import torch

from lightning_peft import CausalLM
from lightning_peft.datamodules.pruning import QTuning, SSToken
from lightning_peft.heads import LoRA
from lightning_peft.objectives import TokenSelector


def make_module():
    torch.manual_seed(0)
    return CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))


def padded_batch(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens, prompts = [12, 9, 7, 12], [4, 3, 5, 2]
    ids = torch.full((4, 12), 0, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.long)
    labels = torch.full((4, 12), -100, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lens, prompts)):
        ids[b, :n] = torch.randint(4, 200, (n,), generator=g)
        mask[b, :n] = 1
        labels[b, p:n] = ids[b, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def randomised(module, seed=1):
    """Move every trainable tensor (LoRA B included) off its initial value, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def current_losses(module, batch):
    """Label-aligned per-token losses of ``module`` on ``batch`` (eval mode, no graph)."""
    from lightning_peft.datamodules.pruning.sstoken import token_losses

    module.eval()
    with torch.no_grad():
        out = token_losses(module(batch).logits, batch["labels"])
    module.train()
    return out


def train_forward_selection(module, pruner, batch):
    """The training forward and the module's objective, with ``pruner`` as the module's token selector
    (the channel the DataModule sets up). Returns ``(loss_output, token_weights, stats)`` of the selection."""
    seen = {}

    class Spy(TokenSelector):
        def select_tokens(self, token_loss, b):
            seen["out"] = pruner.select_tokens(token_loss, b)
            return seen["out"]

    module.token_selector = Spy()
    try:
        out = module.loss_output(batch)
    finally:
        module.token_selector = None
    weights, stats = seen["out"]
    return out, weights, stats


# ------------------------------------------------------------------------------------- recording pruners
class _Recording:
    """A pruner that also writes, on every training call of every rank, what it decided from what: the
    input batch, the trainable state it scored with, its context (plain values) and its selection (the
    pruned batch's ``input_ids`` / ``labels`` / ``token_weights``; an ``SSToken``'s token weights from
    ``select_tokens``) to ``<out_dir>/rank<r>_call<n>.pt``. The decisions are the parent class's own."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self._recorded_calls = 0
        self._recorded: dict | None = None

    @staticmethod
    def _rank() -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _write(self) -> None:
        import os

        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(self._recorded, os.path.join(self.out_dir, f"rank{self._rank()}_call{self._recorded_calls}.pt"))
        self._recorded_calls += 1

    def __call__(self, batch, model=None):
        ctx = self.context
        self._recorded = {
            "batch": {k: v.detach().cpu().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)},
            "state": {n: p.detach().cpu().clone() for n, p in model.model.named_parameters() if p.requires_grad},
            "context": {k: getattr(ctx, k) for k in ("precision", "global_step", "epoch", "num_training_batches",
                                                     "accumulate_grad_batches")},
        }
        out = super().__call__(batch, model=model)
        self._recorded["output"] = {k: out[k].detach().cpu().clone() for k in ("input_ids", "labels", "token_weights")
                                  if isinstance(out.get(k), torch.Tensor)}
        if not isinstance(self, TokenSelector):
            self._write()
        return out

    def select_tokens(self, token_loss, batch):
        result = super().select_tokens(token_loss, batch)
        if result is not None and self._recorded is not None:
            self._recorded["output"]["token_weights"] = result[0].detach().cpu().clone()
            self._write()
            self._recorded = None
        return result


class RecordingQTuning(_Recording, QTuning):
    def __init__(self, out_dir: str, sample_ratio: float = 0.25, token_ratio: float = 0.5) -> None:
        super().__init__(out_dir, sample_ratio=sample_ratio, token_ratio=token_ratio)


class RecordingSSToken(_Recording, SSToken):
    def __init__(self, out_dir: str, gamma: float = 0.5, rho: float = 0.6) -> None:
        super().__init__(out_dir, gamma=gamma, rho=rho)


def load_records(out_dir, rank: int) -> list[dict]:
    """The records one rank's recording pruner wrote, in call order."""
    from pathlib import Path

    files = sorted(Path(out_dir).glob(f"rank{rank}_call*.pt"), key=lambda p: int(p.stem.split("call")[1]))
    return [torch.load(f, weights_only=True) for f in files]


def replay(pruner, module, record) -> tuple[dict, torch.Tensor]:
    """``pruner``'s decision, in this process, on a record's batch with the record's trainable state and
    context: ``(pruned batch, token weights)`` (QTuning: of the kept rows; SSToken: from the training forward)."""
    from lightning_peft.datamodules.pruning import PrunerContext

    state = dict(module.model.named_parameters())
    with torch.no_grad():
        for name, value in record["state"].items():
            state[name].copy_(value)
    pruner.bind(PrunerContext(module=module, **record["context"]))
    out = pruner({k: v.clone() for k, v in record["batch"].items()}, model=module)
    if isinstance(pruner, TokenSelector):
        return out, train_forward_selection(module, pruner, out)[1]
    return out, out["token_weights"]
