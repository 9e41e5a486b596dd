"""What ``PeftHead`` does differently per ``peft_type``: one small class per type, in one registry.

``PeftHead(config)`` looks its ``peft_type`` up in :data:`PEFT_TYPES` and delegates every
method-specific duty to that class: the merge / identity-at-init flags, the tasks it supports, field
defaults, the trainable-parameter formula, a regulariser, training hooks and extra state, and the
forward. A type without an entry attaches and trains through peft with the defaults of
:class:`PeftType` (no formula, not mergeable).

Adding a peft type is one class in one file: subclass :class:`PeftType` (or :class:`AdapterType` for
a mergeable adapter) here, in :mod:`~lightning_peft.heads.peft_types_prompt` (prompt learning) or next to
:mod:`~lightning_peft.heads.peft_types_adalora`, and decorate it with ``@register("NAME")``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft import architectures as A
from lightning_peft.heads.lora import matches_target, targeted_linears

#: peft_type -> the class holding its specifics (filled by ``@register``)
PEFT_TYPES: dict[str, type[PeftType]] = {}


def register(*names: str):
    """Class decorator: ``@register("LORA")`` makes the class the specifics of those peft types."""

    def add(cls: type[PeftType]) -> type[PeftType]:
        for name in names:
            PEFT_TYPES[name] = cls
        return cls

    return add


def model_dims(model: nn.Module) -> tuple[int, int, int]:
    """(token-embedding width, blocks per stack, key/value width) of ``model`` (any wrapper).

    Read from the architecture table (:mod:`lightning_peft.architectures`): the width of the token
    embeddings, the length of the first block stack (T5: the encoder's, which peft's prefix uses per
    stack) and ``head_dim * kv_heads`` from :func:`~lightning_peft.architectures.attention_facts`. A
    family not in the table falls back to the usual ``transformers`` config names (``hidden_size`` /
    ``n_embd`` / ``d_model``, ``num_hidden_layers`` / ``n_layer`` / ``num_layers``, attention and
    key/value heads, ``head_dim``); where those are missing too, one sentence says how to add the family.
    """
    try:
        stacks = A.block_stacks(model)
        facts = A.attention_facts(model)
        return A.embeddings(model).embedding_dim, len(stacks[0]), facts.head_dim * facts.kv_heads
    except A.UnsupportedArchitecture:
        return _config_dims(A.unwrap(model))


def _config_dims(hf: nn.Module) -> tuple[int, int, int]:
    """The fallback of :func:`model_dims` for families outside the architecture table."""
    c = getattr(hf, "config", None)

    def first(*names: str) -> Any:
        value = next((getattr(c, n) for n in names if getattr(c, n, None)), None)
        if value is None:
            model_type = getattr(c, "model_type", None)
            raise A.UnsupportedArchitecture(
                f"cannot tell the dimensions of model_type {model_type!r} ({type(hf).__name__}): it is not in the "
                f"architecture table and its config has none of {', '.join(names)}; add the family to "
                "ARCHITECTURES in lightning_peft/architectures.py.")
        return value

    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return hidden, layers, head_dim * kv_heads


class PeftType:
    """The defaults: a peft method that attaches and trains, with no formula and no merge.

    One instance per ``PeftHead``; ``fields`` are the user's config fields (without ``peft_type``).
    """

    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    #: the model computes the loss itself (the objective uses ``output.loss``)
    own_loss: ClassVar[bool] = False
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "sequence-classification")

    def __init__(self, peft_type: str, fields: dict[str, Any]) -> None:
        self.peft_type = peft_type
        self.fields = fields
        self.set_defaults(fields)

    def set_defaults(self, fields: dict[str, Any]) -> None:
        """Fill in defaults of this package (proposals where peft has none), in place."""

    def config_fields(self, model: nn.Module) -> dict[str, Any]:
        """The fields handed to peft's config class (default: the user's)."""
        return dict(self.fields)

    def formula(self, model: nn.Module) -> int | None:
        """Trainable parameters the method adds (classifier output layers are counted by ``PeftHead``)."""
        return None

    def field(self, model: nn.Module, key: str) -> Any:
        """The user's ``key``; when left out, peft's per-architecture default for ``target_modules`` /
        ``feedforward_modules`` (the public ``peft.utils.TRANSFORMERS_MODELS_TO_<TYPE>_..._MAPPING`` tables,
        keyed by ``model_type``), which is what peft will attach to."""
        value = self.fields.get(key)
        if value is None and key in ("target_modules", "feedforward_modules"):
            import peft.utils

            kind = "TARGET_MODULES" if key == "target_modules" else "FEEDFORWARD_MODULES"
            table = getattr(peft.utils, f"TRANSFORMERS_MODELS_TO_{self.peft_type}_{kind}_MAPPING", {})
            value = table.get(getattr(getattr(model, "config", None), "model_type", None))
        return sorted(value) if isinstance(value, set) else value

    # hooks, with the meaning of the same-named ``Head`` methods
    def disabled(self, model: nn.Module) -> Any:
        """A context that switches this type off, or None for the default (peft's adapter layers bypassed)."""
        return None

    def before_attach(self, model: nn.Module) -> None:
        """Checks or decisions that need the bare backbone."""

    def forward_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {}

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        return model(**inputs)

    def on_fit_start(self, model: nn.Module, total_steps: int) -> None:
        pass

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        pass

    def extra_state(self, model: nn.Module) -> dict[str, Any]:
        return {}

    def load_extra_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        pass

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None


class AdapterType(PeftType):
    """Weight adapters: mergeable, and the attached model equals the backbone at initialisation."""

    mergeable = True
    identity_at_init = True


@register("LOHA", "LOKR")
class _MergeableWithoutFormula(AdapterType):
    pass


@register("LORA")
class LoraType(AdapterType):
    """LoRA (Hu et al., 2021): ``r (d_in + d_out)`` per targeted linear, plus ``d_out`` with DoRA."""

    def formula(self, model: nn.Module) -> int:
        f = self.fields
        r = f.get("r", 8)
        return sum(r * (d_in + d_out) + (d_out if f.get("use_dora") else 0)
                   for _, d_in, d_out in targeted_linears(model, self.field(model, "target_modules") or "all-linear"))


@register("IA3")
class IA3Type(AdapterType):
    """(IA)^3 (Liu et al., 2022): one scale per input feature of FFN layers, per output feature elsewhere."""

    def formula(self, model: nn.Module) -> int:
        ff = list(self.field(model, "feedforward_modules") or [])
        return sum(d_in if matches_target(name, ff) else d_out
                   for name, d_in, d_out in targeted_linears(model, self.field(model, "target_modules")))


@register("VERA")
class VeraType(AdapterType):
    """VeRA (Kopiczko et al., 2024): trainable scaling vectors ``d`` (r) and ``b`` (d_out) per linear."""

    def formula(self, model: nn.Module) -> int:
        r = self.fields.get("r", 256)
        return sum(d_out + r for _, _, d_out in targeted_linears(model, self.field(model, "target_modules")))


@register("OFT")
class OftType(AdapterType):
    """OFT (Qiu et al., 2023): block-diagonal orthogonal rotations, skew-symmetric ``b (b - 1) / 2`` per block."""

    def formula(self, model: nn.Module) -> int:
        total = 0
        for _, d_in, _ in targeted_linears(model, self.field(model, "target_modules")):
            r, b = self.fields.get("r", 0), self.fields.get("oft_block_size", 32)
            n, b = (r, d_in // r) if r else (d_in // b, b)
            total += n * b * (b - 1) // 2
        return total


@register("BOFT")
class BoftType(AdapterType):
    """BOFT (Liu et al., 2024): butterfly factors of ``b x b`` blocks plus an output scale."""

    def formula(self, model: nn.Module) -> int:
        f = self.fields
        # peft falls back to one butterfly factor when its CUDA extension is unavailable
        factor = f.get("boft_n_butterfly_factor", 1) if torch.cuda.is_available() else 1
        total = 0
        for _, d_in, d_out in targeted_linears(model, self.field(model, "target_modules")):
            b = f.get("boft_block_size") or d_in // f["boft_block_num"]
            total += factor * (d_in // b) * b * b + d_out
        return total
