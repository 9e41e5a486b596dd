"""Trainer-level behaviour: adapter-only checkpoints, exact resume, CLI, export, per-group LRs."""

from __future__ import annotations

import glob
import os

import lightning as L
import pytest
import torch
from helpers import REPO, causal_batch, cpu_trainer, fit_interrupted_and_whole
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.checkpoints import load_module
from lightning_peft.cli import main
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.export import export
from lightning_peft.heads import FullFineTune, LoRA, PeftHead

QUICKSTART = str(REPO / "examples" / "quickstart.yaml")


_trainer = cpu_trainer


def _data():
    return SyntheticSFTDataModule(num_train=48, num_val=8, batch_size=8, num_digits=2, seed=0)


def _module(head=None):
    module = CausalLM(backbone="tiny-llama", head=head or LoRA(r=4, target_modules=["q_proj", "v_proj"]))
    module.set_optimizer("torch.optim.AdamW", lr=1e-2, weight_decay=0.01)
    return module


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def _adalora():
    return PeftHead({"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj"],
                     "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 10})


@pytest.mark.parametrize("make_head", [None, _adalora], ids=["lora", "adalora"])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, make_head):
    """6 batches per epoch; interrupt at step 4 (mid-epoch), resume to step 10 (crosses an epoch)."""
    def build():
        return _module(make_head() if make_head else None)

    (full, _), (resumed, _) = fit_interrupted_and_whole(build, _data, tmp_path, total=10, cut=4)

    a, b = _trainable(full), _trainable(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    # and the run really moved
    assert any(not torch.equal(a[n], v) for n, v in _trainable(build()).items())


def test_checkpoint_is_adapter_only_and_loads_weights_only(tmp_path):
    module = _module()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    _trainer(tmp_path, 3, [ckpt]).fit(module, datamodule=_data())
    raw = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    expected = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(raw["state_dict"]) == expected
    assert raw["hyper_parameters"]["head"]["class_path"] == "lightning_peft.heads.lora.LoRA"
    assert "optimizer_states" in raw and "loops" in raw
    reloaded = load_module(str(tmp_path / "last.ckpt"))
    batch = causal_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                   module.eval().model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                   rtol=0, atol=0)


def test_full_finetune_checkpoint_holds_everything(tmp_path):
    module = _module(FullFineTune())
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    _trainer(tmp_path, 2, [ckpt]).fit(module, datamodule=_data())
    raw = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(raw["state_dict"]) == set(module.state_dict())


def test_checkpoint_with_other_head_is_refused(tmp_path):
    module = _module()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    _trainer(tmp_path, 1, [ckpt]).fit(module, datamodule=_data())
    other = _module(LoRA(r=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="trained with head"):
        _trainer(tmp_path / "x", 2).fit(other, datamodule=_data(), ckpt_path=str(tmp_path / "last.ckpt"))


def test_loraplus_param_groups_get_scaled_lr():
    module = CausalLM(head=LoRA(r=4, target_modules=["q_proj"], loraplus_lr_ratio=16))
    module.set_optimizer("torch.optim.AdamW", lr=1e-3)
    opt = module.configure_optimizers()
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [1e-3, pytest.approx(16e-3)]
    b_params = {id(p) for n, p in module.model.named_parameters() if "lora_B" in n}
    big = [g for g in opt.param_groups if g["lr"] > 1e-3][0]
    assert {id(p) for p in big["params"]} == b_params


def test_adalora_allocator_is_stepped_by_the_trainer(tmp_path):
    head = PeftHead({"peft_type": "ADALORA", "init_r": 4, "target_r": 1, "target_modules": ["q_proj", "v_proj"],
                     "tinit": 1, "tfinal": 1, "deltaT": 1})
    module = _module(head)
    _trainer(tmp_path, 8).fit(module, datamodule=_data())
    cfg = module.model.peft_config["default"]
    assert cfg.total_step == 8  # filled in from the run
    assert cfg.rank_pattern, "update_and_allocate never ran"
    kept = sum(int(sum(v)) for v in cfg.rank_pattern.values())
    assert kept == 1 * 4  # target_r per module x 4 modules: the budget was reached


def test_cli_fit_export_merged_and_reload(tmp_path):
    root = tmp_path / "run"
    main(["fit", "--config", QUICKSTART, "--trainer.max_steps", "4", "--trainer.max_epochs", "1",
          "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
          "--trainer.limit_val_batches", "2", "--data.init_args.num_train", "256",
          "--trainer.val_check_interval", "1.0"])
    last = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    assert last, "quickstart must save last.ckpt"
    out = tmp_path / "merged"
    report = export(last[0], str(out), merge=True)
    assert report["max_abs_logit_diff"] <= 1e-5
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    trained = load_module(last[0])
    batch = causal_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, trained.model(**inputs).logits, rtol=0, atol=1e-5)
    # the saved config.yaml re-runs the run
    config = glob.glob(str(root / "**" / "config.yaml"), recursive=True)[0]
    main(["fit", "--config", config, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "rerun"),
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"])
    assert glob.glob(str(tmp_path / "rerun" / "**" / "*.ckpt"), recursive=True)


def test_cli_peft_head_override_and_unmerged_peft_export(tmp_path):
    root = tmp_path / "run"
    main(["fit", "--config", QUICKSTART, "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root),
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
          "--model.head", "lightning_peft.heads.PeftHead", "--model.head.config",
          '{"peft_type": "IA3", "target_modules": ["k_proj","v_proj","down_proj"], '
          '"feedforward_modules": ["down_proj"]}'])
    last = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)[0]
    trained = load_module(last)
    assert trained.head.peft_type == "IA3"
    out = tmp_path / "adapter"
    export(last, str(out), merge=False)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    from peft import PeftModel

    from lightning_peft.backbones import load_backbone

    base, _ = load_backbone("tiny-llama")
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    batch = causal_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained.model(**inputs).logits, rtol=0, atol=1e-5)
    # the adapter is not a no-op: without it the logits differ
    with loaded.disable_adapter(), torch.no_grad():
        assert not torch.allclose(loaded(**inputs).logits, trained.model(**inputs).logits, atol=1e-4)


def test_classifier_trains_and_exports(tmp_path):
    from lightning_peft.datamodules import ClassificationDataModule

    path = tmp_path / "train.jsonl"
    import json

    with open(path, "w") as f:
        for i in range(64):
            f.write(json.dumps({"text": ("good " if i % 2 else "bad ") * 3, "label": ["neg", "pos"][i % 2]}) + "\n")
    data = ClassificationDataModule(train_file=str(path), label_names=["neg", "pos"], val_fraction=0.25,
                                    batch_size=8, max_length=32)
    module = SequenceClassifier(backbone="tiny-bert", num_labels=2, head=LoRA(r=4, target_modules=["query", "value"]))
    module.set_optimizer("torch.optim.AdamW", lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ckpt])
    trainer.fit(module, datamodule=data)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert metrics["val/acc"] == 1.0  # a separable toy task
    report = export(str(tmp_path / "ck" / "last.ckpt"), str(tmp_path / "merged"), merge=True)
    assert report["max_abs_logit_diff"] <= 1e-5


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_cli_other_subcommands_run_on_a_checkpoint(subcommand, tmp_path):
    root = tmp_path / "run"
    main(["fit", "--config", QUICKSTART, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root),
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
          "--data.init_args.num_train", "64", "--data.init_args.num_val", "16"])
    last = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)[0]
    cli_args = [subcommand, "--config", QUICKSTART, "--ckpt_path", last, "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(tmp_path / subcommand), "--data.init_args.num_train", "64",
                "--data.init_args.num_val", "16", "--trainer.callbacks", "[]"]
    main(cli_args)


def test_objective_honours_ignore_index_and_token_weights():
    from lightning_peft.objectives import TokenCrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, 4, 5, 6]])
    weights = torch.tensor([[0.0, 1.0, 0.5, 1.0, 2.0], [0.0, 0.0, 1.0, 1.0, 0.0]])
    loss = TokenCrossEntropy()(logits, {"labels": labels, "token_weights": weights})
    # brute force: position t predicts labels[t] from logits[t-1]
    num, den = 0.0, 0.0
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != -100:
                ce = -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
                num += weights[b, t] * ce
                den += weights[b, t]
    torch.testing.assert_close(loss, num / den)
    plain = TokenCrossEntropy()(logits, {"labels": labels})
    valid = [(b, t) for b in range(2) for t in range(1, 5) if labels[b, t] != -100]
    manual = sum(-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b, t in valid) / len(valid)
    torch.testing.assert_close(plain, manual)


def test_gradient_checkpointing_and_local_folder_backbone(tmp_path):
    from lightning_peft.backbones import load_backbone

    model, tok = load_backbone("tiny-llama")
    model.save_pretrained(tmp_path / "folder")
    tok.save_pretrained(tmp_path / "folder")
    batch = causal_batch()
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
    plain = CausalLM(backbone="tiny-llama", head=LoRA(r=4, target_modules=["q_proj"]))
    torch.manual_seed(0)
    ckpt = CausalLM(backbone=str(tmp_path / "folder"), head=LoRA(r=4, target_modules=["q_proj"]),
                    gradient_checkpointing=True)
    assert ckpt.model.base_model.model.is_gradient_checkpointing
    plain.train(), ckpt.train()
    losses = []
    for m in (plain, ckpt):
        loss, _ = m.compute_loss(batch)
        loss.backward()
        losses.append((loss.detach(), {n: p.grad.clone() for n, p in m.model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    for n in losses[0][1]:
        torch.testing.assert_close(losses[0][1][n], losses[1][1][n])


def test_embedded_default_is_the_quickstart_and_runs_without_a_config(tmp_path, monkeypatch):
    from lightning_peft.cli import embedded_default

    assert open(embedded_default()).read() == open(QUICKSTART).read(), "keep the two copies identical"
    monkeypatch.chdir(tmp_path)
    main(["fit", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert glob.glob(str(tmp_path / "run" / "**" / "last.ckpt"), recursive=True)
