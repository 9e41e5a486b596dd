"""BottleneckAdapter (Houlsby, Pfeiffer): counts on real-size configs without weights, placement via
forward hooks, the adapter formula, identity at init, switching off, and bad configs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import causal_batch, class_batch, cpu_threads, logits

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.backbones import load_backbone
from lightning_peft.heads import BottleneckAdapter, Head, HeadError

cpu_threads()


def _roberta_base():
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):
        return RobertaModel(RobertaConfig())  # 12 layers, d = 768, ff 3072


def _llama_meta(layers=3, d=96):
    from transformers import LlamaConfig, LlamaModel

    with torch.device("meta"):
        return LlamaModel(LlamaConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50))


@pytest.mark.parametrize("placement,want", [
    # L[2(2dm + d + m) + 4d], L = 12, d = 768, m = 48
    ("houlsby", 12 * (2 * (2 * 768 * 48 + 768 + 48) + 4 * 768)),
    # L(2dm + d + m): the spec's worked example, 12 * (73,728 + 816)
    ("pfeiffer", 894_528),
])
def test_roberta_base_counts_follow_the_spec_formulas(placement, want):
    model = _roberta_base()
    head = BottleneckAdapter(placement=placement, bottleneck=48)
    assert head.expected_trainable_parameters(model) == want
    head.attach(model)
    assert Head.trainable_parameters(model) == want


def test_llama_houlsby_trains_the_weight_only_rms_norms():
    """Llama blocks have two RMSNorms of d weights (no bias): 2d per block where BERT has 4d."""
    model, d, m, L = _llama_meta(layers=3, d=96), 96, 16, 3
    head = BottleneckAdapter(placement="houlsby", bottleneck=m)
    head.attach(model)
    assert Head.trainable_parameters(model) == L * (2 * (2 * d * m + d + m) + 2 * d)
    pf = _llama_meta(layers=3, d=96)
    BottleneckAdapter(placement="pfeiffer", bottleneck=m).attach(pf)
    assert Head.trainable_parameters(pf) == L * (2 * d * m + d + m)


@pytest.mark.parametrize("placement,per_block", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-bert"])
def test_adapters_run_at_the_intended_positions(placement, per_block, backbone):
    """A forward hook on each adapter: two per block (Houlsby) or one (Pfeiffer); the attention adapter's
    input is the attention output projection applied to that projection's own input."""
    torch.manual_seed(0)
    model, _ = load_backbone(backbone, task="causal-lm" if backbone == "tiny-llama" else "sequence-classification",
                             num_labels=2)
    BottleneckAdapter(placement=placement, bottleneck=4).attach(model)
    o_name, down_name = ("self_attn.o_proj", "mlp.down_proj") if backbone == "tiny-llama" else \
        ("attention.output.dense", "output.dense")
    calls, proj_inputs = [], {}
    for name, module in model.named_modules():
        if name.endswith(("bottleneck_attn", "bottleneck_mlp")):
            module.register_forward_pre_hook(lambda mod, args, name=name: calls.append((name, args[0].clone())))
        if name.endswith(o_name) or name.endswith(down_name):
            module.register_forward_pre_hook(lambda mod, args, name=name: proj_inputs.__setitem__(name, args[0]))
    batch = causal_batch(n=2) if backbone == "tiny-llama" else class_batch(n=2)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    n_blocks = 2
    assert len(calls) == per_block * n_blocks
    kinds = [n.rsplit(".", 1)[1] for n, _ in calls]
    assert kinds == (["bottleneck_attn", "bottleneck_mlp"] * n_blocks if per_block == 2 else ["bottleneck_mlp"] * 2)
    modules = dict(model.named_modules())
    for name, seen in calls:
        block = name.rsplit(".", 1)[0]
        proj = f"{block}.{o_name if name.endswith('attn') else down_name}"
        want = F.linear(proj_inputs[proj], modules[proj].weight, modules[proj].bias)
        torch.testing.assert_close(seen, want, rtol=0, atol=0)


def test_adapter_output_is_the_bottleneck_formula():
    """On one projection: out = y + s (W_up relu(W_down y + b_down) + b_up), y the projection's output."""
    torch.manual_seed(0)
    model, _ = load_backbone("tiny-llama", task="causal-lm")
    BottleneckAdapter(placement="pfeiffer", bottleneck=4, scale=0.5).attach(model)
    proj = model.model.layers[1].mlp.down_proj
    g = torch.Generator().manual_seed(3)
    wd, bd = torch.randn(4, 64, generator=g), torch.randn(4, generator=g)
    wu, bu = torch.randn(64, 4, generator=g), torch.randn(64, generator=g)
    with torch.no_grad():
        adapter = model.model.layers[1].bottleneck_mlp
        adapter.down_weight.copy_(wd), adapter.down_bias.copy_(bd)
        adapter.up_weight.copy_(wu), adapter.up_bias.copy_(bu)
        x = torch.randn(3, 128, generator=g)
        y = x @ proj.weight.T
        want = y + 0.5 * (torch.clamp(y @ wd.T + bd, min=0) @ wu.T + bu)
        torch.testing.assert_close(proj(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_zero_up_is_exactly_the_base_in_float64_and_other_inits_are_not(placement):
    batch = causal_batch(n=2)
    bare, _ = load_backbone("tiny-llama", task="causal-lm")
    bare = bare.double().eval()
    want = logits(bare, batch)
    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=BottleneckAdapter(placement=placement, bottleneck=8)).double()
    assert torch.equal(logits(module.eval(), batch), want)
    for init in ("houlsby", "bert"):
        head = BottleneckAdapter(placement=placement, bottleneck=8, init=init)
        assert not head.identity_at_init
        other = CausalLM(backbone="tiny-llama", head=head).double().eval()
        assert not torch.allclose(logits(other, batch), want, atol=1e-9)


def test_disabled_bypasses_the_adapters_and_changes_no_flag():
    torch.manual_seed(0)
    module = SequenceClassifier(backbone="tiny-bert", num_labels=2,
                                head=BottleneckAdapter(placement="houlsby", bottleneck=8, train_layernorm=False))
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    module.eval()
    batch = class_batch(n=2)
    # the base: the same classifier weights without adapters (a deep copy with the hooks bypassed)
    reference = copy.deepcopy(module.model)
    for name, sub in reference.named_modules():
        if name.endswith(("bottleneck_attn", "bottleneck_mlp")):
            sub.active = False
    flags = {n: p.requires_grad for n, p in module.model.named_parameters()}
    adapted = logits(module, batch)
    with module.head.disabled(module.model):
        inside = logits(module, batch)
        assert {n: p.requires_grad for n, p in module.model.named_parameters()} == flags
    assert torch.equal(logits(module, batch), adapted)
    assert not torch.allclose(inside, adapted, atol=1e-4)
    assert torch.equal(inside, logits(reference, batch))
    # and that reference really is the backbone: with the classifier copied into a bare model
    bare, _ = load_backbone("tiny-bert", task="sequence-classification", num_labels=2)
    bare.classifier.load_state_dict(module.model.classifier.state_dict())
    torch.testing.assert_close(inside, logits(bare.eval(), batch), rtol=0, atol=1e-6)


def test_disabled_refuses_when_the_norms_train():
    module = CausalLM(backbone="tiny-llama", head=BottleneckAdapter(placement="houlsby", bottleneck=4))
    with pytest.raises(HeadError, match="trains the blocks' norms.*train_layernorm=False"):
        module.head.disabled(module.model)


def test_deepcopy_keeps_each_copy_on_its_own_adapters():
    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=BottleneckAdapter(placement="pfeiffer", bottleneck=4, init="bert"))
    batch = causal_batch(n=2)
    twin = copy.deepcopy(module.model).eval()
    before = logits(twin, batch)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert torch.equal(logits(twin, batch), before)


@pytest.mark.parametrize("kwargs,match", [
    ({"placement": "parallel"}, "placement='parallel' is unknown; use 'houlsby' or 'pfeiffer'"),
    ({"bottleneck": 0}, "bottleneck=0 must be a positive integer"),
    ({"activation": "swishy"}, "activation='swishy' is unknown; use one of"),
    ({"init": "xavier"}, "init='xavier' is unknown"),
])
def test_bad_configs_name_the_value(kwargs, match):
    with pytest.raises(HeadError, match=match):
        BottleneckAdapter(**kwargs)


def test_unknown_family_is_one_sentence():
    from transformers import GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(GPTJConfig(vocab_size=50, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=16))
    with pytest.raises(HeadError, match="BottleneckAdapter cannot run on this model: model_type 'gptj'"):
        BottleneckAdapter().attach(model)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "opt", "bloom", "phi3", "gemma2", "t5", "roberta"])
def test_every_table_family_places_two_adapters_per_block(model_type):
    """Resolved through the architecture table only: 2 adapters of (2dm + d + m) per block (d = 32 in these
    configs; T5: encoder and decoder blocks), identity at init, and the adapters change the output once moved."""
    from test_architectures import TINY

    torch.manual_seed(0)
    model = TINY[model_type]().eval()
    base = copy.deepcopy(model)
    n_blocks = 4 if model_type == "t5" else 2
    d, m = 32, 4
    head = BottleneckAdapter(placement="houlsby", bottleneck=m, train_layernorm=False)
    assert head.expected_trainable_parameters(model) == n_blocks * 2 * (2 * d * m + d + m)
    head.attach(model)
    assert Head.trainable_parameters(model) == n_blocks * 2 * (2 * d * m + d + m)
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids, **({"decoder_input_ids": ids[:, :5]} if model_type == "t5" else {})}
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, base(**kw).logits)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        assert not torch.allclose(model(**kw).logits, base(**kw).logits, atol=1e-4)
