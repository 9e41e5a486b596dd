"""Q-Tuning (sample + token pruning on the EU plane): the pure decision, the scoring pass (fast route,
precision) and per-token statistics."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import cpu_threads
from pruning_helpers import make_module, padded_batch
from pruning_helpers import randomised as _randomised

from lightning_peft import CausalLM
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.datamodules.pruning import QTuning, SSToken
from lightning_peft.datamodules.pruning.qtuning import apply_plan, bisect_quadrants, plan_pruning, smoothed_scores
from lightning_peft.datamodules.pruning.sstoken import decoder_layers
from lightning_peft.heads import LoRA

cpu_threads()

SPIKE = [10.0, 10, 10, 300, 10, 10, 120, 120, 120, 10]  # the spec's example PPLs x 10


# ------------------------------------------------------------------------------------- QTuning, pure
def hand_batch():
    """8 samples, 2 prompt + 10 response label positions. Per-sample (ppl, entropy) blobs:
    0,1 high/high (Q1); 2,3 high/low (Q2); 4,5 low/low (Q3); 6,7 low/high (Q4). Sample 2 carries the
    spike pattern; prompt positions carry huge entropies that must not count."""
    ppl = [20.0, 21.0, None, 35.0, 2.0, 2.1, 2.2, 2.3]
    ent = [5.0, 5.1, 1.0, 1.1, 1.2, 1.3, 5.2, 5.3]
    loss = torch.zeros(8, 12, dtype=torch.float64)
    entropy = torch.zeros(8, 12, dtype=torch.float64)
    for b in range(8):
        loss[b, 2:] = torch.log(torch.tensor(SPIKE, dtype=torch.float64)) if ppl[b] is None else math.log(ppl[b])
        entropy[b, 2:] = ent[b]
        entropy[b, 1] = 100.0
    response = torch.zeros(8, 12, dtype=torch.bool)
    response[:, 2:] = True
    valid = torch.ones(8, 12, dtype=torch.bool)
    valid[:, 0] = False
    return loss, entropy, response, valid


def test_qtuning_quadrants_and_drops_on_hand_built_batch():
    loss, entropy, response, valid = hand_batch()
    # need = 80 - round(80 * 0.5 * rt) - 40 (dropped samples): rt = 0.975 -> need 1, rt = 0.9 -> need 4
    plan = plan_pruning(loss, entropy, response, valid, 0.5, 0.975, lam=0.5)
    assert plan["q2"].nonzero().flatten().tolist() == [2, 3]
    assert plan["q4"].nonzero().flatten().tolist() == [6, 7]
    assert plan["keep"].nonzero().flatten().tolist() == [2, 3, 6, 7]
    assert plan["need"] == 1
    dropped = response & plan["keep"][:, None] & ~plan["token_keep"]
    # smoothed scores (x10) of sample 2: [10, 15, 160, 160, 160, 70, 125, 180, 125, 65] -> index 7, not the spike
    assert dropped.nonzero().tolist() == [[2, 2 + 7]]
    plan4 = plan_pruning(loss, entropy, response, valid, 0.5, 0.9, lam=0.5)
    assert plan4["need"] == 4
    dropped4 = response & plan4["keep"][:, None] & ~plan4["token_keep"]
    assert dropped4.nonzero().tolist() == [[2, 2 + 2], [2, 2 + 3], [2, 2 + 4], [2, 2 + 7]]  # 180, then 160 x3
    plan0 = plan_pruning(loss, entropy, response, valid, 0.5, 0.975, lam=0.0)
    assert (response & ~plan0["token_keep"] & plan0["keep"][:, None]).nonzero().tolist() == [[2, 2 + 3]]
    low = plan_pruning(loss, entropy, response, valid, 0.5, 0.975, lam=0.5, drop="lowest")
    assert (response & ~low["token_keep"] & low["keep"][:, None]).nonzero().tolist() == [[2, 2 + 0]]
    # Q4 samples (and prompts) are never token-pruned
    assert plan4["token_keep"][6:].sum() == 20 and not plan4["token_keep"][:, :2].any()
    # 'all' entropy counts the prompt's huge entropies: the Q2/Q4 picture changes
    assert plan_pruning(loss, entropy, response, valid, 0.5, 0.9, entropy_positions="all")["ent"][2] > 5


def test_prompt_neighbour_counts_one_as_in_the_released_code():
    """Issue 12, defect 7b: in the official code a prompt position's PPL is exp(0) = 1 (label -100, loss 0),
    so the first response token's left neighbour adds lam * 1; padding and the sequence edges add 0.
    Sample 2's response PPLs are [10, 1, 1, 1, 1, 9.9, 1, 1, 1, 1] after one prompt position; with lam = 0.2
    (s_i = 0.8 PPL_i + 0.2 (PPL_{i-1} + PPL_{i+1})), by hand:
    prompt neighbour 1: [8.4, 3.0, 1.2, 1.2, 2.98, 8.32, 2.98, 1.2, 1.2, 1.0] -> drop index 0;
    prompt neighbour 0: index 0 scores 8.2 < 8.32 -> drop index 5."""
    loss, entropy, response, valid = hand_batch()
    pattern = [10.0, 1, 1, 1, 1, 9.9, 1, 1, 1, 1]
    for b, ppl in enumerate([1.5, 1.55, None, 1.65, 1.1, 1.12, 1.13, 1.14]):  # same ranks as hand_batch
        row = torch.tensor(pattern, dtype=torch.float64) if ppl is None else torch.full((10,), ppl, dtype=torch.float64)
        loss[b, 2:] = row.log()
    # the scores themselves (one row: pad, prompt, the response, pad)
    ppl_row = torch.tensor([[0.0, 0.0] + pattern + [0.0]], dtype=torch.float64)
    region = torch.tensor([[False, False] + [True] * 10 + [False]])
    prompt = torch.tensor([[False, True] + [False] * 11])
    s = smoothed_scores(ppl_row, region, 0.2, prompt=prompt)
    want = [0, 0, 8.4, 3.0, 1.2, 1.2, 2.98, 8.32, 2.98, 1.2, 1.2, 1.0, 0]
    torch.testing.assert_close(s, torch.tensor([want], dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(smoothed_scores(ppl_row, region, 0.2, prompt=prompt, prompt_ppl=0.0)[0, 2]) == pytest.approx(8.2)
    # the whole decision (need = 1, as in test_qtuning_quadrants_and_drops_on_hand_built_batch)
    plan = plan_pruning(loss, entropy, response, valid, 0.5, 0.975, lam=0.2)
    assert plan["keep"].nonzero().flatten().tolist() == [2, 3, 6, 7] and plan["need"] == 1
    assert (response & plan["keep"][:, None] & ~plan["token_keep"]).nonzero().tolist() == [[2, 2 + 0]]
    zero = plan_pruning(loss, entropy, response, valid, 0.5, 0.975, lam=0.2, prompt_neighbour_ppl=0.0)
    assert (response & zero["keep"][:, None] & ~zero["token_keep"]).nonzero().tolist() == [[2, 2 + 5]]
    # the pruner passes its option through (a batch with this layout: column 1 the prompt, 2.. the response)
    labels = torch.full((8, 12), 7)
    labels[:, :2] = -100
    batch = {"labels": labels, "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    for pruner, col in ((QTuning(sample_ratio=0.5, token_ratio=0.975, lam=0.2), 2),
                        (QTuning(sample_ratio=0.5, token_ratio=0.975, lam=0.2, prompt_neighbour_ppl=0.0), 7)):
        got = pruner.plan_from_stats(loss, entropy, batch)
        assert (response & got["keep"][:, None] & ~got["token_keep"]).nonzero().tolist() == [[2, col]]


def test_smoothed_score_numbers_from_spec():
    p = torch.tensor([[1.0, 1, 1, 30, 1, 1, 12, 12, 12, 1]])
    region = torch.ones_like(p, dtype=torch.bool)
    s = smoothed_scores(p, region, 0.5)
    assert s.tolist() == [[1, 1.5, 16, 16, 16, 7, 12.5, 18, 12.5, 6.5]]
    assert int(s.argmax()) == 7 and int(smoothed_scores(p, region, 0.0).argmax()) == 3


def test_bisection_properties():
    g = torch.Generator().manual_seed(0)
    ppl, ent = torch.rand(1000, generator=g), torch.rand(1000, generator=g)
    q2, q4, _, _ = bisect_quadrants(ppl, ent, 0.25)
    assert not (q2 & q4).any()
    assert abs(float((q2 | q4).float().mean()) - 0.25) <= 0.03
    assert ppl[q2].min() > ppl[q4].max() and ent[q2].max() < ent[q4].min()
    loss = torch.rand(8, 6, generator=g)
    resp = torch.ones(8, 6, dtype=torch.bool)
    plan = plan_pruning(loss, torch.rand(8, 6, generator=g), resp, resp, 0.125, 1.0)
    assert plan["keep"].sum() >= 1


def random_plan(seed, sample_ratio, token_ratio, b=16, s=24):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(b, s, generator=g, dtype=torch.float64) * 4
    ent = torch.rand(b, 1, generator=g, dtype=torch.float64) * 3 + torch.rand(b, s, generator=g, dtype=torch.float64)
    lengths = torch.randint(8, s + 1, (b,), generator=g)
    prompt = torch.randint(2, 6, (b,), generator=g)
    pos = torch.arange(s)[None]
    valid = (pos < lengths[:, None]) & (pos > 0)
    response = valid & (pos >= prompt[:, None])
    return plan_pruning(loss, ent, response, valid, sample_ratio, token_ratio), response


@pytest.mark.parametrize("sample_ratio,token_ratio", [(0.5, 0.7), (0.25, 0.5), (0.5, 0.5), (1.0, 0.6)])
def test_kept_token_fraction_meets_budget(sample_ratio, token_ratio):
    met = 0
    for seed in range(20):
        plan, response = random_plan(seed, sample_ratio, token_ratio)
        tot = int(response.sum())
        kept = int(plan["token_keep"].sum())
        n_kept = int(plan["keep"].sum())
        cand = int((response & (plan["keep"] & (plan["q2"] | plan["q2like"]))[:, None]).sum())
        assert n_kept >= 1 and plan["token_keep"][plan["keep"]].any(1).all()  # no kept sample is empty
        if cand - int((plan["keep"] & (plan["q2"] | plan["q2like"])).sum()) >= plan["need"]:
            met += 1
            assert abs(kept - sample_ratio * token_ratio * tot) <= n_kept, (seed, kept, tot)
        else:  # too few Q2 tokens (spec 5: "no Q2 samples -> budget not met"): all Q2 tokens but one per sample go
            q2rows = plan["keep"] & (plan["q2"] | plan["q2like"])
            assert kept >= int(response[plan["keep"] & ~q2rows].sum()) + int(q2rows.sum())
            assert kept >= sample_ratio * token_ratio * tot - n_kept  # over budget, never under
    assert met >= 5


def test_apply_plan_keeps_labels_and_shapes():
    plan, response = random_plan(3, 0.5, 0.5)
    b, s = response.shape
    labels = torch.where(response, torch.arange(b * s).view(b, s) + 10, torch.full((b, s), -100))
    batch = {"input_ids": torch.arange(b * s).view(b, s), "attention_mask": torch.ones(b, s, dtype=torch.long),
             "labels": labels}
    out = apply_plan(batch, plan)
    keep = plan["keep"]
    assert torch.equal(out["labels"], labels[keep]) and out["input_ids"].shape[0] == int(keep.sum())
    assert torch.equal(out["token_weights"], plan["token_keep"][keep].float())


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True])
def test_bad_ratios(bad):
    with pytest.raises(ValueError, match="must be in"):
        QTuning(sample_ratio=bad)
    with pytest.raises(ValueError, match="must be in"):
        QTuning(token_ratio=bad)
    with pytest.raises(ValueError, match="must be in"):
        SSToken(rho=bad)


@pytest.fixture(scope="module")
def module():
    return make_module()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_qtuning_on_model_and_no_response_batch(module, fast):
    """The scoring pass runs in eval mode (dropout off) and leaves the module in the mode it found, from
    train mode and from eval mode."""
    batch = padded_batch(module.tokenizer)
    seen = []
    handle = decoder_layers(module.model)[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    try:
        for mode in (True, False):
            module.train(mode)
            out = QTuning(sample_ratio=0.5, token_ratio=0.5, fast_scoring=fast)(batch, model=module)
            assert module.training is mode and all(m.training is mode for m in module.modules())
    finally:
        handle.remove()
        module.train()
    assert seen == [False, False]  # one scoring forward per call, both in eval mode
    assert 1 <= out["input_ids"].shape[0] <= 4 and out["token_weights"].shape == out["labels"].shape
    assert "pruning_stats" in out
    empty = {k: v.clone() for k, v in batch.items()}
    empty["labels"][:] = -100
    assert QTuning()(empty, model=module) is empty  # documented: passed through unpruned


def test_qtuning_scoring_pass_builds_no_graph():
    """The scoring forward is no-grad: it must not keep activations for a backward that never comes."""
    from lightning_peft import CausalLM
    from lightning_peft.datamodules.pruning import QTuning
    from lightning_peft.heads import LoRA

    module = CausalLM(head=LoRA(r=4, target_modules=["q_proj", "v_proj"])).train()
    ids = torch.randint(4, 260, (4, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    logits = QTuning.score_logits(module, batch)
    assert not logits.requires_grad and logits.grad_fn is None
    assert module.training  # the module's mode is restored


# ------------------------------------------------------------------------------------- fast scoring route
def _plans(pruner_kwargs, module, batch):
    fast, ref = QTuning(**pruner_kwargs, fast_scoring=True), QTuning(**pruner_kwargs, fast_scoring=False)
    plan_fast = fast.plan_from_stats(*fast.score(module, batch), batch)
    return plan_fast, ref.plan_from_stats(*ref.score(module, batch), batch)


@pytest.mark.parametrize("entropy_positions", ["response", "all"])
@pytest.mark.parametrize("head", ["lora", "full"])
def test_fast_scoring_equals_reference(head, entropy_positions):
    """Decoder body + LM head at the needed positions + merged LoRA deltas == the plain forward."""
    from lightning_peft.datamodules.pruning.scoring import fast_parts
    from lightning_peft.heads import FullFineTune

    torch.manual_seed(0)
    h = LoRA(r=4, alpha=8) if head == "lora" else FullFineTune()
    module = _randomised(CausalLM(backbone="tiny-llama", head=h)).train()
    batch = padded_batch(module.tokenizer, seed=2)
    batch = {k: torch.cat([v, v.roll(1, 0)]) for k, v in batch.items()}  # 8 rows, padded
    assert fast_parts(module, batch) is not None  # the fast route is really taken
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in module.model.named_parameters()}
    kw = dict(sample_ratio=0.5, token_ratio=0.6, entropy_positions=entropy_positions)
    fast, ref = _plans(kw, module, batch)
    assert module.training
    for n, p in module.model.named_parameters():  # nothing was merged into the model's own weights
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n
    torch.testing.assert_close(fast["ppl"], ref["ppl"], rtol=1e-5, atol=0)
    torch.testing.assert_close(fast["ent"], ref["ent"], rtol=1e-5, atol=1e-6)
    for key in ("keep", "token_keep", "q2", "q4", "q2like"):
        assert torch.equal(fast[key], ref[key]), key
    # the LoRA delta really takes part: with the adapter off the statistics move
    if head == "lora":
        with module.model.disable_adapter():
            off, _ = _plans(kw, module, batch)
        assert not torch.allclose(off["ppl"], ref["ppl"], rtol=1e-3)


def test_fast_scoring_falls_back_where_it_does_not_apply():
    from lightning_peft.datamodules.pruning.scoring import fast_parts, score_tokens, token_stats
    from lightning_peft.heads import PeftHead

    batch = padded_batch(None, seed=3)
    dora = CausalLM(backbone="tiny-llama", head=LoRA(r=4, use_dora=True))
    prompt = CausalLM(backbone="tiny-llama", head=PeftHead({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    gpt2 = CausalLM(backbone="tiny-gpt2", head=LoRA(r=4, target_modules=["c_attn"]))
    assert fast_parts(dora, batch) is None and fast_parts(prompt, batch) is None
    assert fast_parts(gpt2, batch) is not None  # Conv1D LoRA layers are plain lora.Linear too
    pos = batch["labels"] != -100
    pos[:, 0] = False
    for module in (dora, prompt, gpt2):
        _randomised(module).eval()
        loss, ent = score_tokens(module, batch, pos)
        with torch.no_grad():
            logits = module(batch).logits[:, -batch["labels"].shape[1]:]
        ref_loss, ref_ent = token_stats(logits, batch["labels"], pos)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)


def _autocast_probe(module):
    """Record (autocast on?, autocast dtype) at each call of the first decoder layer."""
    seen = []

    def hook(mod, args):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    return seen, decoder_layers(module.model)[0].register_forward_pre_hook(hook)


def test_scoring_precision_option():
    """``scoring_precision`` autocasts the scoring pass only; fp32 statistics, close to the fp32 pass."""
    torch.manual_seed(0)
    module = _randomised(CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8))).train()
    batch = padded_batch(module.tokenizer, seed=4)
    seen, handle = _autocast_probe(module)
    try:
        loss32, ent32 = QTuning(scoring_precision="32").score(module, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # "32" means fp32 even under an outer autocast
            QTuning(scoring_precision="32").score(module, batch)
        loss16, ent16 = QTuning(scoring_precision="bf16-mixed").score(module, batch)
    finally:
        handle.remove()
    assert [on for on, _ in seen] == [False, False, True] and seen[2][1] == torch.bfloat16
    assert loss16.dtype == torch.float32 and not torch.equal(loss16, loss32)  # really a bf16 pass
    torch.testing.assert_close(loss16, loss32, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(ent16, ent32, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("pruner", [lambda: QTuning(sample_ratio=0.5, plot_every_epoch=False),
                                    lambda: SSToken(rel_warmup_steps=0)], ids=["qtuning", "sstoken"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_scoring_pass_runs_in_the_trainers_precision(tmp_path, pruner, precision):
    """The DataModule hook is outside Lightning's autocast; the no-grad passes still use the training
    precision (a bf16-mixed run must not score in fp32, which would cost more than its own forward)."""
    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8))
    dm = SyntheticSFTDataModule(task="copy", num_digits=3, num_train=8, num_val=4, batch_size=4, pruner=pruner())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=str(tmp_path))
    seen, handle = _autocast_probe(module)
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        handle.remove()
    assert len(seen) == 2  # the no-grad pruner pass, then the training forward
    expected = (True, torch.bfloat16) if precision == "bf16-mixed" else (False,)
    for on_dtype in seen:
        assert on_dtype[: len(expected)] == expected


def test_token_stats_match_brute_force():
    from lightning_peft.datamodules.pruning.scoring import token_stats

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[:, :2] = -100
    loss, ent = token_stats(logits, labels)
    for b in range(3):
        for t in range(1, 7):
            p = torch.softmax(logits[b, t - 1].double(), -1)
            want = 0.0 if labels[b, t] == -100 else float(-torch.log(p[labels[b, t]]))
            assert abs(float(loss[b, t]) - want) < 1e-5 and abs(float(ent[b, t]) + float((p * p.log()).sum())) < 1e-5
    assert (loss[:, 0] == 0).all() and (ent[:, 0] == 0).all()


def test_apply_plan_trims_trailing_padding():
    batch = padded_batch(None)  # lengths 12, 9, 7, 12
    keep = torch.tensor([False, True, True, False])
    plan = {"keep": keep, "token_keep": (batch["labels"] != -100)}
    out = apply_plan(batch, plan)
    assert out["input_ids"].shape == (2, 9) and out["token_weights"].shape == (2, 9)
    assert torch.equal(out["labels"], batch["labels"][keep][:, :9])
    assert apply_plan(batch, plan, trim=False)["input_ids"].shape == (2, 12)
