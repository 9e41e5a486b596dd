"""Any method of Hugging Face ``peft``, chosen by ``peft_type`` in one plain dict.

```yaml
head:
  class_path: lightning_peft.heads.PeftHead
  init_args:
    config: {peft_type: IA3, target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}
```

The dict holds exactly the fields the user sets (``--print_config`` stays short); every other field
keeps peft's default. ``task_type`` is filled in from the backbone.

Everything that differs between peft types (AdaLoRA's rank allocator, regulariser and state; CPT's
own loss and token types; prompt learning through :class:`~lightning_peft.heads.PromptHead`; the
merge/identity flags; trainable-parameter formulas) lives in one small class per type, registered in
:mod:`lightning_peft.heads.peft_types` (adapters), :mod:`~lightning_peft.heads.peft_types_adalora`
and :mod:`~lightning_peft.heads.peft_types_prompt`; adding a type touches one of those files. A type
with no entry attaches and trains through peft with no formula and no merge.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

# the per-type modules register their classes on import
from lightning_peft.heads import peft_types_adalora, peft_types_prompt  # noqa: F401
from lightning_peft.heads._peft import PeftBackedHead, classifier_parameters, peft_task_type
from lightning_peft.heads.base import HeadError
from lightning_peft.heads.peft_types import PEFT_TYPES, PeftType


class PeftHead(PeftBackedHead):
    """Any ``peft`` method: ``config`` is a plain dict with ``peft_type`` and that method's fields.

    Args:
        config: e.g. ``{"peft_type": "IA3", "target_modules": [...], "feedforward_modules": [...]}``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        if not isinstance(config, dict) or "peft_type" not in config:
            raise HeadError(f"PeftHead config {config!r} needs a 'peft_type' key, e.g. {{'peft_type': 'IA3', ...}}.")
        self.config_dict = dict(config)
        self.peft_type = str(config["peft_type"]).upper()
        known = sorted(str(k.value if hasattr(k, "value") else k) for k in PEFT_TYPE_TO_CONFIG_MAPPING)
        if self.peft_type not in known:
            raise HeadError(f"Unknown peft_type {config['peft_type']!r}; choose one of {', '.join(known)}.")
        self.fields = {k: v for k, v in config.items() if k != "peft_type"}
        self.kind: PeftType = PEFT_TYPES.get(self.peft_type, PeftType)(self.peft_type, self.fields)
        self.target_modules = self.fields.get("target_modules")

    # plain values for YAML / checkpoints
    def init_args(self) -> dict[str, Any]:
        return {"config": copy.deepcopy(self.config_dict)}

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.kind.mergeable

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.kind.identity_at_init

    @property
    def own_loss(self) -> bool:
        return self.kind.own_loss

    @property
    def tasks(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.kind.tasks

    def forward_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.kind.forward_inputs(batch)

    def attach(self, model: nn.Module) -> nn.Module:
        self.kind.before_attach(model)
        return super().attach(model)

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        return self.kind.forward(model, inputs)

    def disabled(self, model: nn.Module):
        switched_off = self.kind.disabled(model)
        return switched_off if switched_off is not None else super().disabled(model)

    def peft_config(self, model: nn.Module):
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        fields = self.kind.config_fields(model)
        fields.setdefault("task_type", peft_task_type(model))
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type]
        try:
            return cls(**fields)
        except TypeError as err:
            import dataclasses

            names = sorted(f.name for f in dataclasses.fields(cls))
            raise HeadError(f"PeftHead {self.peft_type}: {err}; its fields are {names}.") from err

    def expected_trainable_parameters(self, model: nn.Module) -> int | None:
        total = self.kind.formula(model)
        return None if total is None else total + classifier_parameters(model)

    # ----------------------------------------------------------------- per-type duties
    def on_fit_start(self, model: nn.Module, total_steps: int) -> None:
        self.kind.on_fit_start(model, total_steps)

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        self.kind.on_optimizer_step(model, global_step)

    def extra_state(self, model: nn.Module) -> dict[str, Any]:
        return self.kind.extra_state(model)

    def load_extra_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.kind.load_extra_state(model, state)

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        return self.kind.regularization_loss(model)
