"""Every reach into a private name of lightning, peft or transformers, one documented function each.

A minor upgrade of a dependency may rename what these functions touch; each has a test in
``tests/test_compat.py`` that fails when the upstream name disappears, so the breakage is loud.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# torch's dispatch-mode base class and pytree helpers have no public home yet (torch 2.x); GreenTrainer's
# op recorder (callbacks/_greentrainer_flops.py) imports them from here. Upstream names:
# ``torch.utils._python_dispatch.TorchDispatchMode``, ``torch.utils._pytree.tree_flatten`` / ``tree_map``.
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


@contextlib.contextmanager
def peft_adapter_layers_bypassed(model: nn.Module) -> Iterator[None]:
    """Run ``model`` (a peft-wrapped model with tuner layers, e.g. LoRA) as its base model, within the block.

    Why private: peft's public switches (``PeftModel.disable_adapter()``, ``disable_adapter_layers()``,
    ``BaseTunerLayer.enable_adapters(False)``) also set ``requires_grad=False`` on the adapter weights and,
    on re-enabling, ``requires_grad=True`` on every weight of the active adapters. That un-freezes weights
    a callback froze (HFT, GreenTrainer) and changes, mid-run, what DDP sees as trainable. The tuner layers
    (and ``modules_to_save`` wrappers) read the flag ``_disable_adapters`` in their forward; this sets it
    on each of them and restores each layer's own value afterwards, touching nothing else.

    Upstream name: ``peft.tuners.tuners_utils.BaseTunerLayer._disable_adapters`` (peft >= 0.18; the
    ``disable_adapters`` property reads it).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) or _is_aux_wrapper(m)]
    saved = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, value in zip(layers, saved):
            m._disable_adapters = value


def _is_aux_wrapper(module: nn.Module) -> bool:
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # older peft: ModulesToSaveWrapper only
        from peft.utils import ModulesToSaveWrapper as AuxiliaryTrainingWrapper
    return isinstance(module, AuxiliaryTrainingWrapper)


def callback_state_key(callback: Any, **kwargs: Any) -> str:
    """The ``state_key`` of a Lightning callback whose checkpoint entry depends on ``kwargs``.

    Lightning keys a callback's ``state_dict`` in the checkpoint by ``Callback.state_key``; a callback
    that may appear twice with different settings builds its key as ``"<class qualname>{kwargs repr}"``.
    Using Lightning's own helper keeps the key identical to what Lightning itself would write, so
    checkpoints stay loadable across versions that keep the format.

    Upstream name: ``lightning.pytorch.callbacks.Callback._generate_state_key`` (lightning >= 1.7).
    """
    return callback._generate_state_key(**kwargs)


#: the optimizer attributes a learning-rate scheduler sets from outside (torch >= 2.2: ``_opt_called``,
#: set by the scheduler's wrapper of ``optimizer.step`` and read to warn about a misordered
#: ``scheduler.step()``)
OPTIMIZER_STEP_FLAGS = ("_opt_called",)


def optimizer_step_flags(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The flags an LR scheduler keeps on ``optimizer`` (see :data:`OPTIMIZER_STEP_FLAGS`), as a dict.

    A component that takes a real ``optimizer.step()`` and undoes it (GreenTrainer's importance pass)
    saves these with the optimizer state and puts them back with :func:`restore_optimizer_step_flags`,
    so the scheduler sees the optimizer exactly as before.

    Upstream name: ``torch.optim.lr_scheduler.LRScheduler`` sets ``optimizer._opt_called``.
    """
    return {k: getattr(optimizer, k) for k in OPTIMIZER_STEP_FLAGS if hasattr(optimizer, k)}


def restore_optimizer_step_flags(optimizer: torch.optim.Optimizer, flags: dict[str, Any]) -> None:
    """Put back the flags saved by :func:`optimizer_step_flags` (flags absent then are left as they are)."""
    for k, v in flags.items():
        setattr(optimizer, k, v)


__all__ = [
    "OPTIMIZER_STEP_FLAGS", "TorchDispatchMode", "callback_state_key", "optimizer_step_flags",
    "peft_adapter_layers_bypassed", "restore_optimizer_step_flags", "tree_flatten", "tree_map",
]
