"""GreenTrainer (callbacks/greentrainer.py): the DPs, the ρ conversion, the measured FLOPs model, the
side-effect-free importance pass, where backprop stops, resume parity, 2-process DDP and bad input."""

from __future__ import annotations

import glob
import itertools
import os
import random

import lightning as L
import pytest
import torch
from helpers import REPO, cpu_trainer, run_cli_ranks
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import CausalLM
from lightning_peft.callbacks import GreenTrainer
from lightning_peft.callbacks._greentrainer_dp import (
    RHO_BP_FLOOR,
    backward_budget_fraction,
    effective_rho,
    exact_dp,
    official_dp,
    quantize,
    selection_cost,
)
from lightning_peft.callbacks.greentrainer import (
    GreenTrainerError,
    apply_mask,
    measure_forward_flops,
    measure_step_flops,
    plan_selection,
    profile_flops,
    tensor_importance,
)
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.heads import FullFineTune, LoRA


def _llama(layers: int = 4, **kw) -> CausalLM:
    return CausalLM(backbone="tiny-llama", head=FullFineTune(),
                    backbone_config={"hidden_size": 64, "num_hidden_layers": layers, **kw})


def _batch(b: int = 4, n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 200, (b, n), generator=g)
    labels = ids.clone()
    labels[:, : n // 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


# ------------------------------------------------------------------------------------------ DP
def _brute(t_dy, t_dw, imp, budget):
    best = 0.0
    for m in itertools.product([False, True], repeat=len(t_dy)):
        if selection_cost(m, t_dy, t_dw) <= budget:
            best = max(best, sum(i for i, x in zip(imp, m) if x))
    return best


def _value(mask, imp):
    return sum(i for i, x in zip(imp, mask) if x)


def test_exact_dp_equals_brute_force_and_official_is_feasible():
    rng = random.Random(0)
    suboptimal = 0
    for _ in range(250):
        n = rng.randint(1, 12 if rng.random() < 0.2 else 8)
        t_dy = [rng.randint(0, 12) for _ in range(n)]
        t_dw = [rng.randint(0, 12) for _ in range(n)]
        imp = [rng.uniform(-1, 1) for _ in range(n)]
        budget = rng.randint(0, 10 * n)
        best = _brute(t_dy, t_dw, imp, budget)
        mask, value = exact_dp(t_dy, t_dw, imp, budget)
        assert value == pytest.approx(best, abs=1e-12)
        assert _value(mask, imp) == pytest.approx(value, abs=1e-12)
        assert selection_cost(mask, t_dy, t_dw) <= budget
        assert all(i > 0 for i, m in zip(imp, mask) if m)
        omask, ovalue = official_dp(t_dy, t_dw, imp, budget)
        assert selection_cost(omask, t_dy, t_dw) <= budget
        assert _value(omask, imp) == pytest.approx(ovalue, abs=1e-12) and ovalue <= best + 1e-12
        suboptimal += ovalue < best - 1e-12
    # the official recurrence drops the deepest tensor when the whole chain fits: sometimes sub-optimal
    assert 0 < suboptimal < 250
    print(f"official DP sub-optimal on {suboptimal}/250 instances")


def test_exact_dp_edge_cases_and_monotone():
    rng = random.Random(1)
    for _ in range(50):
        n = rng.randint(1, 10)
        t_dy = [rng.randint(1, 9) for _ in range(n)]
        t_dw = [rng.randint(0, 9) for _ in range(n)]
        imp = [rng.uniform(-1, 1) for _ in range(n)]
        total = sum(t_dy) + sum(t_dw)
        # budget ≥ total (ρ = 1): exactly the tensors with positive importance
        mask, _ = exact_dp(t_dy, t_dw, imp, total + rng.randint(0, 5))
        assert mask == [i > 0 for i in imp]
        # a budget below the first tensor's t_dy: nothing
        assert exact_dp(t_dy, t_dw, imp, t_dy[0] - 1) == ([False] * n, 0.0)
        values = [exact_dp(t_dy, t_dw, imp, b)[1] for b in range(total + 2)]
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))


def test_rho_conversion_and_clamp(recwarn):
    for t_fp, t_bp in [(1.0, 2.0), (3.0, 5.0), (10.0, 7.0)]:
        for rho in (0.5, 0.7, 0.9, 1.0):
            rho_bp, clamped = backward_budget_fraction(rho, t_fp, t_bp)
            if not clamped:
                assert (t_fp + rho_bp * t_bp) / (t_fp + t_bp) == pytest.approx(rho)
                assert effective_rho(rho_bp, t_fp, t_bp) == pytest.approx(rho)
    # ρ below the forward share (1/3 here) leaves no backward budget: clamped to 0.05
    assert backward_budget_fraction(0.2, 1.0, 2.0) == (RHO_BP_FLOOR, True)
    assert backward_budget_fraction(0.34, 1.0, 2.0)[1] is False
    # quantisation rounds up: an in-budget integer mask is in budget in real FLOPs
    q_dy, q_dw = quantize([0.0, 1.01, 2.5], [3.0, 0.0, 0.2], t_bp=6.71, tq=100)
    assert q_dy == [0, 16, 38] and q_dw == [45, 0, 3]


def test_low_rho_warns_with_effective_value(tmp_path):
    L.seed_everything(0)
    module = _llama(2)
    module.set_optimizer("torch.optim.AdamW", lr=1e-3)
    cb = GreenTrainer(rho=0.05, interval=1, interval_unit="step", plot=False)
    warning = r"rho=0.05 is below .*clamped to 0.05.*effective rho of this selection is 0\.\d+"
    with pytest.warns(UserWarning, match=warning):
        trainer = _trainer(tmp_path, 2, [cb])
        trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 2
    assert sum(cb.history[-1]["mask"]) == 1  # nothing fitted: the cheapest useful tensor trained


# ------------------------------------------------------------------------------------------ FLOPs model
def test_profile_sanity_and_matches_flop_counter():
    torch.manual_seed(0)
    module = _llama(2)
    batch = _batch(2, 16)
    tokens = 2 * 16
    prof = GreenTrainer.profile(module, batch)
    # backward order: the LM head first, the input embeddings last
    assert prof.names[0] == "lm_head.weight" and prof.names[-1] == "model.embed_tokens.weight"
    linear_fwd = 0.0
    for node in prof.nodes:
        mod = dict(module.model.named_modules())[node["name"]] if node["kind"] == "module" else None
        if isinstance(mod, torch.nn.Linear):  # every linear: t_dy = t_dw = 2·B·N·D_in·D_out FLOPs
            expected = 2 * tokens * mod.in_features * mod.out_features
            assert node["t_fp"] == node["t_dy"] == node["t_dw"] == expected, node
            linear_fwd += expected
    pseudo = [n for n in prof.nodes if n["kind"] == "pseudo"]
    assert len(pseudo) == 2 and all(n["name"].endswith("self_attn.<ops>") for n in pseudo)
    for n in pseudo:  # SDPA forward 2 matmuls, backward 5 (the counter's formula)
        assert n["t_dy"] == pytest.approx(2.5 * n["t_fp"]) and n["t_fp"] > 0
    attn_fwd = sum(n["t_fp"] for n in pseudo)
    # Σ(t_dy + t_dw) = 2·(matmul part of t_fp), + the attention core's extra half
    assert prof.t_bp == pytest.approx(2 * linear_fwd + 2.5 * attn_fwd)
    assert prof.t_fp == pytest.approx(linear_fwd + attn_fwd)
    # and both agree with FlopCounterMode on the real step
    assert prof.t_fp == measure_forward_flops(module, batch)
    assert prof.t_fp + prof.t_bp == measure_step_flops(module, batch)


def test_profile_gpt2_and_bert_match_flop_counter():
    from lightning_peft import SequenceClassifier

    gpt2 = CausalLM(backbone="tiny-gpt2", head=FullFineTune())
    bert = SequenceClassifier(backbone="tiny-bert", head=FullFineTune())
    for module, batch in ((gpt2, _batch(2, 16)), (bert, {**_batch(2, 16), "labels": torch.tensor([0, 1])})):
        prof = profile_flops(module, batch)
        assert prof.t_fp + prof.t_bp == measure_step_flops(module, batch)
        assert all(n >= 0 for n in prof.t_dy + prof.t_dw)
    prof = profile_flops(gpt2, _batch(2, 16))
    # the tied input embedding / LM head sits at its deepest use and pays the LM head's weight gradient
    assert prof.names[-1] == "transformer.wte.weight" and prof.t_dw[-1] > 0


@pytest.fixture(scope="module")
def llama4():
    torch.manual_seed(0)
    module = _llama(4)
    batch = _batch(4, 64)
    return module, batch, profile_flops(module, batch), measure_step_flops(module, batch)


@pytest.mark.parametrize("rho", [0.4, 0.5, 0.7])
def test_measured_flops_ratio_within_rho(llama4, rho):
    module, batch, prof, full = llama4
    rng = random.Random(int(rho * 10))
    for _ in range(2):
        imp = [rng.random() for _ in prof.names]
        sel = plan_selection(prof, imp, rho)
        assert any(sel.mask) and not all(sel.mask)
        try:
            apply_mask(module, prof.names, sel.mask)
            measured = measure_step_flops(module, batch)
        finally:
            apply_mask(module, prof.names, [True] * len(prof.names))
        assert measured / full <= rho + 0.03
        assert measured / full <= sel.predicted_rho + 1e-9  # the model never under-predicts
        assert sel.predicted_rho <= rho + 1e-9


def test_flops_difference_of_two_masks_matches_model(llama4):
    module, batch, prof, full = llama4

    def upto(layer):  # everything from layer `layer` up to the loss
        return [not n.startswith("model.embed_tokens") and not any(f"layers.{i}." in n for i in range(layer))
                for n in prof.names]

    measured, predicted = [], []
    for mask in (upto(3), upto(1)):
        try:
            apply_mask(module, prof.names, mask)
            measured.append(measure_step_flops(module, batch))
        finally:
            apply_mask(module, prof.names, [True] * len(prof.names))
        predicted.append(prof.cost(mask))
    assert measured[1] - measured[0] == pytest.approx(predicted[1] - predicted[0], rel=0.1)
    assert measured[1] - measured[0] > 0.2 * full


# ------------------------------------------------------------------------------------------ importance
def _warm_optimizer(module, batch, opt, sched, steps=2):
    for _ in range(steps):
        loss, _ = module.compute_loss(batch)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_importance_pass_is_side_effect_free():
    torch.manual_seed(0)
    module = _llama(2)
    batch = _batch(2, 16)
    params = [p for p in module.model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=10)
    _warm_optimizer(module, batch, opt, sched)
    names = [n for n, _ in module.model.named_parameters()][::2]
    before_w = _params(module)
    import copy

    before_opt = copy.deepcopy(opt.state_dict())
    before_epoch, before_lr = sched.last_epoch, [g["lr"] for g in opt.param_groups]
    rng = torch.get_rng_state()
    raw = tensor_importance(module, batch, opt, names)
    assert any(r != 0 for r in raw)
    for n, p in module.model.named_parameters():
        assert torch.equal(p, before_w[n]), n
        assert p.grad is None and p.requires_grad
    after_opt = opt.state_dict()
    assert after_opt["param_groups"] == before_opt["param_groups"]
    assert after_opt["state"].keys() == before_opt["state"].keys()
    for k, s in before_opt["state"].items():
        for key, v in s.items():
            assert torch.equal(after_opt["state"][k][key], v), (k, key)
    assert sched.last_epoch == before_epoch and [g["lr"] for g in opt.param_groups] == before_lr
    assert torch.equal(torch.get_rng_state(), rng)


def test_importance_sign_with_sgd():
    torch.manual_seed(0)
    module = _llama(2)
    batch = _batch(2, 16)
    lr = 1e-4
    opt = torch.optim.SGD(module.model.parameters(), lr=lr)
    names = [n for n, _ in module.model.named_parameters()]
    loss, _ = module.compute_loss(batch)
    loss.backward()
    sq = {n: float((p.grad.double() ** 2).sum()) for n, p in module.model.named_parameters()}
    module.model.zero_grad(set_to_none=True)
    raw = tensor_importance(module, batch, opt, names)
    for n, r in zip(names, raw):
        if sq[n] > 1e-12:  # I = −Î ≈ lr·‖g‖² > 0
            assert -r > 0, n
            assert -r == pytest.approx(lr * sq[n], rel=0.05), n


# ------------------------------------------------------------------------------------------ backprop stops
def test_backprop_stops_below_the_deepest_selected_tensor():
    torch.manual_seed(0)
    module = _llama(3)
    batch = _batch(2, 16)
    prof = profile_flops(module, batch)
    deepest = 1  # train layer 1 (its o_proj and everything above), nothing below
    mask = [not n.startswith("model.embed_tokens") and not any(f"layers.{i}." in n for i in range(deepest))
            and "layers.1.self_attn.q_proj" not in n and "layers.1.self_attn.k_proj" not in n
            and "layers.1.self_attn.v_proj" not in n and "layers.1.input_layernorm" not in n
            for n in prof.names]
    fired: set[int] = set()
    handles = []
    for i, layer in enumerate(module.model.model.layers):
        def hook(mod, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            if h.requires_grad:
                h.register_hook(lambda g: fired.add(i))
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    apply_mask(module, prof.names, mask)
    try:
        loss, _ = module.compute_loss(batch)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    assert fired == {2}  # only the layer above the deepest selected one receives an input gradient
    params = dict(module.model.named_parameters())
    for n, m in zip(prof.names, mask):
        assert (params[n].grad is None) != m, n


# ------------------------------------------------------------------------------------------ Trainer runs
_trainer = cpu_trainer


def _data():
    return SyntheticSFTDataModule(task="copy", num_train=48, num_val=8, batch_size=8, num_digits=2, seed=0)


def _gt_module():
    module = _llama(2)
    module.set_optimizer("torch.optim.AdamW", lr=1e-2, weight_decay=0.01)
    return module


def test_resume_equals_uninterrupted(tmp_path):
    """6 batches per epoch, selection every 3 steps; interrupt at step 4 (mid-interval), resume to 10."""
    def gt():
        return GreenTrainer(rho=0.5, interval=3, interval_unit="step", plot=False)

    L.seed_everything(0)
    full, cb_full = _gt_module(), gt()
    trainer = _trainer(tmp_path / "a", 10, [cb_full])
    trainer.fit(full, datamodule=_data())
    assert trainer.global_step == 10  # the importance passes are not training steps
    assert [h["step"] for h in cb_full.history] == [0, 3, 6, 9]

    L.seed_everything(0)
    first = _gt_module()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "b"), every_n_train_steps=4, save_top_k=-1)
    _trainer(tmp_path / "b", 4, [gt(), ckpt]).fit(first, datamodule=_data())
    path = glob.glob(str(tmp_path / "b" / "*step=4*.ckpt"))[0]
    L.seed_everything(123)
    resumed, cb_res = _gt_module(), gt()
    _trainer(tmp_path / "c", 10, [cb_res]).fit(resumed, datamodule=_data(), ckpt_path=path)

    assert cb_res.history == cb_full.history  # same masks; no re-selection at the resume point
    a, b = _params(full), _params(resumed)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6)
    init = _params(_gt_module())
    ever = [any(h["mask"][i] for h in cb_full.history) for i in range(len(cb_full.candidates))]
    for n, e in zip(cb_full.candidates, ever):  # never selected: bit-identical; selected: moved
        assert torch.equal(a[n], init[n]) != e, n
    assert not all(ever)


def test_logs_and_draws_each_selection(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    module = _gt_module()
    cb = GreenTrainer(rho=0.6, interval=2, interval_unit="step", importance_batch="fixed")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, default_root_dir=str(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=CSVLogger(str(tmp_path)), callbacks=[cb])
    trainer.fit(module, datamodule=_data())
    pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(trainer.log_dir, "greentrainer_sel*.png")))
    assert pngs == ["greentrainer_sel1.png", "greentrainer_sel2.png"]
    metrics = open(os.path.join(trainer.log_dir, "metrics.csv")).read()
    for key in ("selected_param_fraction", "predicted_flops_saving", "predicted_rho"):
        assert f"greentrainer/{key}" in metrics
    assert 0 < cb.last_metrics["greentrainer/selected_param_fraction"] < 1
    assert cb.last_metrics["greentrainer/predicted_rho"] <= 0.6 + 1e-9
    assert cb.state_dict()["fixed_batch"]["input_ids"].shape[0] == 8  # the run's first batch, kept for resume
    # after fit every candidate is trainable again (the module can be re-used)
    assert all(p.requires_grad for p in module.model.parameters())


@pytest.mark.ddp
def test_ddp_two_cpu_ranks_identical(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{save_last: true, dirpath: {tmp_path / 'ckpt'}}}\n"
        "    - class_path: lightning_peft.callbacks.GreenTrainer\n"
        "      init_args: {rho: 0.5, interval: 2, interval_unit: step, plot: false}\n"
        "    - class_path: helpers.DumpTrainable\n"
        f"      init_args: {{out_dir: {tmp_path / 'dump'}}}\n"
    )
    args = ["--config", str(REPO / "examples" / "greentrainer.yaml"),
           "--config", str(extra), "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2",
           "--trainer.accelerator", "cpu", "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0",
           "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
           "--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.num_train", "128",
           "--data.init_args.batch_size", "8"]
    r0, r1 = run_cli_ranks(args, tmp_path, tmp_path / "dump")
    assert r0["step"] == r1["step"] == 5
    assert r0["trainable"] == r1["trainable"]
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), f"ranks differ on {name}"
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    gt_state = next(v for k, v in state.items() if k.startswith("GreenTrainer"))
    history = gt_state["history"]
    assert [h["step"] for h in history] == [0, 2, 4]  # re-selected inside the run
    init = {n: p.detach() for n, p in _llama(4).model.named_parameters()}
    never = [n for i, n in enumerate(gt_state["candidates"]) if not any(h["mask"][i] for h in history)]
    ever = [n for n in gt_state["candidates"] if n not in never]
    assert never and ever
    for n in never:
        assert torch.equal(r0["params"][n], init[n]), n
    assert any(not torch.equal(r0["params"][n], init[n]) for n in ever)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("rho", [0, 0.0, 1.5, -0.1])
def test_bad_rho(rho):
    with pytest.raises(GreenTrainerError, match=r"rho=.* must be in \(0, 1\]"):
        GreenTrainer(rho=rho)


def test_lora_head_is_refused(tmp_path):
    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4))
    with pytest.raises(GreenTrainerError, match="FullFineTune"):
        _trainer(tmp_path, 1, [GreenTrainer()]).fit(module, datamodule=_data())


def test_unsupported_architectures_are_one_sentence():
    """OPT and BLOOM (the paper's families) run now (tests/test_family_matrix_selection.py); a family outside
    the architecture table, and T5's two block stacks, are refused in one sentence naming the model_type."""
    from transformers import T5Config, T5ForConditionalGeneration

    module = _llama(1)
    module.model = T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                                       vocab_size=260))
    with pytest.raises(GreenTrainerError, match=r"GreenTrainer cannot run on model_type 't5' \(T5\): it needs one "
                                                r"stack of blocks \(it has 2 block stacks\)\.$"):
        GreenTrainer().setup(L.Trainer(accelerator="cpu", logger=False), module, "fit")
    module.model = torch.nn.Sequential(torch.nn.Embedding(260, 8), torch.nn.Linear(8, 260))
    with pytest.raises(GreenTrainerError, match=r"model_type None \(Sequential\) is not in the architecture table"):
        GreenTrainer.profile(module, _batch(1, 8))


def test_ddp_without_find_unused_parameters_is_refused(tmp_path):
    """Checked on the wrapped DistributedDataParallel's public find_unused_parameters, after the wrap."""
    from helpers import fit_under_one_process_ddp

    with pytest.raises(GreenTrainerError, match="ddp_find_unused_parameters_true"):
        fit_under_one_process_ddp(tmp_path, _gt_module(), GreenTrainer(plot=False), _data())
