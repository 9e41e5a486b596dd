"""The component matrix: every exported callback and batch pruner x {state round-trip, exact resume, DDP}.

One row per component in COMPONENTS (a test fails when an exported one has none). Each row states:

* how to build it and the tiny run that gives it a non-trivial state (``make``, ``module``, ``data``);
* the existing test that proves exact resume (interrupted + resumed == uninterrupted to 1e-6) and the
  one that proves 2-process DDP identical ranks. Those are not run twice: the matrix asserts that they
  exist (and, for a parametrized test, that the component is one of its parameters); they run in their
  own files. A component without such a test must get one there before it joins the matrix.

What this file runs itself is the state round-trip after a short real run: ``state_dict()`` → through
``torch.save`` / ``torch.load(weights_only=True)`` → a fresh instance's ``load_state_dict()`` → the same
state. A component whose documented state is empty (SSToken keeps none) says so with ``stateless``.
"""

from __future__ import annotations

import importlib
import inspect
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch
from helpers import cpu_threads, cpu_trainer

import lightning_peft.callbacks as callbacks_package
import lightning_peft.datamodules.pruning as pruning_package
from lightning_peft import CausalLM
from lightning_peft.callbacks import GreenTrainer, HalfFineTuning, TokenElimination
from lightning_peft.datamodules import SyntheticSFTDataModule
from lightning_peft.datamodules.pruning import BatchPruner, QTuning, SSToken
from lightning_peft.heads import FullFineTune, LoRA

cpu_threads()

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _full(layers: int = 2) -> CausalLM:
    module = CausalLM(backbone="tiny-llama", head=FullFineTune(), backbone_config={"num_hidden_layers": layers})
    module.set_optimizer("torch.optim.AdamW", lr=1e-2)
    return module


def _lora(layers: int = 2) -> CausalLM:
    module = CausalLM(backbone="tiny-llama", head=LoRA(r=4, alpha=8, target_modules=ATTN),
                      backbone_config={"num_hidden_layers": layers})
    module.set_optimizer("torch.optim.AdamW", lr=1e-2)
    return module


def _data(pruner: BatchPruner | None = None) -> SyntheticSFTDataModule:
    return SyntheticSFTDataModule(task="copy", num_digits=3, num_train=48, num_val=4, batch_size=8, seed=0,
                                  pruner=pruner)


@dataclass
class Row:
    """One component of the matrix."""

    cls: type
    make: Callable[[], Any]
    module: Callable[[], CausalLM]
    #: (test module, test function[, parameter id]) proving exact resume / 2-process DDP identical ranks
    resume: tuple[str, ...]
    ddp: tuple[str, ...]
    #: called on a fresh instance after ``load_state_dict`` (e.g. attaching it to a model) before reading its state
    after_load: Callable[[Any], None] | None = None
    #: the component documents that it keeps no state
    stateless: bool = False
    #: state entries that ``load_state_dict`` does not restore because ``setup`` derives them again from the
    #: model (compared only on the instance that ran); everything else must round-trip
    rederived: tuple[str, ...] = ()

    @property
    def is_pruner(self) -> bool:
        return issubclass(self.cls, BatchPruner)


def _attach_token_elimination(cb: TokenElimination) -> None:
    cb.attach(_lora(layers=3).model)


COMPONENTS: dict[str, Row] = {
    "HalfFineTuning": Row(
        HalfFineTuning, lambda: HalfFineTuning(seed=3, round_every="step", every_n=2, plot=False), _full,
        resume=("test_hft", "test_resume_mid_round_equals_uninterrupted"),
        ddp=("test_hft", "test_ddp_two_cpu_ranks_identical_with_round_change")),
    "GreenTrainer": Row(
        GreenTrainer, lambda: GreenTrainer(rho=0.5, interval=2, interval_unit="step", plot=False), _full,
        resume=("test_greentrainer", "test_resume_equals_uninterrupted"),
        ddp=("test_greentrainer", "test_ddp_two_cpu_ranks_identical"),
        rederived=("candidates",)),  # GreenTrainer.setup lists the candidate tensors from the model again
    "TokenElimination": Row(
        TokenElimination,
        lambda: TokenElimination(block_size=4, keep_ratio=0.5, dense_layers=[0], calibration_batches=1,
                                 predictor_steps=5, predictor_hidden=[8, 8]),
        lambda: _lora(layers=3),
        resume=("test_lemo_trainer", "test_resume_restores_predictors_and_continues_exactly"),
        ddp=("test_lemo_trainer", "test_token_elimination_ddp_two_cpu_ranks_identical"),
        after_load=_attach_token_elimination),
    "QTuning": Row(
        QTuning, lambda: QTuning(sample_ratio=0.5, token_ratio=0.5), _lora,
        resume=("test_pruning_runs", "test_pruned_run_resumes_exactly", "qtuning"),
        ddp=("test_pruning_runs", "test_ddp_two_ranks_identical", "qtuning")),
    "SSToken": Row(
        SSToken, lambda: SSToken(rho=0.6, rel_warmup_steps=1), _lora,
        resume=("test_pruning_runs", "test_pruned_run_resumes_exactly", "sstoken"),
        ddp=("test_pruning_runs", "test_ddp_two_ranks_identical", "sstoken"), stateless=True),
}


# ---------------------------------------------------------------------------------------------- completeness
def _leaves_open(cls: type) -> bool:
    """An abstract base: some method (resolved through the MRO) raises NotImplementedError."""
    return any("NotImplementedError" in fn.__code__.co_names for _, fn in inspect.getmembers(cls, inspect.isfunction))


def _exported_components() -> set[type]:
    found = set()
    for package, base in ((callbacks_package, L.Callback), (pruning_package, BatchPruner)):
        for name in package.__all__:
            obj = getattr(package, name)
            if isinstance(obj, type) and issubclass(obj, base) and not _leaves_open(obj):
                found.add(obj)
    return found


def _components_without_row() -> list[str]:
    return sorted(c.__name__ for c in _exported_components() - {row.cls for row in COMPONENTS.values()})


def test_every_exported_callback_and_pruner_has_a_row():
    missing = _components_without_row()
    assert not missing, f"exported callbacks/pruners without a row in tests/test_component_matrix.py: {missing}"


def test_a_newly_exported_component_without_a_row_is_reported(monkeypatch):
    class NewPruner(BatchPruner):
        def __call__(self, batch, model=None):
            return batch

    assert _leaves_open(BatchPruner) and not _leaves_open(NewPruner)
    monkeypatch.setattr(pruning_package, "NewPruner", NewPruner, raising=False)
    monkeypatch.setattr(pruning_package, "__all__", [*pruning_package.__all__, "NewPruner"])
    assert _components_without_row() == ["NewPruner"]


# ---------------------------------------------------------------------------------------------- resume and DDP
def _proof(ref: tuple[str, ...]) -> Any:
    module_name, function_name, *param = ref
    fn = getattr(importlib.import_module(module_name), function_name, None)
    assert callable(fn), f"{module_name}.{function_name} is gone; the matrix row points at it"
    if param:
        ids = [i for mark in getattr(fn, "pytestmark", []) if mark.name == "parametrize"
               for i in (mark.kwargs.get("ids") or [])]
        assert param[0] in ids, f"{module_name}.{function_name} no longer runs {param[0]!r} (its ids: {ids})"
    return fn


@pytest.mark.parametrize("name", COMPONENTS)
def test_exact_resume_is_proven(name):
    """Interrupted + resumed == uninterrupted to 1e-6: proven by the row's test in its own file."""
    _proof(COMPONENTS[name].resume)


@pytest.mark.parametrize("name", COMPONENTS)
def test_ddp_identical_ranks_is_proven(name):
    """2-process DDP gives identical ranks: proven by the row's test (marked ``ddp``) in its own file."""
    fn = _proof(COMPONENTS[name].ddp)
    assert any(mark.name == "ddp" for mark in getattr(fn, "pytestmark", [])), f"{fn.__name__} is not marked ddp"


# ---------------------------------------------------------------------------------------------- state round-trip
def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _StateAt(L.Callback):
    """Keeps the component's state at the end of training step ``step`` (mid-epoch: QTuning's epoch-end plot
    consumes its points)."""

    def __init__(self, read: Callable[[], dict[str, Any]], step: int) -> None:
        self.read, self.step, self.state = read, step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.state = self.read()


@pytest.mark.parametrize("name", COMPONENTS)
def test_state_round_trip_after_a_short_run(name, tmp_path):
    row = COMPONENTS[name]
    L.seed_everything(0)
    component = row.make()
    if row.is_pruner:
        data, extra = _data(component), []
    else:
        data, extra = _data(), [component]
    snap = _StateAt(component.state_dict, step=3)
    cpu_trainer(tmp_path, 4, [*extra, snap]).fit(row.module(), datamodule=data)
    state = snap.state
    assert state is not None
    if row.stateless:
        assert state == {} and row.make().state_dict() == {}
        return
    assert not _same(state, row.make().state_dict()), "the short run left the state as a fresh instance has it"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = row.make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # plain values and tensors only
    if row.after_load is not None:
        row.after_load(fresh)
    restored = fresh.state_dict()
    for key in row.rederived:
        assert state[key], f"{key} is empty after the run"
        restored.pop(key), state.pop(key)
    assert _same(restored, state)
