"""LeMo token elimination: the block predictors (training, elastic pruning, targets, persistence) and the
channel-pruned MLP backward (spec ``lemo.md`` section 6, items 9 and the MLP side).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lemo_common import ATTN_LORA, BLOCK, B, N, layer_inputs, lm_batch, tiny

from lightning_peft import CausalLM
from lightning_peft.architectures import attention_parts
from lightning_peft.backbones import unwrap_hf
from lightning_peft.callbacks import TokenElimination
from lightning_peft.callbacks._lemo_ops import (
    BlockPredictor,
    DeadNeuronCounter,
    channel_pruned_mlp,
    prune_dead_neurons,
    train_predictors,
)
from lightning_peft.callbacks.token_elimination import TokenEliminationError
from lightning_peft.heads.full import FullFineTune
from lightning_peft.heads.lora import LoRA

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
    with torch.no_grad():  # the linears have no bias (released code): a zero weight row is dead, always 0
        pred.q[0].weight[:5] = 0.0
        pred.k[2].weight[3:6] = 0.0
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
    valid = batch["attention_mask"].bool()
    parts = attention_parts(module.model, 2)
    # scores before the rotary embedding (score_positions="pre_rope", the default): no cos/sin
    matrix = exact_block_matrix(parts, captured["hidden_states"], None, None, BLOCK, valid)
    torch.testing.assert_close(target, matrix)  # the exact (causal, 1/sqrt(d)) matrix, not the released /16 one
    assert torch.equal(target.triu(1), torch.zeros_like(target))
    for sym in (True, False):  # a perfect predictor reproduces the exact scores on valid blocks
        want = exact_block_scores(parts, captured["hidden_states"], None, None, BLOCK, valid, sym)
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


# ------------------------------------------------------------------------------ recall on a known task

MARKERS = range(200, 260)  # token ids whose keys every query attends to (by construction below)


def marked_model() -> CausalLM:
    """A tiny Llama whose layer 0 attends, in every head and from every query, to marker tokens only.

    Embeddings share a constant feature 1 and marker tokens add a large feature 0; layer 0's q_proj reads
    feature 1 and its k_proj feature 0 (into the first dimension of every head), so before the rotary
    embedding ``q_i . k_j`` is large exactly when token ``j`` is a marker. The informative blocks of layer 0
    are therefore known: those holding a marker.
    """
    module = CausalLM("tiny-llama", head=LoRA(r=4, target_modules=ATTN_LORA), backbone_config={"num_hidden_layers": 4})
    layer = unwrap_hf(module.model).model.layers[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = unwrap_hf(module.model).model.embed_tokens.weight
        emb.copy_(0.02 * torch.randn(emb.shape, generator=g))
        emb[:, 1] = 1.0
        emb[list(MARKERS), 0] = 3.0
        layer.input_layernorm.weight.fill_(1.0)
        wq, wk = layer.self_attn.q_proj.base_layer.weight, layer.self_attn.k_proj.base_layer.weight
        wq.zero_()
        wk.zero_()
        wq[0::16, 1] = 1.0  # every query head: feature 1
        wk[0::16, 0] = 1.0  # every key head: feature 0
    return module.train()


def marked_batch(seed: int, n_marked: int = 3) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A batch with one marker token at a random offset in ``n_marked`` random blocks of each sample."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 200, (B, N), generator=g)
    marked = torch.zeros(B, N // BLOCK, dtype=torch.bool)
    for s in range(B):
        blocks = torch.randperm(N // BLOCK, generator=g)[:n_marked]
        marked[s, blocks] = True
        for blk in blocks.tolist():
            ids[s, blk * BLOCK + int(torch.randint(BLOCK, (1,), generator=g))] = int(
                torch.randint(MARKERS.start, MARKERS.stop, (1,), generator=g))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, marked


def test_trained_predictors_find_the_informative_blocks_far_above_chance():
    module = marked_model()
    cb = TokenElimination(block_size=BLOCK, keep_ratio=0.4, dense_layers=[1, 2, 3], calibration_batches=12,
                          predictor_steps=100, predictor_lr=1e-2, predictor_hidden=[32, 32], symmetrize=False)
    cb.calibrate(module.model, [marked_batch(seed)[0] for seed in range(12)], progress=False)
    keep = int(0.4 * (N // BLOCK))  # 3 of 8 blocks: exactly the marked ones would be perfect
    chance = keep / (N // BLOCK)
    exact = TokenElimination(block_size=BLOCK, scorer="exact", symmetrize=False)  # scores only, not attached
    hits, exact_hits = [], []
    for seed in range(100, 106):  # held out: new marker placements
        batch, marked = marked_batch(seed)
        _, x, pe = layer_inputs(module, batch, 0)
        valid = torch.ones(B, N, dtype=torch.bool)
        for scorer, out in ((cb, hits), (exact, exact_hits)):
            scores = scorer.block_scores(0, cb._parts[0], x, pe, valid)
            top = scores.topk(keep, dim=-1).indices
            out.append(torch.gather(marked, 1, top).float().mean())
    assert float(torch.stack(exact_hits).mean()) == 1.0  # the construction: the exact scorer finds them all
    recall = float(torch.stack(hits).mean())
    assert recall >= 0.9 > chance + 0.5, (recall, chance)
    assert cb.recall[0] >= 0.9  # the callback's own held-out report agrees
