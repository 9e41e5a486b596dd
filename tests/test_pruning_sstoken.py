"""SSToken (token selection by retrospective excess loss and attention to the prompt): the pure parts,
the attention recompute, the selection channel and the history modes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import cpu_threads
from pruning_helpers import current_losses as _current_losses
from pruning_helpers import make_module, padded_batch, train_forward_selection
from pruning_helpers import randomised as _randomised

from lightning_peft import CausalLM
from lightning_peft.architectures import attention_parts
from lightning_peft.datamodules.pruning import PrunerContext, SSToken
from lightning_peft.datamodules.pruning.sstoken import (
    attention_to_prompt,
    last_layer_attention,
    select_tokens,
    token_losses,
)
from lightning_peft.heads import LoRA
from lightning_peft.objectives import TokenCrossEntropy

cpu_threads()


@pytest.fixture(scope="module")
def module():
    return make_module()


# ------------------------------------------------------------------------------------- SSToken, pure
def test_sstoken_gamma_extremes_and_counts():
    response = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    rel = torch.tensor([[0, 0, 5.0, 1, 4, 2, 3], [0, 9, 1, 2, 0, 0, 0]])
    attn = torch.tensor([[0, 0, 0.1, 0.9, 0.2, 0.8, 0.3], [0, 0.1, 0.9, 0.5, 0, 0, 0]])
    by_rel = select_tokens(rel, attn, response, 1.0, 0.6)
    by_attn = select_tokens(rel, attn, response, 0.0, 0.6)
    assert by_rel.nonzero().tolist() == [[0, 2], [0, 4], [0, 6], [1, 1], [1, 3]]  # ceil(.6*5)=3, ceil(.6*3)=2
    assert by_attn.nonzero().tolist() == [[0, 3], [0, 5], [0, 6], [1, 2], [1, 3]]
    assert torch.equal(select_tokens(rel, attn, response, 0.5, 1.0), response)
    assert not (select_tokens(rel, attn, response, 0.5, 0.6) & ~response).any()


def test_sstoken_attention_recompute_matches_eager():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    batch = padded_batch(None)
    batch["input_ids"] = batch["input_ids"] % 64
    pruner = SSToken()
    pruner._install_hook(model)
    pruner._armed = True
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    hidden, pos = pruner._captured
    ours = last_layer_attention(attention_parts(model, -1), hidden, pos, batch["attention_mask"])
    ref = out.attentions[-1].mean(1)
    valid = batch["attention_mask"].bool()
    assert torch.allclose(ours[valid], ref[valid], atol=1e-5)
    response = (batch["labels"] != -100)
    score = attention_to_prompt(ours, ~response & valid)
    assert (score >= 0).all() and (score <= 1 + 1e-6).all()
    received = attention_to_prompt(ours.transpose(1, 2), ~response & valid)  # column sums: a wrong variant
    assert not torch.allclose(score[response], received[response])


def _attention_topk_reference(module, batch, rho):
    """The kept (row, position) pairs when attention alone decides, from an independent reference: the
    module's function as a plain eager HF model (adapter merged), its own ``output_attentions`` of the last
    layer, head mean, summed over the non-response columns, top ceil(rho * |R|) per row in Python."""
    ref = copy.deepcopy(module.model).merge_and_unload().eval()
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        att = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  output_attentions=True).attentions[-1].mean(1).double()
    kept = set()
    for b in range(att.shape[0]):
        n_valid = int(batch["attention_mask"][b].sum())
        resp = [j for j in range(1, n_valid) if int(batch["labels"][b, j]) != -100]
        prompt = [i for i in range(n_valid) if i not in resp]
        score = {j: sum(float(att[b, j, i]) for i in prompt) for j in resp}
        ranked = sorted(resp, key=lambda j: -score[j])
        kept |= {(b, j) for j in ranked[: math.ceil(rho * len(resp))]}
    return kept


def test_sstoken_lora_init_rel_is_zero_and_selection_by_attention(module):
    """At LoRA init the history is the current model, so REL is 0 and the default gamma=0.5 selects by
    attention alone (spec 3.2): the kept tokens are the top ceil(rho |R|) by attention to the prompt of an
    independent eager reference, which here differ from the first tokens of each response."""
    batch = padded_batch(module.tokenizer)
    module.eval()
    with torch.no_grad():
        current = token_losses(module(batch).logits, batch["labels"])
    pruner = SSToken(gamma=0.5, rho=0.5, rel_warmup_fraction=0.0)
    assert torch.equal(pruner.history_losses(module, batch), current)  # LoRA B = 0: base == current
    out = pruner(batch, model=module)
    assert pruner._pending[1] == 0.5  # REL is used (no warm-up): it is zero, so attention decides
    assert all(isinstance(v, torch.Tensor) for v in out.values())  # plain tensors only in the batch
    result, weights, stats = train_forward_selection(module, pruner, out)
    module.train()
    kept = {tuple(x) for x in weights.nonzero().tolist()}
    want = _attention_topk_reference(module, batch, 0.5)
    assert kept == want
    response = batch["labels"] != -100
    response[:, 0] = False
    first = {(b, j) for b in range(4)
             for j in response[b].nonzero().flatten().tolist()[: math.ceil(0.5 * int(response[b].sum()))]}
    assert want != first  # a selection that ignored the scores (ties -> position order) would fail
    assert torch.isfinite(result.loss) and stats["rel_mean"] == 0.0
    assert result.logs["pruning/rel_mean"] == 0.0  # the selection's statistics reach the module's logs


def test_sstoken_rho_one_equals_plain_ce_and_masks_gradients(module):
    batch = padded_batch(module.tokenizer, seed=1)
    module.eval()
    logits = module(batch).logits.detach().requires_grad_(True)
    plain = TokenCrossEntropy()(logits, batch)
    def selected(pruner):  # the training forward fills the hook; the selection sees its per-token losses
        out = pruner(batch, model=module)
        module(out)
        weights, _ = pruner.select_tokens(token_losses(logits.detach(), out["labels"]), out)
        return {**out, "token_weights": weights}

    full = selected(SSToken(rho=1.0, gamma=0.0))
    assert torch.allclose(TokenCrossEntropy()(logits, full), plain)
    part = selected(SSToken(rho=0.4, gamma=0.0))
    loss = TokenCrossEntropy()(logits, part)
    loss.backward()
    dropped = (batch["labels"] != -100) & (part["token_weights"] == 0)
    dropped[:, 0] = False
    rows, cols = dropped.nonzero(as_tuple=True)
    assert rows.numel() > 0 and logits.grad[rows, cols - 1].abs().max() == 0
    module.train()


def test_sstoken_warmup_from_global_step():
    context = PrunerContext(num_training_batches=50, accumulate_grad_batches=1, global_step=0)
    p = SSToken(gamma=0.5, rel_warmup_fraction=0.2)
    assert p.gamma_at() == 0.5  # no context bound: no warm-up to count
    p.bind(context)
    assert p.gamma_at() == 0.0
    context.global_step = 9
    assert p.gamma_at() == 0.0
    context.global_step = 10  # a resumed run at step 10 sees the same gamma_t as an uninterrupted one
    assert p.gamma_at() == 0.5


def test_sstoken_warmup_resets_every_epoch():
    """The released warm-up flag resets at each epoch start: the first steps of every epoch are attention-only."""
    context = PrunerContext(num_training_batches=50, accumulate_grad_batches=2, global_step=24, epoch=0)
    p = SSToken(gamma=0.5, rel_warmup_fraction=0.2)  # 25 optimizer steps per epoch, ceil(0.2 * 50 / 2) = 5 warm
    p.bind(context)
    assert p.gamma_at() == 0.5  # the last step of epoch 0
    context.global_step, context.epoch = 25, 1  # the first step of epoch 1
    assert p.gamma_at() == 0.0
    context.global_step = 29
    assert p.gamma_at() == 0.0
    context.global_step = 30
    assert p.gamma_at() == 0.5
    # an epoch of 5 batches, accumulating 2: Lightning steps on batches 2, 4 and the last one -> 3 steps an epoch
    context = PrunerContext(num_training_batches=5, accumulate_grad_batches=2, global_step=6, epoch=2)
    p = SSToken(gamma=0.5, rel_warmup_steps=1)
    p.bind(context)
    assert p.gamma_at() == 0.0
    context.global_step = 7
    assert p.gamma_at() == 0.5


# ------------------------------------------------------------------------------------- SSToken history modes
def test_sstoken_copy_history_with_full_finetuning():
    """history='auto' + FullFineTune -> a frozen copy of the base: REL is 0 at step 0 and, after an update,
    equals (base losses - current losses) computed by hand from a freshly built base model."""
    from lightning_peft.backbones import load_backbone
    from lightning_peft.heads import FullFineTune

    torch.manual_seed(0)
    module = CausalLM(backbone="tiny-llama", head=FullFineTune()).train()
    batch = padded_batch(module.tokenizer, seed=4)
    pruner = SSToken(gamma=1.0, rho=0.5, rel_warmup_fraction=0.0)
    assert pruner._mode(module) == "copy"
    torch.testing.assert_close(pruner.history_losses(module, batch), _current_losses(module, batch), rtol=0, atol=1e-6)
    out = pruner(batch, model=module)
    _, _, stats = train_forward_selection(module, pruner, out)  # the training forward + the selector
    assert abs(stats["rel_mean"]) < 1e-6

    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    loss = TokenCrossEntropy()(module(batch).logits, batch)
    loss.backward()
    opt.step()
    base, _ = load_backbone("tiny-llama")
    with torch.no_grad():
        want_history = token_losses(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    history = pruner.history_losses(module, batch)
    torch.testing.assert_close(history, want_history, rtol=0, atol=1e-6)  # the copy did not train
    current = _current_losses(module, batch)
    rel = want_history - current
    response = (batch["labels"] != -100) & batch["attention_mask"].bool()
    response[:, 0] = False
    assert (rel[response] > 1e-3).any()  # the update moved the losses
    out = pruner(batch, model=module)
    module.eval()  # dropout-free either way; eval makes the selector see exactly `current`
    _, weights, stats = train_forward_selection(module, pruner, out)
    module.train()
    want = select_tokens(rel, torch.zeros_like(rel), response, 1.0, 0.5)
    assert torch.equal(weights.bool(), want)
    assert stats["rel_mean"] == pytest.approx(float(rel[response].mean()), abs=1e-5)


def test_sstoken_cache_history(tmp_path, module):
    """history_cache: per-sample history losses written once, looked up per sample (by a hash of its
    token ids, so row order does not matter); a sample not in the cache is a clear error."""
    batch = padded_batch(module.tokenizer, seed=5)
    history_model = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomised(history_model, seed=7)
    path = str(tmp_path / "history.pt")
    assert SSToken.build_history_cache(history_model, [batch], path) == 4
    want = _current_losses(history_model, batch)
    pruner = SSToken(history_cache=path)
    assert pruner.history == "cache"
    got = pruner.history_losses(module, batch)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-6)
    assert (got[~mask] == 0).all()
    flipped = {k: v.flip(0) for k, v in batch.items()}
    torch.testing.assert_close(pruner.history_losses(module, flipped), got.flip(0), rtol=0, atol=0)
    other = padded_batch(module.tokenizer, seed=6)
    with pytest.raises(KeyError, match="no entry for a training sample"):
        pruner.history_losses(module, other)
    with pytest.raises(ValueError, match="needs history_cache"):
        SSToken(history="cache")
