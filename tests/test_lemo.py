"""LeMo token elimination (``TokenElimination``) and the segmented loss: spec ``lemo.md`` section 6.

Tiny Llama (hidden 64, 4 heads, 2 KV heads, 4 layers, byte vocabulary), block size 4, N = 32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_threads
from transformers.models.llama.modeling_llama import LlamaAttention

from lightning_peft import CausalLM
from lightning_peft.architectures import attention_parts
from lightning_peft.backbones import unwrap_hf
from lightning_peft.callbacks import TokenElimination
from lightning_peft.callbacks._lemo_ops import (
    BlockPredictor,
    DeadNeuronCounter,
    block_score_matrix,
    block_to_token_index,
    channel_pruned_mlp,
    prune_dead_neurons,
    select_blocks,
    sparse_attention,
    token_block_scores,
    train_predictors,
)
from lightning_peft.callbacks.token_elimination import TokenEliminationError
from lightning_peft.heads.full import FullFineTune
from lightning_peft.heads.lora import LoRA
from lightning_peft.objectives import TokenCrossEntropy

B, N, BLOCK = 2, 32, 4
ATTN_LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]

cpu_threads()


def tiny(head=None, layers: int = 4, **kw) -> CausalLM:
    module = CausalLM("tiny-llama", head=head or LoRA(r=4, target_modules=ATTN_LORA),
                      backbone_config={"num_hidden_layers": layers}, **kw)
    torch.manual_seed(1)
    with torch.no_grad():  # move LoRA off its identity init so A and B both get gradients
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return module.train()


def lm_batch(n: int = N, seed: int = 0, pad_from: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (B, n), generator=g)
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[1, pad_from:] = 0
        ids[1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class FixedScores(TokenElimination):
    """Selection from given scores (so perturbing an input cannot change which blocks are kept)."""

    def __init__(self, scores: torch.Tensor, **kw):
        super().__init__(block_size=BLOCK, scorer="exact", warmup_steps=0, **kw)
        self.fixed = scores

    def block_scores(self, layer, attn, x, position_embeddings, token_valid):
        return self.fixed[: x.shape[0]]


def layer_inputs(module: CausalLM, batch, layer: int):
    """The normalised input and rotary (cos, sin) that reach ``layer``'s attention in a dense forward."""
    attn = unwrap_hf(module.model).model.layers[layer].self_attn
    seen = {}

    def grab(mod, args, kwargs):
        seen["x"] = kwargs["hidden_states"].detach()
        seen["pe"] = tuple(t.detach() for t in kwargs["position_embeddings"])

    h = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    return attn, seen["x"], seen["pe"]


def lora_grads(module: CausalLM, batch) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss, _ = module.compute_loss(batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}


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
    assert sorted(cb._sparse) == [2] and cb._sparse[2] == 0.4  # first half + last layer dense
    cb.selection_log = []
    batch = lm_batch(pad_from=13)  # sample 1: 13 real tokens = blocks 0..3 (block 3 partly pad)
    module.compute_loss(batch)
    (_, idx), = cb.selection_log
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
    """Full attention where eliminated keys are masked out (-inf) and eliminated rows output 0."""
    n = x.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & keep_mask[:, None, :]
    allowed = allowed | torch.eye(n, dtype=torch.bool)[None]
    out, _ = LlamaAttention.forward(attn, x, position_embeddings=pe, attention_mask=allowed[:, None])
    return out * keep_mask[:, :, None]


def keep_mask_of(scores=SCORES):
    m = torch.zeros(B, N, dtype=torch.bool)
    for s in range(B):
        m[s, kept_positions(s)] = True
    return m


def test_rope_uses_original_positions():
    module = tiny()
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
    module = tiny()
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


# ------------------------------------------------------------------------------------------ 9


def test_predictor_shape_and_training_reduces_the_loss():
    module = tiny()
    torch.manual_seed(0)
    cb = TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], calibration_batches=3)
    cb.attach(module.model)
    cb.begin_collection()
    with torch.no_grad():
        for seed in range(3):
            module.model(input_ids=lm_batch(seed=seed)["input_ids"])
    samples = {2: [s[:3] for s in cb._collect[2]]}
    pred = BlockPredictor(64, 4, BLOCK, h1=32)
    assert pred(samples[2][0][0]).shape == (B, N // BLOCK, N // BLOCK)
    assert pred(torch.randn(B, N + 3, 64)).shape == (B, N // BLOCK + 1, N // BLOCK + 1)

    def loss_now():
        with torch.no_grad():
            return sum(F.smooth_l1_loss(pred(x), t).item() for x, t, _ in samples[2])

    start = loss_now()
    train_predictors({2: pred}, samples, steps=300, lr=3e-3, progress=False)
    assert loss_now() < 0.5 * start


def test_elastic_pruning_removes_only_dead_neurons_and_keeps_the_function():
    torch.manual_seed(0)
    pred = BlockPredictor(64, 4, BLOCK, h1=32, h2=24)
    with torch.no_grad():
        pred.q[0].bias[:5] = -1e4  # dead: always <= 0 before the ReLU
        pred.k[2].bias[3:6] = -1e4
    x = torch.randn(3, N, 64)

    def measure():
        counter = DeadNeuronCounter(pred)
        out = pred(x)
        rates = counter.rates()
        counter.remove()
        return out, rates

    before, rates = measure()
    # tau = 1: only neurons that were zero on every input go, so the function on x is unchanged
    dead = {k: int((r >= 1.0).sum()) for k, r in rates.items()}
    assert dead["q.0"] >= 5 and dead["k.2"] >= 3
    assert prune_dead_neurons(pred, rates, 1.0) == sum(dead.values())
    assert pred.q[0].out_features == 32 - dead["q.0"] and pred.q[2].in_features == pred.q[0].out_features
    assert pred.k[2].out_features == 24 - dead["k.2"] and pred.k[4].in_features == pred.k[2].out_features
    torch.testing.assert_close(pred(x), before, atol=1e-5, rtol=1e-5)
    # tau = 0.6: exactly the neurons whose zero-rate is >= 0.6 go, no others
    _, rates = measure()
    widths = {k: int(r.numel()) for k, r in rates.items()}
    expect = {k: int((r >= 0.6).sum()) for k, r in rates.items()}
    assert sum(expect.values()) > 0
    assert prune_dead_neurons(pred, rates, 0.6) == sum(expect.values())
    assert pred.dims() == {"q": [widths["q.0"] - expect["q.0"], widths["q.2"] - expect["q.2"]],
                           "k": [widths["k.0"] - expect["k.0"], widths["k.2"] - expect["k.2"]]}


def test_train_predictors_elastic_schedule_shrinks():
    torch.manual_seed(0)
    pred = BlockPredictor(64, 4, BLOCK, h1=32, h2=32)
    x = torch.randn(2, N, 64)
    target = torch.rand(2, 8, 8)
    hist = train_predictors({0: pred}, {0: [(x, target, torch.ones(2, 8, dtype=torch.bool))]}, steps=40,
                            elastic=True, prune_interval=10, prune_until=40, tau=0.5, tau_step=0.05, progress=False)
    assert len(hist["removed"]) == 4
    assert sum(pred.dims()["q"]) + sum(pred.dims()["k"]) == 128 - sum(hist["removed"])


# ------------------------------------------------------------------------------------------ 10


@pytest.mark.parametrize("segment", [8, 5, 31, 64])
def test_segmented_loss_equals_plain_loss_in_value_and_gradient(segment):
    batch = lm_batch()
    batch["labels"][:, :6] = -100
    batch["labels"][0, 20:23] = -100
    plain = tiny()
    seg = tiny(objective=TokenCrossEntropy(segment_size=segment))
    seg.load_state_dict(plain.state_dict())
    lp, _ = plain.compute_loss(batch)
    ls, logits = seg.compute_loss(batch)
    assert logits is None
    torch.testing.assert_close(ls, lp, atol=1e-6, rtol=1e-6)
    gp, gs = lora_grads(plain, batch), lora_grads(seg, batch)
    for name in gp:
        torch.testing.assert_close(gs[name], gp[name], atol=1e-6, rtol=1e-5)


def test_segmented_loss_full_finetune_gradient_and_eval_metrics():
    batch = lm_batch()
    plain = tiny(head=FullFineTune(), layers=2)
    seg = tiny(head=FullFineTune(), layers=2, objective=TokenCrossEntropy(segment_size=7))
    seg.load_state_dict(plain.state_dict())
    gp, gs = lora_grads(plain, batch), lora_grads(seg, batch)
    assert "lm_head.weight" in gp
    for name in gp:
        torch.testing.assert_close(gs[name], gp[name], atol=1e-6, rtol=1e-5)
    for m in (plain, seg):
        m.eval()
        with torch.no_grad():
            m._eval_step(batch, "val")
    for key in ("loss", "token_acc", "seq_acc"):
        torch.testing.assert_close(seg.eval_metrics["val"][key].compute(), plain.eval_metrics["val"][key].compute())


def test_segmented_loss_keeps_logits_off_the_saved_tensors():
    batch = lm_batch(n=64)
    plain = tiny(layers=1)
    seg = tiny(layers=1, objective=TokenCrossEntropy(segment_size=8))
    vocab_sized = {}
    for name, m in (("plain", plain), ("seg", seg)):
        sizes = []

        def pack(t, sizes=sizes):
            if 260 in t.shape:  # vocabulary-sized: logits (or the LM head weight, 260 x 64)
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.compute_loss(batch)
        vocab_sized[name] = max(sizes, default=0)
    assert vocab_sized["plain"] >= B * 63 * 260  # the whole logits tensor is saved
    assert vocab_sized["seg"] <= 260 * 64  # only the LM head weight; logits are recomputed in backward


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


# ------------------------------------------------------------------------------------------ MLP side


def test_channel_pruned_mlp_backward():
    module = tiny(layers=1)
    mlp = unwrap_hf(module.model).model.layers[0].mlp
    x = torch.randn(B, N, 64, requires_grad=True)
    gy = torch.randn(B, N, 64)
    (mlp(x) * gy).sum().backward()
    exact = x.grad.clone()
    x.grad = None
    out = channel_pruned_mlp(mlp, x, 1.0)
    torch.testing.assert_close(out, mlp(x))
    (out * gy).sum().backward()
    torch.testing.assert_close(x.grad, exact, atol=1e-5, rtol=1e-5)
    x.grad = None
    saved_pruned, saved_exact = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_pruned.append(t.shape) or t, lambda t: t):
        out = channel_pruned_mlp(mlp, x, 0.5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_exact.append(t.shape) or t, lambda t: t):
        mlp(x)
    (out * gy).sum().backward()
    cos = F.cosine_similarity(x.grad.flatten(), exact.flatten(), dim=0)
    assert 0.5 < cos < 1.0  # an approximation, but a close one
    widths = lambda shapes: sorted(s[-1] for s in shapes if len(s) == 3 and s[:2] == (B, N))
    assert widths(saved_exact)[-1] == 128  # the exact MLP keeps [B, N, intermediate] activations
    assert widths(saved_pruned) == [64, 64]  # the pruned one keeps half the channels of gate and up only


def test_mlp_backward_keep_needs_frozen_mlp():
    with pytest.raises(TokenEliminationError, match="mlp.gate_proj is trainable"):
        TokenElimination(block_size=BLOCK, mlp_backward_keep=0.5).attach(tiny(head=FullFineTune()).model)
    with pytest.raises(TokenEliminationError, match="lora"):
        TokenElimination(block_size=BLOCK, mlp_backward_keep=0.5).attach(tiny(head=LoRA(r=2)).model)
    module = tiny()
    cb = TokenElimination(block_size=BLOCK, keep_ratio=0.5, dense_layers=[0], scorer="exact",
                          mlp_backward_keep=0.5).attach(module.model)
    loss, _ = module.compute_loss(lm_batch())
    loss.backward()
    assert cb.current_ratio(1) == 0.5


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


def test_predictors_for_another_shape_are_refused(tmp_path):
    module = tiny()
    cb = TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictor_steps=5, calibration_batches=2)
    cb.calibrate(module.model, [lm_batch(seed=s) for s in range(2)], progress=False)
    path = tmp_path / "pred.pt"
    cb.save_predictors(str(path))
    other = TokenElimination(block_size=8, dense_layers=[0, 1, 3], predictors_path=str(path))
    with pytest.raises(TokenEliminationError, match="trained for .*'block': 4.* this run has .*'block': 8"):
        other.attach(tiny().model)
    wider = CausalLM("tiny-llama", head=LoRA(r=2, target_modules=ATTN_LORA),
                     backbone_config={"num_hidden_layers": 4, "hidden_size": 128})
    with pytest.raises(TokenEliminationError, match="'hidden_size': 64.*'hidden_size': 128"):
        TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictors_path=str(path)).attach(wider.model)
    with pytest.raises(TokenEliminationError, match="does not exist"):
        TokenElimination(predictors_path=str(tmp_path / "nope.pt")).attach(tiny().model)
    # the right shape loads and gives the same scores
    same = TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictors_path=str(path)).attach(module.model)
    x = torch.randn(B, N, 64)
    torch.testing.assert_close(same.predictors[2](x), cb.predictors[2](x))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_family_layouts(family):
    import transformers

    cfg_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
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


def test_exact_predictor_target(tmp_path):
    """predictor_target='exact': the predictors learn the exact profiling matrix and their output is reduced
    like the exact scorer, so a perfect predictor selects exactly the exact scorer's blocks."""
    from lightning_peft.callbacks._lemo_ops import exact_block_matrix, exact_block_scores, predicted_block_scores

    module = tiny()
    cb = TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], calibration_batches=2, predictor_steps=5,
                          predictor_target="exact")
    cb.attach(module.model)
    cb.begin_collection()
    captured = {}
    attn = unwrap_hf(module.model).model.layers[2].self_attn
    handle = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    batch = lm_batch(seed=3, pad_from=21)
    with torch.no_grad():
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    x, target, bvalid, exact = cb._collect[2][0]
    cos, sin = captured["position_embeddings"]
    valid = batch["attention_mask"].bool()
    parts = attention_parts(module.model, 2)
    matrix = exact_block_matrix(parts, captured["hidden_states"], cos, sin, BLOCK, valid)
    torch.testing.assert_close(target, matrix)  # the exact (causal, 1/sqrt(d)) matrix, not the released /16 one
    assert torch.equal(target.triu(1), torch.zeros_like(target))
    for sym in (True, False):  # a perfect predictor reproduces the exact scores on valid blocks
        want = exact_block_scores(parts, captured["hidden_states"], cos, sin, BLOCK, valid, sym)
        got = predicted_block_scores(matrix + matrix.transpose(-1, -2).triu(1) * 5, bvalid, exact_target=True,
                                     symmetrize=sym)  # garbage above the diagonal must be ignored
        torch.testing.assert_close(got[bvalid], want[bvalid])
    # predictors trained on one target are refused by a run that expects the other
    cb._collect = None
    released = TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictor_steps=5, calibration_batches=2)
    released.calibrate(module.model, [lm_batch(seed=s) for s in range(2)], progress=False)
    released.save_predictors(str(tmp_path / "released.pt"))
    with pytest.raises(TokenEliminationError, match="'released' target.*predictor_target='exact'"):
        TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictors_path=str(tmp_path / "released.pt"),
                         predictor_target="exact").attach(tiny().model)
    with pytest.raises(TokenEliminationError, match="predictor_target='causal'"):
        TokenElimination(predictor_target="causal")


def test_causal_predictor_training_ignores_the_upper_triangle():
    torch.manual_seed(0)
    x = torch.randn(B, N, 64)
    bvalid = torch.ones(B, N // BLOCK, dtype=torch.bool)
    target = torch.rand(B, N // BLOCK, N // BLOCK).tril()
    wild = target + torch.ones_like(target).triu(1) * 1e3  # never read with causal=True
    preds = []
    for t in (target, wild):
        torch.manual_seed(1)
        pred = BlockPredictor(64, 4, BLOCK, h1=16)
        train_predictors({0: pred}, {0: [(x, t, bvalid)]}, steps=20, progress=False, causal=True)
        preds.append(pred(x))
    torch.testing.assert_close(preds[0], preds[1])


def test_fused_chunk_cross_entropy_gradcheck_and_weighted_smoothed_loss():
    """The frozen-head segmented path forms d ce / d h in the forward: exact under gradcheck (fp64), with
    ignored labels and label smoothing, and equal to the plain loss with per-token weights."""
    from lightning_peft.objectives.losses import _FusedChunkCE

    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(11, 6, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 5))
    y[0, 1] = y[1, 4] = -100
    for smoothing in (0.0, 0.1):
        assert torch.autograd.gradcheck(lambda h: _FusedChunkCE.apply(h, w, b, y, smoothing), (h,))
    batch = lm_batch()
    batch["labels"][:, :5] = -100
    batch["token_weights"] = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(3))
    plain = tiny(objective=TokenCrossEntropy(label_smoothing=0.1))
    seg = tiny(objective=TokenCrossEntropy(label_smoothing=0.1, segment_size=6))
    seg.load_state_dict(plain.state_dict())
    torch.testing.assert_close(seg.compute_loss(batch)[0], plain.compute_loss(batch)[0], atol=1e-6, rtol=1e-6)
    gp, gs = lora_grads(plain, batch), lora_grads(seg, batch)
    for name in gp:
        torch.testing.assert_close(gs[name], gp[name], atol=1e-6, rtol=1e-5)
