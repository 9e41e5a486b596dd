"""Shared glue for heads backed by Hugging Face ``peft`` (LoRA, PeftHead)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from torch import nn

from lightning_peft.heads.base import Head, HeadError, check_targets, classifier_module_names, is_classifier


def peft_task_type(model: nn.Module) -> str:
    return "SEQ_CLS" if is_classifier(model) else "CAUSAL_LM"


def classifier_parameters(model: nn.Module) -> int:
    """Parameters of a classifier's new output layer, which peft trains as ``modules_to_save``."""
    if not is_classifier(model):
        return 0
    return sum(p.numel() for n in classifier_module_names(model) for p in getattr(model, n).parameters())


class PeftBackedHead(Head):
    """A head whose method lives in ``peft``: subclasses only build the ``peft`` config."""

    def peft_config(self, model: nn.Module):
        raise NotImplementedError

    def targets(self) -> Any:
        """The ``target_modules`` the head asks for (checked against the backbone before attaching)."""
        return getattr(self, "target_modules", None)

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        if is_classifier(model) and "sequence-classification" not in self.tasks:
            raise HeadError(f"{self!r} supports only {self.tasks}; use it with a causal LM backbone.")
        check_targets(model, self.targets(), type(self).__name__)
        config = self.peft_config(model)
        try:
            return get_peft_model(model, config)
        except ValueError as err:
            raise HeadError(f"{self!r} cannot attach to {type(model).__name__}: {err}") from err

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The base model within the block: prompt-learning methods through peft's public
        ``disable_adapter()`` (it swaps the forward, no ``requires_grad`` change); methods with tuner layers
        through :func:`lightning_peft.compat.peft_adapter_layers_bypassed` (peft's public switch would flip
        ``requires_grad`` of the adapter weights)."""
        config = getattr(model, "active_peft_config", None)
        if config is not None and getattr(config, "is_prompt_learning", False):
            return model.disable_adapter()
        from lightning_peft.compat import peft_adapter_layers_bypassed

        return peft_adapter_layers_bypassed(model)

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            return super().merge(model)
        return model.merge_and_unload()

    def export_adapter(self, model: nn.Module, directory: str) -> None:
        """Write a peft-format adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        os.makedirs(directory, exist_ok=True)
        model.save_pretrained(directory)
