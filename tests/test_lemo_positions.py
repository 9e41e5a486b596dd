"""TokenElimination against the released code's choices (issue 12, defects 4, 5 and 7c): scores taken before
the rotary embedding, the default dense layers, bias-free predictors.

References are computed here from the q/k projections read off the model with forward hooks (what its own
``q_proj``/``k_proj`` return, LoRA included), never through the code's own projection or rotation helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from lemo_common import BLOCK, B, N, lm_batch, tiny
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lightning_peft.backbones import unwrap_hf
from lightning_peft.callbacks import TokenElimination
from lightning_peft.callbacks._lemo_ops import BlockPredictor
from lightning_peft.callbacks.token_elimination import TokenEliminationError, default_dense_layers

HEAD_DIM = 16


def projections(module, batch, layer: int):
    """What layer ``layer``'s own q_proj / k_proj return in a dense forward, its input, and (cos, sin)."""
    attn = unwrap_hf(module.model).model.layers[layer].self_attn
    seen = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("q", out.detach())),
             attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out.detach())),
             attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"].detach(),
                                                                       pe=kw["position_embeddings"]),
                                            with_kwargs=True)]
    with torch.no_grad():
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    q = seen["q"].view(B, N, -1, HEAD_DIM).transpose(1, 2)
    k = seen["k"].view(B, N, -1, HEAD_DIM).transpose(1, 2)
    return q, k, seen["x"], seen["pe"]


def naive_matrix(q, k, causal: bool, scale: float | None):
    """Block max of the head-summed positive scores, one dense N x N matrix at a time."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.float() @ k.float().transpose(-1, -2) * (scale or 1.0)
    if causal:
        s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), 0.0)
    s = s.clamp_min(0).sum(1)
    nb = N // BLOCK
    return s.view(B, nb, BLOCK, nb, BLOCK).amax(dim=(2, 4))


def naive_scores(q, k, symmetrize=True):
    mat = naive_matrix(q, k, causal=True, scale=HEAD_DIM ** -0.5)
    if symmetrize:
        mat = mat + torch.triu(mat.transpose(-1, -2), 1)
    return mat.sum(-2)


def rotated(q, k, pe):
    return apply_rotary_pos_emb(q, k, *pe)  # transformers' own rotation, not the code's


def test_exact_scorer_scores_before_the_rotary_embedding():
    module = tiny()
    batch = lm_batch(seed=5)
    q, k, x, pe = projections(module, batch, 2)
    pre, post = naive_scores(q, k), naive_scores(*rotated(q, k, pe))
    assert not torch.allclose(pre, post, rtol=0.05)  # the two choices really differ on this input
    cb = TokenElimination(block_size=BLOCK, scorer="exact", dense_layers=[0, 1, 3]).attach(module.model)
    valid = torch.ones(B, N, dtype=torch.bool)
    parts = cb._parts[2]
    torch.testing.assert_close(cb.block_scores(2, parts, x, pe, valid), pre)
    # the blocks a training forward keeps are the pre-RoPE top 40% (layers 0-1 dense: the same input reaches 2)
    cb.selection_log = []
    module.compute_loss(batch)
    (layer, idx), = cb.selection_log
    want = pre.topk(math.floor(0.4 * N / BLOCK), dim=-1).indices.sort(-1).values
    assert layer == 2 and torch.equal(idx[:, ::BLOCK] // BLOCK, want)
    cb.detach()
    # the parity flag scores the rotated queries and keys, as earlier releases did
    old = TokenElimination(block_size=BLOCK, scorer="exact", dense_layers=[0, 1, 3],
                           score_positions="post_rope").attach(module.model)
    torch.testing.assert_close(old.block_scores(2, old._parts[2], x, pe, valid), post)


@pytest.mark.parametrize("target", ["released", "exact"])
def test_predictor_target_is_taken_before_the_rotary_embedding(target):
    module = tiny()
    batch = lm_batch(seed=6)
    q, k, _, pe = projections(module, batch, 2)
    cb = TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictor_target=target).attach(module.model)
    cb.begin_collection()
    with torch.no_grad():
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    _, got, _, exact = cb._collect[2][0]
    if target == "released":  # no causal mask, no 1/sqrt(d), divided by 16 (block_attn_pool)
        want = naive_matrix(q, k, causal=False, scale=None) / 16
        wrong = naive_matrix(*rotated(q, k, pe), causal=False, scale=None) / 16
    else:
        want = naive_matrix(q, k, causal=True, scale=HEAD_DIM ** -0.5)
        wrong = naive_matrix(*rotated(q, k, pe), causal=True, scale=HEAD_DIM ** -0.5)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, wrong, rtol=0.05)
    torch.testing.assert_close(exact, naive_scores(q, k))  # the recall reference: pre-RoPE exact scores


def test_predictors_remember_their_score_positions(tmp_path):
    module = tiny()
    cb = TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictor_steps=3, calibration_batches=2)
    cb.calibrate(module.model, [lm_batch(seed=s) for s in range(2)], progress=False)
    path = tmp_path / "pre.pt"
    cb.save_predictors(str(path))
    assert torch.load(path, weights_only=True)["positions"] == "pre_rope"
    with pytest.raises(TokenEliminationError, match="trained on pre_rope scores.*score_positions='post_rope'"):
        TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictors_path=str(path),
                         score_positions="post_rope").attach(tiny().model)
    with pytest.raises(TokenEliminationError, match="score_positions='rope'.*'pre_rope'"):
        TokenElimination(score_positions="rope")


# ------------------------------------------------------------------------------ default dense layers


def test_default_dense_layers_on_a_32_layer_llama_built_without_weights():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)  # Llama-2-7B's shape
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    cb = TokenElimination().attach(model)
    assert sorted(cb._sparse) == list(range(15, 31))  # released: layer_idx < 15 and layer 31 dense
    assert set(cb._sparse.values()) == {0.4}
    assert default_dense_layers(32) == set(range(15)) | {31}
    assert default_dense_layers(8) == {0, 1, 2, 7}
    assert default_dense_layers(2) == {1} and default_dense_layers(1) == {0}
    cb.detach()


# ------------------------------------------------------------------------------ bias-free predictors


def test_predictor_linears_have_no_bias_and_biased_files_still_load(tmp_path):
    pred = BlockPredictor(64, 4, BLOCK, h1=16)
    assert all(lin.bias is None for lin in list(pred.q) + list(pred.k) if isinstance(lin, torch.nn.Linear))
    # no bias: a zero block predicts exactly zero interaction
    assert torch.equal(pred(torch.zeros(1, N, 64)), torch.zeros(1, N // BLOCK, N // BLOCK))
    # a predictor file saved by an earlier version (linears with biases) loads with its biases
    module = tiny()
    cb = TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictor_steps=2, calibration_batches=1)
    cb.calibrate(module.model, [lm_batch()], progress=False)
    state = cb.predictor_state()
    old = BlockPredictor(64, 4, BLOCK, dims=state["dims"]["2"], bias=True)
    state["weights"] = {"2": {k: v.clone() for k, v in old.state_dict().items()}}
    torch.save(state, tmp_path / "old.pt")
    again = TokenElimination(block_size=BLOCK, dense_layers=[0, 1, 3], predictors_path=str(tmp_path / "old.pt"))
    again.attach(tiny().model)
    x = torch.randn(B, N, 64)
    torch.testing.assert_close(again.predictors[2](x), old(x))
