"""PeftHead per type: every per-type duty comes from the registered class, none from ``if`` sets."""

from __future__ import annotations

import inspect

from lightning_peft import CausalLM
from lightning_peft.heads import PeftHead, peft_head
from lightning_peft.heads.peft_types import PEFT_TYPES, AdapterType, PeftType, register


def test_peft_head_holds_no_per_type_branches():
    source = inspect.getsource(peft_head)
    for pattern in ("peft_type ==", "peft_type !=", "peft_type in", "MERGEABLE", "OWN_LOSS"):
        assert pattern not in source, pattern


def test_every_known_type_declares_its_duties():
    expected_mergeable = {"LORA", "ADALORA", "IA3", "VERA", "OFT", "BOFT", "LOHA", "LOKR"}
    assert {t for t, cls in PEFT_TYPES.items() if cls.mergeable} == expected_mergeable
    assert {t for t, cls in PEFT_TYPES.items() if cls.own_loss} == {"CPT"}
    assert PEFT_TYPES["CPT"].tasks == ("causal-lm",)


def test_a_new_type_is_one_registered_class(monkeypatch):
    """Registering a class is all it takes: PeftHead picks up its flags and its formula."""
    monkeypatch.setattr("lightning_peft.heads.peft_types.PEFT_TYPES", dict(PEFT_TYPES))
    from lightning_peft.heads import peft_types

    monkeypatch.setattr(peft_head, "PEFT_TYPES", peft_types.PEFT_TYPES)

    @register("LOHA")
    class LohaType(AdapterType):
        def formula(self, model):  # LoHa: two rank-r Hadamard factors, each r (d_in + d_out)
            return sum(2 * 4 * (d_in + d_out) for _, d_in, d_out in _linears(model, ["q_proj", "v_proj"]))

    head = PeftHead({"peft_type": "LOHA", "r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert isinstance(head.kind, LohaType) and head.mergeable and head.identity_at_init
    module = CausalLM(backbone="tiny-llama", head=head)
    assert module.expected_trainable_parameters == module.trainable_parameters()


def test_an_unregistered_type_gets_the_defaults():
    head = PeftHead({"peft_type": "FOURIERFT", "target_modules": ["q_proj"]})
    assert type(head.kind) is PeftType
    assert not head.mergeable and not head.identity_at_init and not head.own_loss


def _linears(model, targets):
    from lightning_peft.heads.lora import targeted_linears

    return targeted_linears(model, targets)


def test_formulas_follow_peft_default_targets_when_none_are_given():
    """Without ``target_modules`` peft picks per-architecture defaults (IA3 on Llama: k, v, down; LoRA: q, v);
    the formula reads what peft resolved instead of failing on ``None`` (it raised TypeError) or guessing."""
    import pytest

    from lightning_peft import SequenceClassifier

    cases = [(CausalLM, "tiny-llama", {"peft_type": "IA3"}), (CausalLM, "tiny-llama", {"peft_type": "LORA", "r": 4}),
             (SequenceClassifier, "tiny-bert", {"peft_type": "IA3"})]
    for cls, backbone, config in cases:
        module = cls(backbone, head=PeftHead(config))
        actual = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
        assert module.expected_trainable_parameters == actual, (backbone, config)
    # a wrong guess ("all-linear") would count the MLP's gate and up projections for IA3 too
    llama = CausalLM("tiny-llama", head=PeftHead({"peft_type": "IA3"}))
    targeted = sorted(llama.model.peft_config["default"].target_modules)
    assert targeted == sorted(["k_proj", "v_proj", "down_proj"]), pytest.fail(f"peft default changed: {targeted}")
