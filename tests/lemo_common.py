"""Shared builders of the LeMo token-elimination tests (tests/test_lemo*.py).

Tiny Llama (hidden 64, 4 heads, 2 KV heads, 4 layers, byte vocabulary), block size 4, N = 32.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from helpers import cpu_threads

from lightning_peft import CausalLM
from lightning_peft.backbones import unwrap_hf
from lightning_peft.callbacks import TokenElimination
from lightning_peft.heads.lora import LoRA

B, N, BLOCK = 2, 32, 4
ATTN_LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]

cpu_threads()


def tiny(head=None, layers: int = 4, **kw) -> CausalLM:
    module = CausalLM("tiny-llama", head=head or LoRA(r=4, target_modules=ATTN_LORA),
                      backbone_config={"num_hidden_layers": layers}, **kw)
    torch.manual_seed(1)
    with torch.no_grad():  # move LoRA off its identity init so A and B both get gradients
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return module.train()


def lm_batch(n: int = N, seed: int = 0, pad_from: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (B, n), generator=g)
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[1, pad_from:] = 0
        ids[1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class FixedScores(TokenElimination):
    """Selection from given scores (so perturbing an input cannot change which blocks are kept)."""

    def __init__(self, scores: torch.Tensor, **kw):
        super().__init__(block_size=BLOCK, scorer="exact", warmup_steps=0, **kw)
        self.fixed = scores

    def block_scores(self, layer, attn, x, position_embeddings, token_valid):
        return self.fixed[: x.shape[0]]


def layer_inputs(module: CausalLM, batch, layer: int):
    """The normalised input and rotary (cos, sin) that reach ``layer``'s attention in a dense forward."""
    attn = unwrap_hf(module.model).model.layers[layer].self_attn
    seen = {}

    def grab(mod, args, kwargs):
        seen["x"] = kwargs["hidden_states"].detach()
        seen["pe"] = tuple(t.detach() for t in kwargs["position_embeddings"])

    h = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    return attn, seen["x"], seen["pe"]


def lora_grads(module: CausalLM, batch) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss, _ = module.compute_loss(batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}


class SelectionRecorder(L.Callback):
    """Records on every rank, for each training step, the batch, the model's state at the step's start and the
    blocks :class:`TokenElimination` kept per layer; written to ``out_dir/rank{r}.pt`` at the end of fit (the
    DDP test replays each rank's steps in one process and compares)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps: list[dict] = []

    @staticmethod
    def _eliminator(trainer) -> TokenElimination:
        return next(cb for cb in trainer.callbacks if isinstance(cb, TokenElimination))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._eliminator(trainer).selection_log = []
        self.steps.append({"step": trainer.global_step,
                           "batch": {k: v.detach().cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)},
                           "state": {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cb = self._eliminator(trainer)
        self.steps[-1]["kept"] = {str(layer): (idx[:, ::cb.block_size] // cb.block_size).cpu()
                                  for layer, idx in cb.selection_log}

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save({"steps": self.steps, "eliminator": self._eliminator(trainer).state_dict()},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
