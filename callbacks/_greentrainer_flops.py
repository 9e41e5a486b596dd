"""GreenTrainer's FLOPs model: ``FlopCounterMode`` counts attributed to modules in execution order.

See :mod:`lightning_peft.callbacks.greentrainer` (module docstring) for the model and its departures
from the paper. Public: :func:`flop_counter`, :func:`measure_step_flops`, :func:`measure_forward_flops`,
:class:`FlopsProfile`, :func:`profile_flops`, :func:`check_architecture`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

from lightning_peft import architectures as A
from lightning_peft.callbacks._greentrainer_dp import selection_cost
from lightning_peft.compat import TorchDispatchMode, tree_flatten, tree_map  # torch private names, see compat

aten = torch.ops.aten


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


def check_architecture(model: nn.Module) -> None:
    """:class:`GreenTrainerError` in one sentence unless ``model``'s family is in the architecture table
    with one stack of blocks (the FLOPs chain follows one stack; T5's two stacks are refused)."""
    A.require(model, "GreenTrainer", needs=("single_stack",), error=GreenTrainerError)


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
