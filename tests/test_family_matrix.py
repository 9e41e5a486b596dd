"""Every decoder family of the architecture table x the components that read it (QTuning, SSToken,
TokenElimination): a component that claims the family trains a couple of steps on a tiny random model of
it and actually prunes; one that does not claim it refuses in one sentence naming the family.

SSToken's last-layer attention recompute is also checked against each claimed family's own eager
``output_attentions`` (issue 12, defect 1: Qwen3's q/k norms)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import causal_batch, cpu_threads
from pruning_helpers import train_forward_selection
from test_architectures import TINY

from lightning_peft import CausalLM
from lightning_peft import architectures as A
from lightning_peft.backbones import build_byte_tokenizer
from lightning_peft.callbacks import TokenElimination
from lightning_peft.callbacks.token_elimination import TokenEliminationError
from lightning_peft.datamodules.pruning import QTuning, SSToken
from lightning_peft.datamodules.pruning.scoring import FAST_MODEL_TYPES, score_tokens
from lightning_peft.datamodules.pruning.sstoken import last_layer_attention
from lightning_peft.heads import LoRA

cpu_threads()

DECODERS = sorted(t for t, a in A.ARCHITECTURES.items() if a.causal)
#: the families each component claims; every other decoder family must be refused in one sentence
CLAIMS = {
    "QTuning": set(DECODERS),
    "SSToken": {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "opt"},
    "TokenElimination": {"llama", "mistral", "qwen2", "qwen3"},
}


def test_claims_cover_the_decoders_of_the_table():
    assert DECODERS == ["bloom", "gemma", "gemma2", "gpt2", "gpt_neox", "llama", "mistral", "opt", "phi3", "qwen2",
                        "qwen3"]
    assert all(claims <= set(DECODERS) for claims in CLAIMS.values())


def _sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the random linear weights up so attention is peaked (near-uniform attention hides mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2 and not isinstance(
                    m, torch.nn.Embedding):
                m.weight.mul_(8.0)
    return model


def _padded_batch(n: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding in one row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # 4 prompt tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("model_type", sorted(CLAIMS["SSToken"]))
def test_sstoken_attention_recompute_matches_eager_attentions(model_type):
    torch.manual_seed(0)
    model = _sharpen(TINY[model_type](attn_implementation="eager")).eval()
    batch = _padded_batch()
    pruner = SSToken()
    pruner._install_hook(model)
    pruner._armed = True
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    hidden, pos = pruner._captured
    parts = pruner._hooked[1]
    ours = last_layer_attention(parts, hidden, pos, batch["attention_mask"])
    ref = out.attentions[-1].float().mean(1)
    valid = batch["attention_mask"].bool()
    s = ref.shape[-1]
    uniform = torch.ones(s, s).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand_as(ref)
    assert (ref[valid] - uniform[valid]).abs().max() > 0.1  # not near-uniform: recipes can be told apart
    torch.testing.assert_close(ours[valid], ref[valid], atol=2e-5, rtol=1e-4)
    if model_type == "qwen3":  # the recipe without q/k norms (the old recompute) is clearly wrong here
        plain = dataclasses.replace(parts, q_norm=None, k_norm=None)
        wrong = last_layer_attention(plain, hidden, pos, batch["attention_mask"])
        assert (wrong[valid] - ref[valid]).abs().max() > 0.05


def test_sstoken_recompute_ignores_lora_dropout():
    """The recompute runs the projections with dropout off: two calls in train mode agree exactly."""
    torch.manual_seed(0)
    module = _module("qwen3", LoRA(r=4, dropout=0.5))
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    module.train()
    batch = _padded_batch()
    pruner = SSToken()
    pruner._install_hook(module)
    pruner._armed = True
    with torch.no_grad():
        module(batch)
    hidden, pos = pruner._captured
    parts = pruner._hooked[1]
    a = last_layer_attention(parts, hidden, pos, batch["attention_mask"])
    b = last_layer_attention(parts, hidden, pos, batch["attention_mask"])
    assert torch.equal(a, b) and parts.module.training


# ----------------------------------------------------------------------------------- training matrix
_FOLDERS: dict[str, str] = {}


def _module(model_type: str, head=None) -> CausalLM:
    """A ``CausalLM`` over a tiny random model of ``model_type`` (saved once to a temporary folder)."""
    if model_type not in _FOLDERS:
        import tempfile

        folder = tempfile.mkdtemp(prefix=f"lp-{model_type}-")
        torch.manual_seed(0)
        TINY[model_type]().save_pretrained(folder)
        build_byte_tokenizer().save_pretrained(folder)
        _FOLDERS[model_type] = folder
    torch.manual_seed(0)
    return CausalLM(_FOLDERS[model_type], head=head or LoRA(r=4))


def _steps(module: CausalLM, batch: dict, prune, steps: int = 2) -> list[dict]:
    """A bare training loop: prune the batch, forward, backward, optimizer step; returns the pruned batches."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    module.train()
    seen = []
    for _ in range(steps):
        out = prune(batch)
        loss, _ = module.compute_loss(out)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append(out)
    return seen


@pytest.mark.parametrize("model_type", DECODERS)
def test_qtuning(model_type):
    module = _module(model_type)
    batch = causal_batch(n=8, length=16)
    pruner = QTuning(sample_ratio=0.5, token_ratio=0.5)
    for out in _steps(module, batch, lambda b: pruner(b, model=module)):
        assert out["input_ids"].shape[0] < batch["input_ids"].shape[0]  # fewer rows trained
        assert out["pruning_stats"]["kept_token_fraction"] < 1.0
    positions = batch["labels"] != -100
    module.eval()
    fast = score_tokens(module, batch, positions, fast=True)
    reference = score_tokens(module, batch, positions, fast=False)
    for a, b in zip(fast, reference, strict=True):  # the fast route computes the same function
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (model_type in FAST_MODEL_TYPES) == (model_type != "gemma2")  # Gemma-2 soft-caps its logits


@pytest.mark.parametrize("model_type", DECODERS)
def test_sstoken(model_type):
    module = _module(model_type)
    batch = causal_batch(n=4, length=16)
    pruner = SSToken(rho=0.5, rel_warmup_fraction=0.0)
    if model_type not in CLAIMS["SSToken"]:
        with pytest.raises(ValueError, match=rf"^SSToken cannot run on model_type '{model_type}' \(.*\): it needs"):
            pruner(batch, model=module)
        return
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    module.train()
    for _ in range(2):
        out = pruner(batch, model=module)
        # the training forward + the objective, with the pruner as the module's token selector
        result, weights, stats = train_forward_selection(module, pruner, out)
        assert torch.isfinite(result.loss)
        result.loss.backward()
        opt.step()
        opt.zero_grad()
        response = out["labels"] != -100
        response[:, 0] = False
        assert 0 < weights[response].sum() < response.sum()  # fewer tokens trained
        assert stats["kept_token_fraction"] == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("model_type", DECODERS)
def test_token_elimination(model_type):
    module = _module(model_type)
    cb = TokenElimination(block_size=4, keep_ratio=0.5, dense_layers=[], scorer="exact")
    if model_type not in CLAIMS["TokenElimination"]:
        with pytest.raises(TokenEliminationError,
                           match=rf"^TokenElimination (cannot run on|supports) .*'{model_type}'"):
            cb.attach(module.model)
        return
    cb.attach(module.model)
    try:
        batch = causal_batch(n=2, length=23)  # 24 tokens: 6 blocks of 4
        _steps(module, batch, lambda b: b)
        fractions = [float(f) for f in cb.last_kept_fraction.values()]
        assert len(fractions) == 2 and all(f <= 0.5 + 1e-6 for f in fractions)  # half the blocks attended
    finally:
        cb.detach()


@pytest.mark.parametrize("model_type", ["bert", "roberta", "t5"])
def test_encoders_are_refused_in_one_sentence(model_type):
    from lightning_peft.datamodules.pruning.sstoken import check_family

    model = TINY[model_type]()
    kind = "an encoder-decoder" if model_type == "t5" else "a bidirectional encoder"
    with pytest.raises(TokenEliminationError,
                       match=rf"^TokenElimination cannot run on model_type '{model_type}' .*\(it is {kind}\)"):
        TokenElimination().attach(model)
    with pytest.raises(ValueError, match=rf"^SSToken cannot run on model_type '{model_type}' .*\(it is {kind}\)"):
        check_family(model)
