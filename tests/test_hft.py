"""HalfFineTuning (HFT, arXiv 2404.18466): the spec's tests (shared/methods/hft.md §6) and Trainer behaviour."""

from __future__ import annotations

import glob
import os
import random

import lightning as L
import pytest
import torch
from helpers import REPO, causal_batch, class_batch, cpu_trainer, run_cli_ranks
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.callbacks import HalfFineTuning
from lightning_peft.callbacks.hft import HFTError
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.heads import FullFineTune, LoRA

MHA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 4}
GQA = dict(MHA, num_key_value_heads=2)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def llama(config=MHA, **kw):
    return CausalLM(backbone="tiny-llama", head=FullFineTune(**kw), backbone_config=config)


def trainable(module) -> set[str]:
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def llama_counts(names: set[str], n_layers: int) -> list[dict[str, int]]:
    """Per layer: how many attention / FFN / norm tensors train (read from parameter names only)."""
    out = []
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        out.append({
            "attn": sum(f"{pre}self_attn.{m}.weight" in names for m in ATTN),
            "ffn": sum(f"{pre}mlp.{m}.weight" in names for m in FFN),
            "norm": sum(f"{pre}{m}.weight" in names for m in NORMS),
        })
    return out


# ----------------------------------------------------------------------------- spec §6 test 1
@pytest.mark.parametrize("n_layers", [4, 3])
def test_llama_mask_structure_per_layer(n_layers):
    module = llama(dict(MHA, num_hidden_layers=n_layers))
    for seed, rnd in [(0, 0), (1, 0), (0, 1), (7, 3)]:
        hft = HalfFineTuning(seed=seed, first_round=rnd)
        names = set(hft.apply(module))
        assert names == trainable(module)
        counts = llama_counts(names, n_layers)
        assert all(c["attn"] == 2 for c in counts), counts
        assert all(c["norm"] == 1 for c in counts), counts
        assert all(c["ffn"] in (1, 2) for c in counts), counts
        n_two = sum(c["ffn"] == 2 for c in counts)
        if n_layers % 2 == 0:
            assert n_two == n_layers // 2
        else:  # odd L: the extra layer gets 1 or 2 (spec §3.1 note)
            assert n_two in (n_layers // 2, n_layers // 2 + 1)
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names


def test_train_embeddings_false_freezes_embeddings_and_lm_head():
    module = llama()
    names = set(HalfFineTuning(seed=0, train_embeddings=False).apply(module))
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    assert "model.norm.weight" in names
    assert all(c["attn"] == 2 for c in llama_counts(names, 4))


# ----------------------------------------------------------------------------- spec §6 test 2
def _block_fraction(module) -> float:
    params = dict(module.model.named_parameters())
    block = [n for n in params if ".layers." in n]
    return sum(params[n].numel() for n in block if params[n].requires_grad) / sum(params[n].numel() for n in block)


def test_exactly_half_for_mha_even_layers_and_gqa_caveat():
    module = llama(MHA)
    params = dict(module.model.named_parameters())
    for seed in range(4):
        hft = HalfFineTuning(seed=seed)
        hft.apply(module)
        block = [n for n in params if ".layers." in n]
        trained = sum(params[n].numel() for n in block if params[n].requires_grad)
        assert 2 * trained == sum(params[n].numel() for n in block)  # exact, by count
        assert hft.report["block_trainable_fraction"] == 0.5
        assert 0.5 < hft.report["trainable_fraction"] < 1  # embeddings and LM head always train
    gqa = llama(GQA)
    category = [HalfFineTuning(seed=s).apply(gqa) and _block_fraction(gqa) for s in range(10)]
    assert any(f != 0.5 for f in category), "GQA + category-level: 2 of 4 is not half by count"
    assert all(0.4 <= f <= 0.6 for f in category)
    for s in range(10):
        hft = HalfFineTuning(seed=s, balance="count")
        names = set(hft.apply(gqa))
        assert _block_fraction(gqa) == 0.5 and hft.report["block_trainable_fraction"] == 0.5
        assert all(c["attn"] == 2 for c in llama_counts(names, 4))


# ----------------------------------------------------------------------------- spec §6 test 3
def _steps(module, opt, steps, accum, set_to_none, seed0):
    module.train()
    for step in range(steps):
        for micro in range(accum):
            loss, _ = module.compute_loss(causal_batch(seed=seed0 + step * accum + micro))
            (loss / accum).backward()
        frozen_grads = [n for n, p in module.model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_grads, f"frozen tensors got gradients: {frozen_grads[:3]}"
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("optimizer_over", ["trainable", "all"])
def test_frozen_tensors_stay_bit_identical_over_two_rounds(optimizer_over):
    """AdamW (wd 0.1, lr 1e-2), accumulation 2, clipping; 'all': one optimizer over every tensor, kept
    across rounds, with zero_grad(set_to_none=False) (the stale-state / zero-grad trap)."""
    torch.manual_seed(0)
    module = llama()
    hft = HalfFineTuning(seed=3)
    all_opt = torch.optim.AdamW(module.model.parameters(), lr=1e-2, weight_decay=0.1)
    changed_status = 0
    previous = None
    for rnd in range(2):
        if rnd:
            hft.new_round()
        names = set(hft.apply(module))
        if previous is not None:
            changed_status = len(names ^ previous)
        previous = names
        before = snapshot(module)
        if optimizer_over == "all":
            opt, set_to_none = all_opt, False
        else:
            opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad],
                                    lr=1e-2, weight_decay=0.1)
            set_to_none = True
        _steps(module, opt, steps=5, accum=2, set_to_none=set_to_none, seed0=100 * rnd)
        after = snapshot(module)
        for n in before:
            if n in names:
                assert not torch.equal(before[n], after[n]), f"round {rnd}: trainable {n} did not move"
            else:
                assert torch.equal(before[n], after[n]), f"round {rnd}: frozen {n} moved"
    assert changed_status > 0, "round 2 should change which tensors train"


# ----------------------------------------------------------------------------- spec §6 test 4
def test_mask_is_a_function_of_seed_and_round_only():
    module = llama()
    random.seed(1)
    torch.manual_seed(1)
    a = HalfFineTuning(seed=5).select(module)
    rng_py, rng_t = random.getstate(), torch.get_rng_state()
    b_cb = HalfFineTuning(seed=5)
    random.seed(2)
    torch.manual_seed(2)  # another "rank" with other global RNG states
    b = b_cb.select(module)
    assert a == b
    random.seed(1)
    torch.manual_seed(1)
    HalfFineTuning(seed=5).select(module)
    assert random.getstate() == rng_py and torch.equal(torch.get_rng_state(), rng_t), "global RNG consumed"
    # another round -> another mask (for almost all seeds), another seed -> another mask
    differ = sum(HalfFineTuning(seed=s).select(module, 0) != HalfFineTuning(seed=s).select(module, 1)
                 for s in range(20))
    assert differ >= 18
    assert HalfFineTuning(seed=0).select(module) != HalfFineTuning(seed=1).select(module)
    hft = HalfFineTuning(seed=5)
    assert hft.new_round() == 1 and hft.select(module) == HalfFineTuning(seed=5, first_round=1).select(module)


# ----------------------------------------------------------------------------- GPT-2 and BERT mappings
def test_gpt2_mapping_one_of_two_per_category_biases_follow():
    module = CausalLM(backbone="tiny-gpt2", head=FullFineTune(), backbone_config={"n_layer": 4})
    for balance in ("category", "count"):
        for seed in range(3):
            hft = HalfFineTuning(seed=seed, balance=balance)
            names = set(hft.apply(module))
            attn_choice = []
            for i in range(4):
                pre = f"transformer.h.{i}."
                for group in (("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"), ("ln_1", "ln_2")):
                    on = [m for m in group if f"{pre}{m}.weight" in names]
                    assert len(on) == 1, (i, group, on)
                    for m in group:  # the bias follows its weight
                        assert (f"{pre}{m}.bias" in names) == (f"{pre}{m}.weight" in names)
                attn_choice.append(f"{pre}attn.c_attn.weight" in names)
            assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= names
            assert 0.4 <= hft.report["block_trainable_fraction"] <= 0.6
            if balance == "count":  # fused QKV in exactly half of the blocks
                assert sum(attn_choice) == 2


def test_bert_mapping_and_classifier_trains():
    module = SequenceClassifier(backbone="tiny-bert", num_labels=2, head=FullFineTune(),
                                backbone_config={"num_hidden_layers": 4})
    hft = HalfFineTuning(seed=0)
    names = set(hft.apply(module))
    groups = [
        ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
        ("intermediate.dense", "output.dense"),
        ("attention.output.LayerNorm", "output.LayerNorm"),
    ]
    for i in range(4):
        pre = f"bert.encoder.layer.{i}."
        on = [sum(f"{pre}{m}.weight" in names for m in g) for g in groups]
        assert on == [2, 1, 1], (i, on)
        for g in groups:
            for m in g:
                assert (f"{pre}{m}.bias" in names) == (f"{pre}{m}.weight" in names)
    assert {"classifier.weight", "bert.pooler.dense.weight", "bert.embeddings.word_embeddings.weight"} <= names
    assert 0.4 <= hft.report["block_trainable_fraction"] <= 0.6
    # frozen BERT tensors get no gradient
    loss, _ = module.compute_loss(class_batch())
    loss.backward()
    assert all(p.grad is None for p in module.model.parameters() if not p.requires_grad)


# ----------------------------------------------------------------------------- spec §6 test 6
def test_flops_saved_equal_weight_gradients_of_frozen_matrices():
    from torch.utils.flop_counter import FlopCounterMode

    batch = causal_batch()
    tokens = batch["input_ids"].numel()

    def step_flops(module):
        with FlopCounterMode(display=False) as counter:
            loss, _ = module.compute_loss(batch)
            loss.backward()
        return counter.get_total_flops()

    full = llama()
    hft_module = llama()
    HalfFineTuning(seed=0).apply(hft_module)
    linears = {f"{n}.weight": m for n, m in hft_module.model.named_modules() if isinstance(m, nn.Linear)}
    frozen = [n for n, p in hft_module.model.named_parameters() if not p.requires_grad and n in linears]
    assert frozen
    expected = sum(2 * tokens * linears[n].in_features * linears[n].out_features for n in frozen)
    saved = step_flops(full) - step_flops(hft_module)
    assert abs(saved - expected) <= 0.02 * expected, (saved, expected)


# ----------------------------------------------------------------------------- Trainer: rounds, logs, resume
def _data(task="copy"):
    return SyntheticSFTDataModule(task=task, num_train=64, num_val=8, batch_size=8, num_digits=2, seed=0)


_trainer = cpu_trainer


def _module():
    module = llama()
    module.set_optimizer("torch.optim.AdamW", lr=1e-2, weight_decay=0.1)
    return module


class _MaskLog(L.Callback):
    """Records the trainable set at every batch (after HFT's own hook) and frozen tensors' grads."""

    def __init__(self):
        self.masks, self.frozen_grads = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.masks.append((trainer.global_step, frozenset(trainable(pl_module))))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.frozen_grads += [n for n, p in pl_module.model.named_parameters()
                              if not p.requires_grad and p.grad is not None]


def test_resume_mid_round_equals_uninterrupted(tmp_path):
    """Rounds every 3 steps; a checkpoint at step 4 (inside round 1) resumed with a fresh callback whose seed
    differs (the saved seed and mask must win) ends equal to the uninterrupted run, masks included."""
    L.seed_everything(0)
    full, hft_full, log_full = _module(), HalfFineTuning(seed=11, round_every="step", every_n=3, plot=False), _MaskLog()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
    trainer_full = _trainer(tmp_path / "a", 8, [hft_full, log_full, ckpt])
    trainer_full.fit(full, datamodule=_data())
    assert hft_full.round == 2  # rounds began at steps 0, 3 and 6
    assert not log_full.frozen_grads
    masks = {step: m for step, m in log_full.masks}
    assert masks[0] == masks[2] != masks[3] == masks[5] != masks[6]

    path = glob.glob(str(tmp_path / "ckpt" / "*step=4*.ckpt"))[0]
    saved = torch.load(path, weights_only=True)["callbacks"]["HalfFineTuning"]
    assert saved["round"] == 1 and saved["seed"] == 11 and sorted(saved["trainable"]) == sorted(masks[3])

    L.seed_everything(123)
    resumed = _module()
    hft_res = HalfFineTuning(seed=999, round_every="step", every_n=3, plot=False)
    log_res = _MaskLog()
    trainer_res = _trainer(tmp_path / "b", 8, [hft_res, log_res])
    trainer_res.fit(resumed, datamodule=_data(), ckpt_path=path)
    assert [(s, m) for s, m in log_res.masks] == [(s, m) for s, m in log_full.masks if s >= 4]
    assert hft_res.round == 2 and hft_res.trainable_names == hft_full.trainable_names
    assert trainable(resumed) == trainable(full)
    a, b = snapshot(full), snapshot(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    opt_a, opt_b = trainer_full.optimizers[0].state_dict(), trainer_res.optimizers[0].state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()


def test_new_round_between_fits_changes_mask_and_logs(tmp_path):
    module = _module()
    hft = HalfFineTuning(seed=0)  # round_every="fit"
    fit_masks = []
    for stage, task in enumerate(["copy", "addition"]):
        if stage:
            assert hft.new_round() == 1
        logger = CSVLogger(str(tmp_path), name="logs", version=stage)
        before = snapshot(module)
        _trainer(tmp_path, 3, [hft], logger=logger).fit(module, datamodule=_data(task))
        after, names = snapshot(module), trainable(module)
        assert names == set(hft.trainable_names)
        assert all(torch.equal(before[n], after[n]) for n in before if n not in names)
        assert all(not torch.equal(before[n], after[n]) for n in names)
        fit_masks.append(names)
        assert os.path.isfile(os.path.join(logger.log_dir, f"hft_round{stage}.png"))
        metrics = open(os.path.join(logger.log_dir, "metrics.csv")).read()
        assert "hft/trainable_fraction" in metrics and "hft/round" in metrics
    assert fit_masks[0] != fit_masks[1]


def test_epoch_rounds(tmp_path):
    module, hft, log = _module(), HalfFineTuning(seed=0, round_every="epoch", every_n=1, plot=False), _MaskLog()
    _trainer(tmp_path, -1, [hft, log], max_epochs=2, limit_train_batches=2).fit(module, datamodule=_data())
    assert hft.round == 1
    assert [s for s, _ in log.masks] == [0, 1, 2, 3]
    assert log.masks[0][1] == log.masks[1][1] != log.masks[2][1] == log.masks[3][1]


# ----------------------------------------------------------------------------- DDP (2 CPU processes)
class RoundSnapshots(L.Callback):
    """Used by the DDP subprocess: parameters and mask at every batch start, frozen tensors' grads."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.records, self.frozen_grads = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.records.append({"step": trainer.global_step, "trainable": sorted(trainable(pl_module)),
                             "params": snapshot(pl_module)})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.frozen_grads += [n for n, p in pl_module.model.named_parameters()
                              if not p.requires_grad and p.grad is not None]

    def on_train_end(self, trainer, pl_module):
        self.records.append({"step": trainer.global_step, "trainable": sorted(trainable(pl_module)),
                             "params": snapshot(pl_module)})
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save({"records": self.records, "frozen_grads": self.frozen_grads},
                   os.path.join(self.out_dir, f"rounds{trainer.global_rank}.pt"))


@pytest.mark.ddp
def test_ddp_two_cpu_ranks_identical_with_round_change(tmp_path):
    dump = tmp_path / "dump"
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning_peft.callbacks.HalfFineTuning\n"
        "      init_args: {seed: 4, round_every: step, every_n: 3}\n"  # pictures on (default)
        f"    - class_path: test_hft.RoundSnapshots\n      init_args: {{out_dir: {dump}}}\n"
        f"    - class_path: helpers.DumpTrainable\n      init_args: {{out_dir: {dump}}}\n"
    )
    args = ["--config", str(REPO / "examples" / "hft.yaml"),
           "--config", str(extra), "--trainer.strategy", "ddp_find_unused_parameters_true",
           "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "7",
           "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.default_root_dir", str(tmp_path / "run"),  # the CLI's default logger
           "--data.init_args.num_train", "256", "--data.init_args.batch_size", "8"]
    r0, r1 = run_cli_ranks(args, tmp_path, dump)
    assert r0["step"] == r1["step"] == 7
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), f"ranks differ on {name}"
    assert r0["trainable"] == r1["trainable"]
    rec0 = torch.load(dump / "rounds0.pt", weights_only=True)
    rec1 = torch.load(dump / "rounds1.pt", weights_only=True)
    assert not rec0["frozen_grads"] and not rec1["frozen_grads"], "a frozen tensor received a gradient"
    assert [r["trainable"] for r in rec0["records"]] == [r["trainable"] for r in rec1["records"]]
    masks = [r["trainable"] for r in rec0["records"]]
    assert masks[0] == masks[2] != masks[3] == masks[5] != masks[6]  # rounds at steps 0, 3, 6
    pictures = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "run" / "**" / "hft_round*.png"),
                                                              recursive=True))
    assert pictures == ["hft_round0.png", "hft_round1.png", "hft_round2.png"]  # drawn by rank 0, no hang
    for recs in (rec0["records"], rec1["records"]):
        for cur, nxt in zip(recs, recs[1:]):  # one optimizer step apart
            moved = [n for n in cur["params"] if not torch.equal(cur["params"][n], nxt["params"][n])]
            # exactly the round's trainable tensors moved: frozen ones stayed, and every tensor that became
            # trainable after the DDP wrap is really optimised
            assert set(moved) == set(cur["trainable"]), f"step {cur['step']}: {set(moved) ^ set(cur['trainable'])}"


# ----------------------------------------------------------------------------- bad input
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mix": nn.Linear(8, 8), "ff": nn.Linear(8, 8),
                                                   "ln": nn.LayerNorm(8)}) for _ in range(4))
        self.out = nn.Linear(8, 10)


@pytest.mark.parametrize("kwargs, match", [
    ({"round_every": "batch"}, "round_every='batch'"),
    ({"every_n": 0}, "every_n=0"),
    ({"balance": "size"}, "balance='size'"),
    ({"groups": {"attention": "q_proj"}}, "non-empty list"),
    ({"groups": {"attention": ["q_proj("]}}, "invalid regex"),
])
def test_bad_arguments_are_one_clear_sentence(kwargs, match):
    with pytest.raises(HFTError, match=match):
        HalfFineTuning(**kwargs)


def test_unknown_architecture_is_one_sentence_and_blocks_with_groups_fix_it():
    with pytest.raises(HFTError, match=r"model_type None \(_Toy\) is not in the architecture table"
                                       r".*`blocks`.*`groups`"):
        HalfFineTuning().apply(_Toy())
    with pytest.raises(HFTError, match=r"regex 'attn' matches 0 modules.*\['mix', 'ff', 'ln'\]"):
        HalfFineTuning(blocks="blocks", groups={"attention": ["attn"]}).apply(_Toy())
    with pytest.raises(HFTError, match=r"blocks='emb' is not a non-empty nn.ModuleList"):
        HalfFineTuning(blocks="emb", groups={"attention": ["mix"]}).apply(_Toy())
    with pytest.raises(HFTError, match=r"blocks='blocks' needs `groups`.*\['mix', 'ff', 'ln'\]"):
        HalfFineTuning(blocks="blocks").apply(_Toy())
    toy = _Toy()
    groups = {"mixer": ["mix"], "ffn": ["ff"], "norm": ["ln"]}
    names = set(HalfFineTuning(seed=0, blocks="blocks", groups=groups).apply(toy))
    for module in ("mix", "ff", "ln"):  # one tensor per block: half of the blocks train it
        on = [f"blocks.{i}.{module}.weight" in names for i in range(4)]
        assert sum(on) == 2
        assert all((f"blocks.{i}.{module}.bias" in names) == on[i] for i in range(4))
    assert {"emb.weight", "out.weight", "out.bias"} <= names


def test_setup_refuses_frozen_backbone_heads_ddp_without_unused_and_adapter_checkpoints(tmp_path):
    from helpers import fit_under_one_process_ddp

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    lora = CausalLM(backbone="tiny-llama", head=LoRA(r=2, target_modules=["q_proj"]))
    with pytest.raises(HFTError, match=r"freezes the backbone.*FullFineTune"):
        HalfFineTuning().setup(trainer, lora, "fit")
    adapter_only = CausalLM(backbone="tiny-llama", head=FullFineTune(), full_checkpoint=False)
    with pytest.raises(HFTError, match="full_checkpoint"):
        HalfFineTuning().setup(trainer, adapter_only, "fit")
    # DDP without find_unused_parameters: refused once the strategy has wrapped the model (the guard reads
    # the wrapped DistributedDataParallel's public find_unused_parameters)
    with pytest.raises(HFTError, match="ddp_find_unused_parameters_true"):
        fit_under_one_process_ddp(tmp_path, _module(), HalfFineTuning(plot=False), _data())
    with pytest.raises(HFTError, match="not train"):  # a saved mask that does not fit the model
        hft = HalfFineTuning()
        hft.load_state_dict({"seed": 0, "round": 0, "trainable": ["nope.weight"]})
        hft.apply(llama())


def test_state_from_a_newer_version_is_refused_in_one_sentence():
    with pytest.raises(HFTError, match=r"state version 99 comes from a newer lightning-peft .* upgrade"):
        HalfFineTuning().load_state_dict({"version": 99, "seed": 0, "round": 0, "trainable": None})
