"""LeMo token elimination (``TokenElimination``): exact scores, selection, the sparse attention mechanism
against independent references, memory, checkpointing, families and bad input (spec ``lemo.md`` section 6).

Tiny Llama (hidden 64, 4 heads, 2 KV heads, 4 layers, byte vocabulary), block size 4, N = 32. Predictors
and the MLP backward are in ``test_lemo_predictors.py``; the segmented loss in ``test_lemo_segmented.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lemo_common import BLOCK, B, FixedScores, N, layer_inputs, lm_batch, lora_grads, tiny
from transformers.models.llama.modeling_llama import LlamaAttention

from lightning_peft import CausalLM
from lightning_peft.architectures import attention_parts
from lightning_peft.backbones import unwrap_hf
from lightning_peft.callbacks import TokenElimination
from lightning_peft.callbacks._lemo_ops import (
    block_score_matrix,
    block_to_token_index,
    select_blocks,
    sparse_attention,
    token_block_scores,
)
from lightning_peft.callbacks.token_elimination import TokenEliminationError
from lightning_peft.heads.lora import LoRA

# ------------------------------------------------------------------------------------------ 1


def naive_scores(q, k, block, causal=True, scale=None, symmetrize=True):
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.float() @ k.float().transpose(-1, -2)
    if scale is not None:
        s = s * scale
    n = s.shape[-1]
    if causal:
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), 0.0)
    s = s.clamp_min(0).sum(1)  # [B, N, N]
    nb = math.ceil(n / block)
    s = F.pad(s, (0, nb * block - n, 0, nb * block - n))
    mat = s.view(s.shape[0], nb, block, nb, block).amax(dim=(2, 4))
    if symmetrize:
        mat = mat + torch.triu(mat.transpose(-1, -2), 1)
    return mat.sum(-2)


@pytest.mark.parametrize("block", [4, 5])
@pytest.mark.parametrize("symmetrize", [True, False])
def test_exact_informativeness_matches_naive_reference(block, symmetrize):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 4, N, 16, generator=g)
    k = torch.randn(B, 2, N, 16, generator=g)
    got = token_block_scores(block_score_matrix(q, k, block, causal=True, scale=0.25), symmetrize)
    torch.testing.assert_close(got, naive_scores(q, k, block, scale=0.25, symmetrize=symmetrize))
    # non-causal, unscaled (the predictor target's form)
    mat = block_score_matrix(q, k, block, causal=False)
    torch.testing.assert_close(mat.sum(-2), naive_scores(q, k, block, causal=False, symmetrize=False))


def test_negative_scores_are_excluded():
    q = torch.ones(1, 1, 8, 1)
    k = torch.ones(1, 1, 8, 1)
    k[0, 0, 2] = -1.0  # every score with key 2 is negative
    before = block_score_matrix(q, k, 2)
    k[0, 0, 2] = -50.0  # more negative: nothing may change
    after = block_score_matrix(q, k, 2)
    assert torch.equal(before, after)
    k[0, 0, 2] = 3.0  # positive again: block column 1 must change
    assert not torch.equal(before, block_score_matrix(q, k, 2))


def test_exact_scores_of_the_attention_module_match_naive():
    module = tiny()
    batch = lm_batch()
    attn, x, (cos, sin) = layer_inputs(module, batch, 2)
    from lightning_peft.callbacks._lemo_ops import apply_rope, exact_block_scores

    q = apply_rope(attn.q_proj(x).view(B, N, -1, 16).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, N, -1, 16).transpose(1, 2), cos, sin)
    got = exact_block_scores(attention_parts(module.model, 2), x, cos, sin, BLOCK, None)
    torch.testing.assert_close(got, naive_scores(q, k, BLOCK, scale=16 ** -0.5))


# ------------------------------------------------------------------------------------------ 2


@pytest.mark.parametrize("ratio", [0.5, 0.4, 1.0])
def test_keep_count_order_and_dense_layers(ratio):
    module = tiny()
    cb = TokenElimination(block_size=BLOCK, keep_ratio=ratio, dense_layers=[0], scorer="exact").attach(module.model)
    cb.selection_log = []
    module.compute_loss(lm_batch())
    layers = [layer for layer, _ in cb.selection_log]
    assert layers == [1, 2, 3]  # layer 0 is dense: never selects
    kept_blocks = math.floor(ratio * N / BLOCK)
    for _, idx in cb.selection_log:
        assert idx.shape == (B, kept_blocks * BLOCK)
        for row in idx:
            assert torch.equal(row, torch.sort(row).values) and len(set(row.tolist())) == row.numel()


def test_default_layers_and_pad_blocks_never_kept():
    module = tiny()
    cb = TokenElimination(block_size=BLOCK, scorer="exact", warmup_steps=0).attach(module.model)
    assert sorted(cb._sparse) == [1, 2] and cb._sparse[1] == cb._sparse[2] == 0.4  # layers 0..n/2-2 + last dense
    cb.selection_log = []
    batch = lm_batch(pad_from=13)  # sample 1: 13 real tokens = blocks 0..3 (block 3 partly pad)
    module.compute_loss(batch)
    assert [layer for layer, _ in cb.selection_log] == [1, 2]
    for _, idx in cb.selection_log:
        assert idx.shape[1] == 3 * BLOCK  # floor(0.4 * 8) for the unpadded sample
    real = cb.last_kept_fraction[2]
    assert 0 < real < 1
    sel = select_blocks(torch.arange(8.0).repeat(2, 1), torch.tensor([[True] * 8, [True] * 4 + [False] * 4]),
                        ratio=0.4)
    # high scores sit on pad blocks 4..7 of sample 1: they must still not be kept
    assert sel[0][0][sel[1][0]].tolist() == [5, 6, 7]
    assert sel[0][1][sel[1][1]].tolist() == [3]  # max(1, floor(0.4 * 4)) = 1 real block
    assert sel[1].sum(1).tolist() == [3, 1]


def test_select_blocks_threshold_and_ties():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.5]])
    idx, kept = select_blocks(scores, torch.ones(1, 4, dtype=torch.bool), ratio=0.25)
    assert idx[kept].tolist() == [1]  # tie between blocks 1 and 2 goes to the earlier one
    idx, kept = select_blocks(scores, torch.ones(1, 4, dtype=torch.bool), threshold=1.0)
    assert idx[kept].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------ 3


def test_ratio_one_reproduces_the_dense_model():
    module = tiny()
    batch = lm_batch(pad_from=20)
    ref_logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_grads = lora_grads(module, batch)
    cb = TokenElimination(block_size=BLOCK, keep_ratio=1.0, dense_layers=[], scorer="exact").attach(module.model)
    cb.selection_log = []
    got_logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got_grads = lora_grads(module, batch)
    assert len(cb.selection_log) == 8  # 4 layers x 2 forwards went through the elimination path
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got_logits[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4)
    cb.detach()  # the model is exactly as before
    after = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(after, ref_logits)


# ------------------------------------------------------------------------------------------ 4-7

SCORES = torch.tensor([[5.0, 0.0, 4.0, 0.0, 0.0, 3.0, 0.0, 2.0], [0.0, 5.0, 0.0, 4.0, 3.0, 0.0, 0.0, 2.0]])


def kept_positions(sample: int) -> list[int]:
    blocks = SCORES[sample].topk(4).indices.sort().values.tolist()
    return [b * BLOCK + t for b in blocks for t in range(BLOCK)]


def test_eliminated_tokens_bypass_attention_exactly():
    module = tiny()
    cb = FixedScores(SCORES, keep_ratio=0.5, dense_layers=[0, 1, 3]).attach(module.model)
    layer = unwrap_hf(module.model).model.layers[2]
    seen = {}

    def before(mod, args, kwargs):
        seen["before"] = args[0] if args else kwargs["hidden_states"]

    h1 = layer.register_forward_pre_hook(before, with_kwargs=True)
    h2 = layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("after", a[0]))
    with torch.no_grad():
        module.compute_loss(lm_batch())
    h1.remove()
    h2.remove()
    for s in range(B):
        kept = kept_positions(s)
        gone = [t for t in range(N) if t not in kept]
        assert torch.equal(seen["after"][s, gone], seen["before"][s, gone])
        assert not torch.allclose(seen["after"][s, kept], seen["before"][s, kept])
    assert cb.last_kept_fraction[2] == 0.5


def test_kept_tokens_ignore_eliminated_tokens():
    module = tiny()
    batch = lm_batch()
    attn, x, pe = layer_inputs(module, batch, 2)
    cb = FixedScores(SCORES, keep_ratio=0.5, dense_layers=[0, 1, 3]).attach(module.model)
    assert cb.current_ratio(2) == 0.5
    with torch.no_grad():
        base, _ = attn(x, position_embeddings=pe, attention_mask=None)
        kept, gone = kept_positions(0), [t for t in range(N) if t not in kept_positions(0)]
        x2 = x.clone()
        x2[0, gone[-1]] += 10.0  # an eliminated token (the last one, so later kept tokens exist before it too)
        x2[0, gone[0]] -= 10.0
        out, _ = attn(x2, position_embeddings=pe, attention_mask=None)
        assert torch.equal(out[0, kept], base[0, kept])
        x3 = x.clone()
        x3[0, kept[0]] += 1.0  # an early kept token: later kept tokens see it
        out3, _ = attn(x3, position_embeddings=pe, attention_mask=None)
        assert not torch.allclose(out3[0, kept[1:]], base[0, kept[1:]])


def masked_reference(attn, x, pe, keep_mask):
    """Independent reference: the model's own *eager* attention (transformers' q/k/v projections, its
    ``apply_rotary_pos_emb`` over the full sequence, i.e. at the original positions, and its softmax), over
    all tokens, with an additive block mask equivalent to the elimination: a kept token sees the kept tokens
    at or before it; eliminated rows (which see only themselves) output 0."""
    n = x.shape[1]
    assert attn.config._attn_implementation == "eager"
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & keep_mask[:, None, :]
    allowed = allowed | torch.eye(n, dtype=torch.bool)[None]
    mask = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, torch.finfo(x.dtype).min)
    out, weights = LlamaAttention.forward(attn, x, position_embeddings=pe, attention_mask=mask[:, None])
    # the reference really is the masked one: kept queries put no probability on eliminated keys
    gone = (~keep_mask)[:, None, None, :] & keep_mask[:, None, :, None]
    assert float(weights.masked_select(gone).abs().max()) == 0.0
    return out * keep_mask[:, :, None]


def eager(module: CausalLM) -> CausalLM:
    unwrap_hf(module.model).set_attn_implementation("eager")
    return module


def keep_mask_of(scores=SCORES):
    m = torch.zeros(B, N, dtype=torch.bool)
    for s in range(B):
        m[s, kept_positions(s)] = True
    return m


def test_rope_uses_original_positions():
    module = eager(tiny())
    batch = lm_batch()
    attn, x, pe = layer_inputs(module, batch, 2)
    FixedScores(SCORES, keep_ratio=0.5, dense_layers=[0, 1, 3]).attach(module.model)
    with torch.no_grad():
        got, _ = attn(x, position_embeddings=pe, attention_mask=None)
        ref = masked_reference(attn, x, pe, keep_mask_of())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the same tokens with RoPE at compact positions 0..M-1 (a wrong implementation) give other outputs
    idx = block_to_token_index(torch.tensor([[0, 2, 5, 7], [1, 3, 4, 7]]), BLOCK)
    m = idx.shape[1]
    compact = []
    for t in pe:
        full = t.expand(B, -1, -1).clone()
        compact.append(full.scatter(1, idx[:, :, None].expand(-1, -1, t.shape[-1]), t[:, :m].expand(B, -1, -1)))
    with torch.no_grad():
        wrong = sparse_attention(attention_parts(module.model, 2), x, compact[0], compact[1], idx,
                                 torch.ones_like(idx, dtype=torch.bool))
    assert not torch.allclose(wrong, ref, atol=1e-3)


def test_backward_matches_masked_reference_and_no_gradient_through_eliminated_rows():
    module = eager(tiny())
    batch = lm_batch()
    cb = FixedScores(SCORES, keep_ratio=0.5, dense_layers=[0, 1, 3]).attach(module.model)
    got = lora_grads(module, batch)
    cb.detach()
    attn = unwrap_hf(module.model).model.layers[2].self_attn
    keep = keep_mask_of()

    def reference_forward(hidden_states, position_embeddings=None, attention_mask=None, **kw):
        return masked_reference(attn, hidden_states, position_embeddings, keep), None

    attn.forward = reference_forward
    ref = lora_grads(module, batch)
    del attn.forward
    layer2 = [n for n in ref if "layers.2.self_attn" in n]
    assert layer2 and all(ref[n].abs().sum() > 0 for n in layer2)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4)
    # the attention branch sends no gradient to eliminated inputs
    FixedScores(SCORES, keep_ratio=0.5, dense_layers=[0, 1, 3]).attach(module.model)
    _, x, pe = layer_inputs(module, batch, 2)
    x = x.clone().requires_grad_(True)
    out, _ = attn(x, position_embeddings=pe, attention_mask=None)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.equal(x.grad[~keep], torch.zeros_like(x.grad[~keep]))
    assert x.grad[keep].abs().sum() > 0


# ------------------------------------------------------------------------------------------ 8


def saved_attention_bytes(module: CausalLM, batch) -> int:
    """Bytes of distinct storages autograd saves inside the attention sub-blocks (weights excluded)."""
    total = {"storages": {}, "inside": 0}
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    layers = unwrap_hf(module.model).model.layers
    hooks = []
    for layer in layers:
        hooks.append(layer.self_attn.register_forward_pre_hook(lambda *a: total.__setitem__("inside", 1)))
        hooks.append(layer.self_attn.register_forward_hook(lambda *a: total.__setitem__("inside", 0)))

    def pack(t):
        storage = t.untyped_storage()
        if total["inside"] and storage.data_ptr() not in weights:
            total["storages"][storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module.compute_loss(batch)
    for h in hooks:
        h.remove()
    return sum(total["storages"].values())


def test_saved_attention_activations_shrink_with_the_keep_ratio():
    module = tiny()
    batch = lm_batch(n=128)
    dense = saved_attention_bytes(module, batch)
    cb = TokenElimination(block_size=BLOCK, keep_ratio=0.5, dense_layers=[], scorer="exact").attach(module.model)
    half = saved_attention_bytes(module, batch)
    cb.detach()
    cb = TokenElimination(block_size=BLOCK, keep_ratio=0.25, dense_layers=[], scorer="exact").attach(module.model)
    quarter = saved_attention_bytes(module, batch)
    assert half <= 0.6 * dense, (half, dense)
    assert quarter <= 0.35 * dense, (quarter, dense)


# ------------------------------------------------------------------------------------------ 11


def test_selection_is_identical_in_the_checkpointing_recompute():
    module = tiny(gradient_checkpointing=True)
    cb = TokenElimination(block_size=BLOCK, keep_ratio=0.5, dense_layers=[0], scorer="exact").attach(module.model)
    cb.selection_log = []
    loss, _ = module.compute_loss(lm_batch())
    forward_calls = list(cb.selection_log)
    assert [layer for layer, _ in forward_calls] == [1, 2, 3]
    loss.backward()
    recompute = cb.selection_log[len(forward_calls):]
    assert sorted(layer for layer, _ in recompute) == [1, 2, 3]  # each sparsified layer re-ran once
    first = dict(forward_calls)
    for layer, idx in recompute:
        assert torch.equal(idx, first[layer])


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input():
    with pytest.raises(TokenEliminationError, match=r"keep_ratio=1.5 must be in \(0, 1\]"):
        TokenElimination(keep_ratio=1.5)
    with pytest.raises(TokenEliminationError, match=r"keep_ratio=0 must be in \(0, 1\]"):
        TokenElimination(keep_ratio=0)
    with pytest.raises(TokenEliminationError, match=r"layer_ratios\[2\]=-0.1"):
        TokenElimination(layer_ratios={2: -0.1})
    gpt2 = CausalLM("tiny-gpt2", head=LoRA(r=2))
    with pytest.raises(TokenEliminationError, match="TokenElimination cannot run on model_type 'gpt2'.*rotary"):
        TokenElimination().attach(gpt2.model)
    with pytest.raises(TokenEliminationError, match="layer index 9 is outside"):
        TokenElimination(dense_layers=[9]).attach(tiny().model)


def test_block_larger_than_sequence_is_a_logged_noop(caplog):
    module = tiny()
    batch = lm_batch(n=8)
    ref, _ = module.compute_loss(batch)
    cb = TokenElimination(block_size=64, keep_ratio=0.4, dense_layers=[], scorer="exact").attach(module.model)
    cb.selection_log = []
    with caplog.at_level("INFO"):
        got, _ = module.compute_loss(batch)
        module.compute_loss(batch)
    assert torch.equal(got, ref) and cb.selection_log == []
    said = [r for r in caplog.records if "fits in one block" in r.getMessage()]
    assert len(said) == 1


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen3"])
def test_other_llama_family_layouts(family):
    import transformers

    cfg_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                          "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    config = cfg_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None)
    model = model_cls(config).train()
    ids = torch.randint(0, 128, (B, N))
    ref = model(input_ids=ids).logits
    cb = TokenElimination(block_size=BLOCK, keep_ratio=1.0, dense_layers=[], scorer="exact").attach(model)
    cb.selection_log = []
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert [layer for layer, _ in cb.selection_log] == [0, 1]
    cb.detach()
    TokenElimination(block_size=BLOCK, keep_ratio=0.5, dense_layers=[], scorer="exact").attach(model)
    out = model(input_ids=ids).logits
    out.sum().backward()
    assert not torch.allclose(out, ref, atol=1e-3) and torch.isfinite(out).all()
