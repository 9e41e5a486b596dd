"""GreenTrainer: train the parameter tensors that buy the most loss reduction per backward FLOP.

Huang, Yin, Huang, Gao, *Towards Green AI in Fine-tuning Large Language Models via Adaptive
Backpropagation*, ICLR 2024 (arXiv 2309.13192); official code github.com/pittisl/GreenTrainer.

Every ``interval`` epochs (or steps) the callback

1. estimates each tensor's importance from one real optimizer update on one batch,
   ``I_k = −Σ g¹_k·Δw_k`` (first-order loss change caused by tensor ``k``'s update), normalised by
   ``max |I|``;
2. chooses, by dynamic programming, the tensor set of maximal importance whose backward FLOPs fit
   ``ρ_bp·T_bp``, where ``ρ_bp`` turns the requested fraction ``rho`` of full fine-tuning's
   *training* FLOPs (forward + backward) into a fraction of its backward FLOPs. Training tensor
   ``i`` costs its own weight gradient plus the activation gradients of every op between the loss
   and ``i`` (deep tensors are expensive);
3. sets ``requires_grad`` to the selection. Autograd then skips the weight gradients of unselected
   tensors and stops back-propagating below the deepest selected one; unselected tensors keep
   ``grad = None``, so the (single, never rebuilt) optimizer does not move them.

Use it with the ``FullFineTune`` head (the callback decides what trains)::

    trainer:
      strategy: auto                    # or ddp_find_unused_parameters_true on several devices
      callbacks:
        - class_path: lightning_peft.callbacks.GreenTrainer
          init_args: {rho: 0.5, interval: 2, interval_unit: epoch}
    model:
      class_path: lightning_peft.CausalLM
      init_args:
        backbone: tiny-llama
        head: {class_path: lightning_peft.heads.FullFineTune}

The FLOPs model (``t_fp``, ``t_dy``, ``t_dw``) is **measured** once, on the first importance batch,
with ``torch.utils.flop_counter.FlopCounterMode`` (so it counts what that counter counts: matmuls
and attention kernels, not element-wise ops, norms, embeddings look-ups or bias sums):

* every counted op is attributed to the innermost module that runs it and placed at its position in
  forward execution order; backward order is the reverse (the chain approximation of the official
  code, which reverses ``named_parameters()``; here the real execution order is used, so norms and
  parallel branches sit where they run);
* a module that owns parameters (``Linear``, GPT-2 ``Conv1D``, the LM head, ...) gets
  ``t_dy = t_dw = its forward FLOPs`` (a matmul's two backward matmuls have the forward's size),
  ``t_dy`` only for ops whose activation input carries a gradient;
* counted ops that run in a module without parameters of its own (the attention core: SDPA or the
  ``QKᵀ``/``AV`` matmuls) form weight-less pseudo-nodes, never selectable but paid when anything
  below them trains; their ``t_dy`` is measured by replaying the op once under the counter with
  gradients on its activation inputs (SDPA: 2.5× its forward FLOPs, as the counter's formula says);
* a tensor used by several modules (tied input embedding / LM head) sits at its deepest use and
  sums the weight-gradient FLOPs of all uses.

On CPU, PyTorch's counter has no formula for the CPU flash-attention kernel; :func:`flop_counter`
adds one (the counter's own SDPA formulas), so CPU and GPU counts agree.

Departures from the paper / official code (``[I]``: the spec's or this implementation's proposal):

* [I] Profile measured with ``FlopCounterMode`` from execution order instead of per-architecture
  hand formulas; attention core as a pseudo-node (spec §3.1 proposal, generalised to every model).
* [I] A tensor's own module's activation gradient is not charged when that tensor is the deepest
  selected one (the official accounting charges it; autograd does not compute it). In the DP's
  terms ``t_dy[i]`` is the activation-gradient cost of reaching tensor ``i`` from tensor ``i−1``.
* [I] Costs are quantised by rounding **up** and the budget is ``⌊ρ_bp·Tq⌋``, so the predicted cost
  bounds the real one (the official code floors costs, which can overshoot the budget).
* [I] Exact O(N·T) DP by default (``dp="exact"``); the official recurrence, re-derived from its
  description, is ``dp="official"`` (feasible but sometimes sub-optimal, e.g. its ``N_limit``
  off-by-one drops the deepest tensor when the whole chain fits).
* [I] The importance pass restores the weights **and the optimizer state** (the official code leaves
  Adam's moments and step counter advanced by two steps), does not step the scheduler, does not
  count as a training step, logs nothing as training loss and leaves the RNG untouched; both of its
  forward passes see the same dropout draws. ``Σ g·Δw`` is accumulated in float64. Its gradients
  come from ``torch.autograd.grad`` on the unwrapped module (a plain ``backward()`` outside DDP's
  forward marks parameters as used in DDP's reducer and breaks the next step).
* [I] When ``rho`` leaves no backward budget (ρ_bp ≤ 0, clamped to 0.05) or the budget fits no
  tensor, a warning states the effective ρ; if nothing fits, the cheapest useful tensor trains (a
  step must train something).
* [I] Only tensors that fit the budget on their own (reach cost + own ``t_dw``) get an importance
  estimate (spec §3.3, tightened); the others get 0 and stay frozen during the pass.
* Re-selected tensors resume with their old Adam moments (as in the official code).
* DDP: each rank estimates importance on its own batch, the raw estimates are averaged with
  ``strategy.reduce``, every rank runs the deterministic DP, and rank 0's mask is broadcast.
  DDP needs ``find_unused_parameters=True``; every candidate stays trainable until the model is
  wrapped (the mask is first applied at the first training batch).

Public helpers: :func:`flop_counter`, :func:`measure_step_flops`, :func:`measure_forward_flops`,
:func:`profile_flops` (also ``GreenTrainer.profile``), :func:`tensor_importance`,
:func:`plan_selection` and :func:`apply_mask`.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

from lightning_peft.callbacks._greentrainer_dp import (
    DP_ROUTINES,
    backward_budget_fraction,
    feasible,
    quantize,
    selection_cost,
)

aten = torch.ops.aten

#: ``config.model_type`` values with a FLOPs model (Llama family, GPT-2, BERT)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert")


class GreenTrainerError(ValueError):
    """A GreenTrainer configuration that cannot work; the message names the fix."""


# ------------------------------------------------------------------------------------ FLOPs counting
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: formulas PyTorch's counter lacks: the CPU flash-attention kernel (the counter's own SDPA formulas)
CUSTOM_FLOPS: dict[Any, Any] = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CUSTOM_FLOPS[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
    CUSTOM_FLOPS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop
_REGISTRY = {**flop_registry, **{k: shape_wrapper(v) for k, v in CUSTOM_FLOPS.items()}}


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode(display=False)`` that also counts the CPU flash-attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=dict(CUSTOM_FLOPS))


def _loss(pl_module: Any, batch: dict[str, Any]) -> torch.Tensor:
    loss, _ = pl_module.compute_loss(batch)
    reg = pl_module.head.regularization_loss(pl_module.model) if hasattr(pl_module, "head") else None
    return loss if reg is None else loss + reg


@contextmanager
def _kept_grads_and_rng(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``.grad`` (by reference) and the RNG state afterwards."""
    params = list(module.parameters())
    grads = [p.grad for p in params]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for p, g in zip(params, grads):
                p.grad = g


def measure_step_flops(pl_module: Any, batch: dict[str, Any]) -> int:
    """FLOPs (``FlopCounterMode``, see :func:`flop_counter`) of one forward + backward of
    ``pl_module.compute_loss(batch)`` (plus the head's regularisation loss) with the parameters'
    current ``requires_grad``. No ``.grad`` is written and the RNG is left as it was."""
    with _kept_grads_and_rng(pl_module), torch.enable_grad():
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        with flop_counter() as counter:
            loss = _loss(pl_module, batch)
            if trainable:  # autograd.grad: safe under DDP (see tensor_importance)
                torch.autograd.grad(loss, trainable, allow_unused=True)
    return int(counter.get_total_flops())


def measure_forward_flops(pl_module: Any, batch: dict[str, Any]) -> int:
    """FLOPs of one forward pass (no gradients)."""
    with _kept_grads_and_rng(pl_module), torch.no_grad(), flop_counter() as counter:
        _loss(pl_module, batch)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------ the FLOPs profile
@dataclass
class FlopsProfile:
    """GreenTrainer's FLOPs model of one training step on a batch shape, in ``FlopCounterMode`` FLOPs.

    ``names``/``t_dy``/``t_dw``/``numel`` describe the selectable tensors in **backward order**
    (index 0 closest to the loss): ``t_dy[i]`` is the activation-gradient FLOPs needed to reach
    tensor ``i`` from tensor ``i-1`` (all ops in between, pseudo-nodes included), ``t_dw[i]`` its
    weight-gradient FLOPs. ``t_fp`` is the forward pass, ``t_bp`` full fine-tuning's backward pass
    (``Σ t_dy + Σ t_dw``). ``nodes`` lists every op node in backward order (``name``, ``kind`` =
    ``module`` or ``pseudo``, ``t_fp``, ``t_dy``, ``t_dw``) for inspection.
    """

    names: list[str]
    t_dy: list[float]
    t_dw: list[float]
    numel: list[int]
    t_fp: float
    t_bp: float
    nodes: list[dict[str, Any]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # candidates the forward pass never touched

    def cost(self, mask: list[bool]) -> float:
        """Predicted backward FLOPs of training ``mask`` (over ``names``)."""
        return selection_cost(mask, self.t_dy, self.t_dw)

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FlopsProfile:
        return cls(**state)


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def check_architecture(model: nn.Module) -> None:
    """Raise :class:`GreenTrainerError` naming the model's modules when it has no FLOPs model here."""
    kind = _model_type(model)
    if kind in SUPPORTED_MODEL_TYPES:
        return
    classes = list(dict.fromkeys(type(m).__name__ for m in model.modules()))
    raise GreenTrainerError(
        f"GreenTrainer has a FLOPs model for Llama-family, GPT-2 and BERT backbones (model_type in "
        f"{list(SUPPORTED_MODEL_TYPES)}), not {type(model).__name__} (model_type {kind!r}) whose modules are "
        f"{classes}; use one of the supported backbones."
    )


class _OpRecorder(TorchDispatchMode):
    """Records every counted op with the innermost module running it (forward pass only)."""

    def __init__(self, stack: list[str], events: list[tuple]) -> None:
        super().__init__()
        self.stack, self.events = stack, events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in _REGISTRY:
            flops = int(_REGISTRY[packet](*args, **kwargs, out_val=out))
            if flops:
                grad_in = any(isinstance(a, torch.Tensor) and a.requires_grad for a in tree_flatten((args, kwargs))[0])
                meta = tree_map(lambda a: ("T", tuple(a.shape), a.dtype, a.requires_grad)
                                if isinstance(a, torch.Tensor) else a, (args, kwargs))
                self.events.append(("op", self.stack[-1], func, flops, grad_in, meta))
        return out


def _replay_backward_flops(func, meta, device) -> int:
    """Backward FLOPs of one op, replayed on dummy inputs of the recorded shapes with gradients on the
    inputs that carried one."""
    def build(a):
        if isinstance(a, tuple) and len(a) == 4 and a[0] == "T":
            _, shape, dtype, grad = a
            t = torch.ones(shape, dtype=dtype, device=device) if dtype == torch.bool else \
                torch.zeros(shape, dtype=dtype, device=device)
            return t.requires_grad_(grad and t.is_floating_point())
        return a

    args, kwargs = tree_map(build, meta, is_leaf=lambda a: isinstance(a, tuple) and len(a) == 4 and a[0] == "T")
    with torch.enable_grad(), flop_counter() as counter:
        out = func(*args, **kwargs)
        forward = counter.get_total_flops()
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.grad_fn is not None]
        if outs:
            outs[0].backward(torch.ones_like(outs[0]))
    return int(counter.get_total_flops() - forward)


def profile_flops(pl_module: Any, batch: dict[str, Any], candidates: list[str] | None = None) -> FlopsProfile:
    """Measure GreenTrainer's FLOPs profile of ``pl_module`` on ``batch`` (see the module docstring).

    ``candidates`` (names in ``pl_module.model.named_parameters()``) are the selectable tensors;
    default: those with ``requires_grad``. Parameters, gradients, ``requires_grad`` and the RNG are
    left as they were. Cost: one forward pass with autograd, plus one small replay per distinct
    weight-less op shape.
    """
    model = pl_module.model
    check_architecture(model)
    named = dict(model.named_parameters())
    if candidates is None:
        candidates = [n for n, p in named.items() if p.requires_grad]
    modules = dict(model.named_modules(remove_duplicate=False))
    own = {name: [n for n, _ in m.named_parameters(recurse=False, remove_duplicate=False)]
           for name, m in modules.items()}

    stack: list[str] = ["<outside>"]
    events: list[tuple] = []
    handles = []

    def pre(name):
        def hook(mod, args):
            stack.append(name)
            events.append(("enter", name))
        return hook

    def post(name):
        def hook(mod, args, out):
            stack.pop()
        return hook

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name)))
    # the activation stream carries a gradient from the input embeddings on; no parameter does
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: out.detach().requires_grad_(True)))
    params = list(pl_module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with _kept_grads_and_rng(pl_module), torch.enable_grad(), _OpRecorder(stack, events):
            _loss(pl_module, batch)
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)

    # ---- nodes in forward order
    device = next(iter(named.values())).device
    order: list[dict[str, Any]] = []
    by_module: dict[str, dict[str, Any]] = {}
    replays: dict[Any, int] = {}
    last_pseudo: dict[str, Any] | None = None
    for ev in events:
        if ev[0] == "enter":
            name = ev[1]
            if own.get(name) and name not in by_module:
                node = {"name": name, "kind": "module", "t_fp": 0.0, "t_dy": 0.0, "t_dw": 0.0, "pos": len(order)}
                by_module[name] = node
                order.append(node)
            last_pseudo = None
            continue
        _, name, func, flops, grad_in, meta = ev
        if own.get(name):
            node = by_module[name]
            node["t_fp"] += flops
            node["t_dw"] += flops
            node["t_dy"] += flops if grad_in else 0
            continue
        if last_pseudo is None or last_pseudo["module"] != name:
            last_pseudo = {"name": f"{name or '<root>'}.<ops>", "module": name, "kind": "pseudo",
                           "t_fp": 0.0, "t_dy": 0.0, "t_dw": 0.0}
            order.append(last_pseudo)
        last_pseudo["t_fp"] += flops
        if grad_in:
            key = (func, repr(meta))
            if key not in replays:
                replays[key] = _replay_backward_flops(func, meta, device)
            last_pseudo["t_dy"] += replays[key]
    for pos, node in enumerate(order):
        node["pos"] = pos

    # ---- selectable tensors: position of the deepest (earliest) use, weight-gradient FLOPs of all uses
    owners: dict[int, list[str]] = {}
    for mname, pnames in own.items():
        for pn in pnames:
            owners.setdefault(id(getattr(modules[mname], pn)), []).append(mname)
    items, unused = [], []
    for n in candidates:
        p = named[n]
        uses = [by_module[m] for m in owners.get(id(p), []) if m in by_module]
        if not uses:
            unused.append(n)
            continue
        t_dw = 0.0
        for node in uses:
            mod = modules[node["name"]]
            main = "weight" if isinstance(getattr(mod, "weight", None), nn.Parameter) else own[node["name"]][0]
            if getattr(mod, main) is p:
                t_dw += node["t_dw"]
        items.append((min(node["pos"] for node in uses), n, t_dw, p.numel()))
    # backward order: latest first; within one module keep reverse registration order (bias before weight)
    items.sort(key=lambda it: (-it[0], -candidates.index(it[1])))
    dy_at = [node["t_dy"] for node in order]
    suffix = [0.0] * (len(order) + 1)  # suffix[k] = Σ t_dy of nodes at positions ≥ k
    for k in range(len(order) - 1, -1, -1):
        suffix[k] = suffix[k + 1] + dy_at[k]
    names, t_dy, t_dw, numel = [], [], [], []
    reached = 0.0
    for pos, n, dw, size in items:
        reach = suffix[pos + 1]  # every op after the tensor's own module
        names.append(n)
        t_dy.append(reach - reached)
        t_dw.append(dw)
        numel.append(size)
        reached = reach
    t_fp = float(sum(node["t_fp"] for node in order))
    t_bp = float(sum(t_dy) + sum(t_dw))
    nodes = [{k: v for k, v in node.items() if k in ("name", "kind", "t_fp", "t_dy", "t_dw")}
             for node in reversed(order)]
    if t_bp <= 0:
        raise GreenTrainerError(
            f"The FLOPs profile of {type(model).__name__} has no backward FLOPs for the candidate tensors; "
            "give GreenTrainer a model whose trainable tensors include linear layers."
        )
    return FlopsProfile(names, t_dy, t_dw, numel, t_fp, t_bp, nodes, unused)


# ------------------------------------------------------------------------------------ importance
def _snapshot_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = {p: {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    extra = {k: getattr(optimizer, k) for k in ("_opt_called",) if hasattr(optimizer, k)}
    return {"state": state, "groups": groups, "extra": extra}


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
    for k, v in snap["extra"].items():
        setattr(optimizer, k, v)


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


# ------------------------------------------------------------------------------------ selection
@dataclass
class Selection:
    """One GreenTrainer decision over ``profile.names``."""

    mask: list[bool]
    rho_bp: float
    clamped: bool  # ρ_bp ≤ 0 was clamped to 0.05 (spec §3.2)
    fallback: bool  # nothing fitted the budget: the cheapest useful tensor was taken instead
    budget: int
    predicted_bp: float  # FLOPs, from the unquantised profile
    predicted_rho: float  # (t_fp + predicted_bp) / (t_fp + t_bp)


def _budget(profile: FlopsProfile, rho: float, quantization: int) -> tuple[float, bool, list[int], list[int], int]:
    rho_bp, clamped = backward_budget_fraction(rho, profile.t_fp, profile.t_bp)
    q_dy, q_dw = quantize(profile.t_dy, profile.t_dw, profile.t_bp, quantization)
    budget = sum(q_dy) + sum(q_dw) if rho_bp >= 1.0 else int(math.floor(rho_bp * quantization + 1e-9))
    return rho_bp, clamped, q_dy, q_dw, budget


def plan_selection(profile: FlopsProfile, importance: list[float], rho: float, quantization: int = 1000,
                   dp: str = "exact") -> Selection:
    """ρ conversion (§3.2), quantisation and the DP (§3.5) for normalised ``importance`` (``I > 0`` is
    useful). Pure: the same inputs give the same mask on every rank.

    When nothing fits the budget, the single cheapest tensor (among those with ``I > 0`` when there
    are any) is selected instead and ``fallback`` is set, so that a step always trains something.
    """
    rho_bp, clamped, q_dy, q_dw, budget = _budget(profile, rho, quantization)
    mask, _ = DP_ROUTINES[dp](q_dy, q_dw, importance, budget)
    fallback = not any(mask) and len(mask) > 0
    if fallback:
        useful = [i for i, v in enumerate(importance) if v > 0] or list(range(len(mask)))
        reach = [sum(profile.t_dy[: i + 1]) + profile.t_dw[i] for i in range(len(mask))]
        mask[min(useful, key=lambda i: (reach[i], -importance[i], i))] = True
    bp = profile.cost(mask)
    return Selection(mask, rho_bp, clamped, fallback, budget, bp,
                     (profile.t_fp + bp) / (profile.t_fp + profile.t_bp))


def apply_mask(pl_module: Any, names: list[str], mask: list[bool]) -> None:
    """``requires_grad = m`` for ``names``; unselected tensors get ``grad = None`` (never zeros)."""
    params = dict(pl_module.model.named_parameters())
    for n, m in zip(names, mask):
        p = params[n]
        p.requires_grad_(bool(m))
        if not m:
            p.grad = None


# ------------------------------------------------------------------------------------ the callback
class GreenTrainer(L.Callback):
    """Adaptive backpropagation (GreenTrainer, Huang et al., ICLR 2024): train the most important
    tensors whose backward FLOPs fit ``rho`` of full fine-tuning's training FLOPs.

    See the module docstring for the method, the FLOPs model and the departures from the paper and
    the official code.

    Args:
        rho: target fraction of full fine-tuning's training (forward + backward) FLOPs, in (0, 1].
            A ``rho`` below the forward pass's share leaves no backward budget: it is clamped
            (ρ_bp = 0.05) with a warning that states the effective value.
        interval: re-select every ``interval`` epochs or steps (official: every 2 epochs).
        interval_unit: ``"epoch"`` (selection at the first batch of epochs 0, interval, 2·interval, …)
            or ``"step"`` (at global steps 0, interval, …; optimizer steps).
        importance_batch: ``"first"``: the first training batch of each interval (official);
            ``"fixed"``: the run's first training batch, reused at every selection (kept in the
            callback state).
        quantization: Tq, the number of integer FLOPs units of the DP (official 1000).
        dp: ``"exact"`` (optimal, default) or ``"official"`` (the official recurrence, for parity).
        plot: draw each selection as a layers × tensors PNG (``greentrainer_sel{k}.png``).

    State (``state_dict``): the candidate names, the current mask, the step/epoch of the last
    selection, the number of selections, every selection's mask and the FLOPs profile, so a resumed
    run re-applies the mask and does not recompute importance mid-interval.
    """

    def __init__(self, rho: float = 0.5, interval: int = 2, interval_unit: str = "epoch",
                 importance_batch: str = "first", quantization: int = 1000, dp: str = "exact",
                 plot: bool = True) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < float(rho) <= 1.0:
            raise GreenTrainerError(f"rho={rho!r} must be in (0, 1] (a fraction of full fine-tuning's FLOPs); "
                                    "use e.g. 0.5.")
        if not isinstance(interval, int) or interval < 1:
            raise GreenTrainerError(f"interval={interval!r} must be a positive integer; use e.g. 2.")
        if interval_unit not in ("epoch", "step"):
            raise GreenTrainerError(f"interval_unit={interval_unit!r} must be 'epoch' or 'step'.")
        if importance_batch not in ("first", "fixed"):
            raise GreenTrainerError(f"importance_batch={importance_batch!r} must be 'first' or 'fixed'.")
        if not isinstance(quantization, int) or quantization < 10:
            raise GreenTrainerError(f"quantization={quantization!r} must be an integer ≥ 10; use 1000.")
        if dp not in DP_ROUTINES:
            raise GreenTrainerError(f"dp={dp!r} must be one of {sorted(DP_ROUTINES)}.")
        self.rho = float(rho)
        self.interval = interval
        self.interval_unit = interval_unit
        self.importance_batch = importance_batch
        self.quantization = quantization
        self.dp = dp
        self.plot = plot
        self.candidates: list[str] = []
        self.mask: dict[str, bool] | None = None
        self.last_step = -1
        self.last_epoch = -1
        self.selections = 0
        self.history: list[dict[str, Any]] = []
        self.profile_state: dict[str, Any] | None = None
        self.fixed_batch: dict[str, Any] | None = None
        self.last_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rho=self.rho, interval=self.interval, interval_unit=self.interval_unit)

    # ----------------------------------------------------------------- public helpers
    @staticmethod
    def profile(pl_module: Any, batch: dict[str, Any]) -> FlopsProfile:
        """The measured FLOPs profile of ``pl_module`` on ``batch`` (:func:`profile_flops`)."""
        return profile_flops(pl_module, batch)

    # ----------------------------------------------------------------- checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        head = getattr(pl_module, "head", None)
        if head is None or not hasattr(pl_module, "compute_loss"):
            raise GreenTrainerError(
                f"GreenTrainer needs a lightning_peft module (CausalLM / SequenceClassifier), not "
                f"{type(pl_module).__name__}."
            )
        if not getattr(head, "trains_backbone", False):
            raise GreenTrainerError(
                f"GreenTrainer chooses which backbone tensors train, but the head {head!r} freezes the backbone; "
                "use `head: lightning_peft.heads.FullFineTune` with GreenTrainer."
            )
        check_architecture(pl_module.model)
        strategy = trainer.strategy
        kind = type(strategy).__name__
        if "DeepSpeed" in kind or "FSDP" in kind:
            raise GreenTrainerError(
                f"GreenTrainer does not support the {kind} (it changes requires_grad during training); "
                "use `strategy: ddp_find_unused_parameters_true` (or a single device)."
            )
        from lightning.pytorch.strategies import DDPStrategy

        if isinstance(strategy, DDPStrategy) and not getattr(strategy, "_ddp_kwargs", {}).get(
                "find_unused_parameters", False):
            raise GreenTrainerError(
                "GreenTrainer changes which tensors train inside one DDP run, so DDP needs "
                "find_unused_parameters=True: use `strategy: ddp_find_unused_parameters_true`."
            )
        # every candidate stays trainable until DDP has wrapped the model (the mask waits for the first batch)
        self.candidates = [n for n, p in pl_module.model.named_parameters() if p.requires_grad]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.mask is not None and set(self.mask) != set(self.candidates):
            raise GreenTrainerError(
                "The GreenTrainer state in this checkpoint selects among other tensors than this model trains; "
                "resume with the same backbone and head."
            )

    # ----------------------------------------------------------------- the schedule
    def _due(self, trainer: L.Trainer, batch_idx: int) -> bool:
        if batch_idx % max(1, int(trainer.accumulate_grad_batches)) != 0:
            return False
        if self.mask is None:
            return True
        if self.interval_unit == "step":
            step = int(trainer.global_step)
            return step % self.interval == 0 and step != self.last_step
        epoch = int(trainer.current_epoch)
        return batch_idx == 0 and epoch % self.interval == 0 and epoch != self.last_epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.importance_batch == "fixed" and self.fixed_batch is None:
            self.fixed_batch = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        if self._due(trainer, batch_idx):
            self._select(trainer, pl_module, batch)
        if self.mask is not None:
            names = list(self.mask)
            apply_mask(pl_module, names, [self.mask[n] for n in names])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unfreeze(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unfreeze(pl_module)

    def _unfreeze(self, pl_module: L.LightningModule) -> None:
        params = dict(pl_module.model.named_parameters())
        for n in self.candidates:
            if n in params:
                params[n].requires_grad_(True)

    # ----------------------------------------------------------------- one selection
    def _select(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        if self.importance_batch == "fixed" and self.fixed_batch is not None:
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in self.fixed_batch.items()}
        if self.profile_state is None:
            prof = profile_flops(pl_module, batch, self.candidates)
            self.profile_state = trainer.strategy.broadcast(prof.to_state(), src=0)
        profile = FlopsProfile.from_state(self.profile_state)

        # importance only for tensors that fit the budget on their own (all of them if none does)
        _, _, q_dy, q_dw, budget = _budget(profile, self.rho, self.quantization)
        fits = feasible(q_dy, q_dw, budget)
        names = [n for n, f in zip(profile.names, fits) if f] if any(fits) else list(profile.names)
        forward_context = trainer.strategy.precision_plugin.forward_context
        raw = tensor_importance(pl_module, batch, trainer.optimizers[0], names, forward_context)
        by_name = dict(zip(names, raw))
        vec = torch.tensor([by_name.get(n, 0.0) for n in profile.names], dtype=torch.float64,
                           device=pl_module.device)
        vec = trainer.strategy.reduce(vec, reduce_op="mean")
        vec = vec.detach().cpu()
        scale = float(vec.abs().max()) if len(vec) else 0.0
        importance = (-vec / scale).tolist() if scale > 0 else [0.0] * len(vec)

        sel = plan_selection(profile, importance, self.rho, self.quantization, self.dp)
        mask_list = trainer.strategy.broadcast(sel.mask, src=0)
        mask = {n: False for n in self.candidates}
        mask.update(dict(zip(profile.names, mask_list)))
        self.mask = mask
        self.last_step = int(trainer.global_step)
        self.last_epoch = int(trainer.current_epoch)
        self.selections += 1
        self.history.append({"step": self.last_step, "epoch": self.last_epoch,
                             "mask": [mask[n] for n in self.candidates]})

        if sel.clamped or sel.fallback:
            share = profile.t_fp / (profile.t_fp + profile.t_bp)
            why = (f"is below the forward pass's share of a training step ({share:.3f}), leaving no backward budget "
                   f"(rho_bp clamped to {sel.rho_bp})" if sel.clamped else "leaves a backward budget too small")
            rank_zero_warn(
                f"GreenTrainer rho={self.rho} {why}"
                + ("; no tensor fits, so the cheapest useful one trains" if sel.fallback else "")
                + f": the effective rho of this selection is {sel.predicted_rho:.3f}. Raise rho to silence this."
            )
        params = dict(pl_module.model.named_parameters())
        total = sum(params[n].numel() for n in self.candidates)
        chosen = sum(params[n].numel() for n in self.candidates if mask[n])
        self.last_metrics = {
            "greentrainer/selected_param_fraction": chosen / max(total, 1),
            "greentrainer/selected_tensor_fraction": sum(mask.values()) / max(len(mask), 1),
            "greentrainer/predicted_flops_saving": 1.0 - sel.predicted_rho,
            "greentrainer/predicted_rho": sel.predicted_rho,
            "greentrainer/rho_bp": sel.rho_bp,
            "greentrainer/selection": float(self.selections),
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=trainer.global_step)
            rank_zero_info(
                f"GreenTrainer selection {self.selections} at step {trainer.global_step}: "
                f"{sum(mask.values())}/{len(mask)} tensors, {100 * chosen / max(total, 1):.1f}% of parameters, "
                f"predicted rho {sel.predicted_rho:.3f} (target {self.rho})."
            )
            if self.plot:
                self._draw(trainer, importance, profile)

    # ----------------------------------------------------------------- picture
    def _draw(self, trainer: L.Trainer, importance: list[float], profile: FlopsProfile) -> None:
        try:
            path = draw_mask(self.candidates, self.mask, trainer.log_dir or trainer.default_root_dir,
                             f"greentrainer_sel{self.selections}.png",
                             title=f"GreenTrainer selection {self.selections} (step {trainer.global_step}, "
                                   f"epoch {trainer.current_epoch}): rho {self.rho}, predicted "
                                   f"{self.last_metrics['greentrainer/predicted_rho']:.3f}")
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="greentrainer/mask", images=[path], step=trainer.global_step)
                elif hasattr(getattr(logger, "experiment", None), "add_figure"):
                    import matplotlib.image as mpimg
                    import matplotlib.pyplot as plt

                    fig = plt.figure(figsize=(8, 5))
                    plt.imshow(mpimg.imread(path))
                    plt.axis("off")
                    logger.experiment.add_figure("greentrainer/mask", fig, global_step=trainer.global_step)
                    plt.close(fig)
        except Exception as err:  # a picture is never worth a failed run
            rank_zero_warn(f"GreenTrainer could not draw its selection ({type(err).__name__}: {err}).")

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "candidates": list(self.candidates),
            "mask": None if self.mask is None else [bool(self.mask[n]) for n in self.mask],
            "mask_names": None if self.mask is None else list(self.mask),
            "last_step": self.last_step,
            "last_epoch": self.last_epoch,
            "selections": self.selections,
            "history": copy.deepcopy(self.history),
            "profile": copy.deepcopy(self.profile_state),
            "fixed_batch": self.fixed_batch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mask") is not None:
            self.mask = dict(zip(state_dict["mask_names"], state_dict["mask"]))
        self.last_step = int(state_dict.get("last_step", -1))
        self.last_epoch = int(state_dict.get("last_epoch", -1))
        self.selections = int(state_dict.get("selections", 0))
        self.history = list(state_dict.get("history") or [])
        self.profile_state = state_dict.get("profile")
        self.fixed_batch = state_dict.get("fixed_batch")


_LAYER = re.compile(r"^(?P<pre>.*?)\.(?P<idx>\d+)\.(?P<role>.+)$")


def draw_mask(names: list[str], mask: dict[str, bool], directory: str, filename: str, title: str = "") -> str:
    """Draw ``mask`` as a layers × tensors grid (matplotlib, Agg) and save it as a PNG; returns its path.

    Rows are the numbered blocks (``layers.{i}``, ``h.{i}``, ``layer.{i}``), deepest at the bottom,
    plus one row for the tensors outside the blocks; columns are the tensor roles.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    cells: dict[tuple[str, str], bool] = {}
    layers: list[int] = []
    roles: list[str] = []
    other: list[str] = []
    for n in names:
        m = _LAYER.match(n)
        if m:
            idx, role = int(m["idx"]), m["role"]
            layers.append(idx) if idx not in layers else None
            roles.append(role) if role not in roles else None
            cells[(str(idx), role)] = mask[n]
        else:
            short = n.replace("model.", "").replace(".weight", ".w").replace(".bias", ".b")
            other.append(short)
            cells[("other", short)] = mask[n]
    rows = [str(i) for i in sorted(layers, reverse=True)] + (["other"] if other else [])
    cols = roles + other
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in cells.items():
        grid[rows.index(r), cols.index(c)] = 1.0 if v else 0.0
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(cols) + 2), max(2.5, 0.35 * len(rows) + 2)))
    shown = np.ma.masked_invalid(grid)
    ax.imshow(shown, cmap=ListedColormap(["#d9d9d9", "#2ca02c"]), vmin=0, vmax=1, aspect="auto")
    ax.set_facecolor("white")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c.replace(".weight", ".w").replace(".bias", ".b") for c in cols], rotation=60,
                       ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"layer {r}" if r != "other" else "outside blocks" for r in rows], fontsize=7)
    ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    selected = sum(bool(v) for v in mask.values())
    ax.set_title(f"{title}\n{selected}/{len(mask)} tensors train (green); grey: frozen", fontsize=8)
    fig.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "FlopsProfile",
    "GreenTrainer",
    "GreenTrainerError",
    "Selection",
    "apply_mask",
    "check_architecture",
    "draw_mask",
    "flop_counter",
    "measure_forward_flops",
    "measure_step_flops",
    "plan_selection",
    "profile_flops",
    "tensor_importance",
]
