"""DatasetSelector contract: once over the whole training set, rank 0 decides, indices saved and reused."""

from __future__ import annotations

import glob

import lightning as L
import pytest
import torch
from helpers import REPO, cpu_trainer, run_cli_ranks
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import CausalLM
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.datamodules.selection import DatasetSelector, RandomSubset, SelectionError
from lightning_peft.heads import LoRA


class Recording(DatasetSelector):
    """Keeps the given rows and counts its calls."""

    def __init__(self, keep):
        self.keep = list(keep)
        self.calls = 0
        self.seen_rows = None

    def select(self, rows, datamodule):
        self.calls += 1
        self.seen_rows = len(rows)
        return self.keep


def _data(selector, num_train=40):
    dm = SyntheticSFTDataModule(task="copy", num_digits=3, num_train=num_train, num_val=4, batch_size=4,
                                tokenizer="tiny-llama", seed=0, selector=selector)
    return dm


def test_selector_sees_all_tokenised_rows_and_training_keeps_exactly_its_choice():
    full = _data(None)
    full.setup("fit")
    sel = Recording([3, 1, 7, 1])
    dm = _data(sel)
    dm.setup("fit")
    assert sel.calls == 1 and sel.seen_rows == 40
    assert dm.selected_indices == [1, 3, 7]  # sorted, duplicates removed
    assert dm._split("train") == [full._split("train")[i] for i in (1, 3, 7)]
    seen = [row for batch in dm.train_dataloader() for row in batch["input_ids"].tolist()]
    kept = {tuple(full._split("train")[i]["input_ids"]) for i in (1, 3, 7)}
    assert {tuple(t for t in row if t != full.tokenizer.pad_token_id) for row in seen} <= kept
    assert len(seen) == 3
    dm.setup("fit")  # a second setup does not select again
    assert sel.calls == 1


def test_no_selector_keeps_every_row():
    dm = _data(None)
    dm.setup("fit")
    assert dm.selected_indices is None and len(dm._split("train")) == 40


def test_random_subset_is_seeded_and_within_budget():
    a, b, c = _data(RandomSubset(10, seed=1)), _data(RandomSubset(10, seed=1)), _data(RandomSubset(10, seed=2))
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.selected_indices == b.selected_indices != c.selected_indices
    assert len(set(a.selected_indices)) == 10 and all(0 <= i < 40 for i in a.selected_indices)


def test_random_subset_response_length_filter():
    dm = _data(RandomSubset(5, min_response_tokens=1))
    dm.setup("fit")
    assert len(dm.selected_indices) == 5
    n_resp = len([t for t in dm._split("train")[0]["labels"] if t != -100])
    too_long = _data(RandomSubset(5, min_response_tokens=n_resp + 100))
    with pytest.raises(SelectionError, match="min_response_tokens=.* leaves no rows out of 40"):
        too_long.setup("fit")


@pytest.mark.parametrize("budget", [0, -1, "10", True])
def test_bad_budget_is_one_sentence(budget):
    with pytest.raises(SelectionError, match="budget=.* must be a positive integer"):
        RandomSubset(budget)


def test_budget_above_rows_is_one_sentence():
    with pytest.raises(SelectionError, match=r"budget=41 exceeds the 40 eligible training rows; set budget to 40"):
        _data(RandomSubset(41)).setup("fit")


@pytest.mark.parametrize("keep, match", [([], "kept no rows out of 40"), ([0, 40], "row index 40, outside the 40")])
def test_selector_results_are_checked(keep, match):
    with pytest.raises(SelectionError, match=match):
        _data(Recording(keep)).setup("fit")


def test_selection_errors_are_value_errors():
    assert issubclass(SelectionError, ValueError)


def test_state_dict_round_trip_and_resume_reuses_indices_without_selecting(tmp_path):
    L.seed_everything(0)
    first_sel = Recording([2, 5, 8, 11, 14, 17, 20, 23])
    first = _data(first_sel)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "a"), every_n_train_steps=1, save_top_k=-1)
    cpu_trainer(tmp_path / "a", 1, [ckpt]).fit(CausalLM(head=LoRA(r=2)), datamodule=first)
    assert first_sel.calls == 1 and first.selected_indices == [2, 5, 8, 11, 14, 17, 20, 23]
    path = glob.glob(str(tmp_path / "a" / "*step=1*.ckpt"))[0]
    saved = torch.load(path, weights_only=True)
    dm_state = next(v for k, v in saved.items() if k.endswith("SyntheticSFTDataModule"))
    assert dm_state["selected_indices"] == [2, 5, 8, 11, 14, 17, 20, 23]

    other = Recording([0, 1, 2, 3])  # would choose differently
    resumed = _data(other)
    cpu_trainer(tmp_path / "b", 2).fit(CausalLM(head=LoRA(r=2)), datamodule=resumed, ckpt_path=path)
    assert other.calls == 0
    assert resumed.selected_indices == [2, 5, 8, 11, 14, 17, 20, 23]
    assert len(resumed._split("train")) == 8


class _Strategy:
    """Stands in for a trainer strategy on a non-zero rank: broadcast returns rank 0's payload."""

    def __init__(self, payload):
        self.payload = payload
        self.calls = 0

    def broadcast(self, obj, src=0):
        self.calls += 1
        return self.payload


def test_non_zero_rank_does_not_select_and_takes_the_broadcast():
    sel = Recording([0])
    trainer = type("T", (), {"global_rank": 1, "strategy": _Strategy(([4, 6], None))})()
    assert sel.run([{}] * 10, None, trainer) == [4, 6]
    assert sel.calls == 0 and trainer.strategy.calls == 1


def test_rank_zero_error_is_raised_on_every_rank():
    trainer = type("T", (), {"global_rank": 1, "strategy": _Strategy((None, "Recording kept no rows out of 10."))})()
    with pytest.raises(SelectionError, match="kept no rows"):
        Recording([0]).run([{}] * 10, None, trainer)


@pytest.mark.ddp
def test_ddp_two_ranks_train_on_rank_zeros_selection(tmp_path):
    extra = tmp_path / "sel.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n    - class_path: selection_helpers.DumpSelection\n"
        f"      init_args: {{out_dir: {tmp_path / 'dump'}}}\n"
        "data:\n  init_args:\n    selector:\n      class_path: selection_helpers.PidSubset\n"
        "      init_args: {budget: 64}\n"
    )
    args = ["--config", str(REPO / "examples" / "quickstart.yaml"), "--config", str(extra),
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.num_train", "256",
            "--data.init_args.batch_size", "8", "--trainer.val_check_interval", "1.0"]
    r0, r1 = run_cli_ranks(args, tmp_path, tmp_path / "dump")
    assert r0["selected"] == r1["selected"] and len(r0["selected"]) == 64
    assert r0["state"]["selected_indices"] == r0["selected"]
    kept = {tuple(r0["pool"][i]) for i in r0["selected"]}
    for rank in (r0, r1):
        rows = [tuple(row[: len(next(iter(kept)))]) for row in rank["seen"]]
        assert rows and all(row in kept for row in rows)
    assert glob.glob(str(tmp_path / "run" / "lightning_logs" / "version_0"))  # the default logger was on
