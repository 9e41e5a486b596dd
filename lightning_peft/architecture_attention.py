"""How a family's attention is computed, resolved on one model (part of :mod:`lightning_peft.architectures`).

:func:`attention_facts` gives the numbers a component re-implementing attention needs (heads, kv heads,
head_dim, scaling, soft cap, rotary module, window); :func:`attention_parts` gives one block's attention
modules with the family's recipe for per-head q/k/v (fused layouts, q/k norms) and rotary embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft.architectures import architecture_of, base_model, block_modules, blocks, get_path, unwrap


@dataclass(frozen=True)
class AttentionFacts:
    """What a component re-implementing a family's attention needs, resolved on one model."""

    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None
    rotary: nn.Module | None  # the model's rotary-embedding module (called as ``rotary(x, position_ids)``)
    rotary_dim: int | None  # rotated share of head_dim (None without rotary embeddings)
    causal: bool
    sliding_window: int | None  # a window the family applies (Mistral; Qwen2 with use_sliding_window)


def attention_facts(model: nn.Module) -> AttentionFacts:
    """Heads, kv heads, head_dim, scaling, soft cap, rotary module and window of ``model``'s attention."""
    arch = architecture_of(model)
    a = arch.attention
    config = unwrap(model).config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads) if a.gqa else heads
    head_dim = getattr(config, a.head_dim, None) if a.head_dim else None
    head_dim = int(head_dim or config.hidden_size // heads)
    if a.scaling == "none":
        scaling = 1.0
    elif a.scaling == "query_pre_attn_scalar":
        scaling = float(config.query_pre_attn_scalar) ** -0.5
    else:
        scaling = 1.0 / math.sqrt(head_dim)
    softcap = getattr(config, a.softcap, None) if a.softcap else None
    rotary = get_path(base_model(model), arch.rotary) if arch.rotary else None
    rotary_dim = None
    if arch.positional == "rope":
        frac = _rotary_fraction(config, a.rotary_fraction)
        rotary_dim = int(head_dim * frac)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    return AttentionFacts(heads=heads, kv_heads=kv_heads, head_dim=head_dim, scaling=scaling,
                          softcap=float(softcap) if softcap else None, rotary=rotary, rotary_dim=rotary_dim,
                          causal=arch.causal, sliding_window=int(window) if window else None)


@dataclass
class AttentionParts:
    """One block's attention, resolved into modules, with the family's recipe for q/k/v.

    :meth:`states` gives per-head ``q [B, H, S, d]``, ``k`` and ``v [B, Hkv, S, d]`` from the block's
    normalised input, with q/k norms applied where the family has them (Qwen3) and before any rotary
    embedding (as in ``transformers``); :meth:`rotate` applies rotary embeddings over the first
    ``cos.shape[-1]`` features (all of them, or GPT-NeoX's rotated share). Projections are called as
    modules, so peft layers (LoRA) take part.
    """

    module: nn.Module
    norm: nn.Module  # the block's pre-attention norm
    o: nn.Module
    facts: AttentionFacts
    q: nn.Module | None = None
    k: nn.Module | None = None
    v: nn.Module | None = None
    qkv: nn.Module | None = None
    qkv_layout: str | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None

    @property
    def dropout(self) -> float:
        """The attention-probability dropout the module applies in training mode."""
        p = getattr(self.module, "attention_dropout", 0.0)
        p = p.p if isinstance(p, nn.Dropout) else p
        return float(p) if self.module.training else 0.0

    def states(self, x: torch.Tensor, want_v: bool = True) -> tuple[torch.Tensor, ...]:
        """``(q, k)`` or ``(q, k, v)`` heads of ``x [B, S, D]`` (the normalised block input), pre-rotary."""
        f = self.facts
        b, s, _ = x.shape
        d, h, hkv = f.head_dim, f.heads, f.kv_heads
        if self.qkv is not None:
            z = self.qkv(x)
            if self.qkv_layout == "per_head":
                q, k, v = z.view(b, s, h, 3 * d).split(d, dim=-1)
            else:
                q, k, v = z.split((h * d, hkv * d, hkv * d), dim=-1)
        else:
            q, k = self.q(x), self.k(x)
            v = self.v(x) if want_v else None
        q = q.reshape(b, s, h, d)
        k = k.reshape(b, s, hkv, d)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        out = (q.transpose(1, 2), k.transpose(1, 2))
        if want_v:
            out += (v.reshape(b, s, hkv, d).transpose(1, 2),)
        return out

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``x [B, H, S, d]`` with ``cos, sin [B, S, r]`` over its first ``r`` features."""
        r = cos.shape[-1]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rot, rest = x[..., :r], x[..., r:]
        a, b = rot.chunk(2, dim=-1)
        rot = rot * cos + torch.cat((-b, a), dim=-1) * sin
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot

    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cos, sin)`` for positions ``0..S-1`` from the model's rotary module (None without rotary)."""
        if self.facts.rotary is None:
            return None
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        return self.facts.rotary(hidden, positions)


def attention_parts(model: nn.Module, block: nn.Module | int) -> AttentionParts:
    """The :class:`AttentionParts` of ``block`` (a block module or an index into :func:`blocks`) of ``model``."""
    arch = architecture_of(model)
    if isinstance(block, int):
        block = blocks(model)[block]
    mods = block_modules(block, arch)
    return AttentionParts(module=mods["attention"], norm=mods["attn_norm"], o=mods["o"], facts=attention_facts(model),
                          q=mods.get("q"), k=mods.get("k"), v=mods.get("v"), qkv=mods.get("qkv"),
                          qkv_layout=arch.attention.qkv_layout, q_norm=mods.get("q_norm"), k_norm=mods.get("k_norm"))


def _rotary_fraction(config: Any, attr: str | None) -> float:
    if attr is None:
        return 1.0
    value = getattr(config, attr, None)
    if value is None:  # transformers 5 keeps it inside rope_parameters
        value = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor")
    return float(value if value is not None else 1.0)


__all__ = ["AttentionFacts", "AttentionParts", "attention_facts", "attention_parts"]
