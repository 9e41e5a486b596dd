"""ShareLoRA: LoRA whose ``A`` (or ``B``, or both) is one matrix per projection type, shared by all layers.

Paper: Song, Zhao, Harris, Abdu Jyothi, "ShareLoRA: Parameter Efficient and Robust Large Language Model
Fine-tuning via Shared Low-Rank Adaptation" (arXiv 2406.10785); spec: ``../shared/methods/sharelora.md``.
For layer ``l`` and projection type ``p`` (share="A")::

    h = W0[l, p] x + (alpha / r) B[l, p] A[p] x

("B": ``B[p] A[l, p]``; "AB": ``B[p] A[p]``, i.e. every layer gets the same update). Initialisation is
LoRA's (``B = 0``), so the model is unchanged at init in every mode.

Built by composition on ``peft`` LoRA, as the official LLaMA script does: after ``get_peft_model`` the
first layer's ``lora_A[adapter].weight`` Parameter is assigned to the same ``lora_A`` of every other layer
of its projection type. ``model.parameters()`` (and so the optimizer, the trainable count, DDP and the
head's saved state) sees the shared matrix once; autograd sums its gradient over the layers that use it.

* A *projection type* is a module's path inside its block, found through the architecture table
  (``attention.self.query`` and ``attention.output.dense`` of a BERT block are different types; T5's
  encoder and decoder stacks are different types); targeted modules outside the blocks are not shared.
  For families outside the table the layer index is read from the module name (the first integer
  component of its path).
* ``shared_modules`` restricts sharing to some types (the paper's LLaMA recipe: LoRA on every Linear,
  only ``q_proj`` and ``v_proj`` shared); the others keep per-layer LoRA.
* ``shared_lr_scale`` (proposal of the spec, default 1.0 = the paper): the shared matrices receive the
  summed gradient of all layers, and this multiplies their learning rate.
* ``share_scope="qkv"`` (a proposal of the spec: the paper's "self-attention variant", found in
  neither the code nor readable text): the q, k and v projections (architecture-table roles) of every
  layer share one matrix, which works for ``A`` because all three read the hidden state; with ``B`` it
  needs equal output widths (no GQA). The default ``"type"`` shares per projection type, as the code does.

Saving: :meth:`Head.save` and adapter-only checkpoints keep each shared matrix once (under its first
layer's name) and re-tie on load, because the rebuilt head shares before the state is copied in. The
unmerged export (``lightning-peft export --merge false``) writes a plain ``peft`` LoRA adapter with the
shared matrices copied into every layer (peft de-aliases shared tensors when it saves), so
``peft.PeftModel.from_pretrained`` loads it and computes the same function, without the sharing.
"""

from __future__ import annotations

import re

from torch import nn

from lightning_peft.heads._peft import PeftBackedHead, classifier_parameters, peft_task_type
from lightning_peft.heads.base import HeadError, classifier_module_names, is_classifier
from lightning_peft.heads.lora import targeted_linears

SHARE = ("A", "B", "AB")
SCOPES = ("type", "qkv")
ADAPTER = "default"


def _block_names(model: nn.Module) -> dict[str, int] | None:
    """Full module name of every block -> index of its stack; None for families outside the table."""
    from lightning_peft.architectures import UnsupportedArchitecture, block_stacks

    try:
        stacks = block_stacks(model)
    except UnsupportedArchitecture:
        return None
    stack_of = {id(b): s for s, stack in enumerate(stacks) for b in stack}
    return {name: stack_of[id(m)] for name, m in model.named_modules() if id(m) in stack_of}


def projection_type(name: str, block_names: dict[str, int] | None, merged: frozenset[str] = frozenset()) -> str:
    """The sharing key of a module: its path inside its block (prefixed by the stack), or its full name
    when it lies outside every block. Block paths in ``merged`` share one key (``share_scope="qkv"``)."""
    if block_names is None:  # not in the architecture table: the first integer path component is the layer
        key, n = re.subn(r"\.\d+\.", ".*.", name, count=1)
        return key if n else name
    for block, stack in block_names.items():
        if name.startswith(block + "."):
            path = name[len(block) + 1:]
            return f"stack{stack}.*.{'qkv' if path in merged else path}"
    return name


class ShareLoRA(PeftBackedHead):
    """LoRA with one ``A`` (``share="A"``), one ``B`` (``"B"``) or both (``"AB"``) per projection type,
    shared across layers.

    Args:
        r: rank of the update.
        alpha: scaling numerator (``alpha / r``).
        share: which factor is shared: ``"A"`` (the paper's default), ``"B"`` or ``"AB"``.
        target_modules: module names (e.g. ``[query, value]``, the paper's GLUE setting) or ``"all-linear"``.
        dropout: dropout on the adapter's input.
        shared_modules: leaf names of the projection types to share (default: every targeted type);
            the others keep plain per-layer LoRA (the paper's LLaMA recipe shares only ``q_proj``, ``v_proj``).
        shared_lr_scale: learning-rate multiplier of the shared matrices (a proposal; 1.0 = the paper).
        share_scope: ``"type"`` (one shared matrix per projection type, the paper's code) or ``"qkv"`` (one
            matrix for the q, k and v projections of every layer; a proposal).
    """

    mergeable = True
    identity_at_init = True

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        share: str = "A",
        target_modules: list[str] | str = "all-linear",
        dropout: float = 0.0,
        shared_modules: list[str] | None = None,
        shared_lr_scale: float = 1.0,
        share_scope: str = "type",
    ) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise HeadError(f"ShareLoRA r={r!r} must be a positive integer; use r >= 1 (8 is the paper's GLUE rank).")
        if share not in SHARE:
            raise HeadError(f"ShareLoRA share={share!r} is not one of {SHARE}; use 'A' (the paper's default).")
        if share_scope not in SCOPES:
            raise HeadError(f"ShareLoRA share_scope={share_scope!r} is not one of {SCOPES}; use 'type' (the paper's "
                            "code).")
        if shared_lr_scale <= 0:
            raise HeadError(f"ShareLoRA shared_lr_scale={shared_lr_scale} must be positive; use 1.0 (no rescaling).")
        self.r = r
        self.alpha = alpha
        self.share = share
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.dropout = dropout
        self.shared_modules = None if shared_modules is None else list(shared_modules)
        self.shared_lr_scale = shared_lr_scale
        self.share_scope = share_scope

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type=peft_task_type(model))

    # ----------------------------------------------------------------- groups
    def groups(self, model: nn.Module) -> list[list[tuple[str, int, int]]]:
        """The targeted Linears ``(name, d_in, d_out)`` grouped by shared matrix: one list per shared
        projection type, a one-element list for each module that keeps its own LoRA."""
        head = set(classifier_module_names(model)) if is_classifier(model) else set()  # peft trains it whole
        targeted = [t for t in targeted_linears(model, self.target_modules) if t[0].split(".")[0] not in head]
        blocks = _block_names(model)
        merged = self._qkv_paths(model, blocks) if self.share_scope == "qkv" else frozenset()
        by_type: dict[str, list[tuple[str, int, int]]] = {}
        for entry in targeted:
            leaf = entry[0].rsplit(".", 1)[-1]
            shared = self.shared_modules is None or leaf in self.shared_modules
            by_type.setdefault(projection_type(entry[0], blocks, merged) if shared else entry[0], []).append(entry)
        for key, members in by_type.items():
            widths = {(i if "A" in self.share else 0, o if "B" in self.share else 0) for _, i, o in members}
            if len(widths) > 1:
                raise HeadError(f"ShareLoRA cannot share across {key!r}: its layers have different shapes "
                                f"{sorted({(i, o) for _, i, o in members})}; leave it out with shared_modules.")
        if self.shared_modules is not None and targeted:
            leaves = {n.rsplit(".", 1)[-1] for n, _, _ in targeted}
            unknown = [m for m in self.shared_modules if m not in leaves]
            if unknown:
                raise HeadError(f"ShareLoRA shared_modules {unknown} are not among the targeted modules "
                                f"{sorted(leaves)}; name some of these.")
        return list(by_type.values())

    @staticmethod
    def _qkv_paths(model: nn.Module, blocks: dict[str, int] | None) -> frozenset[str]:
        """Block-relative paths of the separate q, k and v projections (architecture table)."""
        from lightning_peft.architectures import architecture_of

        attention = architecture_of(model).attention if blocks is not None else None
        if attention is None or not (attention.q and attention.k and attention.v):
            raise HeadError(f"ShareLoRA share_scope='qkv' needs separate q, k and v projections from the "
                            f"architecture table, which {type(model).__name__} lacks; use share_scope='type'.")
        return frozenset((attention.q, attention.k, attention.v))

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        """Per group, the shared factor counts once and the other once per member: for ``n`` layers of one
        type, share A ``r d_in + n r d_out``; share B ``n r d_in + r d_out``; share AB ``r (d_in + d_out)``
        (+ a classifier's output layer). On ``P`` types over ``L`` layers, share A gives
        the paper's ``P r d_in + L P r d_out``."""
        total = 0
        for members in self.groups(model):
            ins, outs = [m[1] for m in members], [m[2] for m in members]  # shared widths are equal in a group
            total += self.r * (ins[0] if "A" in self.share else sum(ins)) + self.r * (outs[0] if "B" in self.share
                                                                                      else sum(outs))
        return total + classifier_parameters(model)

    # ----------------------------------------------------------------- attach
    def attach(self, model: nn.Module) -> nn.Module:
        groups = self.groups(model)  # names in the bare model; peft replaces each Linear under the same name
        attached = super().attach(model)
        factors = [f"lora_{f}" for f in self.share]
        for members in groups:
            layers = [model.get_submodule(name) for name, _, _ in members]
            for factor in factors:
                shared = getattr(layers[0], factor)[ADAPTER].weight
                for layer in layers[1:]:
                    getattr(layer, factor)[ADAPTER].weight = shared
        return attached

    @staticmethod
    def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
        """The trainable Parameters registered under more than one name (the shared matrices)."""
        seen: dict[int, tuple[nn.Parameter, int]] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                seen[id(p)] = (p, seen.get(id(p), (p, 0))[1] + 1)
        return [p for p, uses in seen.values() if uses > 1]

    def param_groups(self, model: nn.Module):
        if self.shared_lr_scale == 1.0:
            return super().param_groups(model)
        shared = self.shared_parameters(model)
        ids = {id(p) for p in shared}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": shared, "lr_scale": float(self.shared_lr_scale)}]


__all__ = ["ShareLoRA", "projection_type"]
