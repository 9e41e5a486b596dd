"""Data pruners: QTuning (sample + token pruning on the EU plane) and SSToken (token selection)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import cpu_threads, fit_interrupted_and_whole, run_cli_ranks, trainable_state

from lightning_peft import CausalLM
from lightning_peft.architectures import attention_parts
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.datamodules.pruning import QTuning, SSToken
from lightning_peft.datamodules.pruning.qtuning import apply_plan, bisect_quadrants, plan_pruning, smoothed_scores
from lightning_peft.datamodules.pruning.sstoken import (
    attention_to_prompt,
    decoder_layers,
    last_layer_attention,
    select_tokens,
    token_losses,
)
from lightning_peft.heads import LoRA
from lightning_peft.objectives import TokenCrossEntropy

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


# ------------------------------------------------------------------------------------- module-level
@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))


def padded_batch(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens, prompts = [12, 9, 7, 12], [4, 3, 5, 2]
    ids = torch.full((4, 12), 0, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.long)
    labels = torch.full((4, 12), -100, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lens, prompts)):
        ids[b, :n] = torch.randint(4, 200, (n,), generator=g)
        mask[b, :n] = 1
        labels[b, p:n] = ids[b, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_qtuning_on_model_and_no_response_batch(module):
    batch = padded_batch(module.tokenizer)
    out = QTuning(sample_ratio=0.5, token_ratio=0.5)(batch, model=module)
    assert 1 <= out["input_ids"].shape[0] <= 4 and out["token_weights"].shape == out["labels"].shape
    assert "pruning_stats" in out and module.training == module.training
    empty = {k: v.clone() for k, v in batch.items()}
    empty["labels"][:] = -100
    assert QTuning()(empty, model=module) is empty  # documented: passed through unpruned


def test_validation_batches_untouched(module):
    dm = SyntheticSFTDataModule(task="copy", num_digits=3, num_train=16, num_val=4, batch_size=4,
                                pruner=QTuning(sample_ratio=0.5))
    batch = padded_batch(module.tokenizer)
    dm.trainer = SimpleNamespace(training=False, lightning_module=module)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = SimpleNamespace(training=True, lightning_module=module)
    assert "token_weights" in dm.on_after_batch_transfer(batch, 0)  # training batches are pruned


# ------------------------------------------------------------------------------------- SSToken, pure
def test_sstoken_gamma_extremes_and_counts():
    response = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    rel = torch.tensor([[0, 0, 5.0, 1, 4, 2, 3], [0, 9, 1, 2, 0, 0, 0]])
    attn = torch.tensor([[0, 0, 0.1, 0.9, 0.2, 0.8, 0.3], [0, 0.1, 0.9, 0.5, 0, 0, 0]])
    by_rel = select_tokens(rel, attn, response, 1.0, 0.6)
    by_attn = select_tokens(rel, attn, response, 0.0, 0.6)
    assert by_rel.nonzero().tolist() == [[0, 2], [0, 4], [0, 6], [1, 1], [1, 3]]  # ceil(.6*5)=3, ceil(.6*3)=2
    assert by_attn.nonzero().tolist() == [[0, 3], [0, 5], [0, 6], [1, 2], [1, 3]]
    assert torch.equal(select_tokens(rel, attn, response, 0.5, 1.0), response)
    assert not (select_tokens(rel, attn, response, 0.5, 0.6) & ~response).any()


def test_sstoken_attention_recompute_matches_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    batch = padded_batch(None)
    batch["input_ids"] = batch["input_ids"] % 64
    pruner = SSToken()
    pruner._install_hook(model)
    pruner._armed = True
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    hidden, pos = pruner._captured
    ours = last_layer_attention(attention_parts(model, -1), hidden, pos, batch["attention_mask"])
    ref = out.attentions[-1].mean(1)
    valid = batch["attention_mask"].bool()
    assert torch.allclose(ours[valid], ref[valid], atol=1e-5)
    response = (batch["labels"] != -100)
    score = attention_to_prompt(ours, ~response & valid)
    assert (score >= 0).all() and (score <= 1 + 1e-6).all()
    received = attention_to_prompt(ours.transpose(1, 2), ~response & valid)  # column sums: a wrong variant
    assert not torch.allclose(score[response], received[response])


def test_sstoken_lora_init_rel_is_zero_and_selection_by_attention(module):
    batch = padded_batch(module.tokenizer)
    module.eval()
    with torch.no_grad():
        current = token_losses(module(batch).logits, batch["labels"])
    pruner = SSToken(gamma=1.0, rho=0.5)
    assert torch.equal(pruner.history_losses(module, batch), current)  # LoRA B = 0: base == current
    out = pruner(batch, model=module)
    loss = TokenCrossEntropy()(module(out).logits, out)
    weights = out["token_weights"]
    response = batch["labels"] != -100
    response[:, 0] = False
    n = response.sum(1)
    assert weights.sum(1).tolist() == torch.ceil(n * 0.5).tolist()
    assert torch.isfinite(loss) and out["pruning_stats"]["rel_mean"] == 0.0
    module.train()


def test_sstoken_rho_one_equals_plain_ce_and_masks_gradients(module):
    batch = padded_batch(module.tokenizer, seed=1)
    module.eval()
    logits = module(batch).logits.detach().requires_grad_(True)
    plain = TokenCrossEntropy()(logits, batch)
    full = SSToken(rho=1.0, gamma=0.0)(batch, model=module)
    module(full)  # the training forward fills the hook
    assert torch.allclose(TokenCrossEntropy()(logits, full), plain)
    part = SSToken(rho=0.4, gamma=0.0)(batch, model=module)
    module(part)
    loss = TokenCrossEntropy()(logits, part)
    loss.backward()
    dropped = (batch["labels"] != -100) & (part["token_weights"] == 0)
    dropped[:, 0] = False
    rows, cols = dropped.nonzero(as_tuple=True)
    assert rows.numel() > 0 and logits.grad[rows, cols - 1].abs().max() == 0
    module.train()


def test_sstoken_warmup_from_global_step():
    trainer = SimpleNamespace(num_training_batches=50, accumulate_grad_batches=1, global_step=0)
    model = SimpleNamespace(_trainer=trainer)
    p = SSToken(gamma=0.5, rel_warmup_fraction=0.2)
    assert p.gamma_at(model) == 0.0
    trainer.global_step = 9
    assert p.gamma_at(model) == 0.0
    trainer.global_step = 10  # a resumed run at step 10 sees the same gamma_t as an uninterrupted one
    assert p.gamma_at(model) == 0.5


# ------------------------------------------------------------------------------------- Trainer runs
def run_trainer(tmp_path, pruner, max_epochs=1):
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    dm = SyntheticSFTDataModule(task="copy", num_digits=4, num_train=24, num_val=4, batch_size=8, pruner=pruner)
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0, enable_checkpointing=False, default_root_dir=str(tmp_path))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=dm)
    moved = any(not torch.equal(p, before[n]) for n, p in module.model.named_parameters() if p.requires_grad)
    return trainer, moved


def test_trainer_run_qtuning(tmp_path):
    trainer, moved = run_trainer(tmp_path, QTuning(sample_ratio=0.5, token_ratio=0.5))
    assert moved and trainer.global_step == 3
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    for key in ("pruning/kept_samples", "pruning/kept_tokens", "pruning/q2", "pruning/q4", "train/loss"):
        assert key in metrics
    assert (tmp_path / "run" / "version_0" / "eu_plane" / "epoch_0.png").stat().st_size > 1000


def test_trainer_run_sstoken(tmp_path):
    trainer, moved = run_trainer(tmp_path, SSToken(rel_warmup_steps=1))
    assert moved and trainer.global_step == 3
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "pruning/kept_token_fraction" in metrics and "pruning/gamma_t" in metrics


@pytest.mark.ddp
@pytest.mark.parametrize("pruner", [
    "{class_path: lightning_peft.datamodules.pruning.QTuning, init_args: {sample_ratio: 0.5, token_ratio: 0.5}}",
    "{class_path: lightning_peft.datamodules.pruning.SSToken, init_args: {gamma: 0.5, rho: 0.6}}",
], ids=["qtuning", "sstoken"])
def test_ddp_two_ranks_identical(tmp_path, pruner):
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        "seed_everything: 0\n"
        "trainer:\n  max_steps: 3\n  accelerator: cpu\n  devices: 2\n  strategy: ddp\n  logger: false\n"
        "  enable_progress_bar: false\n  enable_checkpointing: false\n  limit_val_batches: 0\n"
        f"  callbacks:\n    - class_path: helpers.DumpTrainable\n      init_args: {{out_dir: {tmp_path / 'dump'}}}\n"
        "model:\n  class_path: lightning_peft.CausalLM\n  init_args:\n    backbone: tiny-llama\n"
        "    head: {class_path: lightning_peft.heads.LoRA, init_args: {r: 4, alpha: 8}}\n"
        "data:\n  class_path: lightning_peft.datamodules.SyntheticSFTDataModule\n  init_args:\n"
        "    task: copy\n    num_digits: 4\n    num_train: 64\n    num_val: 4\n    batch_size: 8\n"
        f"    pruner: {pruner}\n"
    )
    r0, r1 = run_cli_ranks(["--config", str(cfg)], tmp_path, tmp_path / "dump")
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name


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
def _randomised(module, seed=1):
    """Move every trainable tensor (LoRA B included) off its initial value, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


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


# ------------------------------------------------------------------------------------- SSToken history modes
def _current_losses(module, batch):
    module.eval()
    with torch.no_grad():
        out = token_losses(module(batch).logits, batch["labels"])
    module.train()
    return out


def test_sstoken_copy_history_with_full_finetuning():
    """history='auto' + FullFineTune -> a frozen copy of the base: REL is 0 at step 0 and, after an update,
    equals (base losses - current losses) computed by hand from a freshly built base model."""
    from lightning_peft.backbones import load_backbone
    from lightning_peft.heads import FullFineTune

    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=FullFineTune()).train()
    batch = padded_batch(module.tokenizer, seed=4)
    pruner = SSToken(gamma=1.0, rho=0.5, rel_warmup_fraction=0.0)
    assert pruner._mode(module) == "copy"
    torch.testing.assert_close(pruner.history_losses(module, batch), _current_losses(module, batch), rtol=0, atol=1e-6)
    out = pruner(batch, model=module)
    TokenCrossEntropy()(module(out).logits, out)  # the training forward + the selector
    assert abs(out["pruning_stats"]["rel_mean"]) < 1e-6

    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    loss = TokenCrossEntropy()(module(batch).logits, batch)
    loss.backward()
    opt.step()
    base, _ = load_backbone("tiny-llama")
    with torch.no_grad():
        want_history = token_losses(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    history = pruner.history_losses(module, batch)
    torch.testing.assert_close(history, want_history, rtol=0, atol=1e-6)  # the copy did not train
    current = _current_losses(module, batch)
    rel = want_history - current
    response = (batch["labels"] != -100) & batch["attention_mask"].bool()
    response[:, 0] = False
    assert (rel[response] > 1e-3).any()  # the update moved the losses
    out = pruner(batch, model=module)
    module.eval()  # dropout-free either way; eval makes the selector see exactly `current`
    TokenCrossEntropy()(module(out).logits, out)
    module.train()
    want = select_tokens(rel, torch.zeros_like(rel), response, 1.0, 0.5)
    assert torch.equal(out["token_weights"].bool(), want)
    assert out["pruning_stats"]["rel_mean"] == pytest.approx(float(rel[response].mean()), abs=1e-5)


def test_sstoken_cache_history(tmp_path, module):
    """history_cache: per-sample history losses written once, looked up per sample (by a hash of its
    token ids, so row order does not matter); a sample not in the cache is a clear error."""
    batch = padded_batch(module.tokenizer, seed=5)
    history_model = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomised(history_model, seed=7)
    path = str(tmp_path / "history.pt")
    assert SSToken.build_history_cache(history_model, [batch], path) == 4
    want = _current_losses(history_model, batch)
    pruner = SSToken(history_cache=path)
    assert pruner.history == "cache"
    got = pruner.history_losses(module, batch)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-6)
    assert (got[~mask] == 0).all()
    flipped = {k: v.flip(0) for k, v in batch.items()}
    torch.testing.assert_close(pruner.history_losses(module, flipped), got.flip(0), rtol=0, atol=0)
    other = padded_batch(module.tokenizer, seed=6)
    with pytest.raises(KeyError, match="no entry for a training sample"):
        pruner.history_losses(module, other)
    with pytest.raises(ValueError, match="needs history_cache"):
        SSToken(history="cache")


# ------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("make_pruner", [lambda: QTuning(sample_ratio=0.5, token_ratio=0.5, plot_every_epoch=False),
                                         lambda: SSToken(rho=0.6, rel_warmup_steps=3)], ids=["qtuning", "sstoken"])
def test_pruned_run_resumes_exactly(tmp_path, make_pruner):
    """6 batches per epoch; stop at step 4 (mid-epoch), resume to step 8 (across the epoch end, and for
    SSToken across its warm-up end) == an uninterrupted 8-step run, to 1e-6."""
    def build():
        module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        module.set_optimizer("torch.optim.AdamW", lr=1e-2)
        return module

    def data():
        return SyntheticSFTDataModule(task="copy", num_digits=3, num_train=48, num_val=4, batch_size=8, seed=0,
                                      pruner=make_pruner())

    (full, _), (resumed, _) = fit_interrupted_and_whole(build, data, tmp_path, total=8, cut=4)
    a, b = trainable_state(full), trainable_state(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(a[n], v) for n, v in trainable_state(build()).items())  # the run really moved


# ------------------------------------------------------------------------------------- bad input
def test_other_bad_values():
    for kwargs in ({"lam": -0.1}, {"lam": 1.5}, {"entropy_positions": "prompt"}, {"budget_positions": "x"},
                   {"drop": "random"}, {"sample_ratio": float("nan")}, {"token_ratio": "0.5"},
                   {"scoring_precision": "fp8"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            QTuning(**kwargs)
    for kwargs in ({"gamma": 1.5}, {"gamma": -1}, {"rel_warmup_fraction": 2.0}, {"history": "ema"},
                   {"rho": 0}, {"rho": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SSToken(**kwargs)


def test_sstoken_no_response_batch_and_rows_without_response(module):
    batch = padded_batch(module.tokenizer, seed=8)
    empty = {k: v.clone() for k, v in batch.items()}
    empty["labels"][:] = -100
    with pytest.warns(UserWarning, match="no response tokens"):
        assert SSToken()(empty, model=module) is empty  # documented: passed through unselected
    # a batch in which some rows have no response: those rows keep nothing, the others their ceil(rho*|R|)
    mixed = {k: v.clone() for k, v in batch.items()}
    mixed["labels"][1:3] = -100
    out = SSToken(gamma=0.0, rho=0.5)(mixed, model=module)
    loss = TokenCrossEntropy()(module(out).logits, out)
    assert torch.isfinite(loss)
    kept = out["token_weights"].sum(1)
    assert kept[1] == 0 and kept[2] == 0 and kept[0] > 0 and kept[3] > 0
    q = QTuning(sample_ratio=0.75, token_ratio=1.0)(mixed, model=module)
    assert q["input_ids"].shape[0] == 2  # rows without a response are never kept (K capped at 2)


def test_tokenizer_without_pad_token(module):
    """A tokenizer without a pad token: the collator pads with EOS (documented), and the pruners read the
    attention mask, never the pad id, so EOS tokens inside responses still count and the decisions equal
    those on the same batch padded with a real pad id."""
    import copy

    from lightning_peft.datamodules.common import CausalLMCollator, encode_sft, pad_id_of

    tok = copy.deepcopy(module.tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None and pad_id_of(tok) == tok.eos_token_id
    prompts = ["12+3=", "4+4=", "100+20=", "7+0=", "9+9=", "1+1="]
    answers = ["15", "8", "120", "7", "18", "2"]
    examples, _ = encode_sft(prompts, answers, tok, max_length=32)
    eos_padded = CausalLMCollator(pad_id_of(tok))(examples)
    pad_padded = CausalLMCollator(0)(examples)
    assert (eos_padded["input_ids"] == tok.eos_token_id).sum() > len(examples)  # EOS in responses and as padding
    for make in (lambda: QTuning(sample_ratio=0.5, token_ratio=0.5, plot_every_epoch=False),
                 lambda: SSToken(gamma=0.0, rho=0.5)):
        outs = []
        for batch in (eos_padded, pad_padded):
            out = make()({k: v.clone() for k, v in batch.items()}, model=module)
            if "token_selector" in out:
                TokenCrossEntropy()(module(out).logits, out)
            outs.append(out)
        assert torch.equal(outs[0]["token_weights"], outs[1]["token_weights"])
        assert torch.equal(outs[0]["labels"], outs[1]["labels"])
        eos_label = (outs[0]["labels"] == tok.eos_token_id)
        assert eos_label.any() and (outs[0]["token_weights"][eos_label] >= 0).all()
