"""Prefix tuning on an encoder classifier (tiny-bert), checked against a hand-written BERT forward.

transformers 5.25 renamed the encoders' ``past_key_values`` argument to ``cache``; peft's classifier
path looks for the old name and refuses. ``PeftHead`` then runs the forward itself. The reference below
writes BERT out from its equations (embeddings, self-attention whose keys and values are the learned
prefix followed by the tokens' own, residual + LayerNorm, GELU MLP, tanh pooler, classifier), so a
prefix that is dropped, put in the wrong layer, swapped between keys and values, or masked out fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import class_batch, logits, train_steps

from lightning_peft import SequenceClassifier
from lightning_peft.heads import PeftHead
from lightning_peft.heads.base import HeadError

N_VIRTUAL = 4


def _prefix_kv(module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The learned prefix as (keys, values) per layer, each (heads, n_virtual, head_dim).

    peft stores prefix tuning (without projection) as one embedding of shape
    (n_virtual, layers * 2 * hidden); per virtual token the row holds layer 0's key, layer 0's value,
    layer 1's key, ... each split into heads."""
    cfg = module.model.base_model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    weight = module.model.prompt_encoder["default"].embedding.weight.detach()
    table = weight.view(N_VIRTUAL, cfg.num_hidden_layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    return [(table[2 * i], table[2 * i + 1]) for i in range(cfg.num_hidden_layers)]


def _reference_logits(module, batch) -> torch.Tensor:
    bert_cls = module.model.base_model
    bert, cfg = bert_cls.bert, bert_cls.config
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, t = ids.shape
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    emb = bert.embeddings
    # positions continue after the prefix, as BERT does after a cache of length n_virtual
    pos = torch.arange(N_VIRTUAL, N_VIRTUAL + t)
    h = emb.word_embeddings(ids) + emb.position_embeddings(pos)[None] + emb.token_type_embeddings(torch.zeros_like(ids))
    h = F.layer_norm(h, (cfg.hidden_size,), emb.LayerNorm.weight, emb.LayerNorm.bias, cfg.layer_norm_eps)
    key_mask = torch.cat([torch.ones(b, N_VIRTUAL), mask.float()], dim=1)  # (b, n_virtual + t)
    bias = (1.0 - key_mask)[:, None, None, :] * torch.finfo(torch.float32).min
    for layer, (pk, pv) in zip(bert.encoder.layer, _prefix_kv(module), strict=True):
        att = layer.attention
        split = lambda x: x.view(b, t, heads, head_dim).transpose(1, 2)
        q = split(att.self.query(h))
        k = torch.cat([pk.expand(b, -1, -1, -1), split(att.self.key(h))], dim=2)
        v = torch.cat([pv.expand(b, -1, -1, -1), split(att.self.value(h))], dim=2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias, dim=-1)
        ctx = (p @ v).transpose(1, 2).reshape(b, t, cfg.hidden_size)
        out = att.output
        h = F.layer_norm(out.dense(ctx) + h, (cfg.hidden_size,), out.LayerNorm.weight, out.LayerNorm.bias,
                         cfg.layer_norm_eps)
        mid = F.gelu(layer.intermediate.dense(h))
        o = layer.output
        h = F.layer_norm(o.dense(mid) + h, (cfg.hidden_size,), o.LayerNorm.weight, o.LayerNorm.bias, cfg.layer_norm_eps)
    pooled = torch.tanh(bert.pooler.dense(h[:, 0]))
    return bert_cls.classifier(pooled)


def _module():
    head = PeftHead({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": N_VIRTUAL})
    return SequenceClassifier(backbone="tiny-bert", num_labels=2, head=head)


def test_prefix_tuning_on_bert_equals_hand_written_forward():
    torch.manual_seed(0)
    module = _module().eval()
    with torch.no_grad():  # a larger prefix so that a dropped or misplaced prefix moves the logits visibly
        module.model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    batch = class_batch()
    batch["attention_mask"][:3, -4:] = 0  # padded rows: the prefix stays visible, padding does not
    with torch.no_grad():
        expected = _reference_logits(module, batch)
        got = logits(module, batch)
        without_prefix = module.model.base_model(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - without_prefix).abs().max() > 1e-2  # the reference is sensitive to the prefix


def test_prefix_tuning_on_bert_trains_only_the_prefix_and_classifier():
    module = _module()
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    losses = train_steps(module, class_batch(), steps=30, lr=2e-2, weight_decay=0.0)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses[::5]
    params = dict(module.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert module.trainable_parameters() == module.expected_trainable_parameters


def test_prefix_tuning_refused_in_one_sentence_for_an_encoder_without_a_cache(monkeypatch):
    """An encoder whose forward takes neither ``past_key_values`` nor ``cache`` cannot hold a prefix."""
    from transformers.models.bert import modeling_bert

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # noqa: ARG001 - signature only
        raise AssertionError("not called")

    monkeypatch.setattr(modeling_bert.BertModel, "forward", forward)
    with pytest.raises(HeadError, match=r"'bert' encoder takes no key/value cache.*PROMPT_TUNING"):
        _module()
