"""GreenTrainer: train the parameter tensors that buy the most loss reduction per backward FLOP.

Huang, Yin, Huang, Gao, *Towards Green AI in Fine-tuning Large Language Models via Adaptive
Backpropagation*, ICLR 2024 (arXiv 2309.13192); official code github.com/pittisl/GreenTrainer.

Every ``interval`` epochs (or steps) the callback

1. estimates each tensor's importance from one real optimizer update on one batch,
   ``I_k = −Σ g¹_k·Δw_k`` (first-order loss change caused by tensor ``k``'s update), normalised by
   ``max |I|``;
2. chooses, by dynamic programming, the tensor set of maximal importance whose backward FLOPs fit
   ``ρ_bp·T_bp``, where ``ρ_bp`` turns the requested fraction ``rho`` of full fine-tuning's
   *training* FLOPs (forward + backward) into a fraction of its backward FLOPs. Training tensor
   ``i`` costs its own weight gradient plus the activation gradients of every op between the loss
   and ``i`` (deep tensors are expensive);
3. sets ``requires_grad`` to the selection. Autograd then skips the weight gradients of unselected
   tensors and stops back-propagating below the deepest selected one; unselected tensors keep
   ``grad = None``, so the (single, never rebuilt) optimizer does not move them.

Use it with the ``FullFineTune`` head (the callback decides what trains)::

    trainer:
      strategy: auto                    # or ddp_find_unused_parameters_true on several devices
      callbacks:
        - class_path: lightning_peft.callbacks.GreenTrainer
          init_args: {rho: 0.5, interval: 2, interval_unit: epoch}
    model:
      class_path: lightning_peft.CausalLM
      init_args:
        backbone: tiny-llama
        head: {class_path: lightning_peft.heads.FullFineTune}

The FLOPs model (``t_fp``, ``t_dy``, ``t_dw``) is **measured** once, on the first importance batch,
with ``torch.utils.flop_counter.FlopCounterMode`` (so it counts what that counter counts: matmuls
and attention kernels, not element-wise ops, norms, embeddings look-ups or bias sums):

* every counted op is attributed to the innermost module that runs it and placed at its position in
  forward execution order; backward order is the reverse (the chain approximation of the official
  code, which reverses ``named_parameters()``; here the real execution order is used, so norms and
  parallel branches sit where they run);
* a module that owns parameters (``Linear``, GPT-2 ``Conv1D``, the LM head, ...) gets
  ``t_dy = t_dw = its forward FLOPs`` (a matmul's two backward matmuls have the forward's size),
  ``t_dy`` only for ops whose activation input carries a gradient;
* counted ops that run in a module without parameters of its own (the attention core: SDPA or the
  ``QKᵀ``/``AV`` matmuls) form weight-less pseudo-nodes, never selectable but paid when anything
  below them trains; their ``t_dy`` is measured by replaying the op once under the counter with
  gradients on its activation inputs (SDPA: 2.5× its forward FLOPs, as the counter's formula says);
* a tensor used by several modules (tied input embedding / LM head) sits at its deepest use and
  sums the weight-gradient FLOPs of all uses.

On CPU, PyTorch's counter has no formula for the CPU flash-attention kernel; :func:`flop_counter`
adds one (the counter's own SDPA formulas), so CPU and GPU counts agree.

Departures from the paper / official code (``[I]``: the spec's or this implementation's proposal):

* [I] Profile measured with ``FlopCounterMode`` from execution order instead of per-architecture
  hand formulas; attention core as a pseudo-node (spec §3.1 proposal, generalised to every model).
* [I] A tensor's own module's activation gradient is not charged when that tensor is the deepest
  selected one (the official accounting charges it; autograd does not compute it). In the DP's
  terms ``t_dy[i]`` is the activation-gradient cost of reaching tensor ``i`` from tensor ``i−1``.
* [I] Costs are quantised by rounding **up** and the budget is ``⌊ρ_bp·Tq⌋``, so the predicted cost
  bounds the real one (the official code floors costs, which can overshoot the budget).
* [I] Exact O(N·T) DP by default (``dp="exact"``); the official recurrence, re-derived from its
  description, is ``dp="official"`` (feasible but sometimes sub-optimal, e.g. its ``N_limit``
  off-by-one drops the deepest tensor when the whole chain fits).
* [I] The importance pass restores the weights **and the optimizer state** (the official code leaves
  Adam's moments and step counter advanced by two steps), does not step the scheduler, does not
  count as a training step, logs nothing as training loss and leaves the RNG untouched; both of its
  forward passes see the same dropout draws. ``Σ g·Δw`` is accumulated in float64. Its gradients
  come from ``torch.autograd.grad`` on the unwrapped module (a plain ``backward()`` outside DDP's
  forward marks parameters as used in DDP's reducer and breaks the next step).
* [I] When ``rho`` leaves no backward budget (ρ_bp ≤ 0, clamped to 0.05) or the budget fits no
  tensor, a warning states the effective ρ; if nothing fits, the cheapest useful tensor trains (a
  step must train something).
* [I] Only tensors that fit the budget on their own (reach cost + own ``t_dw``) get an importance
  estimate (spec §3.3, tightened); the others get 0 and stay frozen during the pass.
* Re-selected tensors resume with their old Adam moments (as in the official code).
* DDP: each rank estimates importance on its own batch, the raw estimates are averaged with
  ``strategy.reduce``, every rank runs the deterministic DP, and rank 0's mask is broadcast.
  DDP needs ``find_unused_parameters=True`` (the wrapped model's public attribute is checked at
  ``on_fit_start``); every candidate stays trainable until the model is wrapped (the mask is first
  applied at the first training batch). The candidates and each mask are digest-checked across ranks.
  The picture of each selection goes through :func:`lightning_peft.figures.log_figure` on every rank
  (the run folder is a collective), drawn by rank 0 only.

Architectures: the FLOPs model is measured, not written per family, so every family of the architecture
table (:mod:`lightning_peft.architectures`) with one stack of blocks works (Llama, Mistral, Qwen2/3,
Gemma/Gemma-2, Phi-3, GPT-2, GPT-NeoX, OPT and BLOOM, the paper's two families, BERT, RoBERTa); the
table also places each tensor in its block for the picture. T5's two stacks and families outside the
table are refused in one sentence (:func:`check_architecture`). The loss is the module's own
``compute_loss(batch)`` plus the head's regularisation, exactly what ``training_step`` optimises.

Files: FLOPs model ``_greentrainer_flops.py``, importance ``_greentrainer_importance.py``, DP
``_greentrainer_dp.py``, shared selection mechanics ``_selection.py``, pictures ``_selection_plot.py``.

Public helpers: :func:`flop_counter`, :func:`measure_step_flops`, :func:`measure_forward_flops`,
:func:`profile_flops` (also ``GreenTrainer.profile``), :func:`tensor_importance`,
:func:`plan_selection` and :func:`apply_mask`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_peft.callbacks._greentrainer_dp import DP_ROUTINES, backward_budget_fraction, feasible, quantize
from lightning_peft.callbacks._greentrainer_flops import (
    CUSTOM_FLOPS,
    FlopsProfile,
    GreenTrainerError,
    check_architecture,
    flop_counter,
    measure_forward_flops,
    measure_step_flops,
    profile_flops,
)
from lightning_peft.callbacks._greentrainer_importance import tensor_importance
from lightning_peft.callbacks._selection import SelectionCallback, block_positions
from lightning_peft.callbacks._selection import apply_mask as _apply
from lightning_peft.callbacks._selection_plot import mask_figure
from lightning_peft.compat import callback_state_key


# ------------------------------------------------------------------------------------ selection
@dataclass
class Selection:
    """One GreenTrainer decision over ``profile.names``."""

    mask: list[bool]
    rho_bp: float
    clamped: bool  # ρ_bp ≤ 0 was clamped to 0.05 (spec §3.2)
    fallback: bool  # nothing fitted the budget: the cheapest useful tensor was taken instead
    budget: int
    predicted_bp: float  # FLOPs, from the unquantised profile
    predicted_rho: float  # (t_fp + predicted_bp) / (t_fp + t_bp)


def _budget(profile: FlopsProfile, rho: float, quantization: int) -> tuple[float, bool, list[int], list[int], int]:
    rho_bp, clamped = backward_budget_fraction(rho, profile.t_fp, profile.t_bp)
    q_dy, q_dw = quantize(profile.t_dy, profile.t_dw, profile.t_bp, quantization)
    budget = sum(q_dy) + sum(q_dw) if rho_bp >= 1.0 else int(math.floor(rho_bp * quantization + 1e-9))
    return rho_bp, clamped, q_dy, q_dw, budget


def plan_selection(profile: FlopsProfile, importance: list[float], rho: float, quantization: int = 1000,
                   dp: str = "exact") -> Selection:
    """ρ conversion (§3.2), quantisation and the DP (§3.5) for normalised ``importance`` (``I > 0`` is
    useful). Pure: the same inputs give the same mask on every rank.

    When nothing fits the budget, the single cheapest tensor (among those with ``I > 0`` when there
    are any) is selected instead and ``fallback`` is set, so that a step always trains something.
    """
    rho_bp, clamped, q_dy, q_dw, budget = _budget(profile, rho, quantization)
    mask, _ = DP_ROUTINES[dp](q_dy, q_dw, importance, budget)
    fallback = not any(mask) and len(mask) > 0
    if fallback:
        useful = [i for i, v in enumerate(importance) if v > 0] or list(range(len(mask)))
        reach = [sum(profile.t_dy[: i + 1]) + profile.t_dw[i] for i in range(len(mask))]
        mask[min(useful, key=lambda i: (reach[i], -importance[i], i))] = True
    bp = profile.cost(mask)
    return Selection(mask, rho_bp, clamped, fallback, budget, bp,
                     (profile.t_fp + bp) / (profile.t_fp + profile.t_bp))


def apply_mask(pl_module: Any, names: list[str], mask: list[bool]) -> None:
    """``requires_grad = m`` for ``names``; unselected tensors get ``grad = None`` (never zeros)."""
    _apply(pl_module.model, dict(zip(names, (bool(m) for m in mask))))


# ------------------------------------------------------------------------------------ the callback
class GreenTrainer(SelectionCallback):
    """Adaptive backpropagation (GreenTrainer, Huang et al., ICLR 2024): train the most important
    tensors whose backward FLOPs fit ``rho`` of full fine-tuning's training FLOPs.

    See the module docstring for the method, the FLOPs model and the departures from the paper and
    the official code.

    Args:
        rho: target fraction of full fine-tuning's training (forward + backward) FLOPs, in (0, 1].
            A ``rho`` below the forward pass's share leaves no backward budget: it is clamped
            (ρ_bp = 0.05) with a warning that states the effective value.
        interval: re-select every ``interval`` epochs or steps (official: every 2 epochs).
        interval_unit: ``"epoch"`` (selection at the first batch of epochs 0, interval, 2·interval, …)
            or ``"step"`` (at global steps 0, interval, …; optimizer steps).
        importance_batch: ``"first"``: the first training batch of each interval (official);
            ``"fixed"``: the run's first training batch, reused at every selection (kept in the
            callback state).
        quantization: Tq, the number of integer FLOPs units of the DP (official 1000).
        dp: ``"exact"`` (optimal, default) or ``"official"`` (the official recurrence, for parity).
        plot: draw each selection as a layers × tensors PNG (``greentrainer_sel{k}.png``).

    State (``state_dict``): the candidate names, the current mask, the step/epoch of the last
    selection, the number of selections, every selection's mask and the FLOPs profile, so a resumed
    run re-applies the mask and does not recompute importance mid-interval.
    """

    component = "GreenTrainer"
    error = GreenTrainerError

    def __init__(self, rho: float = 0.5, interval: int = 2, interval_unit: str = "epoch",
                 importance_batch: str = "first", quantization: int = 1000, dp: str = "exact",
                 plot: bool = True) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < float(rho) <= 1.0:
            raise GreenTrainerError(f"rho={rho!r} must be in (0, 1] (a fraction of full fine-tuning's FLOPs); "
                                    "use e.g. 0.5.")
        if not isinstance(interval, int) or interval < 1:
            raise GreenTrainerError(f"interval={interval!r} must be a positive integer; use e.g. 2.")
        if interval_unit not in ("epoch", "step"):
            raise GreenTrainerError(f"interval_unit={interval_unit!r} must be 'epoch' or 'step'.")
        if importance_batch not in ("first", "fixed"):
            raise GreenTrainerError(f"importance_batch={importance_batch!r} must be 'first' or 'fixed'.")
        if not isinstance(quantization, int) or quantization < 10:
            raise GreenTrainerError(f"quantization={quantization!r} must be an integer ≥ 10; use 1000.")
        if dp not in DP_ROUTINES:
            raise GreenTrainerError(f"dp={dp!r} must be one of {sorted(DP_ROUTINES)}.")
        self.rho = float(rho)
        self.interval = interval
        self.interval_unit = interval_unit
        self.importance_batch = importance_batch
        self.quantization = quantization
        self.dp = dp
        self.plot = plot
        self.candidates: list[str] = []
        self.mask: dict[str, bool] | None = None
        self.last_step = -1
        self.last_epoch = -1
        self.selections = 0
        self.history: list[dict[str, Any]] = []
        self.profile_state: dict[str, Any] | None = None
        self.fixed_batch: dict[str, Any] | None = None
        self.last_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return callback_state_key(self, rho=self.rho, interval=self.interval, interval_unit=self.interval_unit)

    # ----------------------------------------------------------------- public helpers
    @staticmethod
    def profile(pl_module: Any, batch: dict[str, Any]) -> FlopsProfile:
        """The measured FLOPs profile of ``pl_module`` on ``batch`` (:func:`profile_flops`)."""
        return profile_flops(pl_module, batch)

    # ----------------------------------------------------------------- checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module, "head", None) is None or not hasattr(pl_module, "compute_loss"):
            raise GreenTrainerError(
                f"GreenTrainer needs a lightning_peft module (CausalLM / SequenceClassifier), not "
                f"{type(pl_module).__name__}."
            )
        self.check_module(pl_module)
        check_architecture(pl_module.model)
        self.check_strategy(trainer, refuse_sharded=True)
        # every candidate stays trainable until DDP has wrapped the model (the mask waits for the first batch)
        self.candidates = [n for n, p in pl_module.model.named_parameters() if p.requires_grad]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_ddp(trainer)  # after the wrap: DDP must find unused parameters

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.mask is not None and set(self.mask) != set(self.candidates):
            raise GreenTrainerError(
                "The GreenTrainer state in this checkpoint selects among other tensors than this model trains; "
                "resume with the same backbone and head."
            )
        self.check_agreement(trainer, self.candidates, "the candidate tensors")

    # ----------------------------------------------------------------- the schedule
    def _due(self, trainer: L.Trainer, batch_idx: int) -> bool:
        if batch_idx % max(1, int(trainer.accumulate_grad_batches)) != 0:
            return False
        if self.mask is None:
            return True
        if self.interval_unit == "step":
            step = int(trainer.global_step)
            return step % self.interval == 0 and step != self.last_step
        epoch = int(trainer.current_epoch)
        return batch_idx == 0 and epoch % self.interval == 0 and epoch != self.last_epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.importance_batch == "fixed" and self.fixed_batch is None:
            self.fixed_batch = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        if self._due(trainer, batch_idx):
            self._select(trainer, pl_module, batch)
        if self.mask is not None:
            names = list(self.mask)
            apply_mask(pl_module, names, [self.mask[n] for n in names])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unfreeze(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unfreeze(pl_module)

    def _unfreeze(self, pl_module: L.LightningModule) -> None:
        _apply(pl_module.model, dict.fromkeys(self.candidates, True))

    # ----------------------------------------------------------------- one selection
    def _select(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        if self.importance_batch == "fixed" and self.fixed_batch is not None:
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in self.fixed_batch.items()}
        if self.profile_state is None:
            prof = profile_flops(pl_module, batch, self.candidates)
            self.profile_state = trainer.strategy.broadcast(prof.to_state(), src=0)
        profile = FlopsProfile.from_state(self.profile_state)

        # importance only for tensors that fit the budget on their own (all of them if none does)
        _, _, q_dy, q_dw, budget = _budget(profile, self.rho, self.quantization)
        fits = feasible(q_dy, q_dw, budget)
        names = [n for n, f in zip(profile.names, fits) if f] if any(fits) else list(profile.names)
        forward_context = trainer.strategy.precision_plugin.forward_context
        raw = tensor_importance(pl_module, batch, trainer.optimizers[0], names, forward_context)
        by_name = dict(zip(names, raw))
        vec = torch.tensor([by_name.get(n, 0.0) for n in profile.names], dtype=torch.float64,
                           device=pl_module.device)
        vec = trainer.strategy.reduce(vec, reduce_op="mean")
        vec = vec.detach().cpu()
        scale = float(vec.abs().max()) if len(vec) else 0.0
        importance = (-vec / scale).tolist() if scale > 0 else [0.0] * len(vec)

        sel = plan_selection(profile, importance, self.rho, self.quantization, self.dp)
        mask_list = trainer.strategy.broadcast(sel.mask, src=0)
        mask = {n: False for n in self.candidates}
        mask.update(dict(zip(profile.names, mask_list)))
        self.mask = mask
        self.last_step = int(trainer.global_step)
        self.last_epoch = int(trainer.current_epoch)
        self.selections += 1
        self.history.append({"step": self.last_step, "epoch": self.last_epoch,
                             "mask": [mask[n] for n in self.candidates]})
        self.check_agreement(trainer, [n for n in self.candidates if mask[n]], f"selection {self.selections}")

        if sel.clamped or sel.fallback:
            share = profile.t_fp / (profile.t_fp + profile.t_bp)
            why = (f"is below the forward pass's share of a training step ({share:.3f}), leaving no backward budget "
                   f"(rho_bp clamped to {sel.rho_bp})" if sel.clamped else "leaves a backward budget too small")
            rank_zero_warn(
                f"GreenTrainer rho={self.rho} {why}"
                + ("; no tensor fits, so the cheapest useful one trains" if sel.fallback else "")
                + f": the effective rho of this selection is {sel.predicted_rho:.3f}. Raise rho to silence this."
            )
        params = dict(pl_module.model.named_parameters())
        total = sum(params[n].numel() for n in self.candidates)
        chosen = sum(params[n].numel() for n in self.candidates if mask[n])
        self.last_metrics = {
            "greentrainer/selected_param_fraction": chosen / max(total, 1),
            "greentrainer/selected_tensor_fraction": sum(mask.values()) / max(len(mask), 1),
            "greentrainer/predicted_flops_saving": 1.0 - sel.predicted_rho,
            "greentrainer/predicted_rho": sel.predicted_rho,
            "greentrainer/rho_bp": sel.rho_bp,
            "greentrainer/selection": float(self.selections),
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=trainer.global_step)
            rank_zero_info(
                f"GreenTrainer selection {self.selections} at step {trainer.global_step}: "
                f"{sum(mask.values())}/{len(mask)} tensors, {100 * chosen / max(total, 1):.1f}% of parameters, "
                f"predicted rho {sel.predicted_rho:.3f} (target {self.rho})."
            )
        if self.plot:  # on every rank: the picture touches a collective (the run folder); rank 0 draws
            self._draw(trainer, pl_module)

    # ----------------------------------------------------------------- picture
    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        title = (f"GreenTrainer selection {self.selections} (step {trainer.global_step}, epoch "
                 f"{trainer.current_epoch}): rho {self.rho}, predicted "
                 f"{self.last_metrics['greentrainer/predicted_rho']:.3f}")
        mask = dict(self.mask or {})
        self.draw(trainer, "greentrainer/mask",
                  lambda: mask_figure(self.candidates, mask, title, block_positions(pl_module.model)),
                  f"greentrainer_sel{self.selections}.png")

    # ----------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        return {
            "candidates": list(self.candidates),
            "mask": None if self.mask is None else [bool(self.mask[n]) for n in self.mask],
            "mask_names": None if self.mask is None else list(self.mask),
            "last_step": self.last_step,
            "last_epoch": self.last_epoch,
            "selections": self.selections,
            "history": copy.deepcopy(self.history),
            "profile": copy.deepcopy(self.profile_state),
            "fixed_batch": self.fixed_batch,
        }

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mask") is not None:
            self.mask = dict(zip(state_dict["mask_names"], state_dict["mask"]))
        self.last_step = int(state_dict.get("last_step", -1))
        self.last_epoch = int(state_dict.get("last_epoch", -1))
        self.selections = int(state_dict.get("selections", 0))
        self.history = list(state_dict.get("history") or [])
        self.profile_state = state_dict.get("profile")
        self.fixed_batch = state_dict.get("fixed_batch")


def draw_mask(names: list[str], mask: dict[str, bool], directory: str, filename: str, title: str = "") -> str:
    """Draw ``mask`` as a blocks x tensors grid (see :func:`~lightning_peft.callbacks._selection_plot.mask_figure`)
    and save it as ``directory/filename``; returns the path. Callbacks send pictures with
    :func:`lightning_peft.figures.log_figure` instead."""
    import os

    fig = mask_figure(names, mask, title)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    fig.savefig(path, dpi=110)
    return path


__all__ = [
    "CUSTOM_FLOPS",
    "FlopsProfile",
    "GreenTrainer",
    "GreenTrainerError",
    "Selection",
    "apply_mask",
    "check_architecture",
    "draw_mask",
    "flop_counter",
    "measure_forward_flops",
    "measure_step_flops",
    "plan_selection",
    "profile_flops",
    "tensor_importance",
]
