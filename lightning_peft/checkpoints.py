"""Loading adapter-only checkpoints (``weights_only=True``) back into a LightningModule."""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

import torch

from lightning_peft.modules import PeftModule


def read_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist; pass the path of a .ckpt file written by fit.")
    return torch.load(path, map_location="cpu", weights_only=True)


def module_class(checkpoint: dict[str, Any]) -> type[PeftModule]:
    path = checkpoint.get("module_class", "lightning_peft.CausalLM")
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def load_module(path: str, **overrides: Any) -> PeftModule:
    """Rebuild the module a checkpoint was trained with: backbone from its spec, then the saved state."""
    checkpoint = read_checkpoint(path)
    cls = module_class(checkpoint)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.update(overrides)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    module = cls(**{k: v for k, v in hparams.items() if k in accepted})
    module.on_load_checkpoint(checkpoint)
    result = module.load_state_dict(checkpoint["state_dict"], strict=module.full_checkpoint)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"Checkpoint {path!r} holds tensors this model lacks (e.g. {unexpected[0]}).")
    return module.eval()
