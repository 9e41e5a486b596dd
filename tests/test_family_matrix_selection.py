"""Every decoder family of the architecture table x {HalfFineTuning, GreenTrainer}: a tiny random model built
from a config, two Trainer steps, and the selection really happened (HFT: half of each block's weight
matrices and norms train and only they move; GreenTrainer: a strict subset trains, only it moves, and the
measured FLOPs of the chosen mask stay within the bound of tests/test_greentrainer.py). A family a callback
cannot run on gets one sentence naming its model_type."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import causal_batch, class_batch, cpu_trainer
from test_architectures import TINY
from torch.utils.data import DataLoader

from lightning_peft import CausalLM
from lightning_peft import architectures as A
from lightning_peft.callbacks import GreenTrainer, HalfFineTuning
from lightning_peft.callbacks.greentrainer import GreenTrainerError, apply_mask, measure_step_flops
from lightning_peft.callbacks.hft import HFTError
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.heads import FullFineTune

DECODERS = sorted(t for t, arch in A.ARCHITECTURES.items() if arch.causal)

#: 1-D weights per block that are not block norms (Qwen3's q/k norms): they belong to no HFT category and
#: always train. Written from the family's published layout, not from the table.
QK_NORMS = {"qwen3": 2}


def test_the_matrix_covers_the_papers_families():
    assert {"opt", "bloom", "llama", "gpt2", "phi3", "gpt_neox", "gemma2", "qwen3"} <= set(DECODERS)


def _module(model_type: str) -> CausalLM:
    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=FullFineTune(), backbone_config={"num_hidden_layers": 1})
    module.model = FullFineTune().attach(TINY[model_type]())
    module.set_optimizer("torch.optim.AdamW", lr=1e-2)
    return module


def _data():
    return SyntheticSFTDataModule(task="copy", num_train=16, num_val=4, batch_size=4, num_digits=2, seed=0)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def _block_weights(module) -> list[dict[str, torch.nn.Parameter]]:
    """Per block: its weight tensors (name -> parameter), blocks found by numbered path parts."""
    out: dict[int, dict[str, torch.nn.Parameter]] = {}
    for name, p in module.model.named_parameters():
        parts = name.split(".")
        idx = next((int(x) for x in parts if x.isdigit()), None)
        if idx is not None and name.endswith("weight"):
            out.setdefault(idx, {})[name] = p
    return [out[i] for i in sorted(out)]


def _fit(root, module, callback, steps=2):
    L.seed_everything(0)
    before = _snapshot(module)
    cpu_trainer(root, steps, [callback], enable_checkpointing=False).fit(module, datamodule=_data())
    after = _snapshot(module)
    return {n for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.parametrize("model_type", DECODERS)
def test_hft_trains_half_of_every_family(model_type, tmp_path):
    module = _module(model_type)
    hft = HalfFineTuning(seed=0, plot=False)
    moved = _fit(tmp_path, module, hft)
    trained = set(hft.trainable_names)
    for block in _block_weights(module):
        norms = [n for n, p in block.items() if p.dim() == 1]
        n_norms = len(norms) - QK_NORMS.get(model_type, 0)
        assert sum(n in trained for n in norms) == n_norms // 2 + QK_NORMS.get(model_type, 0), (model_type, norms)
    # weight matrices: exactly half over the blocks (a 3-matrix FFN gives 2 in one block, 1 in the other)
    all_matrices = [n for block in _block_weights(module) for n, p in block.items() if p.dim() == 2]
    assert 2 * sum(n in trained for n in all_matrices) == len(all_matrices), model_type
    # the selection really happened: exactly the trainable tensors moved in two steps
    assert moved <= trained and len(moved) > 0.9 * len(trained), (model_type, trained - moved)
    assert not moved & {n for n, _ in module.model.named_parameters()} - trained


@pytest.mark.parametrize("model_type", DECODERS)
def test_greentrainer_selects_within_budget_on_every_family(model_type, tmp_path):
    module = _module(model_type)
    gt = GreenTrainer(rho=0.5, interval=100, interval_unit="step", plot=False)
    moved = _fit(tmp_path, module, gt)
    assert len(gt.history) == 1
    mask = gt.history[0]["mask"]
    chosen = {n for n, m in zip(gt.candidates, mask) if m}
    assert 0 < len(chosen) < len(gt.candidates), model_type
    assert moved <= chosen and moved, (model_type, moved - chosen)
    batch = causal_batch(4, 16)
    full = measure_step_flops(module, batch)
    try:
        apply_mask(module, gt.candidates, mask)
        measured = measure_step_flops(module, batch)
    finally:
        apply_mask(module, gt.candidates, [True] * len(mask))
    assert measured / full <= 0.5 + 0.03, (model_type, measured / full)
    assert measured / full <= gt.last_metrics["greentrainer/predicted_rho"] + 1e-9, model_type


def test_two_stack_t5_is_refused_in_one_sentence():
    module = _module("llama")
    module.model = FullFineTune().attach(TINY["t5"]())
    with pytest.raises(HFTError, match=r"^HalfFineTuning cannot run on model_type 't5' \(T5\): it needs one stack "
                                       r"of blocks \(it has 2 block stacks\)\.$"):
        HalfFineTuning().apply(module)
    with pytest.raises(GreenTrainerError, match=r"^GreenTrainer cannot run on model_type 't5' \(T5\): it needs one "
                                                r"stack of blocks \(it has 2 block stacks\)\.$"):
        GreenTrainer.profile(module, causal_batch())


@pytest.mark.parametrize("model_type", sorted(t for t, arch in A.ARCHITECTURES.items()
                                              if not arch.causal and len(arch.blocks) == 1))
def test_encoder_families_as_classifiers(model_type, tmp_path):
    """BERT and RoBERTa (one stack, bidirectional) are claimed too: a classifier trains with either callback."""
    import transformers as T

    from lightning_peft import SequenceClassifier

    config = {"bert": T.BertConfig, "roberta": T.RobertaConfig}[model_type](
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=320,
        max_position_embeddings=64, num_labels=2, pad_token_id=0)
    for callback in (HalfFineTuning(seed=0, plot=False), GreenTrainer(rho=0.6, interval_unit="step", plot=False)):
        torch.manual_seed(0)
        module = SequenceClassifier(backbone="tiny-bert", num_labels=2, head=FullFineTune())
        module.model = FullFineTune().attach(T.AutoModelForSequenceClassification.from_config(config))
        module.set_optimizer("torch.optim.AdamW", lr=1e-2)
        batches = DataLoader([class_batch(n=4, seed=i) for i in range(2)], batch_size=None)
        before = _snapshot(module)
        cpu_trainer(tmp_path, 2, [callback], enable_checkpointing=False).fit(module, train_dataloaders=batches)
        moved = {n for n, p in module.model.named_parameters() if not torch.equal(before[n], p.detach())}
        if isinstance(callback, HalfFineTuning):
            trained = set(callback.trainable_names)
        else:
            trained = {n for n, m in zip(callback.candidates, callback.history[-1]["mask"]) if m}
        assert moved and moved <= trained < set(before), (model_type, type(callback).__name__)
