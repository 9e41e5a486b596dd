"""The segmented (chunked LM head) loss used for long-context fine-tuning with LeMo: value, gradient,
evaluation metrics and memory (spec ``lemo.md`` section 6, item 10).
"""

from __future__ import annotations

import pytest
import torch
from lemo_common import B, lm_batch, lora_grads, tiny

from lightning_peft.heads.full import FullFineTune
from lightning_peft.objectives import TokenCrossEntropy

# ------------------------------------------------------------------------------------------ 10


@pytest.mark.parametrize("segment", [8, 5, 31, 64])
def test_segmented_loss_equals_plain_loss_in_value_and_gradient(segment):
    batch = lm_batch()
    batch["labels"][:, :6] = -100
    batch["labels"][0, 20:23] = -100
    plain = tiny()
    seg = tiny(objective=TokenCrossEntropy(segment_size=segment))
    seg.load_state_dict(plain.state_dict())
    lp, _ = plain.compute_loss(batch)
    ls, logits = seg.compute_loss(batch)
    assert logits is None
    torch.testing.assert_close(ls, lp, atol=1e-6, rtol=1e-6)
    gp, gs = lora_grads(plain, batch), lora_grads(seg, batch)
    for name in gp:
        torch.testing.assert_close(gs[name], gp[name], atol=1e-6, rtol=1e-5)


def test_segmented_loss_full_finetune_gradient_and_eval_metrics():
    batch = lm_batch()
    plain = tiny(head=FullFineTune(), layers=2)
    seg = tiny(head=FullFineTune(), layers=2, objective=TokenCrossEntropy(segment_size=7))
    seg.load_state_dict(plain.state_dict())
    gp, gs = lora_grads(plain, batch), lora_grads(seg, batch)
    assert "lm_head.weight" in gp
    for name in gp:
        torch.testing.assert_close(gs[name], gp[name], atol=1e-6, rtol=1e-5)
    for m in (plain, seg):
        m.eval()
        with torch.no_grad():
            m._eval_step(batch, "val")
    for key in ("loss", "token_acc", "seq_acc"):
        torch.testing.assert_close(seg.eval_metrics["val"][key].compute(), plain.eval_metrics["val"][key].compute())


def test_segmented_loss_keeps_logits_off_the_saved_tensors():
    batch = lm_batch(n=64)
    plain = tiny(layers=1)
    seg = tiny(layers=1, objective=TokenCrossEntropy(segment_size=8))
    vocab_sized = {}
    for name, m in (("plain", plain), ("seg", seg)):
        sizes = []

        def pack(t, sizes=sizes):
            if 260 in t.shape:  # vocabulary-sized: logits (or the LM head weight, 260 x 64)
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.compute_loss(batch)
        vocab_sized[name] = max(sizes, default=0)
    assert vocab_sized["plain"] >= B * 63 * 260  # the whole logits tensor is saved
    assert vocab_sized["seg"] <= 260 * 64  # only the LM head weight; logits are recomputed in backward


def test_fused_chunk_cross_entropy_gradcheck_and_weighted_smoothed_loss():
    """The frozen-head segmented path forms d ce / d h in the forward: exact under gradcheck (fp64), with
    ignored labels and label smoothing, and equal to the plain loss with per-token weights."""
    from lightning_peft.objectives.losses import _FusedChunkCE

    torch.manual_seed(0)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(11, 6, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 5))
    y[0, 1] = y[1, 4] = -100
    for smoothing in (0.0, 0.1):
        assert torch.autograd.gradcheck(lambda h, s=smoothing: _FusedChunkCE.apply(h, w, b, y, s), (h,))
    batch = lm_batch()
    batch["labels"][:, :5] = -100
    batch["token_weights"] = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(3))
    plain = tiny(objective=TokenCrossEntropy(label_smoothing=0.1))
    seg = tiny(objective=TokenCrossEntropy(label_smoothing=0.1, segment_size=6))
    seg.load_state_dict(plain.state_dict())
    torch.testing.assert_close(seg.compute_loss(batch)[0], plain.compute_loss(batch)[0], atol=1e-6, rtol=1e-6)
    gp, gs = lora_grads(plain, batch), lora_grads(seg, batch)
    for name in gp:
        torch.testing.assert_close(gs[name], gp[name], atol=1e-6, rtol=1e-5)
