"""The ``Head`` contract: what every PEFT method in this package looks like.

A head is configured with plain values (so YAML and ``--help`` show them one-to-one), attaches to a
backbone (freezing what it does not train), reports its trainable parameters and an expected count
from its own formula, optionally adds a regularisation loss, optionally merges into the base weights,
and saves/loads only its own state with a JSON config. A head never knows about Lightning.

Adding a method is a checklist:

1. ``lightning_peft/heads/<method>.py`` with a subclass of :class:`Head` (plain ``__init__`` args,
   ``attach``, ``expected_trainable_parameters``; ``merge`` if the method merges);
2. export it from ``lightning_peft/heads/__init__.py``;
3. add one line to ``HEAD_CASES`` in ``tests/test_head_matrix.py``;
4. an example YAML in ``examples/`` and a row in the README table.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn


class HeadError(ValueError):
    """A head configuration that cannot be applied to the given backbone."""


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear-like modules of ``model`` (what ``target_modules`` can name)."""
    names: list[str] = []
    for full_name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind == "Conv1D":
            leaf = full_name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def classifier_module_names(model: nn.Module) -> list[str]:
    """Names of the freshly initialised output layer of a sequence classifier (trained by every head)."""
    return [n for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)]


class Head:
    """Base class of every PEFT head. Subclasses keep their ``__init__`` arguments plain values."""

    #: the merged model computes the same function as the unmerged one
    mergeable: ClassVar[bool] = False
    #: at initialisation the attached model computes exactly what the backbone computed
    identity_at_init: ClassVar[bool] = False
    #: the backbone's own weights are trained (no frozen-backbone guarantee)
    trains_backbone: ClassVar[bool] = False
    #: tasks the head supports
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm", "sequence-classification")

    # ----------------------------------------------------------------- configuration
    def init_args(self) -> dict[str, Any]:
        """The plain-valued ``__init__`` arguments (read back from attributes of the same name)."""
        sig = inspect.signature(type(self).__init__)
        return {name: getattr(self, name) for name in sig.parameters if name != "self"}

    def config(self) -> dict[str, Any]:
        """A JSON-able description that rebuilds this head with :func:`head_from_config`."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"

    # ----------------------------------------------------------------- attach
    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze what the method does not train, add the method's parameters; return the model to call."""
        raise NotImplementedError

    def expected_trainable_parameters(self, model: nn.Module) -> int | None:
        """The method's own formula for the trainable-parameter count, computed from backbone shapes."""
        return None

    @staticmethod
    def trainable_parameters(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to the objective (None when the method has none)."""
        return None

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups. A group may carry ``lr_scale`` (multiplies the base learning rate)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def forward_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments the attached model needs from the batch (default: none)."""
        return {}

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        """Run the attached model on the model inputs of a batch (``input_ids``, ``attention_mask``, ...).

        The default calls the model; a head whose method needs to build the inputs itself (virtual
        tokens, a prefix cache) overrides this, and every caller (module, export check, tests) goes
        through it."""
        return model(**inputs)

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which ``model`` (as returned by :meth:`attach`) computes the backbone's function,
        with this head switched off (a reference forward, e.g. DPO's reference model or ssToken's history).

        It changes no ``requires_grad`` flag and no parameter, so it is safe under DDP and inside a step.
        """
        raise HeadError(f"{type(self).__name__} cannot be switched off to run the base model; use a head that "
                        "keeps the backbone frozen (e.g. LoRA), or keep a frozen copy of the base model.")

    # ----------------------------------------------------------------- training hooks
    def on_fit_start(self, model: nn.Module, total_steps: int) -> None:
        """Called once the number of optimizer steps is known."""

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        """Called after every optimizer step, while gradients are still present."""

    def calibration_batches(self, model: nn.Module) -> int:
        """How many training batches the head wants to see before the first optimizer step (0: none)."""
        return 0

    def on_calibration_batches(self, model: nn.Module, batches: list[dict[str, Any]],
                               loss_fn: Callable[[dict[str, Any]], torch.Tensor]) -> None:
        """Receives the first :meth:`calibration_batches` batches of the trainer's train dataloader (on the
        model's device) and ``loss_fn(batch) -> loss`` (the module's objective through :meth:`forward`).

        ``PeftModule.on_train_start`` calls it once per fit, after :meth:`on_fit_start` and after a resumed
        checkpoint's :meth:`load_extra_state` (the train dataloader exists only from then on); it is
        skipped when :meth:`calibration_batches` returns 0. E.g. SparseAdapter prunes on these batches.
        """

    # ----------------------------------------------------------------- merge and state
    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the head into the base weights and return the plain backbone (may modify ``model``)."""
        raise HeadError(
            f"{type(self).__name__} cannot be merged into the base weights; export it unmerged "
            "(`--merge false`) instead."
        )

    def head_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Only the head's own state: its trainable parameters, by name in the attached model."""
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_head_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in self.head_state_dict(model) if n not in state]
        unknown = [n for n in state if n not in params]
        if missing or unknown:
            raise HeadError(
                f"Head state does not fit this model (missing {missing[:3]}, unknown {unknown[:3]}); "
                "load it into a model built with the same backbone and head configuration."
            )
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def extra_state(self, model: nn.Module) -> dict[str, Any]:
        """Training state that is not a parameter (plain values and tensors), kept in checkpoints."""
        return {}

    def load_extra_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def save(self, model: nn.Module, directory: str) -> None:
        """Write ``head_config.json`` and ``head.safetensors`` (only the head's state)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "head_config.json"), "w") as f:
            json.dump(self.config(), f, indent=2)
        state = {k: v.contiguous() for k, v in self.head_state_dict(model).items()}
        save_file(state, os.path.join(directory, "head.safetensors"))

    def load(self, model: nn.Module, directory: str) -> None:
        from safetensors.torch import load_file

        self.load_head_state_dict(model, load_file(os.path.join(directory, "head.safetensors")))


def head_from_config(config: dict[str, Any] | Head) -> Head:
    """Rebuild a head from ``{"class_path": ..., "init_args": {...}}`` (as written by ``Head.config``)."""
    if isinstance(config, Head):
        return config
    import importlib

    if not isinstance(config, dict) or "class_path" not in config:
        raise HeadError(f"Head config {config!r} has no 'class_path'; write it as a Head or a class_path dict.")
    module_name, _, cls_name = config["class_path"].rpartition(".")
    if "." not in config["class_path"]:
        module_name, cls_name = "lightning_peft.heads", config["class_path"]
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**dict(config.get("init_args") or {}))


def check_targets(model: nn.Module, target_modules: list[str] | str | None, head_name: str) -> None:
    """Fail early, naming the modules that exist, when ``target_modules`` matches nothing."""
    if target_modules is None or isinstance(target_modules, str):
        return
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    full = {n for n, _ in model.named_modules()}
    matched = [t for t in target_modules if t in leaves or t in full or any(f.endswith("." + t) for f in full)]
    if not matched:
        raise HeadError(
            f"{head_name} target_modules {list(target_modules)} match no module of {type(model).__name__}; "
            f"its linear modules are {linear_module_names(model)}: name some of these (or 'all-linear')."
        )
