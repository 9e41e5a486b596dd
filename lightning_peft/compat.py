"""Every reach into a private name of lightning, peft or transformers, one documented function each.

A minor upgrade of a dependency may rename what these functions touch; each has a test in
``tests/test_compat.py`` that fails when the upstream name disappears, so the breakage is loud.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


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


__all__ = ["peft_adapter_layers_bypassed"]
