"""AdaLoRA's specifics for ``PeftHead`` (Zhang et al., 2023, "Adaptive Budget Allocation for PEFT").

* the rank allocator is stepped after every optimizer step (``update_and_allocate``);
* ``total_step`` defaults to the run's number of optimizer steps (set in ``on_fit_start``);
* the orthogonality regulariser is added to the objective (peft adds it only when it computes the
  loss itself, which we do not);
* the allocator's importance averages and the rank pattern are checkpoint state, so resume is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft.heads.base import HeadError
from lightning_peft.heads.lora import targeted_linears
from lightning_peft.heads.peft_types import AdapterType, register

_PLACEHOLDER_TOTAL_STEP = 10**9


@register("ADALORA")
class AdaLoraType(AdapterType):
    """SVD-form LoRA: ``init_r (d_in + d_out) + init_r`` per targeted linear (P, Q and the singular values)."""

    def config_fields(self, model: nn.Module) -> dict[str, Any]:
        fields = dict(self.fields)
        fields.setdefault("total_step", _PLACEHOLDER_TOTAL_STEP)  # replaced in on_fit_start
        return fields

    def formula(self, model: nn.Module) -> int:
        r = self.fields.get("init_r", 12)
        targets = self.field(model, "target_modules")
        return sum(r * (d_in + d_out) + r for _, d_in, d_out in targeted_linears(model, targets))

    def on_fit_start(self, model: nn.Module, total_steps: int) -> None:
        if "total_step" in self.fields:
            return
        cfg = model.peft_config["default"]
        if cfg.tinit >= total_steps - cfg.tfinal:
            raise HeadError(
                f"AdaLoRA tinit={cfg.tinit} + tfinal={cfg.tfinal} leave no budgeting phase in {total_steps} "
                "optimizer steps; lower tinit/tfinal or train for more steps."
            )
        cfg.total_step = int(total_steps)

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        model.base_model.update_and_allocate(global_step)

    def extra_state(self, model: nn.Module) -> dict[str, Any]:
        alloc = model.base_model.rankallocator
        cfg = model.peft_config["default"]
        state = {k: {n: t.detach().clone() for n, t in getattr(alloc, k).items()}
                 for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
        state["rank_pattern"] = {n: [bool(x) for x in v] for n, v in (cfg.rank_pattern or {}).items()}
        state["total_step"] = int(cfg.total_step)
        return state

    def load_extra_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        if not state:
            return
        alloc = model.base_model.rankallocator
        for k in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            getattr(alloc, k).clear()
            getattr(alloc, k).update({n: t.clone() for n, t in state[k].items()})
        cfg = model.peft_config["default"]
        cfg.rank_pattern = dict(state["rank_pattern"]) or None
        cfg.total_step = state["total_step"]

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        """AdaLoRA's orthogonality penalty ``w * mean ||P P^T - I||_F^2`` over its P (A) and Q (B)."""
        weight = model.peft_config["default"].orth_reg_weight
        if weight <= 0:
            return None
        terms = []
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                m = p if "lora_A" in name else p.T
                eye = torch.eye(m.shape[0], device=m.device, dtype=m.dtype)
                terms.append(torch.linalg.matrix_norm(m @ m.T - eye, ord="fro"))
        return weight * torch.stack(terms).mean() if terms else None
