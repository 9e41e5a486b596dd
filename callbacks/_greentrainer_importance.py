"""GreenTrainer's importance pass: ``I_k = Σ g¹_k·Δw_k`` from one real optimizer update, undone afterwards.

See :mod:`lightning_peft.callbacks.greentrainer` for how the estimates enter the selection.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch

from lightning_peft.callbacks._greentrainer_flops import _kept_grads_and_rng, _loss
from lightning_peft.compat import optimizer_step_flags, restore_optimizer_step_flags


def _snapshot_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = {p: {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"state": state, "groups": groups, "extra": optimizer_step_flags(optimizer)}


def _restore_optimizer(optimizer: torch.optim.Optimizer, snap: dict[str, Any]) -> None:
    """Put the optimizer state back in place (same tensor objects where they existed)."""
    saved = snap["state"]
    for p in list(optimizer.state.keys()):
        if p not in saved:
            del optimizer.state[p]
    for p, s in saved.items():
        cur = optimizer.state[p]
        for k in list(cur.keys()):
            if k not in s:
                del cur[k]
        for k, v in s.items():
            old = cur.get(k)
            if torch.is_tensor(v) and torch.is_tensor(old) and old.shape == v.shape and old.dtype == v.dtype:
                old.copy_(v)
            else:
                cur[k] = v
    for g, s in zip(optimizer.param_groups, snap["groups"]):
        g.update(s)
    restore_optimizer_step_flags(optimizer, snap["extra"])


def tensor_importance(pl_module: Any, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                      names: list[str], forward_context: Any = None) -> list[float]:
    """Raw first-order importance estimates ``Î_k = Σ g¹_k ⊙ Δw_k`` (spec §3.4) for ``names``.

    One forward/backward on ``batch`` with only ``names`` trainable, one real ``optimizer.step()``
    (Δw = w¹ − w⁰), one more forward/backward at w¹ for g¹ (same dropout draws). Afterwards the
    weights, the optimizer state (moments, step counts, param-group values), every ``.grad``,
    ``requires_grad`` and the RNG are exactly as before; no scheduler is stepped. ``Î_k < 0`` means
    tensor ``k``'s update lowered the loss (GreenTrainer's importance is ``−Î / max|Î|``).
    Accumulated in float64.
    """
    params = dict(pl_module.model.named_parameters())
    chosen = [params[n] for n in names]
    if not chosen:
        return []
    everything = list(pl_module.parameters())
    flags = [p.requires_grad for p in everything]
    w0 = [p.detach().clone() for p in chosen]
    snap = _snapshot_optimizer(optimizer)
    ctx = forward_context or nullcontext
    result = [0.0] * len(chosen)
    try:
        with _kept_grads_and_rng(pl_module), torch.enable_grad():
            for p in everything:
                p.requires_grad_(False)
                p.grad = None
            for p in chosen:
                p.requires_grad_(True)
            rng_cpu = torch.get_rng_state()
            rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            # torch.autograd.grad, not backward(): no AccumulateGrad node runs, so a DDP reducer's hooks
            # never see this pass (a backward() outside DDP's forward corrupts its used-parameter map)
            with ctx():
                loss = _loss(pl_module, batch)
            for p, g in zip(chosen, torch.autograd.grad(loss, chosen, allow_unused=True)):
                p.grad = g
            optimizer.step()
            delta = [(p.detach().to(torch.float64) - w.to(torch.float64)) for p, w in zip(chosen, w0)]
            for p in chosen:
                p.grad = None
            torch.set_rng_state(rng_cpu)
            if rng_cuda is not None:
                torch.cuda.set_rng_state_all(rng_cuda)
            with ctx():
                loss = _loss(pl_module, batch)
            for k, (g, d) in enumerate(zip(torch.autograd.grad(loss, chosen, allow_unused=True), delta)):
                if g is not None:
                    result[k] = float((g.detach().to(torch.float64) * d).sum())
            del delta
    finally:
        with torch.no_grad():
            for p, w in zip(chosen, w0):
                p.copy_(w)
        _restore_optimizer(optimizer, snap)
        for p, f in zip(everything, flags):
            p.requires_grad_(f)
    return result
