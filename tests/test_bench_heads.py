"""Smoke test of ``benchmarks/heads.py``'s core: one head, two steps, a tiny BERT and a ten-row SST-2 look-alike.

No MiniLM, no ``../shared/data``: the core takes the backbone and the data folder as arguments, so this
checks the record (parameter counts, adapter bytes, loss curve, accuracy) on assets built here.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from helpers import REPO

from lightning_peft.heads import FullFineTune

_spec = importlib.util.spec_from_file_location("bench_heads", REPO / "benchmarks" / "heads.py")
heads = importlib.util.module_from_spec(_spec)
sys.modules["bench_heads"] = heads  # dataclasses look their module up there
_spec.loader.exec_module(heads)

POS = ["a great film", "warm and funny", "a joy to watch", "brilliant acting", "lovely"]
NEG = ["a dull mess", "boring and long", "a waste of time", "awful script", "tedious"]


@pytest.fixture
def sst2_like(tmp_path):
    for split in ("train", "dev", "test"):
        lines = [f"1 {t}" for t in POS] + [f"0 {t}" for t in NEG]
        (tmp_path / f"stsa.binary.{split}").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_lora_record_on_tiny_bert(sst2_like):
    rec = heads.train_and_eval("lora", heads.HEADS["lora"], backbone="tiny-bert", data=sst2_like, steps=2,
                               batch=4, accelerator="cpu", eval_batch=8)
    ti = rec["train_info"]
    assert ti["status"] == "success", rec["run_info"]["error_msg"]
    assert len(ti["train_loss_curve"]) == 2
    # LoRA r=8 on query and value of tiny-bert (2 layers, hidden 64) plus the new classifier (64*2 + 2)
    assert ti["num_trainable_params"] == 2 * 2 * 8 * (64 + 64) + 64 * 2 + 2
    assert ti["num_trainable_params"] == ti["expected_trainable_params"]
    # head.safetensors holds every trainable value in fp32, plus a small JSON header
    assert 4 * ti["num_trainable_params"] <= ti["file_size"] < 4 * ti["num_trainable_params"] + 16_384
    assert ti["dev_accuracy"] * 10 == pytest.approx(round(ti["dev_accuracy"] * 10))  # a fraction of 10 dev rows
    assert rec["run_info"]["train_config"]["optimizer_kwargs"]["lr"] == heads.HEADS["lora"].lr
    json.dumps(rec)  # the record is plain JSON


def test_full_frozen_embeddings_counts_without_the_embedding_matrix(sst2_like):
    rec = heads.train_and_eval("full-frozen-emb", heads.HEADS["full-frozen-emb"], backbone="tiny-bert",
                               data=sst2_like, steps=1, batch=4, accelerator="cpu", test=False)
    ti = rec["train_info"]
    emb = 260 * 64  # byte-level vocabulary (256 + 4 specials) x hidden 64
    assert ti["num_trainable_params"] == ti["num_total_params"] - emb
    assert ti["test_accuracy"] is None


def test_a_head_that_is_not_there_is_skipped_with_a_note(sst2_like):
    spec = heads.HeadSpec("NoSuchHead", {}, 1e-3)
    rec = heads.train_and_eval("nosuch", spec, backbone="tiny-bert", data=sst2_like, steps=1, accelerator="cpu")
    assert rec["train_info"]["status"] == "skipped"
    assert "NoSuchHead is not importable" in rec["run_info"]["error_msg"]


def test_head_specs_build_the_classes_they_name():
    head = heads.HEADS["full-frozen-emb"].build("bert")
    assert isinstance(head, FullFineTune) and head.freeze_embeddings
    assert heads.HEADS["lora"].build("llama").target_modules == ["q_proj", "v_proj"]
    ia3 = heads.HEADS["ia3"].build("llama")
    assert ia3.init_args()["config"]["feedforward_modules"] == ["down_proj"]


def test_tiny_llama_step_times_per_head():
    out = heads.llama_step_times(["lora", "full"], rounds=1, steps=2, warmup=1, batch=2, length=16)
    assert [len(out["lora"]), len(out["full"])] == [2, 2]
