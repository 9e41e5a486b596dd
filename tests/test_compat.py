"""lightning_peft.compat: each private reach of a dependency still exists upstream and still does what the
package relies on (a failing test here names the upgrade that broke it)."""

from __future__ import annotations

import copy

import torch
from helpers import causal_batch, cpu_threads

from lightning_peft import CausalLM
from lightning_peft.compat import (
    TorchDispatchMode,
    callback_state_key,
    optimizer_step_flags,
    peft_adapter_layers_bypassed,
    restore_optimizer_step_flags,
    tree_flatten,
    tree_map,
)
from lightning_peft.heads import LoRA

cpu_threads()


# ---------------------------------------------------------------------------------------- peft adapter flag
def _lora_module(seed=0):
    torch.manual_seed(seed)
    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def test_peft_tuner_layers_still_read_the_private_disable_flag():
    """Upstream name: ``BaseTunerLayer._disable_adapters``, read by the public ``disable_adapters`` property."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    module = _lora_module()
    layers = [m for m in module.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    for layer in layers:
        assert "_disable_adapters" in vars(layer), "peft renamed BaseTunerLayer._disable_adapters; update compat.py"
        layer._disable_adapters = True
        assert layer.disable_adapters is True
        layer._disable_adapters = False
        assert layer.disable_adapters is False


def test_adapter_layers_bypassed_computes_the_base_model_and_changes_no_flag():
    """Inside: the base model's logits (reference: peft's ``unload()`` of a copy, which removes the LoRA
    layers); no ``requires_grad`` changes, a weight a callback froze stays frozen; afterwards the adapted
    model again."""
    module = _lora_module()
    batch = causal_batch(n=2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    base = copy.deepcopy(module.model).unload()
    frozen = next(p for n, p in module.model.named_parameters() if "lora_B" in n)
    frozen.requires_grad_(False)  # as HFT / GreenTrainer do
    flags = {n: p.requires_grad for n, p in module.model.named_parameters()}
    with torch.no_grad():
        adapted = module.model(**inputs).logits
        want = base(**inputs).logits
        assert not torch.allclose(adapted, want, atol=1e-4)  # the adapter matters on this model
        with peft_adapter_layers_bypassed(module.model):
            inside = module.model(**inputs).logits
            assert {n: p.requires_grad for n, p in module.model.named_parameters()} == flags
        after = module.model(**inputs).logits
    torch.testing.assert_close(inside, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in module.model.named_parameters()} == flags and not frozen.requires_grad


# ---------------------------------------------------------------------------------------- lightning state key
def test_callback_state_key_is_lightnings_format():
    """Upstream name: ``Callback._generate_state_key``; the key is the class qualname and the kwargs' repr
    (the format checkpoints already written by GreenTrainer carry)."""
    import lightning as L

    from lightning_peft.callbacks import GreenTrainer

    assert hasattr(L.Callback, "_generate_state_key"), \
        "lightning removed Callback._generate_state_key; update compat.py"
    assert GreenTrainer(rho=0.5, interval=3, interval_unit="step").state_key == \
        "GreenTrainer{'rho': 0.5, 'interval': 3, 'interval_unit': 'step'}"

    class Other(L.Callback):
        pass

    assert callback_state_key(Other(), a=1) == Other.__qualname__ + "{'a': 1}"


# ---------------------------------------------------------------------------------------- torch scheduler flag
def test_lr_scheduler_still_marks_the_optimizer_step_and_the_flags_round_trip():
    """Upstream name: ``optimizer._opt_called``, set by the LR scheduler's wrapper of ``optimizer.step``."""
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert optimizer_step_flags(opt) in ({}, {"_opt_called": False})  # nothing stepped yet
    saved = optimizer_step_flags(opt)
    w.grad = torch.ones(2)
    opt.step()
    assert getattr(opt, "_opt_called", None) is True, \
        "torch no longer sets optimizer._opt_called in LRScheduler; update OPTIMIZER_STEP_FLAGS in compat.py"
    assert optimizer_step_flags(opt) == {"_opt_called": True}
    restore_optimizer_step_flags(opt, {"_opt_called": False})
    assert opt._opt_called is False
    restore_optimizer_step_flags(opt, saved)


# ---------------------------------------------------------------------------------------- torch dispatch/pytree
def test_torch_dispatch_mode_and_pytree_still_work():
    """Upstream names: ``torch.utils._python_dispatch.TorchDispatchMode``, ``torch.utils._pytree``."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record():
        torch.ones(2, 3) @ torch.ones(3, 1)
    assert any("mm" in name for name in seen)
    leaves, _ = tree_flatten(({"a": 1, "b": [2, 3]}, 4))
    assert sorted(leaves) == [1, 2, 3, 4]
    assert tree_map(lambda x: x * 10, {"a": [1, 2]}) == {"a": [10, 20]}
