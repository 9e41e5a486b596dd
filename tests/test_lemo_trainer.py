"""TokenElimination under the Trainer: the calibration phase, schedule, resume, full fine-tuning, DDP."""

from __future__ import annotations

import glob

import lightning as L
import pytest
import torch
from helpers import REPO, cpu_threads, cpu_trainer, fit_interrupted_and_whole, run_cli_ranks

from lightning_peft import CausalLM
from lightning_peft.callbacks import TokenElimination
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.heads import FullFineTune, LoRA

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

cpu_threads()


_trainer = cpu_trainer


def _data():
    return SyntheticSFTDataModule(task="copy", num_digits=6, num_train=64, num_val=8, batch_size=8, seed=0)


def _module(head=None):
    module = CausalLM("tiny-llama", head=head or LoRA(r=4, target_modules=ATTN),
                      backbone_config={"num_hidden_layers": 4})
    module.set_optimizer("torch.optim.AdamW", lr=1e-2)
    return module


def _cb(**kw):
    args = {"block_size": 4, "keep_ratio": 0.5, "dense_layers": [0], "calibration_batches": 2,
            "predictor_steps": 20, "predictor_hidden": [16, 32]}
    args.update(kw)
    return TokenElimination(**args)


def _predictor_weights(cb):
    return {f"{i}.{k}": v.clone() for i, p in cb.predictors.items() for k, v in p.state_dict().items()}


def test_calibration_phase_trains_frozen_predictors(tmp_path):
    L.seed_everything(0)
    module, cb = _module(), _cb()
    cb.selection_log = []
    snapshots = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                snapshots["step3"] = _predictor_weights(cb)

    trainer = _trainer(tmp_path, 5, [cb, Snap()])
    trainer.fit(module, datamodule=_data())
    assert sorted(cb.predictors) == [1, 2, 3]
    assert set(cb.recall) == {1, 2, 3} and all(0.0 <= r <= 1.0 for r in cb.recall.values())
    assert "lemo/recall" in trainer.callback_metrics and "lemo/kept_fraction" in trainer.callback_metrics
    # steps 0-1 dense (calibration), steps 2-4 eliminate in the 3 sparsified layers
    assert [layer for layer, _ in cb.selection_log] == [1, 2, 3] * 3
    assert cb.state_dict()["calibrated_at"] == 2  # a ramp would start here
    # predictors are frozen, outside the module and the optimizer, and unchanged by fine-tuning
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    module_params = {id(p) for p in module.parameters()}
    for p in cb.predictors.values():
        assert all(not q.requires_grad and id(q) not in opt_params | module_params for q in p.parameters())
    end = _predictor_weights(cb)
    assert all(torch.equal(end[k], v) for k, v in snapshots["step3"].items())
    # the callback state is plain and loads with weights_only
    torch.save(cb.state_dict(), tmp_path / "cb.pt")
    again = _cb()
    again.load_state_dict(torch.load(tmp_path / "cb.pt", weights_only=True))
    again.attach(_module().model)
    assert all(torch.equal(_predictor_weights(again)[k], v) for k, v in end.items())
    assert again.recall == cb.recall


def test_resume_restores_predictors_and_continues_exactly(tmp_path):
    def callbacks():
        cb = _cb()
        cb.selection_log = []
        return [cb]

    (full, (cb_full,)), (resumed, (cb_resumed,)) = fit_interrupted_and_whole(_module, _data, tmp_path, total=6,
                                                                           cut=4, callbacks=callbacks)
    assert [layer for layer, _ in cb_resumed.selection_log] == [1, 2, 3] * 2  # no new calibration phase
    for k, v in _predictor_weights(cb_full).items():
        assert torch.equal(_predictor_weights(cb_resumed)[k], v)
    a = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_full_finetuning_and_exact_threshold_policy(tmp_path):
    L.seed_everything(0)
    module = _module(FullFineTune())
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    cb = _cb(scorer="exact", policy="threshold", calibration_batches=1)
    cb.selection_log = []
    _trainer(tmp_path, 3, [cb]).fit(module, datamodule=_data())
    assert sorted(cb.thresholds) == [1, 2, 3] and all(t > 0 for t in cb.thresholds.values())
    assert not cb.predictors
    assert len(cb.selection_log) == 3 * 2
    moved = [n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("mlp" in n for n in moved) and any("self_attn" in n for n in moved)


def test_warmup_and_ramp_schedule():
    cb = TokenElimination(block_size=4, keep_ratio=0.5, dense_layers=[0], scorer="exact", warmup_steps=2,
                          ramp_steps=4, layer_ratios={3: 0.25}).attach(_module().model)
    got = []
    for step in range(8):
        cb.set_step(step)
        got.append((cb.current_ratio(0), cb.current_ratio(2), cb.current_ratio(3)))
    assert got[0] == got[1] == (None, None, None)
    assert got[2] == (None, 1 - 0.25 * 0.5, 1 - 0.25 * 0.75)
    assert got[5] == got[7] == (None, 0.5, 0.25)


DDP_ELIMINATION = {"block_size": 4, "keep_ratio": 0.5, "dense_layers": [0], "calibration_batches": 2,
                   "predictor_steps": 20, "predictor_hidden": [16, 32]}


@pytest.mark.ddp
def test_token_elimination_ddp_two_cpu_ranks_identical(tmp_path):
    """2-process CLI run with the default logger. DDP keeps parameters equal whatever each rank selects, so the
    test compares decisions: both ranks eliminate at the same steps in the same layers with rank 0's
    predictors, and every kept block on either rank is what a single process selects on that rank's batch
    from the model state the step started with."""
    init = ", ".join(f"{k}: {v}" for k, v in DDP_ELIMINATION.items())
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "model:\n  init_args:\n    backbone_config: {num_hidden_layers: 4}\n"
        "    head:\n      class_path: lightning_peft.heads.LoRA\n"
        "      init_args: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}\n"
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning_peft.callbacks.TokenElimination\n"
        f"      init_args: {{{init}}}\n"
        "    - class_path: helpers.DumpTrainable\n"
        f"      init_args: {{out_dir: {tmp_path / 'dump'}}}\n"
        "    - class_path: lemo_common.SelectionRecorder\n"
        f"      init_args: {{out_dir: {tmp_path / 'selections'}}}\n"
    )
    args = ["--config", str(REPO / "examples" / "quickstart.yaml"), "--config", str(extra),
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "5", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.num_train", "256",
            "--data.init_args.batch_size", "8", "--trainer.val_check_interval", "1.0"]
    r0, r1 = run_cli_ranks(args, tmp_path, tmp_path / "dump")
    assert glob.glob(str(tmp_path / "run" / "lightning_logs" / "version_0" / "*")), "the default logger wrote nothing"
    assert r0["step"] == r1["step"] == 5
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), f"ranks differ on {name}"
    p0 = r0["callbacks"]["TokenElimination"]["predictors"]["weights"]
    p1 = r1["callbacks"]["TokenElimination"]["predictors"]["weights"]
    assert sorted(p0) == ["1", "2", "3"]
    for layer in p0:
        for k in p0[layer]:
            assert torch.equal(p0[layer][k], p1[layer][k]), "ranks use different predictors"
    lora_moved = [n for n in r0["trainable"] if "lora_B" in n and r0["params"][n].abs().sum() > 0]
    assert lora_moved

    # the decisions: same schedule on both ranks (steps 0-1 calibrate densely, 2-4 eliminate in layers 1-3)
    s0, s1 = (torch.load(tmp_path / "selections" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for rank in (s0, s1):
        assert [(s["step"], sorted(s["kept"])) for s in rank["steps"]] == (
            [(0, []), (1, [])] + [(step, ["1", "2", "3"]) for step in (2, 3, 4)])
    assert not torch.equal(s0["steps"][2]["batch"]["input_ids"], s1["steps"][2]["batch"]["input_ids"])
    # ... and each rank's kept blocks are what one process selects on its batch with rank 0's predictors
    module = _module(LoRA(r=4, alpha=8, dropout=0.0, target_modules=ATTN)).train()
    replay = TokenElimination(**DDP_ELIMINATION)
    replay.load_state_dict(s0["eliminator"])
    replay.attach(module.model)
    for rank in (s0, s1):
        for record in rank["steps"][2:]:
            module.model.load_state_dict(record["state"])
            replay.set_step(record["step"])
            replay.selection_log = []
            with torch.no_grad():
                module.compute_loss(record["batch"])
            block = replay.block_size
            got = {str(layer): idx[:, ::block] // block for layer, idx in replay.selection_log}
            assert sorted(got) == sorted(record["kept"])
            for layer, kept in record["kept"].items():
                assert torch.equal(got[layer], kept), f"step {record['step']} layer {layer}: rank kept other blocks"


def test_long_context_example_runs(tmp_path):
    from lightning_peft.cli import main

    root = tmp_path / "run"
    main(["fit", "--config", str(REPO / "examples" / "long_context_lemo.yaml"), "--trainer.max_steps", "3",
          "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3", "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
          "--data.init_args.num_digits", "150", "--data.init_args.num_train", "16", "--data.init_args.max_length",
          "320", "--trainer.callbacks.init_args.calibration_batches", "2",
          "--trainer.callbacks.init_args.predictor_steps", "10"])
    ckpt = torch.load(glob.glob(str(root / "**" / "last.ckpt"), recursive=True)[0], weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if "TokenElimination" in k)
    assert sorted(state["predictors"]["weights"]) == ["3", "4", "5", "6"]  # 8 layers: 0-2 and 7 dense
    assert ckpt["global_step"] == 3
