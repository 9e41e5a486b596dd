"""ShareLoRA (``lightning_peft.heads.ShareLoRA``): the spec's tests (../shared/methods/sharelora.md §11),
the issue's count ``P r d_in + L P r d_out`` on configs built without weights, and the unmerged peft export."""

from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import torch
from helpers import REPO, causal_batch, cpu_threads
from safetensors.torch import load_file
from torch import nn
from transformers import RobertaConfig, RobertaForSequenceClassification

from lightning_peft import CausalLM
from lightning_peft.backbones import load_backbone
from lightning_peft.heads import HeadError, LoRA, ShareLoRA
from lightning_peft.heads.base import Head
from lightning_peft.heads.sharelora import projection_type

cpu_threads()

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, type_vocab_size=1)
QV = ["query", "value"]


def tiny_roberta() -> nn.Module:
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(**TINY)).double().eval()


def classifier_size(model: nn.Module) -> int:
    return sum(p.numel() for p in model.classifier.parameters())


def ids(n=3, length=9, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 97, (n, length), generator=g)
    x[:, 0] = 0
    return x


def lora_layer(model: nn.Module, layer: int, proj: str) -> nn.Module:
    return model.get_submodule(f"base_model.model.roberta.encoder.layer.{layer}.attention.self.{proj}")


def factor(model: nn.Module, layer: int, proj: str, which: str) -> nn.Parameter:
    return getattr(lora_layer(model, layer, proj), f"lora_{which}")["default"].weight


def randomise(model: nn.Module, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("share,expected", [
    ("A", 2 * 4 * 32 + 2 * 2 * 4 * 32),  # P r d_in + L P r d_out = 768 (the spec's tiny number)
    ("B", 2 * 2 * 4 * 32 + 2 * 4 * 32),  # L P r d_in + P r d_out
    ("AB", 2 * 4 * (32 + 32)),           # P r (d_in + d_out)
])
def test_tiny_counts(share, expected):
    model = tiny_roberta()
    classifier = classifier_size(model)
    head = ShareLoRA(r=4, share=share, target_modules=QV)
    assert head.expected_trainable_parameters(model) == expected + classifier
    assert Head.trainable_parameters(head.attach(model)) == expected + classifier


@pytest.mark.parametrize("share,expected", [
    ("A", 2 * 4 * 64 + 2 * 4 * (64 + 32)),   # q: 64 -> 64, v: 64 -> 32 (2 kv heads of 16), L=2, r=4
    ("B", 2 * 4 * (64 + 64) + 4 * (64 + 32)),
])
def test_gqa_counts_tell_d_in_from_d_out(share, expected):
    llama, _ = load_backbone("tiny-llama", task="causal-lm")
    head = ShareLoRA(r=4, share=share, target_modules=["q_proj", "v_proj"])
    assert head.expected_trainable_parameters(llama) == expected
    assert Head.trainable_parameters(head.attach(llama)) == expected


def test_roberta_base_share_a_count_built_without_weights():
    """The spec's example: RoBERTa-base, Q and V, r=8: 2*8*768 + 12*2*8*768 = 159,744 (LoRA: 294,912)."""
    with torch.device("meta"):
        model = RobertaForSequenceClassification(RobertaConfig())
    head = ShareLoRA(r=8, share="A", target_modules=QV)
    classifier = 768 * 768 + 768 + 768 * 2 + 2
    assert head.expected_trainable_parameters(model) == 159_744 + classifier
    assert Head.trainable_parameters(head.attach(model)) == 159_744 + classifier


def test_llama_recipe_shares_only_the_named_types():
    """LoRA on every Linear, A shared only for q_proj and v_proj (the official LLaMA script)."""
    llama, _ = load_backbone("tiny-llama", task="causal-lm")
    head = ShareLoRA(r=4, share="A", target_modules="all-linear", shared_modules=["q_proj", "v_proj"])
    shared = 4 * 64 + 2 * 4 * 64 + 4 * 64 + 2 * 4 * 32                      # q and v
    own = 2 * 4 * ((64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))    # k, o, gate, up, down per layer
    assert head.expected_trainable_parameters(llama) == shared + own
    model = head.attach(llama)
    assert Head.trainable_parameters(model) == shared + own
    layers = model.base_model.model.model.layers
    a = {p: [layer.self_attn.get_submodule(p).lora_A["default"].weight for layer in layers]
         for p in ("q_proj", "k_proj")}
    assert a["q_proj"][0] is a["q_proj"][1]
    assert a["k_proj"][0] is not a["k_proj"][1]


# ---------------------------------------------------------------------------------------------- sharing
def test_sharing_is_real_per_type_and_per_factor():
    model = ShareLoRA(r=4, share="A", target_modules=QV).attach(tiny_roberta())
    assert factor(model, 0, "query", "A") is factor(model, 1, "query", "A")
    assert factor(model, 0, "query", "A").data_ptr() == factor(model, 1, "query", "A").data_ptr()
    assert factor(model, 0, "query", "A") is not factor(model, 0, "value", "A")
    assert factor(model, 0, "query", "B") is not factor(model, 1, "query", "B")
    model = ShareLoRA(r=4, share="AB", target_modules=QV).attach(tiny_roberta())
    assert factor(model, 0, "value", "B") is factor(model, 1, "value", "B")


def test_projection_types_come_from_the_block_paths():
    """BERT blocks have two Linears named ``dense`` (attention output, FFN output): different types."""
    model = ShareLoRA(r=2, share="A", target_modules=["dense"]).attach(tiny_roberta())
    att = [model.get_submodule(f"base_model.model.roberta.encoder.layer.{i}.attention.output.dense") for i in (0, 1)]
    ffn = [model.get_submodule(f"base_model.model.roberta.encoder.layer.{i}.output.dense") for i in (0, 1)]
    assert att[0].lora_A["default"].weight is att[1].lora_A["default"].weight
    assert ffn[0].lora_A["default"].weight is ffn[1].lora_A["default"].weight
    assert att[0].lora_A["default"].weight.shape == (2, 32) and ffn[0].lora_A["default"].weight.shape == (2, 64)
    # a family outside the architecture table: the first integer path component is the layer index
    assert projection_type("transformer.h.3.attn.q_proj", None) == "transformer.h.*.attn.q_proj"
    assert projection_type("lm_head", None) == "lm_head"


@pytest.mark.parametrize("share", ["A", "B", "AB"])
def test_identity_at_init(share):
    base = tiny_roberta()
    model = ShareLoRA(r=4, share=share, target_modules=QV).attach(copy.deepcopy(base))
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)


def test_gradient_of_a_shared_a_is_the_sum_of_the_unshared_layer_gradients():
    """Independent reference: peft LoRA without sharing, each layer's A a copy of the shared one."""
    base = tiny_roberta()
    shared = ShareLoRA(r=4, alpha=8, share="A", target_modules=QV).attach(copy.deepcopy(base))
    randomise(shared)
    reference = LoRA(r=4, alpha=8, target_modules=QV).attach(copy.deepcopy(base))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(shared.get_parameter(name))
    assert factor(reference, 0, "query", "A") is not factor(reference, 1, "query", "A")
    x = ids()
    for model in (shared, reference):  # eval mode: dropout off, so both see the same function
        model(input_ids=x).logits.pow(2).sum().backward()
    for proj in QV:
        per_layer = [factor(reference, i, proj, "A").grad for i in (0, 1)]
        assert not torch.allclose(per_layer[0], per_layer[1])
        torch.testing.assert_close(factor(shared, 0, proj, "A").grad, per_layer[0] + per_layer[1],
                                   rtol=1e-10, atol=1e-12)
        for i in (0, 1):  # the per-layer B gradients are those of plain LoRA
            torch.testing.assert_close(factor(shared, i, proj, "B").grad, factor(reference, i, proj, "B").grad,
                                       rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("share", ["A", "B", "AB"])
def test_merge_equals_unmerged(share):
    head = ShareLoRA(r=4, alpha=8, share=share, target_modules=QV)
    model = head.attach(tiny_roberta())
    randomise(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        merged = head.merge(copy.deepcopy(model)).eval()
        got = merged(input_ids=x).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged.roberta.encoder.layer[1].attention.self.query) is nn.Linear
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_saved_head_stores_each_shared_matrix_once_and_reloads_tied(tmp_path):
    head = ShareLoRA(r=4, share="A", target_modules=QV)
    model = head.attach(tiny_roberta())
    randomise(model)
    head.save(model, str(tmp_path))
    state = load_file(str(tmp_path / "head.safetensors"))
    a_keys = [k for k in state if "lora_A" in k]
    assert len(a_keys) == 2 and all(".layer.0." in k for k in a_keys)  # P = 2 shared A, stored once
    assert len([k for k in state if "lora_B" in k]) == 2 * 2  # L P per-layer B
    fresh_head = ShareLoRA(r=4, share="A", target_modules=QV)
    fresh = fresh_head.attach(tiny_roberta())
    fresh_head.load(fresh, str(tmp_path))
    assert factor(fresh, 0, "value", "A") is factor(fresh, 1, "value", "A")
    torch.testing.assert_close(factor(fresh, 1, "value", "A"), factor(model, 1, "value", "A"), rtol=0, atol=0)
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)


def test_adapter_only_checkpoint_keeps_one_copy_and_restores_the_sharing():
    build = lambda: CausalLM(backbone="tiny-llama", head=ShareLoRA(r=4, target_modules=["q_proj", "v_proj"]))  # noqa: E731
    module = build()
    randomise(module.model)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    kept = checkpoint["state_dict"]
    assert len([k for k in kept if "lora_A" in k]) == 2 and len([k for k in kept if "lora_B" in k]) == 4
    fresh = build()
    fresh.load_state_dict(kept, strict=False)
    layers = fresh.model.base_model.model.model.layers
    assert layers[0].self_attn.v_proj.lora_A["default"].weight is layers[1].self_attn.v_proj.lora_A["default"].weight
    batch = causal_batch(n=2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(fresh.eval()(inputs).logits, module.eval()(inputs).logits)


def test_unmerged_export_is_a_plain_peft_lora_adapter_with_the_same_logits(tmp_path):
    from peft import PeftModel

    from lightning_peft.checkpoints import load_module
    from lightning_peft.cli import main
    from lightning_peft.export import export

    root = tmp_path / "run"
    main(["fit", "--config", str(REPO / "examples" / "quickstart.yaml"), "--trainer.max_steps", "3",
          "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
          "--trainer.limit_val_batches", "0", "--data.init_args.num_train", "128",
          "--model.head", "lightning_peft.heads.ShareLoRA", "--model.head.init_args.r", "4",
          "--model.head.init_args.target_modules", "[q_proj, v_proj]"])
    last = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)[0]
    trained = load_module(last)
    out = tmp_path / "adapter"
    report = export(last, str(out), merge=False)  # the export reloads it through peft and compares logits
    assert report["max_abs_logit_diff"] <= 1e-5
    config = json.load(open(out / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4
    state = load_file(str(out / "adapter_model.safetensors"))
    a = sorted(k for k in state if "q_proj.lora_A" in k)
    assert len(a) == 2 and torch.equal(state[a[0]], state[a[1]])  # copied into every layer
    b = sorted(k for k in state if "q_proj.lora_B" in k)
    assert not torch.equal(state[b[0]], state[b[1]])  # trained per layer
    loaded = PeftModel.from_pretrained(load_backbone("tiny-llama")[0], str(out)).eval()
    batch = causal_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained.model(**inputs).logits, rtol=0, atol=1e-5)
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(**inputs).logits, trained.model(**inputs).logits, atol=1e-4)
    merged = export(last, str(tmp_path / "merged"), merge=True)  # merging needs no sharing either
    assert merged["max_abs_logit_diff"] <= 1e-5 and os.path.isfile(tmp_path / "merged" / "config.json")


def test_shared_lr_scale_puts_the_shared_matrices_in_their_own_group():
    module = CausalLM(backbone="tiny-llama", head=ShareLoRA(r=4, target_modules=["q_proj", "v_proj"],
                                                            shared_lr_scale=0.5))
    module.set_optimizer("torch.optim.AdamW", lr=1e-2)
    groups = module.configure_optimizers().param_groups
    layers = module.model.base_model.model.model.layers
    shared = {id(layers[0].self_attn.q_proj.lora_A["default"].weight),
              id(layers[0].self_attn.v_proj.lora_A["default"].weight)}
    small = [g for g in groups if g["lr"] == pytest.approx(5e-3)]
    assert len(small) == 1 and {id(p) for p in small[0]["params"]} == shared
    assert sum(len(g["params"]) for g in groups) == 2 + 4


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "r=0 must be a positive integer"),
    ({"share": "C"}, "share='C' is not one of"),
    ({"shared_lr_scale": 0.0}, "shared_lr_scale=0.0 must be positive"),
])
def test_bad_configuration_is_one_sentence(kwargs, match):
    with pytest.raises(HeadError, match=match):
        ShareLoRA(**kwargs)


def test_shared_modules_outside_the_targets_are_named():
    with pytest.raises(HeadError, match=r"shared_modules \['k_proj'\] are not among the targeted modules"):
        ShareLoRA(target_modules=["q_proj", "v_proj"], shared_modules=["k_proj"]).attach(
            load_backbone("tiny-llama")[0])


def test_qkv_scope_shares_one_a_across_q_k_v_and_layers():
    """share_scope="qkv" (the spec's proposal): r d + L sum_p r d_out,p with share A."""
    llama, _ = load_backbone("tiny-llama", task="causal-lm")
    head = ShareLoRA(r=4, share="A", target_modules=["q_proj", "k_proj", "v_proj"], share_scope="qkv")
    expected = 4 * 64 + 2 * 4 * (64 + 32 + 32)
    assert head.expected_trainable_parameters(llama) == expected
    model = head.attach(llama)
    assert Head.trainable_parameters(model) == expected
    layers = model.base_model.model.model.layers
    a = {layer.self_attn.get_submodule(p).lora_A["default"].weight for layer in layers for p in ("q_proj", "k_proj",
                                                                                                   "v_proj")}
    assert len({id(w) for w in a}) == 1
    with pytest.raises(HeadError, match=r"cannot share across 'stack0.\*.qkv'.*different shapes"):
        ShareLoRA(share="B", target_modules=["q_proj", "v_proj"], share_scope="qkv").attach(
            load_backbone("tiny-llama")[0])  # GQA: v is narrower than q


def test_qkv_scope_needs_separate_projections():
    gpt2, _ = load_backbone("tiny-gpt2", task="causal-lm")
    with pytest.raises(HeadError, match="share_scope='qkv' needs separate q, k and v projections"):
        ShareLoRA(target_modules=["c_attn"], share_scope="qkv").attach(gpt2)
    with pytest.raises(HeadError, match="share_scope='all' is not one of"):
        ShareLoRA(share_scope="all")
