"""Propulsion: a trained per-output-dimension scale ``z**k`` on frozen layers.

Paper: Kowsher et al., "Propulsion: Steering LLM with Tiny Fine-Tuning" (COLING 2025, arXiv 2409.10927);
spec: ``../shared/methods/propulsion.md``. A wrapped Linear (``W`` out x in, bias ``b``) computes

    y = (x W^T + b) * z**k        (element-wise over the output dimension, ``k`` = ``degree``)

and a wrapped Embedding ``e(t) = E[t] * z**k``. ``z`` starts at ones, so the model is unchanged at init
(``1**k == 1`` exactly). Merging scales row ``i`` of ``W`` and ``b_i`` by ``z_i**k`` (columns of an
embedding table); no overhead remains.

Where this departs from the official library (each a proposal of the spec, with its parity flag):

* ``train_bias=False`` (the library makes base biases trainable; the reported counts do not);
* ``train_classifier=True``: a sequence classifier's new output layer trains fully, as with every head of
  this package, and is not wrapped. ``train_classifier=False`` is the notebooks' accounting (the
  classifier's weights stay frozen and, with ``targets="all"``, only their scales train): it gives the
  paper's 86,018 parameters on RoBERTa-base;
* no weight decay on ``z`` (``decay_z=False``): decay would pull ``z`` towards 0, i.e. switch layers off;
  an optional ``z_penalty * sum((z - 1)**2)`` replaces the paper's unspecified "L2 regularisation";
* ``degree=15`` (the paper's GLUE default for SST-2; the notebooks use 55, the library 5);
* Multi-Propulsion (several ``z`` per layer, appendix) is left out.

Tied input/output embeddings: the unmerged model scales only the embedding lookup, so the LM head keeps
its own function. :meth:`Propulsion.merge` therefore *unties* before scaling: the scaled layer gets its
own copy of the shared table and the model's config says ``tie_word_embeddings=False``, so the merged
folder saves and reloads both tables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lightning_peft.heads.base import Head, HeadError, classifier_module_names, is_classifier, linear_module_names

TARGETS = ("all", "attention")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _width(module: nn.Module) -> int:
    """Size of the output dimension that ``z`` scales."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return int(module.weight.shape[1])  # GPT-2 Conv1D: weight is (in, out)


class PropulsionScaled(nn.Module):
    """A frozen Linear, GPT-2 ``Conv1D`` or Embedding whose output is multiplied by ``z**degree``."""

    def __init__(self, base: nn.Module, degree: int) -> None:
        super().__init__()
        self.base = base
        self.degree = degree
        self.active = True
        dtype = base.weight.dtype
        if dtype in (torch.float16, torch.bfloat16):  # z near 1 needs the precision: z**k amplifies its error
            dtype = torch.float32
        self.propulsion_z = nn.Parameter(torch.ones(_width(base), dtype=dtype, device=base.weight.device))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)  # weight, bias, in_features, padding_idx, ... of the base layer

    def scale(self) -> torch.Tensor:
        return self.propulsion_z ** self.degree

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if not self.active:
            return out
        return out * self.scale().to(out.dtype)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


class Propulsion(Head):
    """Per-output-dimension scales ``z**degree`` on the targeted layers (only ``z`` trains).

    Args:
        degree: the fixed exponent ``k`` (a positive integer; paper GLUE: 15-55).
        targets: ``"all"`` (every Linear except the LM head and, when it trains fully, the classifier),
            ``"attention"`` (the q, k, v projections, or a fused qkv, found through the architecture
            table), or a list of module names (leaf names such as ``[query, value]`` or full paths).
        train_embeddings: also scale every ``nn.Embedding`` (default: only with ``targets="all"``).
        train_bias: also train the biases of the wrapped layers (the official library's default).
        train_classifier: a classifier's new output layer trains fully (default); ``False`` keeps it
            frozen and, with ``targets="all"``, scales its Linears instead (the paper's accounting).
        decay_z: let the optimizer's weight decay act on ``z`` (default: no decay on ``z``).
        z_penalty: weight of an optional ``sum((z - 1)**2)`` regulariser (default 0: none).
    """

    mergeable = True
    identity_at_init = True

    def __init__(
        self,
        degree: int = 15,
        targets: str | list[str] = "all",
        train_embeddings: bool | None = None,
        train_bias: bool = False,
        train_classifier: bool = True,
        decay_z: bool = False,
        z_penalty: float = 0.0,
    ) -> None:
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise HeadError(f"Propulsion degree={degree!r} must be a positive integer; use e.g. 15 (the paper's "
                            "GLUE default).")
        if isinstance(targets, str) and targets not in TARGETS:
            raise HeadError(f"Propulsion targets={targets!r} is not one of {TARGETS}; use one of these or a list "
                            "of module names.")
        if not isinstance(targets, str) and not list(targets):
            raise HeadError("Propulsion targets=[] names no module; use 'all', 'attention' or module names.")
        if z_penalty < 0:
            raise HeadError(f"Propulsion z_penalty={z_penalty} is negative; use 0 (off) or a positive weight.")
        self.degree = degree
        self.targets = targets if isinstance(targets, str) else list(targets)
        self.train_embeddings = train_embeddings
        self.train_bias = train_bias
        self.train_classifier = train_classifier
        self.decay_z = decay_z
        self.z_penalty = z_penalty

    # ----------------------------------------------------------------- which layers
    def _wrap_embeddings(self) -> bool:
        return self.targets == "all" if self.train_embeddings is None else bool(self.train_embeddings)

    def _classifier_names(self, model: nn.Module) -> list[str]:
        return classifier_module_names(model) if is_classifier(model) else []

    def _attention_names(self, model: nn.Module) -> set[str]:
        from lightning_peft.architectures import UnsupportedArchitecture, architecture_of, block_modules, blocks

        try:
            arch = architecture_of(model)
            found = [m for b in blocks(model) for role, m in block_modules(b, arch).items()
                     if role in ("q", "k", "v", "qkv")]
        except UnsupportedArchitecture as err:
            raise HeadError(f"Propulsion targets='attention' needs the architecture table: {err} Name the "
                            "q/k/v modules in targets instead.") from None
        ids = {id(m) for m in found}
        return {n for n, m in model.named_modules() if id(m) in ids}

    def target_names(self, model: nn.Module) -> list[str]:
        """Full names of the modules that get a scale, in model order."""
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        trained_head = self._classifier_names(model) if self.train_classifier else []
        attention = self._attention_names(model) if self.targets == "attention" else set()
        names = []
        for name, module in model.named_modules():
            if isinstance(module, PropulsionScaled):
                raise HeadError("Propulsion is already attached to this model; attach it to a fresh backbone.")
            if name.split(".")[0] in trained_head:
                continue
            if _is_linear(module):
                if self.targets == "all":
                    chosen = module is not out_emb
                elif self.targets == "attention":
                    chosen = name in attention
                else:
                    chosen = name in self.targets or name.rsplit(".", 1)[-1] in self.targets
            elif isinstance(module, nn.Embedding):
                chosen = self._wrap_embeddings() or (
                    not isinstance(self.targets, str)
                    and (name in self.targets or name.rsplit(".", 1)[-1] in self.targets))
            else:
                continue
            if chosen:
                names.append(name)
        if not names:
            raise HeadError(f"Propulsion targets={self.targets!r} match no Linear or Embedding of "
                            f"{type(model).__name__}; its linear modules are {linear_module_names(model)}.")
        return names

    # ----------------------------------------------------------------- attach
    def attach(self, model: nn.Module) -> nn.Module:
        names = self.target_names(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            parent, leaf = _parent(model, name)
            wrapper = PropulsionScaled(getattr(parent, leaf), self.degree)
            setattr(parent, leaf, wrapper)
            if self.train_bias and getattr(wrapper.base, "bias", None) is not None:
                wrapper.base.bias.requires_grad_(True)
        if self.train_classifier:
            for head_name in self._classifier_names(model):
                getattr(model, head_name).requires_grad_(True)
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        """``sum out_features`` over wrapped Linears + ``embedding_dim`` per wrapped Embedding (+ their biases
        with ``train_bias``) + a fully trained classifier's parameters."""
        total = 0
        for name in self.target_names(model):
            module = model.get_submodule(name)
            total += _width(module)
            if self.train_bias and getattr(module, "bias", None) is not None:
                total += module.bias.numel()
        if self.train_classifier:
            total += sum(p.numel() for n in self._classifier_names(model) for p in getattr(model, n).parameters())
        return total

    # ----------------------------------------------------------------- training
    @staticmethod
    def _scaled(model: nn.Module) -> list[tuple[str, PropulsionScaled]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, PropulsionScaled)]

    def param_groups(self, model: nn.Module):
        zs = [m.propulsion_z for _, m in self._scaled(model) if m.propulsion_z.requires_grad]
        ids = {id(z) for z in zs}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": zs} if self.decay_z else {"params": zs, "weight_decay": 0.0}, {"params": rest}]

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        if not self.z_penalty:
            return None
        return self.z_penalty * sum(((m.propulsion_z - 1) ** 2).sum() for _, m in self._scaled(model))

    @contextlib.contextmanager
    def _bypassed(self, model: nn.Module) -> Iterator[None]:
        layers = [m for _, m in self._scaled(model)]
        saved = [m.active for m in layers]
        try:
            for m in layers:
                m.active = False
            yield
        finally:
            for m, value in zip(layers, saved):
                m.active = value

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Every scale switched off (the frozen layers alone); no flag or parameter changes."""
        return self._bypassed(model)

    # ----------------------------------------------------------------- merge
    def merge(self, model: nn.Module) -> nn.Module:
        """Scale the rows of each wrapped ``W`` and ``b`` (columns of an embedding table) by ``z**k`` and put
        the plain layers back. A table shared with another module (tied embeddings) is untied first."""
        untied = False
        with torch.no_grad():
            for name, wrapper in self._scaled(model):
                base = wrapper.base
                owners = sum(1 for m in model.modules() for p in m.parameters(recurse=False) if p is base.weight)
                if owners > 1:  # tied: this layer gets its own copy, the other keeps the original table
                    base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
                    untied = True
                s = wrapper.scale().to(base.weight.dtype)
                if isinstance(base, nn.Linear):
                    base.weight.mul_(s[:, None])
                else:  # Embedding (V x d) and Conv1D (in x out) both scale their last dimension
                    base.weight.mul_(s[None, :])
                if getattr(base, "bias", None) is not None:
                    base.bias.mul_(s)
                parent, leaf = _parent(model, name)
                setattr(parent, leaf, base)
        if untied and getattr(model, "config", None) is not None:
            model.config.tie_word_embeddings = False
        return model


__all__ = ["Propulsion", "PropulsionScaled"]
