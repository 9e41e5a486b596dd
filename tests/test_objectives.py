"""The objective matrix: every exported objective × (value equals its formula on a hand-built batch,
``-100`` ignored, token weights honoured, the token-selection channel, finite gradient, bf16-mixed
autocast on CPU). A test fails when an exported objective has no row.

References are written out by hand in Python floats (``log(sum(exp(z))) - z[y]``), independent of the
package's cross-entropy.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import cpu_threads

import lightning_peft.objectives as objectives
from lightning_peft import CausalLM
from lightning_peft.heads import LoRA
from lightning_peft.objectives import (
    ClassificationCrossEntropy,
    LogitsObjective,
    LossOutput,
    Objective,
    SegmentedTokenCrossEntropy,
    TokenCrossEntropy,
    TokenSelector,
)

cpu_threads()


# ---------------------------------------------------------------------------------------- hand formulas
def ce_by_hand(z: list[float], y: int, smoothing: float = 0.0) -> float:
    """Cross-entropy of one row of logits ``z`` against class ``y``, label-smoothed, in Python floats."""
    lse = math.log(sum(math.exp(v) for v in z))
    return (1 - smoothing) * (lse - z[y]) + smoothing * (lse - sum(z) / len(z))


def next_token_by_hand(logits, labels, weights=None, smoothing=0.0) -> float:
    """``sum_t w_t ce(logits[t-1], labels[t]) / sum_t w_t`` over labels other than -100."""
    num = den = 0.0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            w = 1.0 if weights is None else float(weights[b, t])
            num += w * ce_by_hand([float(v) for v in logits[b, t - 1]], y, smoothing)
            den += w
    return num / den


def classes_by_hand(logits, labels, smoothing=0.0) -> float:
    rows = [(b, int(labels[b])) for b in range(labels.shape[0]) if int(labels[b]) != -100]
    return sum(ce_by_hand([float(v) for v in logits[b]], y, smoothing) for b, y in rows) / len(rows)


# ---------------------------------------------------------------------------------------- modules
class LinearStub(torch.nn.Module):
    """A module whose forward is ``logits = x @ I`` (a linear layer, so autocast applies to it)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(x.clone())
        self.register_buffer("eye", torch.eye(x.shape[-1]))
        self.head = None
        self.token_selector = None

    def forward(self, batch):
        return SimpleNamespace(logits=torch.nn.functional.linear(self.x, self.eye))

    def grad(self):
        return self.x.grad


class TinyLM:
    """A real tiny causal LM (the segmented loss runs the decoder body itself); gradient = the LoRA weights'."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # move LoRA B off zero so the adapter takes part
            for p in self.module.model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)

    def logits(self, batch):
        with torch.no_grad():
            return self.module(batch).logits


def token_batch():
    """Hand-built: 2 rows × 5 positions, vocabulary 4; small-integer logits, -100 on prompts."""
    logits = torch.tensor([
        [[2.0, 0, 0, 1], [0, 3, 0, 0], [1, 1, 1, 1], [0, 0, 2, 0], [5, 0, 0, 0]],
        [[0.0, 1, 0, 0], [2, 2, 0, 0], [0, 0, 0, 4], [1, 0, 1, 0], [0, 0, 0, 0]],
    ])
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, 0, 3, 1]])
    weights = torch.tensor([[0.0, 1.0, 0.5, 1.0, 2.0], [0.0, 0.0, 1.0, 0.0, 3.0]])
    return logits, labels, weights


def lm_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 260, (2, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7] = -100
    weights = torch.rand(ids.shape, generator=g)
    weights[0, 6] = 0.0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, weights


# ---------------------------------------------------------------------------------------- the rows
def _token_row(make):
    def build():
        logits, labels, weights = token_batch()
        return LinearStub(logits), {"labels": labels}, weights, lambda batch: logits
    return {"make": make, "build": build, "token_level": True, "formula": next_token_by_hand}


def _segmented_build():
    lm = TinyLM()
    batch, weights = lm_batch()
    return lm.module, batch, weights, lm.logits


def _class_build():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 4.0, 0.0], [3.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, -100, 1])
    return LinearStub(logits), {"labels": labels}, None, lambda batch: logits


ROWS = {
    "TokenCrossEntropy": _token_row(lambda s: TokenCrossEntropy(label_smoothing=s)),
    "SegmentedTokenCrossEntropy": {"make": lambda s: SegmentedTokenCrossEntropy(label_smoothing=s, segment_size=3),
                                   "build": _segmented_build, "token_level": True, "formula": next_token_by_hand},
    "ClassificationCrossEntropy": {"make": lambda s: ClassificationCrossEntropy(label_smoothing=s),
                                   "build": _class_build, "token_level": False,
                                   "formula": lambda lg, lb, w=None, smoothing=0.0: classes_by_hand(lg, lb, smoothing)},
}


def test_every_exported_objective_has_a_row():
    exported = {name for name in objectives.__all__
                if isinstance(getattr(objectives, name), type) and issubclass(getattr(objectives, name), Objective)
                and getattr(objectives, name) not in (Objective, LogitsObjective)}
    assert exported == set(ROWS), f"add a row to ROWS for {sorted(exported - set(ROWS))}"
    assert {cls.__name__ for cls in objectives.OBJECTIVES} == set(ROWS)


def _grad(module):
    if isinstance(module, LinearStub):
        return module.grad()
    return torch.cat([p.grad.flatten() for p in module.model.parameters() if p.requires_grad and p.grad is not None])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_value_equals_formula_and_ignores_minus_100(name, smoothing):
    row = ROWS[name]
    module, batch, _, logits_of = row["build"]()
    out = row["make"](smoothing).loss(module, batch)
    assert isinstance(out, LossOutput) and out.loss.dim() == 0
    want = row["formula"](logits_of(batch), batch["labels"], None, smoothing=smoothing)
    assert float(out.loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    with torch.no_grad():  # evaluation: predictions for the metrics
        preds = row["make"](smoothing).loss(module, batch).predictions
    if name == "SegmentedTokenCrossEntropy":  # no whole logits: next-token ids instead
        assert not preds.is_floating_point()
        assert torch.equal(preds, logits_of(batch)[:, :-1].argmax(-1))
    else:
        torch.testing.assert_close(preds, logits_of(batch))
    # -100 ignored: changing a label that is -100 into another -100 position's value changes nothing, and
    # masking one more label gives the formula over the rest
    masked = dict(batch, labels=batch["labels"].clone())
    flat = masked["labels"].view(-1)
    first_valid = int((flat[1:] != -100).nonzero()[0]) + 1
    flat[first_valid] = -100
    got = float(row["make"](smoothing).loss(module, masked).loss)
    assert got == pytest.approx(row["formula"](logits_of(batch), masked["labels"], None, smoothing=smoothing),
                                rel=1e-5, abs=1e-6)
    assert got != pytest.approx(float(out.loss), rel=1e-6)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_token_weights_honoured(name):
    row = ROWS[name]
    if not row["token_level"]:
        pytest.skip(f"{name} has no tokens to weight")
    module, batch, weights, logits_of = row["build"]()
    out = row["make"](0.0).loss(module, dict(batch, token_weights=weights))
    want = row["formula"](logits_of(batch), batch["labels"], weights)
    assert float(out.loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert want != pytest.approx(row["formula"](logits_of(batch), batch["labels"]), rel=1e-4)  # weights matter


@pytest.mark.parametrize("name", sorted(ROWS))
def test_token_selection_channel(name):
    """A TokenSelector registered on the module replaces the batch's weights and logs its statistics;
    one with nothing to select (None) leaves them; the batch is not modified."""
    row = ROWS[name]
    if not row["token_level"]:
        pytest.skip(f"{name} has no tokens to select")
    module, batch, weights, logits_of = row["build"]()
    seen = {}

    class Half(TokenSelector):
        def select_tokens(self, token_loss, b):
            seen["loss"] = token_loss
            return weights, {"kept": 3.0}

    class Nothing(TokenSelector):
        def select_tokens(self, token_loss, b):
            return None

    module.token_selector = Half()
    plain = dict(batch)
    out = row["make"](0.0).loss(module, plain)
    assert float(out.loss) == pytest.approx(row["formula"](logits_of(batch), batch["labels"], weights), rel=1e-5)
    assert out.logs == {"pruning/kept": 3.0} and set(plain) == set(batch)
    labels = batch["labels"]
    assert seen["loss"].shape == labels.shape and not seen["loss"].requires_grad
    assert (seen["loss"][:, 0] == 0).all() and (seen["loss"][labels == -100] == 0).all()
    module.token_selector = Nothing()
    out = row["make"](0.0).loss(module, dict(batch, token_weights=weights))
    assert float(out.loss) == pytest.approx(row["formula"](logits_of(batch), batch["labels"], weights), rel=1e-5)
    module.token_selector = None


@pytest.mark.parametrize("name", sorted(ROWS))
def test_finite_gradient_and_zero_weight_tokens_get_none(name):
    row = ROWS[name]
    module, batch, weights, _ = row["build"]()
    if row["token_level"]:
        batch = dict(batch, token_weights=weights)
    row["make"](0.1).loss(module, batch).loss.backward()
    grad = _grad(module)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if isinstance(module, LinearStub) and row["token_level"]:
        dead = (batch["labels"] == -100) | (weights == 0)  # token t's loss reads the logits at t-1
        rows, cols = dead[:, 1:].nonzero(as_tuple=True)
        assert grad[rows, cols].abs().max() == 0
        assert grad[:, -1].abs().max() == 0  # the last position predicts nothing


@pytest.mark.parametrize("name", sorted(ROWS))
def test_bf16_mixed_autocast_on_cpu(name):
    row = ROWS[name]
    module, batch, weights, _ = row["build"]()
    if row["token_level"]:
        batch = dict(batch, token_weights=weights)
    full = float(row["make"](0.0).loss(module, batch).loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = row["make"](0.0).loss(module, batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert float(out.loss) == pytest.approx(full, rel=3e-2)
    out.loss.backward()
    assert torch.isfinite(_grad(module)).all()


def test_token_cross_entropy_with_segment_size_delegates_to_the_segmented_objective():
    lm = TinyLM()
    batch, weights = lm_batch()
    batch["token_weights"] = weights
    out = TokenCrossEntropy(segment_size=4).loss(lm.module, batch)
    ref = SegmentedTokenCrossEntropy(segment_size=4).loss(lm.module, batch)
    assert torch.equal(out.loss, ref.loss)
    assert float(out.loss) == pytest.approx(next_token_by_hand(lm.logits(batch), batch["labels"], weights), rel=1e-5)
    with pytest.raises(ValueError, match="segment_size=0"):
        TokenCrossEntropy(segment_size=0)


def test_head_with_its_own_loss_is_honoured_by_the_objective_base():
    class OwnLoss(LinearStub):
        def forward(self, batch):
            return SimpleNamespace(logits=super().forward(batch).logits, loss=torch.tensor(7.5))

    logits, labels, _ = token_batch()
    module = OwnLoss(logits)
    module.head = SimpleNamespace(own_loss=True)
    for objective in (TokenCrossEntropy(), SegmentedTokenCrossEntropy(segment_size=2)):
        assert float(objective.loss(module, {"labels": labels}).loss) == 7.5
