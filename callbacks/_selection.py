"""What HalfFineTuning and GreenTrainer share: callbacks that choose which backbone tensors train.

:class:`SelectionCallback` holds the mechanics that do not depend on *how* a method chooses:

* **mask application**: ``requires_grad`` from a name -> bool mask; a frozen tensor gets ``grad = None``
  (never zeros, so AdamW applies neither momentum nor weight decay to it and autograd skips its
  weight-gradient GEMM); every tensor a mask froze is marked, so a fresh callback on an already-masked
  model sees the same candidates;
* **optimizer state** of tensors that became frozen: :meth:`SelectionCallback.forget_optimizer_state`
  drops it (used by methods whose frozen tensors must restart fresh when trained again);
* **strategy guards**: FSDP and DeepSpeed are refused or warned about at ``setup``; under DDP the
  wrapped model's public ``find_unused_parameters`` (``torch.nn.parallel.DistributedDataParallel``,
  reached as ``trainer.strategy.model`` once the strategy has wrapped the module) must be true,
  because the set of tensors with gradients changes after the wrap (checked at ``on_fit_start``);
* **cross-rank agreement**: rank 0's digest of a mask is broadcast and compared on every rank (a
  mismatch stops every rank with an error);
* **state plumbing**: ``state_dict`` adds a version to the subclass's plain-value state, and
  ``load_state_dict`` refuses a newer version in one sentence;
* **pictures**: :func:`lightning_peft.figures.log_figure` on every rank (it touches a collective).

It also resolves, from the architecture table (:mod:`lightning_peft.architectures`), which block each
parameter belongs to (:func:`block_positions`), for the layers x tensors pictures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft import architectures as A
from lightning_peft.figures import log_figure

FROZEN_MARK = "_lp_selection_frozen"  # set on tensors a selection mask froze (they stay candidates)


def target(module: nn.Module) -> nn.Module:
    """The attached model of a lightning_peft module (its ``.model``), else the module itself."""
    inner = getattr(module, "model", None)
    if isinstance(module, L.LightningModule) and isinstance(inner, nn.Module):
        return inner
    return module


def apply_mask(model: nn.Module, mask: dict[str, bool]) -> tuple[list[str], list[str]]:
    """``requires_grad = mask[name]`` for every name in ``mask`` (others untouched); a frozen tensor
    loses its gradient (``None``). Returns the names that (became frozen, became trainable)."""
    frozen_now, trained_now = [], []
    for name, p in model.named_parameters():
        if name not in mask:
            continue
        train = bool(mask[name])
        if p.requires_grad and not train:
            frozen_now.append(name)
        elif train and not p.requires_grad:
            trained_now.append(name)
        p.requires_grad_(train)
        setattr(p, FROZEN_MARK, not train)
        if not train:
            p.grad = None  # None, not zeros: AdamW then applies no momentum and no weight decay
    return frozen_now, trained_now


def candidate_names(model: nn.Module) -> list[str]:
    """Tensors a selection may freeze: those the head left trainable, and those a mask froze earlier."""
    return [n for n, p in model.named_parameters() if p.requires_grad or getattr(p, FROZEN_MARK, False)]


def digest(names: Iterable[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def block_positions(model: nn.Module) -> dict[str, tuple[int, str]]:
    """``{parameter name: (block index, path inside the block)}`` for every parameter inside the blocks
    of ``model`` (names as in ``model.named_parameters()``), blocks from the architecture table.
    Raises :class:`~lightning_peft.architectures.UnsupportedArchitecture` for families not in the table."""
    pnames = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[int, str]] = {}
    for stack in A.block_stacks(model):
        for i, block in enumerate(stack):
            for rel, p in block.named_parameters():
                if id(p) in pnames and pnames[id(p)] not in out:
                    out[pnames[id(p)]] = (i, rel)
    return out


class SelectionCallback(L.Callback):
    """Base of callbacks that set which tensors train (see the module docstring).

    Subclasses set ``component`` (their name in messages), ``error`` (their ValueError subclass) and
    ``state_version``, and implement ``_state()`` / ``_load_state(state)`` with plain values.
    """

    component = "SelectionCallback"
    error: type[ValueError] = ValueError
    state_version = 1

    # ----------------------------------------------------------------- guards
    def check_module(self, pl_module: L.LightningModule) -> None:
        """The head must leave the backbone trainable (the callback decides what trains)."""
        head = getattr(pl_module, "head", None)
        if head is not None and not getattr(head, "trains_backbone", False):
            raise self.error(
                f"{self.component} chooses which backbone tensors train, but head {head!r} freezes the backbone; "
                f"use `head: lightning_peft.heads.FullFineTune` with {self.component}."
            )

    def check_strategy(self, trainer: L.Trainer, refuse_sharded: bool) -> None:
        """At ``setup``: FSDP / DeepSpeed are refused (``refuse_sharded``) or warned about."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        strategy = trainer.strategy
        if not isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
            return
        kind = type(strategy).__name__
        if refuse_sharded:
            raise self.error(
                f"{self.component} does not support the {kind} (it changes requires_grad during training); "
                "use `strategy: ddp_find_unused_parameters_true` (or a single device)."
            )
        rank_zero_warn(
            f"{self.component} has been tested with single-device and DDP strategies only, not {kind} "
            "(FSDP needs use_orig_params=True for mixed frozen/trainable units)."
        )

    def check_ddp(self, trainer: L.Trainer) -> None:
        """After the wrap (``on_fit_start``): a DDP-wrapped model must find unused parameters."""
        from torch.nn.parallel import DistributedDataParallel

        wrapped = getattr(trainer.strategy, "model", None)
        if isinstance(wrapped, DistributedDataParallel) and not wrapped.find_unused_parameters:
            raise self.error(
                f"{self.component} changes which tensors train after DDP has wrapped the model, which needs "
                "find_unused_parameters=True: use `strategy: ddp_find_unused_parameters_true` "
                "(or DDPStrategy(find_unused_parameters=True))."
            )

    # ----------------------------------------------------------------- mask mechanics
    @staticmethod
    def forget_optimizer_state(trainer: L.Trainer, model: nn.Module, names: Iterable[str]) -> None:
        """Drop the optimizer state (moments, step) of ``names``: stale moments are never applied later."""
        params = dict(model.named_parameters())
        for opt in trainer.optimizers:
            for name in names:
                opt.state.pop(params[name], None)

    def check_agreement(self, trainer: L.Trainer, names: Iterable[str], what: str) -> None:
        """Every rank holds the same ``names`` (rank 0's digest is broadcast and compared)."""
        if trainer.world_size <= 1:
            return
        mine = digest(names)
        same = trainer.strategy.broadcast(mine, src=0) == mine
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise RuntimeError(
                f"{self.component}: ranks disagree on {what}; give every rank the same seed, model and data order."
            )

    def draw(self, trainer: L.Trainer, name: str, figure: Any, filename: str) -> str | None:
        """Send a picture to the loggers; call on every rank (only rank 0 draws)."""
        path = log_figure(trainer, name, figure, trainer.global_step, filename=filename)
        if path is not None:
            self.last_plot = path
        return path

    # ----------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.state_version, **self._state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = int(state_dict.get("version", 1))
        if version > self.state_version:
            raise self.error(
                f"{self.component} state version {version} comes from a newer lightning-peft (this one reads "
                f"up to {self.state_version}); upgrade lightning-peft to resume this checkpoint."
            )
        self._load_state(state_dict)


__all__ = ["FROZEN_MARK", "SelectionCallback", "apply_mask", "block_positions", "candidate_names",
           "digest", "target"]
