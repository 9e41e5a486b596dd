"""TokenElimination's predictor phase: collecting calibration samples, training the per-layer block
predictors (and threshold initialisation), held-out recall, the callback state (resume, DDP agreement), and
saving/loading predictors with their shapes.

A mixin of :class:`lightning_peft.callbacks.TokenElimination` (see its module docstring, *Predictors are
trained in a callback phase* and *Predictor target*); the tensor operations live in :mod:`._lemo_ops`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_peft.architectures import AttentionParts
from lightning_peft.callbacks._lemo_ops import (
    BlockPredictor,
    exact_block_matrix,
    predictor_recall,
    predictor_target,
    token_block_scores,
    train_predictors,
    valid_blocks,
)


class TokenEliminationError(ValueError):
    """A TokenElimination setting or backbone that cannot work."""


class PredictorCalibration:
    """Calibration, the callback's ``state_dict`` and predictor persistence of :class:`TokenElimination`
    (state lives on the callback)."""

    # ------------------------------------------------------------------ calibration
    def _collect_layer(self, layer: int, attn: AttentionParts, x: torch.Tensor, position_embeddings: tuple) -> None:
        cos, sin = self._score_rotary(position_embeddings)
        token_valid = self._valid(x)
        with torch.no_grad():
            matrix = exact_block_matrix(attn, x, cos, sin, self.block_size, token_valid)
            exact = token_block_scores(matrix, self.symmetrize)
            if self.predictor_target == "exact":
                target = matrix
            else:
                target = predictor_target(attn, x, cos, sin, self.block_size, token_valid)
        self._collect[layer].append((x.detach().float().clone(), target, valid_blocks(token_valid, self.block_size),
                                     exact))

    def begin_collection(self) -> None:
        """Start recording calibration samples from the next training-mode forwards (runs dense)."""
        self._collect = {i: [] for i in self._sparse}

    def finish_calibration(self, progress: bool = True) -> dict[int, float]:
        """Train the predictors (and/or thresholds) from the recorded samples; returns the recall per layer."""
        collected, self._collect = self._collect, None
        if not collected or not any(collected.values()):
            raise TokenEliminationError("TokenElimination calibration saw no training forward; nothing to learn from.")
        device = next(iter(collected.values()))[0][0].device
        if self.scorer == "predictor" and not self.predictors:
            hidden = self._hf.config.hidden_size
            heads = self._hf.config.num_attention_heads
            h1, h2 = self.predictor_hidden[0], self.predictor_hidden[1] if len(self.predictor_hidden) > 1 else None
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the training RNG
                torch.manual_seed(self.seed)
                predictors = {i: BlockPredictor(hidden, heads, self.block_size, int(h1),
                                                None if h2 is None else int(h2)).to(device) for i in self._sparse}
            n = len(next(iter(collected.values())))
            train_n = n - 1 if n >= 2 else n
            samples = {i: [s[:3] for s in collected[i][:train_n]] for i in predictors}
            with torch.enable_grad():
                train_predictors(predictors, samples, steps=self.predictor_steps, lr=self.predictor_lr,
                                 loss=self.predictor_loss, elastic=self.elastic_pruning, progress=progress,
                                 seed=self.seed, causal=self.predictor_target == "exact")
            for p in predictors.values():
                p.requires_grad_(False).eval()
            self.predictors = predictors
            held = {i: collected[i][-1] for i in predictors}
            for i, (x, _, bvalid, exact) in held.items():
                with torch.no_grad():
                    pred = self._predicted(i, x, bvalid, predictors)
                self.recall[i] = predictor_recall(pred, exact, bvalid, self._sparse[i])
        if self.policy == "threshold" and self.thresholds is None:
            self.thresholds = {}
            for i, recs in collected.items():
                means = []
                for x, _, bvalid, exact in recs:
                    s = exact if self.scorer == "exact" else self._predicted(i, x, bvalid)
                    means.append(s[bvalid].float().mean())
                self.thresholds[i] = float(torch.stack(means).mean())
        return dict(self.recall)

    def calibrate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], progress: bool = True
                  ) -> dict[int, float]:
        """Offline predictor training: run ``batches`` through ``model`` (no gradients), train, and return
        the held-out recall per layer. ``model`` is the attached model (``module.model``)."""
        self.attach(model)
        was_training = model.training
        model.train()
        self.begin_collection()
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        model.train(was_training)
        return self.finish_calibration(progress=progress)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The callback state (plain values and tensors: loads with ``weights_only=True``)."""
        return {
            "predictors": self.predictor_state(),
            "thresholds": {str(i): t for i, t in self.thresholds.items()} if self.thresholds is not None else None,
            "calibrated_at": self._calibrated_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._hf is None:
            self._pending_state = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        self._load_predictor_state(state.get("predictors") or {}, source="the checkpoint")
        if state.get("thresholds") is not None:
            self.thresholds = {int(i): float(t) for i, t in state["thresholds"].items()}
        self._calibrated_at = int(state.get("calibrated_at", 0))
        # samples collected before an interruption are not saved: calibration restarts on the next batches

    def _agree(self, trainer: Any) -> None:
        """Under DDP, every rank takes rank 0's predictors and thresholds."""
        if trainer.world_size <= 1:
            return
        state = trainer.strategy.broadcast({"predictors": self.predictor_state(), "thresholds": self.thresholds},
                                           src=0)
        self._load_predictor_state(state["predictors"], source="rank 0")
        self.thresholds = state["thresholds"]

    def predictor_state(self) -> dict[str, Any]:
        return {
            "shape": next(iter(self.predictors.values())).shape() if self.predictors else None,
            "target": self.predictor_target,
            "positions": self.score_positions,
            "dims": {str(i): p.dims() for i, p in self.predictors.items()},
            "weights": {str(i): {k: v.detach().cpu() for k, v in p.state_dict().items()}
                        for i, p in self.predictors.items()},
            "recall": {str(i): r for i, r in self.recall.items()},
        }

    def save_predictors(self, path: str) -> None:
        """Write the trained predictors with their shapes (load with ``predictors_path=path``)."""
        torch.save(self.predictor_state(), path)

    def load_predictors(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise TokenEliminationError(f"predictors_path={path!r} does not exist; train predictors first "
                                        "(leave predictors_path unset) and save them with save_predictors().") from None
        self._load_predictor_state(state, source=path)

    def _load_predictor_state(self, state: dict[str, Any], source: str) -> None:
        shape = state.get("shape")
        if shape is None:
            return
        hf = self._hf
        want = {"hidden_size": hf.config.hidden_size, "num_heads": hf.config.num_attention_heads,
                "block": self.block_size}
        if shape != want:
            raise TokenEliminationError(
                f"predictors from {source} were trained for {shape}, but this run has {want}; "
                "train predictors for this model and block_size (leave predictors_path unset)."
            )
        target = state.get("target", "released")
        if target != self.predictor_target:
            raise TokenEliminationError(
                f"predictors from {source} were trained on the {target!r} target, but this run has "
                f"predictor_target={self.predictor_target!r}; set predictor_target: {target} or retrain them."
            )
        positions = state.get("positions", "post_rope")  # saved before the setting existed: rotated scores
        if positions != self.score_positions:
            raise TokenEliminationError(
                f"predictors from {source} were trained on {positions} scores, but this run has "
                f"score_positions={self.score_positions!r}; set score_positions: {positions} or retrain them."
            )
        layers = sorted(int(i) for i in state["weights"])
        missing = sorted(set(self._sparse) - set(layers))
        if missing:
            raise TokenEliminationError(f"predictors from {source} cover layers {layers} but layer {missing[0]} is "
                                        "sparsified here; match dense_layers to the run that trained them.")
        device = next(hf.parameters()).device
        predictors = {}
        for i in self._sparse:
            weights = state["weights"][str(i)]
            p = BlockPredictor(shape["hidden_size"], shape["num_heads"], shape["block"], dims=state["dims"][str(i)],
                               bias=any(k.endswith(".bias") for k in weights))
            p.load_state_dict(weights)
            predictors[i] = p.to(device).requires_grad_(False).eval()
        self.predictors = predictors
        self.recall = {int(i): float(r) for i, r in (state.get("recall") or {}).items()}


__all__ = ["PredictorCalibration", "TokenEliminationError"]
