"""The architecture table: every family built from a tiny config resolves every role to a module whose
shape matches the family's config (widths, GQA, fused qkv, block counts, LM head, scaling)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import transformers as T
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from lightning_peft import architectures as A

H, HEADS, KV, HD, FF, VOCAB, POS = 32, 4, 2, 8, 64, 320, 64
_common = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF,
               vocab_size=VOCAB, max_position_embeddings=POS, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_gqa = dict(_common, num_key_value_heads=KV, head_dim=HD)


def _causal(config_cls, **kw):
    return lambda **extra: AutoModelForCausalLM.from_config(config_cls(**kw), **extra)


#: model_type -> builder of a tiny random model of that family (no download). One line per family. The
#: builders of decoders take ``from_config`` keywords (e.g. ``attn_implementation="eager"``).
TINY = {
    "llama": _causal(T.LlamaConfig, **_gqa),
    "mistral": _causal(T.MistralConfig, **_gqa),
    "qwen2": _causal(T.Qwen2Config, **_gqa),
    "qwen3": _causal(T.Qwen3Config, **_gqa),
    "gemma": _causal(T.GemmaConfig, **_gqa),
    "gemma2": _causal(T.Gemma2Config, **_gqa, query_pre_attn_scalar=16),
    "phi3": _causal(T.Phi3Config, **_gqa),
    "gpt2": _causal(T.GPT2Config, n_embd=H, n_layer=2, n_head=HEADS, n_inner=FF, vocab_size=VOCAB, n_positions=POS),
    "gpt_neox": _causal(T.GPTNeoXConfig, **_common),
    "opt": _causal(T.OPTConfig, **_common, ffn_dim=FF, word_embed_proj_dim=H),
    "bloom": _causal(T.BloomConfig, hidden_size=H, n_layer=2, n_head=HEADS, vocab_size=VOCAB),
    "bert": lambda **extra: AutoModelForMaskedLM.from_config(T.BertConfig(**_common), **extra),
    "roberta": lambda **extra: AutoModelForMaskedLM.from_config(T.RobertaConfig(**_common), **extra),
    "t5": lambda **extra: AutoModelForSeq2SeqLM.from_config(T.T5Config(d_model=H, d_kv=HD, d_ff=FF, num_layers=2,
                                                               num_heads=HEADS, vocab_size=VOCAB), **extra),
}

#: families whose attention uses grouped kv heads in the tiny configs above
GQA = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}


def test_every_family_in_the_table_has_a_tiny_config():
    assert set(TINY) == set(A.ARCHITECTURES)


@pytest.fixture(scope="module", params=sorted(TINY))
def family(request):
    torch.manual_seed(0)
    return request.param, TINY[request.param]().eval()


def _in_features(module):
    module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.in_features


def test_blocks_and_roles_match_the_config(family):
    model_type, model = family
    arch = A.architecture_of(model)
    assert arch.model_type == model_type
    blocks = A.blocks(model)
    assert len(blocks) == (4 if model_type == "t5" else 2)  # T5: 2 encoder + 2 decoder blocks
    assert len(A.block_stacks(model)) == (2 if model_type == "t5" else 1)

    facts = A.attention_facts(model)
    assert facts.heads == HEADS and facts.head_dim == HD
    assert facts.kv_heads == (KV if model_type in GQA else HEADS)
    q_width, kv_width = HEADS * HD, facts.kv_heads * HD
    ff = 4 * H if model_type == "bloom" else FF  # BLOOM's MLP width is fixed at 4 * hidden
    for block in blocks:
        mods = A.block_modules(block, arch)
        missing = set(arch.roles) - set(mods) - ({"cross"} if model_type == "t5" else set())
        assert not missing, missing
        if "q" in mods:
            assert A.out_features(mods["q"]) == q_width
            assert A.out_features(mods["k"]) == kv_width and A.out_features(mods["v"]) == kv_width
        else:  # fused: GPT-2/NeoX/BLOOM 3*hidden, Phi-3 (heads + 2 kv heads) * head_dim
            assert A.out_features(mods["qkv"]) == q_width + 2 * kv_width
            assert (arch.attention.qkv_layout == "stacked") == (model_type in {"gpt2", "phi3"})
        assert _in_features(mods["o"]) == q_width and A.out_features(mods["o"]) == H
        if "gate_up" in mods:
            assert A.out_features(mods["gate_up"]) == 2 * ff
        else:
            assert A.out_features(mods["up"]) == ff
        if "gate" in mods:
            assert A.out_features(mods["gate"]) == ff
        assert _in_features(mods["down"]) == ff and A.out_features(mods["down"]) == H
        for role in arch.norms:
            assert mods[role].weight.shape == (H,), role
        if model_type == "qwen3":
            assert mods["q_norm"].weight.shape == (HD,) and mods["k_norm"].weight.shape == (HD,)
        else:
            assert "q_norm" not in mods
        # the attention module that holds q/k/v is the one the table calls "attention"
        proj = mods.get("q", mods.get("qkv"))
        assert any(m is proj for m in mods["attention"].modules())
    if model_type == "t5":  # decoder blocks have cross-attention, encoder blocks do not
        assert ["cross" in A.block_modules(b, arch) for b in blocks] == [False, False, True, True]

    # transformers' own public accessors agree with the table
    assert A.embeddings(model) is model.get_input_embeddings()
    assert A.lm_head(model) is model.get_output_embeddings()
    assert A.out_features(A.lm_head(model)) == VOCAB
    assert A.embeddings(model).weight.shape == (VOCAB, H)
    norms = A.final_norms(model)
    assert len(norms) == {"t5": 2, "bert": 0, "roberta": 0}.get(model_type, 1)
    assert all(n.weight.shape == (H,) for n in norms)
    if arch.position_embeddings:
        assert A.get_path(A.base_model(model), arch.position_embeddings).weight.shape[0] >= POS


def test_attention_facts_agree_with_the_models_own_attention(family):
    model_type, model = family
    arch = A.architecture_of(model)
    facts = A.attention_facts(model)
    attn = A.block_modules(A.blocks(model)[0], arch)["attention"]
    own = getattr(attn, "scaling", None)
    if model_type == "bloom":
        own = attn.inv_norm_factor
    if model_type in {"bert", "roberta"}:
        own = attn.self.scaling if hasattr(attn.self, "scaling") else HD**-0.5
    if model_type == "t5":
        own = attn.scaling  # T5 folds the scale into the weights: 1.0
        assert own == 1.0
    assert facts.scaling == pytest.approx(own)
    expected_scaling = {"gemma2": 16**-0.5, "t5": 1.0}.get(model_type, HD**-0.5)
    assert facts.scaling == pytest.approx(expected_scaling)
    assert facts.softcap == (50.0 if model_type == "gemma2" else None)
    assert facts.causal == (model_type not in {"bert", "roberta", "t5"})
    if arch.positional == "rope":
        assert "Rotary" in type(facts.rotary).__name__
        # GPT-NeoX rotates 25% of each head by default; the module's own rotary_ndims says so
        assert facts.rotary_dim == (attn.rotary_ndims if model_type == "gpt_neox" else HD)
        cos, _ = facts.rotary(torch.zeros(1, 3, H), torch.arange(3)[None])
        assert cos.shape[-1] == facts.rotary_dim
    else:
        assert facts.rotary is None and facts.rotary_dim is None
    assert arch.positional == {"gpt2": "learned", "opt": "learned", "bert": "learned", "roberta": "learned",
                               "bloom": "alibi", "t5": "relative_bias"}.get(model_type, "rope")


def test_peft_and_lightning_wrappers_are_unwrapped():
    torch.manual_seed(0)
    base = TINY["qwen3"]()
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

    for wrapped in (peft_model, Module(peft_model)):
        assert A.unwrap(wrapped) is base
        arch = A.architecture_of(wrapped)
        assert arch.model_type == "qwen3"
        blocks = A.blocks(wrapped)
        assert len(blocks) == 2
        mods = A.block_modules(blocks[1], arch)
        assert type(mods["q"]).__module__.startswith("peft.")  # the LoRA layer, not the bare Linear
        assert A.out_features(mods["q"]) == HEADS * HD and A.out_features(mods["down"]) == H
        assert A.lm_head(wrapped) is base.lm_head


@pytest.mark.parametrize("config_cls", [T.LlamaConfig, T.Qwen3Config])
def test_32_layer_config_on_meta_device_resolves_every_block(config_cls):
    config = config_cls(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, intermediate_size=11008, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch = A.architecture_of(model)
    blocks = A.blocks(model)
    assert len(blocks) == 32
    assert len({id(b) for b in blocks}) == 32
    for block in blocks:
        mods = A.block_modules(block, arch)
        assert set(mods) == set(arch.roles)
        assert A.out_features(mods["k"]) == 8 * 128 and A.out_features(mods["q"]) == 32 * 128
    facts = A.attention_facts(model)
    assert (facts.heads, facts.kv_heads, facts.head_dim) == (32, 8, 128)


def test_unknown_family_names_the_known_ones_and_how_to_add_one():
    model = AutoModelForCausalLM.from_config(T.GPTJConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=64,
                                                          n_positions=32, rotary_dim=4))
    with pytest.raises(A.UnsupportedArchitecture) as err:
        A.blocks(model)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "'gptj'" in msg and "llama" in msg and "t5" in msg and "lightning_peft/architectures.py" in msg
    assert "\n" not in msg and msg.count(". ") == 0


def test_require_names_component_family_and_what_is_missing():
    gpt2 = TINY["gpt2"]()
    with pytest.raises(A.UnsupportedArchitecture) as err:
        A.require(gpt2, component="TokenElimination", needs=("causal", "rope", "split_qkv"))
    msg = str(err.value)
    assert msg.startswith("TokenElimination cannot run on model_type 'gpt2'")
    assert "rotary position embeddings (it uses learned absolute positions)" in msg
    assert "attn.c_attn" in msg and "causal" not in msg.split("needs", 1)[1]
    assert "\n" not in msg

    bert = TINY["bert"]()
    with pytest.raises(A.UnsupportedArchitecture, match=r"'bert'.*causal decoder-only.*bidirectional encoder"):
        A.require(bert, component="SSToken", needs=("causal",))

    qwen3 = TINY["qwen3"]()
    assert A.require(qwen3, component="X", needs=("causal", "rope", "split_qkv")).model_type == "qwen3"
    with pytest.raises(A.UnsupportedArchitecture, match=r"q_norm"):
        A.require(qwen3, component="X", needs=("plain_qk",))

    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match=r"X supports model_type llama, mistral and not 'qwen3'"):
        A.require(qwen3, component="X", needs=("rope",), families=("llama", "mistral"), error=MyError)
    with pytest.raises(ValueError, match="unknown need 'fast'"):
        A.require(qwen3, component="X", needs=("fast",))


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "gpt_neox", "bloom"])
def test_fused_qkv_is_split_by_the_documented_layout(model_type):
    """Output row r of the fused projection is made to carry the value r; the per-head q/k/v must then hold
    the rows the layout names: stacked [q | k | v] (GPT-2 c_attn, Phi-3 qkv_proj) or, per head, [q_h k_h v_h]
    (GPT-NeoX and BLOOM query_key_value)."""
    model = TINY[model_type]()
    parts = A.attention_parts(model, 0)
    qkv = parts.qkv
    with torch.no_grad():
        qkv.weight.zero_()
        rows = torch.arange(A.out_features(qkv), dtype=torch.float32)
        if type(qkv).__name__ == "Conv1D":  # weight [in, out]
            qkv.weight[0] = rows
        else:
            qkv.weight[:, 0] = rows
        if qkv.bias is not None:
            qkv.bias.zero_()
    x = torch.zeros(1, 1, H)
    x[..., 0] = 1.0
    q, k, v = parts.states(x)
    f = parts.facts
    j = torch.arange(HD, dtype=torch.float32)
    for h in range(f.heads):
        if parts.qkv_layout == "per_head":
            want_q, want_k, want_v = h * 3 * HD + j, h * 3 * HD + HD + j, h * 3 * HD + 2 * HD + j
        else:
            want_q = h * HD + j
        assert torch.equal(q[0, h, 0], want_q)
        if parts.qkv_layout == "per_head":
            assert torch.equal(k[0, h, 0], want_k) and torch.equal(v[0, h, 0], want_v)
    if parts.qkv_layout == "stacked":
        for h in range(f.kv_heads):
            assert torch.equal(k[0, h, 0], f.heads * HD + h * HD + j)
            assert torch.equal(v[0, h, 0], (f.heads + f.kv_heads) * HD + h * HD + j)
