"""Full fine-tuning: every parameter of the backbone trains. The reference point of every method."""

from __future__ import annotations

import contextlib

from torch import nn

from lightning_peft.heads.base import Head, HeadError


class FullFineTune(Head):
    """Train every backbone parameter (optionally all but the embeddings).

    Args:
        freeze_embeddings: keep the input embedding matrix frozen.
    """

    mergeable = True
    identity_at_init = True
    trains_backbone = True

    def __init__(self, freeze_embeddings: bool = False) -> None:
        self.freeze_embeddings = freeze_embeddings

    def attach(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # distinct tensors only: tied embeddings count once
        total = sum(p.numel() for p in model.parameters())
        if self.freeze_embeddings:
            total -= model.get_input_embeddings().weight.numel()
        return total

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        raise HeadError("FullFineTune trains the backbone's own weights, so there is no head to switch off; keep a "
                        "frozen copy of the base model for a reference forward (e.g. SSToken history='copy').")

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # nothing to fold: the weights are the model
