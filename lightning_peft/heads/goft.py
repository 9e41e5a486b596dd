"""GOFT / qGOFT: (quasi-)orthogonal fine-tuning with O(d) Givens rotations.

Ma, Chu, Yang, Lin, Gao, Zhao, "Parameter Efficient Quasi-Orthogonal Fine-Tuning via Givens Rotation",
ICML 2024 (arXiv 2404.04316). Official code: github.com/ArthurLeoM/peft-givens (``tuners/givens``).

Each targeted Linear (``h = W x + b``, HF layout ``W`` out x in, ``d = in_features``) becomes
``h = W Rᵀ x + b``: the input is rotated first (``x' = Rᵀ x``, i.e. ``x_row @ R``) and the frozen
Linear applied. ``R = P_S ⋯ P_2 P_1 · D`` is a product of ``d − 1`` 2x2 blocks arranged in
``S = ⌈log₂ d⌉`` stages of disjoint coordinate pairs (:func:`givens_schedule`; stage ``s`` pairs
``(2·step·j, 2·step·j + step)`` with ``step = 2^(s-1)`` among the coordinates still "alive", an odd
leftover carried to the next stage, so any ``d`` gets exactly ``d − 1`` blocks). ``D`` is a learned
diagonal for the ``scaled`` variant and the identity otherwise. Variants:

* ``strict`` (GOFT): block ``[[cos θ, −sin θ], [sin θ, cos θ]]``, ``d − 1`` parameters per Linear;
* ``scaled`` (the paper's GOFT* ablation): strict plus the diagonal ``D``, ``2d − 1`` parameters
  (the official code's strict mode adds this scaler by default, ``no_scaling=False``; the paper's GOFT
  counts exclude it, and so does ``strict`` here);
* ``quasi`` (qGOFT): a free block ``[[α₁, β₁], [α₂, β₂]]`` (columns ``α``, ``β``), ``4(d − 1)``
  parameters, with the soft-orthogonality regulariser ``λ Σ ⟨α, β⟩²`` (paper §4) returned by
  :meth:`GOFT.regularization_loss`; column norms are deliberately free.

Every block is the identity at init (θ = 0, free blocks = I, D = 1), so the attached model equals the
backbone exactly. Training never builds a d x d matrix: each stage is one elementwise 2x2 update of all
its pairs at once (the official v2 "Hadamard" path) on contiguous slices of a once-permuted input
(:func:`_fast_layout`); ``⌈log₂ d⌉`` vectorised steps whose sizes double, O(T·d) in all.
Merging builds ``R`` densely once and folds ``W ← W Rᵀ`` (bias unchanged).

Proposals (spec ``qgoft.md`` §11): ``θ = π·tanh(t)`` with raw parameter ``t`` (the official code's
bound; the paper uses a raw angle: ``bounded_angle=False`` gives that parity), and the rotation sits on
the input side only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from lightning_peft.heads.base import Head, HeadError, check_targets, classifier_module_names, is_classifier

VARIANTS = ("strict", "scaled", "quasi")
#: ``target_modules`` shorthands resolved through the architecture table (block roles)
ROLE_SETS = {
    "all": ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up"),
    "attention": ("q", "k", "v", "o", "qkv"),
    "mlp": ("gate", "up", "down", "gate_up"),
}


# ---------------------------------------------------------------------------------------------- schedule
def givens_schedule(d: int) -> list[tuple[list[int], list[int]]]:
    """The parallel Givens stages for dimension ``d``: a list of ``(p, q)`` index lists, one per stage.

    Pairs within a stage are disjoint; in total there are ``d − 1`` pairs over ``⌈log₂ d⌉`` stages
    (spec §3, code v1 ``get_delta_weight``). Blocks consume the parameters in this order.
    """
    stages: list[tuple[list[int], list[int]]] = []
    cnt, step = d, 1
    while cnt > 1:
        m = cnt // 2
        stages.append(([2 * step * j for j in range(m)], [2 * step * j + step for j in range(m)]))
        cnt, step = m + cnt % 2, 2 * step
    return stages


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return int(module.weight.shape[0])
    return None


def _fast_layout(d: int, stage_sizes: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Index tables of :meth:`GivensLinear.rotate`: ``(perm, unperm, coef)``.

    Stage ``s`` (``step = 2^(s-1)``) pairs ``p`` with ``q = p + step``. Walking from the coarsest stage
    down, ``reached`` lists the coordinates updated so far in their in-memory order, with the stage's
    ``p``'s first and an unpaired leftover last; the stage's ``q``'s are laid out to match. ``perm`` puts
    ``x`` in the order ``[0, q's of stage S, …, q's of stage 1]``, ``unperm`` undoes the final order, and
    ``coef[i]`` is the block (in schedule order) that the ``i``-th pair processed uses.
    """
    offsets = [sum(stage_sizes[:s]) for s in range(len(stage_sizes))]
    reached, perm, coef = [0], [0], []
    for s in reversed(range(len(stage_sizes))):
        m, step = stage_sizes[s], 2 ** s
        ps = reached[:m]
        qs = [p + step for p in ps]
        perm += qs
        coef += [offsets[s] + p // (2 * step) for p in ps]
        reached = ps + qs + reached[m:]
    unperm = [0] * d
    for position, coordinate in enumerate(reached):
        unperm[coordinate] = position
    return perm, unperm, coef


# ---------------------------------------------------------------------------------------------- layer
class GivensLinear(nn.Module):
    """A frozen Linear (or GPT-2 ``Conv1D``) whose input is multiplied by ``R`` (row form ``x @ R``)."""

    def __init__(self, base_layer: nn.Module, variant: str, bounded_angle: bool) -> None:
        super().__init__()
        d = _in_features(base_layer)
        self.base_layer = base_layer
        self.variant = variant
        self.bounded_angle = bounded_angle
        self.bypass = False
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        kw = {"device": weight.device, "dtype": dtype}
        if variant == "quasi":  # (d-1, 2, 2): rows [[α₁, β₁], [α₂, β₂]], identity at init
            self.goft_blocks = nn.Parameter(torch.eye(2, **kw).repeat(d - 1, 1, 1))
        else:
            self.goft_theta = nn.Parameter(torch.zeros(d - 1, **kw))
        if variant == "scaled":
            self.goft_scale = nn.Parameter(torch.ones(d, **kw))
        stages = givens_schedule(d)
        self.stage_sizes = [len(p) for p, _ in stages]
        self.num_stages = len(stages)
        for s, (ps, qs) in enumerate(stages):  # used by :meth:`dense` (merge), not by the forward
            self.register_buffer(f"goft_idx{s}", torch.tensor(ps + qs, device=weight.device), persistent=False)
        perm, unperm, coef = _fast_layout(d, self.stage_sizes)
        for name, values in (("goft_perm", perm), ("goft_unperm", unperm), ("goft_coef", coef)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.long, device=weight.device), persistent=False)
        self.in_features = d

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def blocks(self) -> torch.Tensor:
        """The ``d − 1`` 2x2 blocks ``[[a, b], [c, d]]`` (rows/columns ``p, q`` of their stage's ``P_s``)."""
        if self.variant == "quasi":
            return self.goft_blocks
        theta = math.pi * torch.tanh(self.goft_theta) if self.bounded_angle else self.goft_theta
        c, s = torch.cos(theta), torch.sin(theta)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)

    def stages(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(index, blocks)`` per stage, in the order ``P_1, P_2, …``; ``index`` is ``cat(p, q)``."""
        blocks, start = self.blocks(), 0
        for s, m in enumerate(self.stage_sizes):
            yield getattr(self, f"goft_idx{s}"), blocks[start:start + m]
            start += m

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R = x P_S ⋯ P_1 D`` over the last dimension, without a d x d matrix or a loop over pairs.

        One gather lays the coordinates out as ``[0 | q's of stage S | … | q's of stage 1]`` (see
        :func:`_fast_layout`); then, coarsest stage first, all pairs of a stage are updated at once:
        ``e`` holds the coordinates already reached, its first ``m`` entries are the stage's ``p``'s and
        the next contiguous piece its ``q``'s, and ``e ← [a p + c q, b p + d q, leftover]``. A last gather
        restores the natural order. Sizes double per stage: O(T·d) work in ``⌈log₂ d⌉`` steps."""
        blocks = self.blocks()[self.goft_coef]  # the blocks in the order the stages consume them
        shape = x.shape  # gathers along dim 1 of a 2-D view are several times faster than along the last of 3
        x = x.reshape(-1, shape[-1]).index_select(1, self.goft_perm)
        pieces = torch.split(x, [1, *self.stage_sizes[::-1]], dim=-1)
        e, start = pieces[0], 0
        for q, m in zip(pieces[1:], self.stage_sizes[::-1]):
            blk, start = blocks[start:start + m], start + m
            p = e[..., :m]
            # (x P)_p = a x_p + c x_q and (x P)_q = b x_p + d x_q for the block [[a, b], [c, d]] at (p, q)
            new_p = torch.addcmul(p * blk[:, 0, 0], q, blk[:, 1, 0])
            new_q = torch.addcmul(p * blk[:, 0, 1], q, blk[:, 1, 1])
            e = torch.cat([new_p, new_q, e[..., m:]], -1)  # an odd leftover stays last
        e = e.index_select(1, self.goft_unperm).reshape(shape)
        if self.variant == "scaled":
            e = e * self.goft_scale
        return e

    def dense(self) -> torch.Tensor:
        """``R = P_S ⋯ P_1 D`` as a d x d matrix (float64), built by left-multiplying row updates."""
        d = self.in_features
        r = torch.eye(d, dtype=torch.float64, device=self.base_layer.weight.device)
        for idx, blk in self.stages():  # r <- P_s r: rows p, q mix through the block
            m, blk = blk.shape[0], blk.detach().double()
            rp, rq = r[idx[:m]], r[idx[m:]]
            new_p = blk[:, 0, 0, None] * rp + blk[:, 0, 1, None] * rq
            new_q = blk[:, 1, 0, None] * rp + blk[:, 1, 1, None] * rq
            r = r.index_copy(0, idx, torch.cat([new_p, new_q], 0))
        if self.variant == "scaled":
            r = r * self.goft_scale.detach().double()
        return r

    def orthogonality_penalty(self) -> torch.Tensor:
        """``Σ ⟨α, β⟩² = Σ (α₁β₁ + α₂β₂)²`` over this layer's blocks (columns ``α``, ``β``)."""
        b = self.blocks()
        return ((b[:, 0, 0] * b[:, 0, 1] + b[:, 1, 0] * b[:, 1, 1]) ** 2).sum()

    def merged_layer(self) -> nn.Module:
        """The base layer with ``W ← W Rᵀ`` folded in (``Conv1D``: ``W ← R W``); computed in float64."""
        layer, r = self.base_layer, self.dense()
        with torch.no_grad():
            w = layer.weight.double()
            folded = w @ r.T if isinstance(layer, nn.Linear) else r @ w
            layer.weight.copy_(folded.to(layer.weight.dtype))
        return layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.bypass:
            return self.base_layer(x, *args, **kwargs)
        dtype = self.goft_blocks.dtype if self.variant == "quasi" else self.goft_theta.dtype
        return self.base_layer(self.rotate(x.to(dtype)).to(x.dtype), *args, **kwargs)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, d={self.in_features}, stages={self.num_stages}"


def givens_layers(model: nn.Module) -> list[GivensLinear]:
    return [m for m in model.modules() if isinstance(m, GivensLinear)]


# ---------------------------------------------------------------------------------------------- head
class GOFT(Head):
    """Givens-rotation orthogonal fine-tuning (GOFT, GOFT*, qGOFT) on the input side of targeted Linears.

    Args:
        variant: ``"strict"`` (GOFT, ``d − 1`` per Linear), ``"scaled"`` (GOFT*, ``2d − 1``) or
            ``"quasi"`` (qGOFT, ``4(d − 1)``), where ``d`` is the Linear's ``in_features``.
        target_modules: ``"all"`` (every attention and MLP projection of every block, the paper's GLUE
            setting), ``"attention"`` (q, k, v, o: its LLaMA setting) or ``"mlp"``, resolved through the
            architecture table; or a list of module names (leaf or full names).
        orth_lambda: weight ``λ`` of qGOFT's soft-orthogonality penalty ``λ Σ ⟨α, β⟩²`` (paper: 0.001 to
            0.05 on GLUE, 0.01 for LLaMA; 0.5 is too strong). Ignored by the strict variants.
        bounded_angle: angles ``θ = π·tanh(t)`` as in the official code (a proposal); ``False`` trains the
            raw angle as in the paper.

    A sequence classifier's new output layer trains too (as with every head).
    """

    mergeable = True
    identity_at_init = True

    def __init__(
        self,
        variant: str = "strict",
        target_modules: list[str] | str = "all",
        orth_lambda: float = 0.01,
        bounded_angle: bool = True,
    ) -> None:
        if variant not in VARIANTS:
            raise HeadError(f"GOFT variant={variant!r} is not one of {list(VARIANTS)}; use 'strict' (GOFT), "
                            "'scaled' (GOFT*) or 'quasi' (qGOFT).")
        if isinstance(target_modules, str) and target_modules not in ROLE_SETS:
            raise HeadError(f"GOFT target_modules={target_modules!r} is not one of {list(ROLE_SETS)}; use one of "
                            "these or a list of module names such as [q_proj, v_proj].")
        if not isinstance(orth_lambda, (int, float)) or orth_lambda < 0:
            raise HeadError(f"GOFT orth_lambda={orth_lambda!r} must be a number >= 0; use e.g. 0.01 (0 turns the "
                            "qGOFT penalty off).")
        self.variant = variant
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.orth_lambda = float(orth_lambda)
        self.bounded_angle = bool(bounded_angle)

    # ----------------------------------------------------------------- targets
    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(full name, module)`` of every module the head wraps, checked (Linear or Conv1D, d >= 2)."""
        if isinstance(self.target_modules, str):
            from lightning_peft.architectures import UnsupportedArchitecture, architecture_of, block_modules, blocks

            try:
                arch = architecture_of(model)
                chosen = {id(m) for b in blocks(model) for role, m in block_modules(b, arch).items()
                          if role in ROLE_SETS[self.target_modules]}
            except UnsupportedArchitecture as err:
                raise HeadError(f"GOFT target_modules={self.target_modules!r} needs the architecture table: {err} "
                                "Or name the modules, e.g. target_modules: [q_proj, v_proj].") from err
            found = [(n, m) for n, m in model.named_modules() if id(m) in chosen]
        else:
            check_targets(model, self.target_modules, "GOFT")
            found = [(n, m) for n, m in model.named_modules()
                     if n in self.target_modules or n.rsplit(".", 1)[-1] in self.target_modules]
        if is_classifier(model):  # a classifier's output layer trains whole; never rotate inside it
            skip = tuple(classifier_module_names(model))
            found = [(n, m) for n, m in found if n.split(".")[0] not in skip]
        if not found:
            raise HeadError(f"GOFT target_modules={self.target_modules!r} selects no module of "
                            f"{type(model).__name__}; name its linear layers instead.")
        for name, module in found:
            if isinstance(module, GivensLinear):
                raise HeadError(f"GOFT is already attached at {name!r}; attach it to a fresh backbone.")
            d = _in_features(module)
            if d is None:
                raise HeadError(f"GOFT target {name!r} is a {type(module).__name__}, not a Linear; name linear "
                                "layers only in target_modules.")
            if d < 2:
                raise HeadError(f"GOFT target {name!r} has in_features={d}; a rotation needs at least 2 inputs, "
                                "so leave it out of target_modules.")
        return found

    def per_layer(self, d: int) -> int:
        """Trainable parameters of one wrapped Linear with ``in_features = d`` (spec §5)."""
        return {"strict": d - 1, "scaled": 2 * d - 1, "quasi": 4 * (d - 1)}[self.variant]

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        """``Σ_targets per_layer(d_in)`` + a classifier's output layer."""
        total = sum(self.per_layer(_in_features(m)) for _, m in self.targets(model))
        if is_classifier(model):
            total += sum(p.numel() for n in classifier_module_names(model) for p in getattr(model, n).parameters())
        return total

    # ----------------------------------------------------------------- attach
    def attach(self, model: nn.Module) -> nn.Module:
        found = self.targets(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in found:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, GivensLinear(module, self.variant, self.bounded_angle))
        if is_classifier(model):
            for n in classifier_module_names(model):
                getattr(model, n).requires_grad_(True)
        return model

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        """qGOFT: ``λ Σ_layers Σ_blocks ⟨α, β⟩²``; the strict variants are orthogonal by construction."""
        if self.variant != "quasi" or self.orth_lambda == 0:
            return None
        return self.orth_lambda * sum(layer.orthogonality_penalty() for layer in givens_layers(model))

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Within the block every wrapped Linear skips its rotation (no parameter or flag changes)."""

        @contextlib.contextmanager
        def switched_off():
            layers = givens_layers(model)
            previous = [layer.bypass for layer in layers]
            for layer in layers:
                layer.bypass = True
            try:
                yield
            finally:
                for layer, before in zip(layers, previous):
                    layer.bypass = before

        return switched_off()

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold ``W ← W Rᵀ`` into every wrapped Linear and put the plain layer back (bias unchanged)."""
        for name, module in list(model.named_modules()):
            if isinstance(module, GivensLinear):
                parent_name, _, leaf = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, leaf, module.merged_layer())
        return model
