"""The shared head matrix: every head x {tiny-llama causal LM, tiny-bert classifier}.

A new head joins with one line in HEAD_CASES: a name and a factory taking the backbone's module names.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from helpers import batch_for, logits, train_steps

import lightning_peft.heads as heads_package
from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.backbones import load_backbone
from lightning_peft.heads import (
    GOFT,
    BottleneckAdapter,
    FullFineTune,
    Head,
    LoRA,
    PeftHead,
    Propulsion,
    ShareLoRA,
    SparseAdapter,
)

# module names per backbone: attention q/k/v, an FFN output layer
NAMES = {
    "tiny-llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "ff": "down_proj"},
    "tiny-bert": {"q": "query", "k": "key", "v": "value", "ff": None},
}


def _ia3(n):
    targets = [n["k"], n["v"]] + ([n["ff"]] if n["ff"] else [])
    ff = [n["ff"]] if n["ff"] else []
    return PeftHead({"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ff})


HEAD_CASES = {
    "full": lambda n: FullFineTune(),
    "lora": lambda n: LoRA(r=4, alpha=8, target_modules=[n["q"], n["v"]]),
    "lora-all-linear": lambda n: LoRA(r=2, alpha=4, target_modules="all-linear"),
    "dora-rslora": lambda n: LoRA(r=4, alpha=8, target_modules=[n["q"], n["v"]], use_dora=True, use_rslora=True),
    "peft-lora": lambda n: PeftHead({"peft_type": "LORA", "r": 4, "target_modules": [n["q"], n["v"]]}),
    "ia3": _ia3,
    "adalora": lambda n: PeftHead({"peft_type": "ADALORA", "init_r": 4, "target_r": 2,
                                   "target_modules": [n["q"], n["v"]],
                                   "tinit": 2, "tfinal": 2, "deltaT": 1, "total_step": 60}),
    "prompt-tuning": lambda n: PeftHead({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}),
    "prefix-tuning": lambda n: PeftHead({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}),
    "oft": lambda n: PeftHead({"peft_type": "OFT", "target_modules": [n["q"], n["v"]], "oft_block_size": 16, "r": 0}),
    "boft": lambda n: PeftHead({"peft_type": "BOFT", "target_modules": [n["q"], n["v"]], "boft_block_size": 4}),
    "vera": lambda n: PeftHead({"peft_type": "VERA", "target_modules": [n["q"], n["k"]], "r": 8}),
    # CPT projects its context deltas into an epsilon-ball (0.1 by default); on a random backbone that
    # ball is too small to move the loss, so the matrix widens it
    "cpt": lambda n: PeftHead({"peft_type": "CPT", "cpt_token_ids": [5, 6, 7, 8], "opt_projection_epsilon": 100.0,
                               "opt_projection_format_epsilon": 100.0}),
    "propulsion": lambda n: Propulsion(degree=15, targets="all"),
    "sharelora": lambda n: ShareLoRA(r=4, alpha=8, share="A", target_modules=[n["q"], n["v"]]),
    "houlsby": lambda n: BottleneckAdapter(placement="houlsby", bottleneck=8),
    "pfeiffer": lambda n: BottleneckAdapter(placement="pfeiffer", bottleneck=8),
    # data-free criterion: pruned in on_fit_start, which the matrix's training loop calls
    "sparseadapter": lambda n: SparseAdapter(base={"placement": "houlsby", "bottleneck": 8}, sparsity=0.5,
                                             criterion="magnitude"),
    "goft": lambda n: GOFT(variant="strict"),
    "qgoft": lambda n: GOFT(variant="quasi", target_modules=[n["q"], n["k"], n["v"]], orth_lambda=0.01),
}
# learning rate of the loss-falls test where the default 2e-2 does not suit the method
LOSS_LR: dict[str, float] = {}
BACKBONES = {"tiny-llama": CausalLM, "tiny-bert": SequenceClassifier}
# a head joins a backbone's column when it declares that backbone's task (``Head.tasks``), not by name
CASES = [
    pytest.param(head, bb, id=f"{head}-{bb}")
    for head in HEAD_CASES
    for bb in BACKBONES
    if BACKBONES[bb].task in HEAD_CASES[head](NAMES[bb]).tasks
]


def build(head_name: str, backbone: str):
    head = HEAD_CASES[head_name](NAMES[backbone])
    cls = BACKBONES[backbone]
    return cls(backbone=backbone, head=head) if cls is CausalLM else cls(backbone=backbone, num_labels=2, head=head)


@pytest.mark.parametrize("head_name,backbone", CASES)
def test_trainable_count_equals_formula(head_name, backbone):
    module = build(head_name, backbone)
    assert module.expected_trainable_parameters is not None, "every matrix head must state its formula"
    assert module.trainable_parameters() == module.expected_trainable_parameters


@pytest.mark.parametrize("head_name,backbone", CASES)
def test_frozen_backbone_bit_identical_and_head_moves(head_name, backbone):
    module = build(head_name, backbone)
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    if module.head.trains_backbone:
        assert not frozen
    train_steps(module, batch_for(module), steps=3, weight_decay=0.1)
    params = dict(module.model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"frozen {name} moved"
    assert any(not torch.equal(params[n], v) for n, v in trainable.items()), "no trainable parameter moved"


@pytest.mark.parametrize("head_name,backbone", CASES)
def test_identity_at_init(head_name, backbone):
    module = build(head_name, backbone)
    if not module.head.identity_at_init:
        pytest.skip(f"{head_name} does not promise identity at init")
    bare, _ = load_backbone(backbone, task=module.task, num_labels=2)
    batch = batch_for(module)
    torch.testing.assert_close(logits(module, batch), logits(bare.eval(), batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("head_name,backbone", CASES)
def test_save_load_reproduces_outputs(head_name, backbone, tmp_path):
    module = build(head_name, backbone)
    batch = batch_for(module)
    train_steps(module, batch, steps=2)
    module.head.save(module.model, str(tmp_path))
    fresh = build(head_name, backbone).eval()
    assert not torch.equal(logits(fresh, batch), logits(module, batch))
    fresh.head.load(fresh.model, str(tmp_path))
    assert torch.equal(logits(fresh, batch), logits(module, batch))


@pytest.mark.parametrize("head_name,backbone", CASES)
def test_merged_equals_unmerged(head_name, backbone):
    module = build(head_name, backbone)
    if not module.head.mergeable:
        pytest.skip(f"{head_name} does not merge")
    batch = batch_for(module)
    train_steps(module, batch, steps=3)
    module.double()  # compare in float64: float32 re-association alone reaches ~2e-5 on logits of size ~10
    expected = logits(module, batch)
    merged = module.head.merge(copy.deepcopy(module.model)).eval()
    assert not any("lora" in n or "ia3" in n or "oft" in n or "vera" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("head_name,backbone", CASES)
def test_loss_falls_within_50_steps(head_name, backbone):
    module = build(head_name, backbone)
    losses = train_steps(module, batch_for(module), steps=50, lr=LOSS_LR.get(head_name, 2e-2), weight_decay=0.0)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses[::10]


# ---------------------------------------------------------------------------------------------- completeness
def _unimplemented(cls: type) -> list[str]:
    """Methods ``cls`` leaves to a subclass: those (resolved through the MRO) that raise NotImplementedError."""
    return [name for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if "NotImplementedError" in fn.__code__.co_names]


def _exported_concrete_heads() -> set[type]:
    exported = {getattr(heads_package, name) for name in heads_package.__all__}
    return {c for c in exported if isinstance(c, type) and issubclass(c, Head) and not _unimplemented(c)}


def test_abstract_bases_are_recognised_by_what_they_leave_open():
    """The filter below decides abstractness from the classes themselves, not from a list of names."""
    from lightning_peft.heads import PromptHead
    from lightning_peft.heads._peft import PeftBackedHead

    assert _unimplemented(Head) == ["attach"]
    assert _unimplemented(PromptHead) == ["build"]
    assert _unimplemented(PeftBackedHead) == ["peft_config"]
    assert {FullFineTune, LoRA, PeftHead} <= _exported_concrete_heads()


def _heads_without_row() -> list[str]:
    covered = {type(factory(NAMES[bb])) for factory in HEAD_CASES.values() for bb in BACKBONES}
    return sorted(c.__name__ for c in _exported_concrete_heads() - covered)


def test_every_exported_head_has_a_matrix_row():
    """A head exported from ``lightning_peft.heads`` joins the matrix with one line in HEAD_CASES."""
    missing = _heads_without_row()
    assert not missing, f"exported heads without a row in HEAD_CASES (tests/test_head_matrix.py): {missing}"


def test_a_newly_exported_head_without_a_row_is_reported(monkeypatch):
    class NewHead(Head):
        def attach(self, model):
            return model

    monkeypatch.setattr(heads_package, "NewHead", NewHead, raising=False)
    monkeypatch.setattr(heads_package, "__all__", [*heads_package.__all__, "NewHead"])
    assert _heads_without_row() == ["NewHead"]


# ---------------------------------------------------------------------------------------------- model dims
def test_model_dims_come_from_the_architecture_table_with_a_config_fallback():
    """(embedding width, blocks per stack, kv width) used by the prompt formulas; numbers from the configs."""
    from types import SimpleNamespace

    from torch import nn
    from transformers import GPTJConfig, GPTJForCausalLM, T5Config, T5ForConditionalGeneration

    from lightning_peft.architectures import UnsupportedArchitecture
    from lightning_peft.heads.peft_types import model_dims

    llama, _ = load_backbone("tiny-llama", task="causal-lm")
    assert model_dims(llama) == (64, 2, 2 * 16)  # 2 kv heads of 64 / 4
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=6, num_heads=4, d_ff=16, num_layers=3,
                                             num_decoder_layers=2))
    assert model_dims(t5) == (32, 3, 24)  # the encoder's blocks; d_kv, not d_model / heads
    gptj = GPTJForCausalLM(GPTJConfig(vocab_size=50, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=16))
    assert model_dims(gptj) == (32, 3, 32)  # not in the table: the config's names

    class Mystery(nn.Module):
        config = SimpleNamespace(model_type="mystery")

    with pytest.raises(UnsupportedArchitecture, match="'mystery'.*ARCHITECTURES"):
        model_dims(Mystery())
