"""Bottleneck adapters: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019) and
the "Pfeiffer" configuration of Pfeiffer et al., "AdapterFusion" (EACL 2021).

One adapter maps the output ``h`` of a sub-layer to ::

    A(h) = h + s * (W_up phi(W_down h + b_down) + b_up)      W_down: m x d, W_up: d x m

with ``2dm + d + m`` parameters. It is not mergeable (``phi`` is nonlinear).

Placement (resolved through :mod:`lightning_peft.architectures`, so every family of the table works):

* ``houlsby``: two adapters per block, on the output of the attention output projection (role ``o``)
  and on the output of the MLP down-projection (role ``down``), i.e. before the residual add (and, in
  post-norm encoders, before the LayerNorm). The block's norms train too (Houlsby trains them per
  task): ``L * [2(2dm + d + m) + 4d]`` on BERT-like encoders (two LayerNorms of ``2d``), ``+ 2d`` per
  block instead of ``4d`` with the weight-only RMSNorms of Llama-like decoders.
* ``pfeiffer``: one adapter per block on the MLP down-projection output: ``L * (2dm + d + m)``. This is
  the simplified equivalent the spec allows; AdapterHub's ``SeqBnConfig`` instead reads the output after
  the original Add & LayerNorm and applies that LayerNorm again, so numbers differ slightly from theirs.

The adapter sits on the projection's output, so in BERT-like blocks it runs before the sub-layer's
dropout rather than after it (identical in eval mode).

Init (``init``): ``"zero_up"`` (default, a proposal of the spec): ``W_down`` from a normal of std 1e-2
truncated at 2 sigma, ``W_up = 0`` and ``b_up = 0``, so the attached model equals the backbone exactly at
init while ``W_up`` still gets gradients; ``"houlsby"``: every weight from that truncated normal, biases
0 (the paper's near-identity init); ``"bert"``: N(0, 0.02) weights, biases 0 (AdapterHub's default).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.architectures import block_modules, blocks, out_features, require
from lightning_peft.heads.base import Head, HeadError, classifier_module_names, is_classifier

ACTIVATIONS = {"relu": F.relu, "swish": F.silu, "silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh}
#: placement -> the block roles whose output is adapted (``o``: attention output projection, ``down``: MLP)
PLACEMENTS = {"houlsby": ("o", "down"), "pfeiffer": ("down",)}
#: the activation each placement uses when none is given (AdapterHub: Houlsby swish, Pfeiffer ReLU)
DEFAULT_ACTIVATION = {"houlsby": "swish", "pfeiffer": "relu"}
INITS = ("zero_up", "houlsby", "bert")
#: child-module name of the adapter in its block, per adapted role
CHILD = {"o": "bottleneck_attn", "down": "bottleneck_mlp"}


class BottleneckModule(nn.Module):
    """One bottleneck adapter on the last dimension, applied as a forward hook on the adapted projection.

    Optional fixed binary masks (``down_mask``, ``up_mask``; SparseAdapter) multiply the weights in the
    forward, so masked entries get exactly zero gradient.
    """

    def __init__(self, d: int, m: int, activation: str, scale: float = 1.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.down_weight = nn.Parameter(torch.zeros(m, d, **kw))
        self.down_bias = nn.Parameter(torch.zeros(m, **kw))
        self.up_weight = nn.Parameter(torch.zeros(d, m, **kw))
        self.up_bias = nn.Parameter(torch.zeros(d, **kw))
        self.activation = activation
        self.scale = scale
        self.active = True  # False inside ``BottleneckAdapter.disabled``
        self.register_buffer("down_mask", None, persistent=False)
        self.register_buffer("up_mask", None, persistent=False)

    def reset(self, init: str) -> None:
        with torch.no_grad():
            for p in (self.down_bias, self.up_bias):
                p.zero_()
            if init == "bert":
                self.down_weight.normal_(0.0, 0.02)
                self.up_weight.normal_(0.0, 0.02)
            else:
                nn.init.trunc_normal_(self.down_weight, std=1e-2, a=-2e-2, b=2e-2)
                if init == "houlsby":
                    nn.init.trunc_normal_(self.up_weight, std=1e-2, a=-2e-2, b=2e-2)
                else:
                    self.up_weight.zero_()

    def set_masks(self, down_mask: torch.Tensor, up_mask: torch.Tensor) -> None:
        """Fix the binary masks and zero the masked weights in place."""
        self.down_mask = down_mask.to(device=self.down_weight.device, dtype=torch.bool)
        self.up_mask = up_mask.to(device=self.up_weight.device, dtype=torch.bool)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self.down_mask is not None:
            self.down_weight.mul_(self.down_mask)
            self.up_weight.mul_(self.up_mask)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.down_mask is None:
            return self.down_weight, self.up_weight
        return self.down_weight * self.down_mask, self.up_weight * self.up_mask

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        down, up = self.weights()
        z = ACTIVATIONS[self.activation](F.linear(h, down, self.down_bias))
        return h + self.scale * F.linear(z, up, self.up_bias)

    def hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        """``register_forward_hook`` target: replace the projection's output by the adapted one."""
        if not self.active:
            return None
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


def adapters(model: nn.Module) -> list[tuple[str, BottleneckModule]]:
    """``(name, adapter)`` of every bottleneck adapter in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BottleneckModule)]


class BottleneckAdapter(Head):
    """Houlsby (two per block) or Pfeiffer (one per block) bottleneck adapters.

    Args:
        placement: ``"houlsby"`` (after the attention output projection and after the MLP) or
            ``"pfeiffer"`` (after the MLP only).
        bottleneck: the bottleneck size ``m``.
        activation: ``relu``, ``swish``/``silu``, ``gelu`` or ``tanh``; default ``swish`` for Houlsby and
            ``relu`` for Pfeiffer (AdapterHub's ``DoubleSeqBnConfig`` / ``SeqBnConfig``).
        init: ``zero_up`` (identity at init, default), ``houlsby`` or ``bert`` (see the module docstring).
        train_layernorm: train the blocks' norms; default True for Houlsby, False for Pfeiffer.
        scale: the output scaling ``s``.
    """

    def __init__(self, placement: str = "houlsby", bottleneck: int = 64, activation: str | None = None,
                 init: str = "zero_up", train_layernorm: bool | None = None, scale: float = 1.0) -> None:
        if placement not in PLACEMENTS:
            raise HeadError(f"BottleneckAdapter placement={placement!r} is unknown; use 'houlsby' or 'pfeiffer'.")
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise HeadError(f"BottleneckAdapter bottleneck={bottleneck!r} must be a positive integer (e.g. 64).")
        if activation is not None and activation not in ACTIVATIONS:
            raise HeadError(f"BottleneckAdapter activation={activation!r} is unknown; "
                            f"use one of {sorted(ACTIVATIONS)}.")
        if init not in INITS:
            raise HeadError(f"BottleneckAdapter init={init!r} is unknown; use one of {list(INITS)}.")
        self.placement = placement
        self.bottleneck = bottleneck
        self.activation = activation
        self.init = init
        self.train_layernorm = train_layernorm
        self.scale = scale
        self.identity_at_init = init == "zero_up"

    # ----------------------------------------------------------------- resolved settings
    @property
    def act(self) -> str:
        return self.activation or DEFAULT_ACTIVATION[self.placement]

    @property
    def trains_norms(self) -> bool:
        return self.placement == "houlsby" if self.train_layernorm is None else bool(self.train_layernorm)

    def _sites(self, model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
        """``(block, role, projection)`` of every adapted projection, from the architecture table."""
        arch = require(model, type(self).__name__, error=HeadError)
        sites = []
        for block in blocks(model):
            mods = block_modules(block, arch)
            for role in PLACEMENTS[self.placement]:
                if role not in mods:
                    raise HeadError(f"{type(self).__name__} needs the {role!r} projection of every block, which "
                                    f"{arch.name} blocks lack; use a family whose table entry names it.")
                sites.append((block, role, mods[role]))
        return sites

    def _norms(self, model: nn.Module) -> list[nn.Module]:
        arch = require(model, type(self).__name__, error=HeadError)
        found = []
        for block in blocks(model):
            mods = block_modules(block, arch)
            found += [mods[role] for role in arch.norms if role in mods]
        return found

    # ----------------------------------------------------------------- attach and counts
    def attach(self, model: nn.Module) -> nn.Module:
        sites = self._sites(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for block, role, proj in sites:
            weight = next(proj.parameters())
            adapter = BottleneckModule(out_features(proj), self.bottleneck, self.act, self.scale,
                                       device=weight.device, dtype=weight.dtype)
            adapter.reset(self.init)
            block.add_module(CHILD[role], adapter)
            proj.register_forward_hook(adapter.hook)
        if self.trains_norms:
            for norm in self._norms(model):
                for p in norm.parameters():
                    p.requires_grad_(True)
        if is_classifier(model):
            for name in classifier_module_names(model):
                for p in getattr(model, name).parameters():
                    p.requires_grad_(True)
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        """``sum (2dm + d + m)`` over adapted projections (``d`` their output width) + the blocks' norm
        parameters when they train (``4d`` per BERT block, ``2d`` per Llama block) + a classifier's output layer."""
        m = self.bottleneck
        total = sum(2 * out_features(proj) * m + out_features(proj) + m for _, _, proj in self._sites(model))
        if self.trains_norms:
            total += sum(p.numel() for norm in self._norms(model) for p in norm.parameters())
        if is_classifier(model):
            total += sum(p.numel() for n in classifier_module_names(model) for p in getattr(model, n).parameters())
        return total

    # ----------------------------------------------------------------- switching off
    @contextlib.contextmanager
    def _bypassed(self, model: nn.Module):
        found = [a for _, a in adapters(model)]
        before = [a.active for a in found]
        for a in found:
            a.active = False
        try:
            yield model
        finally:
            for a, was in zip(found, before):
                a.active = was

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The adapters are bypassed inside the block (no parameter or flag changes). Refused when the
        blocks' norms train, since the backbone's own norm weights are then gone."""
        if self.trains_norms:
            raise HeadError(f"{self!r} trains the blocks' norms, so bypassing the adapters does not give the base "
                            "model back; use train_layernorm=False for a head that can be switched off.")
        return self._bypassed(model)
