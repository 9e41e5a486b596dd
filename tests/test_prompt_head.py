"""PromptHead: virtual tokens reach the model, masks and labels grow, logits shrink back, generation works.

References are independent of the head: embeddings concatenated by hand and fed to the transformers
model, a greedy loop over plain forwards, and peft's own forward for peft's prompt types.
"""

from __future__ import annotations

import pytest
import torch
from helpers import causal_batch, class_batch, train_steps
from torch import nn

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.generation import generate_answers
from lightning_peft.heads import PeftHead, PromptHead, PromptModel

M = 3


class SoftPrompt(PromptHead):
    """The smallest PromptHead: ``m`` free vectors in front of the input (a test double, not a product)."""

    def __init__(self, m: int = M) -> None:
        self.m = m

    def build(self, backbone: nn.Module) -> nn.Module:
        d = backbone.get_input_embeddings().weight.shape[1]
        emb = nn.Embedding(self.m, d)
        with torch.no_grad():
            emb.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
        return emb

    def virtual_embeddings(self, model, batch_size):
        return model.prompt.weight.unsqueeze(0).expand(batch_size, -1, -1)


def _by_hand(hf, prompt: torch.Tensor, batch: dict) -> torch.Tensor:
    """The backbone on [prompt; embed(ids)] with the mask grown by hand."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), hf.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([torch.ones(ids.shape[0], prompt.shape[1], dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return hf(inputs_embeds=embeds, attention_mask=mask).logits


def _left_padded(batch: dict, pad: int = 2) -> dict:
    out = {k: v.clone() for k, v in batch.items()}
    out["attention_mask"][0, :pad] = 0
    out["input_ids"][0, :pad] = 0
    return out


def test_virtual_tokens_reach_the_causal_lm_and_logits_are_stripped():
    module = CausalLM(backbone="tiny-llama", head=SoftPrompt())
    assert isinstance(module.model, PromptModel)
    batch = _left_padded(causal_batch(n=4, length=10))
    with torch.no_grad():
        got = module(batch).logits
    want = _by_hand(module.model.backbone, module.model.prompt.weight.unsqueeze(0), batch)
    assert got.shape == batch["input_ids"].shape + (want.shape[-1],)
    torch.testing.assert_close(got, want[:, M:])
    with torch.no_grad():
        plain = module.model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (got - plain).abs().max() > 1e-3  # the prompt changes the outputs


def test_mask_and_labels_are_extended():
    module = CausalLM(backbone="tiny-llama", head=SoftPrompt())
    batch = _left_padded(causal_batch(n=2, length=6))
    kwargs, n = module.head.model_inputs(module.model, batch)
    assert n == M
    assert kwargs["inputs_embeds"].shape[1] == M + batch["input_ids"].shape[1]
    assert kwargs["attention_mask"][:, :M].eq(1).all()
    assert torch.equal(kwargs["attention_mask"][:, M:], batch["attention_mask"])
    assert kwargs["labels"][:, :M].eq(-100).all() and torch.equal(kwargs["labels"][:, M:], batch["labels"])
    assert "input_ids" not in kwargs


def test_loss_ignores_virtual_positions_and_only_the_prompt_trains():
    module = CausalLM(backbone="tiny-llama", head=SoftPrompt())
    assert module.trainable_parameters() == M * module.model.backbone.config.hidden_size
    frozen = {n: p.detach().clone() for n, p in module.model.backbone.named_parameters()}
    before = module.model.prompt.weight.detach().clone()
    losses = train_steps(module, causal_batch(), 30, lr=5e-2)
    assert losses[-1] < losses[0]
    assert not torch.equal(module.model.prompt.weight, before)
    assert all(torch.equal(p, frozen[n]) for n, p in module.model.backbone.named_parameters())


def _greedy_by_forward(module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with full forwards (no cache, no generate) through the module."""
    for _ in range(steps):
        with torch.no_grad():
            logits = module({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_generation_equals_step_by_step_forward():
    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=SoftPrompt()).eval()
    ids = module.tokenizer("12+34=", return_tensors="pt")["input_ids"]
    want = _greedy_by_forward(module, ids, 6)
    got = module.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, pad_token_id=module.tokenizer.pad_token_id)
    assert torch.equal(got, want)
    text = module.tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    assert module.generate(["12+34="], max_new_tokens=6) == [text]
    assert generate_answers(module, prompts=["12+34="], max_new_tokens=6, progress=False) == [text]


def test_stop_when_sees_the_new_text_with_virtual_tokens():
    module = CausalLM(backbone="tiny-llama", head=SoftPrompt()).eval()
    ids = module.tokenizer("7", return_tensors="pt")["input_ids"]
    full = module.tokenizer.decode(_greedy_by_forward(module, ids, 6)[0, ids.shape[1]:], skip_special_tokens=True)
    first = full[:1]
    got = generate_answers(module, prompts=["7"], max_new_tokens=6, progress=False, stop_when=lambda t: len(t) >= 1)
    assert got == [first]


def test_classifier_with_a_prompt_head():
    module = SequenceClassifier(backbone="tiny-bert", num_labels=2, head=SoftPrompt())
    batch = _left_padded(class_batch(n=4))
    with torch.no_grad():
        got = module(batch).logits
    want = _by_hand(module.model.backbone, module.model.prompt.weight.unsqueeze(0), batch)
    assert got.shape == (4, 2)
    torch.testing.assert_close(got, want)
    hidden = module.model.backbone.config.hidden_size
    head_params = sum(p.numel() for p in module.model.backbone.classifier.parameters())
    assert module.trainable_parameters() == M * hidden + head_params
    losses = train_steps(module, class_batch(), 20, lr=5e-2)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ peft's prompt types run through it
def _peft_reference(module, batch, **extra):
    """peft's own forward of the same PeftModel (virtual positions dropped from causal-LM logits)."""
    with torch.no_grad():
        out = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    return out


@pytest.mark.parametrize("config", [
    {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
    {"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
    {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4},
], ids=lambda c: c["peft_type"])
def test_peft_prompt_types_match_peft_forward_on_llama(config):
    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=PeftHead(dict(config)))
    batch = _left_padded(causal_batch(n=3, length=8))
    with torch.no_grad():
        got = module(batch).logits
    ref = _peft_reference(module, batch).logits
    assert got.shape[1] == batch["input_ids"].shape[1]
    torch.testing.assert_close(got, ref[:, -batch["input_ids"].shape[1]:])


def test_peft_prompt_tuning_matches_peft_forward_on_bert():
    torch.manual_seed(0)
    module = SequenceClassifier(backbone="tiny-bert", num_labels=2,
                                head=PeftHead({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    batch = class_batch(n=3)
    with torch.no_grad():
        got = module(batch).logits
    torch.testing.assert_close(got, _peft_reference(module, batch).logits)


def test_peft_cpt_loss_and_logits_match_peft_forward():
    torch.manual_seed(0)
    head = PeftHead({"peft_type": "CPT", "cpt_token_ids": [5, 6, 7, 8]})
    module = CausalLM(backbone="tiny-llama", head=head)
    batch = _left_padded(causal_batch(n=3, length=8))
    with torch.no_grad():
        got = module(batch)
    extra = head.forward_inputs(batch)
    extra = {"labels": extra["labels"].clone(), "input_type_mask": extra["input_type_mask"].clone()}
    ref = _peft_reference(module, batch, **extra)
    torch.testing.assert_close(got.loss, ref.loss)
    torch.testing.assert_close(got.logits, ref.logits[:, 4:])
    loss, logits = module.compute_loss(batch)
    torch.testing.assert_close(loss, ref.loss)


def test_peft_prompt_tuning_generation_still_goes_through_peft():
    module = CausalLM(backbone="tiny-llama", head=PeftHead({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    module.eval()
    ids = module.tokenizer("3", return_tensors="pt")["input_ids"]
    want = _greedy_by_forward(module, ids, 4)
    assert module.generate(["3"], max_new_tokens=4) == [
        module.tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)]
