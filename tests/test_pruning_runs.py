"""Pruners inside a run: the DataModule hook (context, token selector, epoch end, state), Trainer runs,
2-process DDP, exact resume, bad input and tokenizers without a pad token."""

from __future__ import annotations

import io
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import cpu_threads, fit_interrupted_and_whole, run_cli_ranks, trainable_state
from pruning_helpers import load_records, make_module, padded_batch, replay, train_forward_selection

from lightning_peft import CausalLM
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.datamodules.pruning import QTuning, SSToken
from lightning_peft.heads import LoRA

cpu_threads()


@pytest.fixture(scope="module")
def module():
    return make_module()


def test_validation_batches_untouched(module):
    dm = SyntheticSFTDataModule(task="copy", num_digits=3, num_train=16, num_val=4, batch_size=4,
                                pruner=QTuning(sample_ratio=0.5))
    batch = padded_batch(module.tokenizer)
    dm.trainer = SimpleNamespace(training=False, lightning_module=module)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = SimpleNamespace(training=True, lightning_module=module)
    assert "token_weights" in dm.on_after_batch_transfer(batch, 0)  # training batches are pruned


def test_datamodule_binds_context_registers_selector_and_relays_epoch_end(module):
    """The documented pruner hook: a PrunerContext from the trainer's public attributes before each training
    batch, a TokenSelector pruner registered as module.token_selector, the epoch end passed on."""
    import contextlib

    seen = []

    class Recorder(SSToken):
        def __call__(self, batch, model=None):
            seen.append(("call", self.context))
            return batch

        def on_train_epoch_end(self, trainer):
            seen.append(("epoch_end", trainer))

    pruner = Recorder()
    dm = SyntheticSFTDataModule(task="copy", num_digits=3, num_train=16, num_val=4, batch_size=4, pruner=pruner)
    trainer = SimpleNamespace(training=True, lightning_module=module, global_step=15, current_epoch=2,
                              num_training_batches=11, accumulate_grad_batches=2, precision="bf16-mixed",
                              precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
    dm.trainer = trainer
    try:
        dm.on_after_batch_transfer(padded_batch(None), 0)
        assert module.token_selector is pruner
    finally:
        module.token_selector = None
    ctx = seen[0][1]
    assert (ctx.module, ctx.global_step, ctx.epoch, ctx.num_training_batches, ctx.accumulate_grad_batches,
            ctx.precision, ctx.forward_context) == (module, 15, 2, 11, 2, "bf16-mixed", contextlib.nullcontext)
    # read from the bound context: epoch 2 starts at step 2 * ceil(11 / 2) = 12, so step 15 is the epoch's step 3,
    # past the warm-up of ceil(0.2 * 11 / 2) = 2 steps (the warm-up restarts every epoch)
    assert pruner.gamma_at() == 0.5
    dm.notify_train_epoch_end()
    assert seen[1] == ("epoch_end", trainer)


def test_datamodule_saves_and_restores_the_pruner_state(module):
    """The DataModule's state carries its pruner's (QTuning: the epoch's EU-plane points) and a fresh
    DataModule restores it; points from another epoch are dropped at the next recorded batch."""
    def data():
        return SyntheticSFTDataModule(task="copy", num_digits=3, num_train=16, num_val=4, batch_size=4,
                                      pruner=QTuning(sample_ratio=0.5))

    dm = data()
    dm.trainer = SimpleNamespace(training=True, lightning_module=module, global_step=0, current_epoch=0)
    dm.on_after_batch_transfer(padded_batch(None), 0)
    dm.trainer = None  # the pruner's state does not need a trainer
    state = dm.state_dict()
    assert len(state["pruner"]["points"]) == 4 and state["pruner"]["thresholds"] is not None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = data()
    restored.load_state_dict(torch.load(buffer, weights_only=True))  # plain values only
    assert restored.pruner.state_dict() == state["pruner"]
    assert restored.pruner._points == dm.pruner._points
    restored.trainer = SimpleNamespace(training=True, lightning_module=module, global_step=1, current_epoch=1)
    restored.on_after_batch_transfer(padded_batch(None, seed=1), 0)
    assert len(restored.pruner.state_dict()["points"]) == 4  # epoch 0's points left, epoch 1's recorded


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
    assert not any(type(cb).__module__.startswith("lightning_peft") for cb in trainer.callbacks)  # none appended


def test_trainer_run_sstoken(tmp_path):
    trainer, moved = run_trainer(tmp_path, SSToken(rel_warmup_steps=1))
    assert moved and trainer.global_step == 3
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "pruning/kept_token_fraction" in metrics and "pruning/gamma_t" in metrics


def check_selections(records, make_pruner, ranks=(0, 1), steps=3):
    """Each rank's recorded selections (see ``pruning_helpers.RecordingQTuning``): one per step, made with the
    same trainable state on every rank from different batches, and each equal to this process's own run of a
    fresh pruner on that rank's batch and state (QTuning: the kept rows, their labels and token weights;
    SSToken: the token weights of the training forward)."""
    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8)).train()
    assert all(len(records[r]) == steps for r in ranks), {r: len(records[r]) for r in ranks}
    for step in range(steps):
        recs = [records[r][step] for r in ranks]
        assert [rec["context"]["global_step"] for rec in recs] == [step] * len(ranks)
        for name, value in recs[0]["state"].items():  # DDP: every rank scores with the same model
            for rec in recs[1:]:
                assert torch.equal(rec["state"][name], value), (step, name)
        assert not torch.equal(recs[0]["batch"]["input_ids"], recs[1]["batch"]["input_ids"])  # rank-own data
        for rank, rec in zip(ranks, recs):
            out, weights = replay(make_pruner(), module, rec)
            want = rec["output"]
            assert torch.equal(out["input_ids"], want["input_ids"]), (rank, step)  # the kept rows
            assert torch.equal(out["labels"], want["labels"]), (rank, step)
            assert torch.equal(weights, want["token_weights"]), (rank, step)  # the kept tokens
            assert 0 < weights.sum() < (want["labels"] != -100).sum()  # really a selection


@pytest.mark.ddp
@pytest.mark.parametrize("name,init_args,make_pruner", [
    ("RecordingQTuning", "sample_ratio: 0.5, token_ratio: 0.5",
     lambda: QTuning(sample_ratio=0.5, token_ratio=0.5, plot_every_epoch=False)),
    ("RecordingSSToken", "gamma: 0.5, rho: 0.6", lambda: SSToken(gamma=0.5, rho=0.6)),
], ids=["qtuning", "sstoken"])
def test_ddp_two_ranks_identical(tmp_path, name, init_args, make_pruner):
    """2-process CLI run with the default logger (and QTuning's EU-plane picture) on: each rank records what
    its pruner selected at each step; the selections are compared across ranks and against a one-process
    replay (parameters alone would agree whatever each rank selected: DDP averages the gradients)."""
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        "seed_everything: 0\n"
        "trainer:\n  max_steps: 3\n  accelerator: cpu\n  devices: 2\n  strategy: ddp\n"
        f"  default_root_dir: {tmp_path / 'run'}\n  limit_train_batches: 3\n"  # default logger, pictures on
        "  enable_progress_bar: false\n  enable_checkpointing: false\n  limit_val_batches: 0\n"
        f"  callbacks:\n    - class_path: helpers.DumpTrainable\n      init_args: {{out_dir: {tmp_path / 'dump'}}}\n"
        "model:\n  class_path: lightning_peft.CausalLM\n  init_args:\n    backbone: tiny-llama\n"
        "    head: {class_path: lightning_peft.heads.LoRA, init_args: {r: 4, alpha: 8}}\n"
        "data:\n  class_path: lightning_peft.datamodules.SyntheticSFTDataModule\n  init_args:\n"
        "    task: copy\n    num_digits: 4\n    num_train: 64\n    num_val: 4\n    batch_size: 8\n"
        f"    pruner: {{class_path: pruning_helpers.{name}, init_args: {{out_dir: {tmp_path / 'sel'}, {init_args}}}}}\n"
    )
    r0, r1 = run_cli_ranks(["--config", str(cfg)], tmp_path, tmp_path / "dump")
    for pname in r0["params"]:
        assert torch.equal(r0["params"][pname], r1["params"][pname]), pname
    check_selections({r: load_records(tmp_path / "sel", r) for r in (0, 1)}, make_pruner)
    if "QTuning" in name:  # the epoch-end plot (a collective: log_dir) ran on both ranks without hanging
        assert list((tmp_path / "run").glob("**/eu_plane/epoch_0.png"))


def test_recorded_selections_replay_in_one_process(tmp_path):
    """The recording pruner and the replay used by the DDP test, on a one-process run (no DDP): the replay
    reproduces each step's selection, and a replay with another pruner's settings does not."""
    from pruning_helpers import RecordingQTuning

    L.seed_everything(0)
    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8))
    module.set_optimizer("torch.optim.AdamW", lr=1e-2)  # the state moves between steps
    dm = SyntheticSFTDataModule(task="copy", num_digits=4, num_train=24, num_val=4, batch_size=8,
                                pruner=RecordingQTuning(str(tmp_path / "sel"), sample_ratio=0.5, token_ratio=0.5))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    records = load_records(tmp_path / "sel", 0)
    assert [r["context"]["global_step"] for r in records] == [0, 1, 2]
    assert any(not torch.equal(v, records[2]["state"][n]) for n, v in records[0]["state"].items())
    fresh = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8)).train()
    for rec in records:
        out, weights = replay(QTuning(sample_ratio=0.5, token_ratio=0.5, plot_every_epoch=False), fresh, rec)
        assert torch.equal(out["input_ids"], rec["output"]["input_ids"])
        assert torch.equal(weights, rec["output"]["token_weights"])
    want = [rec["output"]["token_weights"] for rec in records]
    other = [replay(QTuning(sample_ratio=0.5, token_ratio=0.9, plot_every_epoch=False), fresh, rec)[1]
             for rec in records]
    assert any(o.shape != w.shape or not torch.equal(o, w) for o, w in zip(other, want))


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
                   {"scoring_precision": "fp8"}, {"prompt_neighbour_ppl": -1.0}, {"prompt_neighbour_ppl": "1"},
                   {"prompt_neighbour_ppl": float("inf")}):
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
    pruner = SSToken(gamma=0.0, rho=0.5)
    out = pruner(mixed, model=module)
    result, weights, _ = train_forward_selection(module, pruner, out)
    assert torch.isfinite(result.loss)
    kept = weights.sum(1)
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
            pruner = make()
            out = pruner({k: v.clone() for k, v in batch.items()}, model=module)
            if isinstance(pruner, SSToken):  # selects in the training forward, through the module's objective
                out["token_weights"] = train_forward_selection(module, pruner, out)[1]
            outs.append(out)
        assert torch.equal(outs[0]["token_weights"], outs[1]["token_weights"])
        assert torch.equal(outs[0]["labels"], outs[1]["labels"])
        eos_label = (outs[0]["labels"] == tok.eos_token_id)
        eos_weights = outs[0]["token_weights"][eos_label]
        assert eos_label.any() and (eos_weights == 1).any()  # EOS labels are response tokens, some kept
        if isinstance(pruner, SSToken):  # the rule's value at every EOS label: kept iff in the attention top-k
            from test_pruning_sstoken import _attention_topk_reference

            kept = _attention_topk_reference(module, eos_padded, 0.5)
            want = [float((b, j) in kept) for b, j in eos_label.nonzero().tolist()]
            assert eos_weights.tolist() == want and 0.0 in want
