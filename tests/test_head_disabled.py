"""``Head.disabled(model)``: the base model within the block, for every kind of head, with no
``requires_grad`` change; heads that train the backbone refuse in one sentence."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import causal_batch, class_batch, cpu_threads

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.heads import FullFineTune, HeadError, LoRA, PeftHead

cpu_threads()

IA3_TARGETS = ["k_proj", "down_proj"]


def _moved(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _flags(module):
    return {n: p.requires_grad for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("make", [
    lambda: CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8)),
    lambda: CausalLM(backbone="tiny-llama", head=LoRA(r=4, use_dora=True)),
    lambda: CausalLM(backbone="tiny-llama", head=PeftHead({"peft_type": "IA3", "target_modules": IA3_TARGETS,
                                                            "feedforward_modules": ["down_proj"]})),
    lambda: SequenceClassifier(backbone="tiny-bert", head=LoRA(r=4, target_modules=["query", "value"])),
], ids=["lora", "dora", "ia3", "lora-classifier"])
def test_disabled_runs_the_base_model_and_changes_no_flag(make):
    torch.manual_seed(0)
    module = _moved(make())
    batch = causal_batch(n=2) if module.task == "causal-lm" else class_batch(n=2)
    causal = module.task == "causal-lm"  # (a classifier's new output layer has no independent base to compare)
    base = copy.deepcopy(module.model).unload() if causal else None  # peft removes the tuner layers
    flags = _flags(module)
    with torch.no_grad():
        adapted = module(batch).logits
        with module.head.disabled(module.model):
            inside = module(batch).logits
            assert _flags(module) == flags
        want = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits if causal else None
        after = module(batch).logits
    assert _flags(module) == flags
    assert not torch.allclose(adapted, inside, atol=1e-5)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    if causal:
        torch.testing.assert_close(inside, want, rtol=1e-5, atol=1e-5)


def test_disabled_prompt_tuning_drops_the_virtual_tokens():
    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=PeftHead({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    module.eval()
    batch = causal_batch(n=2)
    flags = _flags(module)
    with torch.no_grad():
        before = module(batch).logits  # virtual positions are stripped by the prompt head
        with module.head.disabled(module.model):
            inside = module(batch).logits
            assert _flags(module) == flags
        want = module.model.get_base_model()(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).logits
        after = module(batch).logits
    torch.testing.assert_close(inside, want, rtol=0, atol=0)
    assert (before - want).abs().max() > 1e-3  # the virtual tokens do change the output outside the block
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # and come back after it


def test_full_finetune_refuses_in_one_sentence():
    module = CausalLM(backbone="tiny-llama", head=FullFineTune())
    with pytest.raises(HeadError, match="FullFineTune trains the backbone's own weights.*frozen copy"):
        module.head.disabled(module.model)


def test_sstoken_adapter_history_is_the_base_model():
    """SSToken's history pass (history='adapter') goes through Head.disabled: the base model's per-token
    losses, also after the adapter moved, and no requires_grad flag changes."""
    from lightning_peft.datamodules.pruning import SSToken
    from lightning_peft.datamodules.pruning.sstoken import token_losses

    torch.manual_seed(0)
    module = _moved(CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8))).train()
    batch = causal_batch(n=2)
    base = copy.deepcopy(module.model).unload()
    flags = _flags(module)
    pruner = SSToken()
    assert pruner._mode(module) == "adapter"
    history = pruner.history_losses(module, batch)
    with torch.no_grad():
        want = token_losses(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
    torch.testing.assert_close(history, want, rtol=1e-5, atol=1e-5)
    assert _flags(module) == flags and module.training
