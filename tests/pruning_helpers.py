"""Builders shared by the pruning tests (tests/test_pruning_*.py)."""

from __future__ import annotations

import torch

from lightning_peft import CausalLM
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
