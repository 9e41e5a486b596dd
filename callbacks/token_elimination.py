"""LeMo token elimination: in chosen decoder layers only the most informative token blocks attend.

Wang, Chen, Li, Cao, Ren, Zhang, *LeMo: Enabling LEss Token Involvement for MOre Context
Fine-tuning*, arXiv 2501.09767 (2025), published as *JENGA: Enhancing LLM Long-Context Fine-tuning
with Contextual Token Sparsity*, USENIX ATC 2025. Spec: ``shared/methods/lemo.md``.

In every sparsified layer, for every sample:

1. each block of ``block_size`` tokens is scored by its informativeness: exactly (``scorer="exact"``,
   block max of the head-summed positive pre-softmax scores, column-summed over query blocks,
   optionally symmetrised; spec §3.1) or by the layer's predictor MLPs (``scorer="predictor"``, the
   paper's runtime path; §3.4); the scores use the queries and keys *before* the rotary embedding, as
   the released code does (``score_positions``, below);
2. the top ``floor(keep * n_valid_blocks)`` blocks (``policy="ratio"``) or the blocks scoring at least
   the layer's threshold (``policy="threshold"``) are gathered; Q/K/V/O and attention run over them
   only, with rotary embeddings at the original positions and causal order kept; the output is
   scattered back with zeros elsewhere (:func:`~lightning_peft.callbacks._lemo_ops.sparse_attention`);
3. eliminated tokens therefore pass the attention sub-block through the residual only; every token
   goes through the MLP, and the next layer re-scores all tokens from their current hidden states.

Their Q/K/V/attention activations are never created, which is where the memory goes.

**Schedule.** Dense while predictors/thresholds are being calibrated and for ``warmup_steps``
optimizer steps, then the keep ratio ramps linearly from 1 to its target over ``ramp_steps`` (counted
from the first step at which elimination may start). Default layers as in the spec and the released code:
layers ``0 .. n/2 - 2`` and the last layer stay dense, layers ``n/2 - 1 .. n - 2`` keep ``keep_ratio = 0.4``
(Llama-2-7B, 32 layers: 0-14 and 31 dense, 15-30 sparse; the released OPT code: ``layer < L/2 - 1`` dense);
``dense_layers`` and ``layer_ratios`` override. Elimination acts in training only (``apply_in_eval=False``): validation,
test and generation run dense, which is how the fine-tuned model will be used.

**Predictors are trained in a callback phase.** When ``scorer="predictor"`` and no predictors were
given (``predictors_path``) or restored (resume), the first ``calibration_batches`` training batches
run dense; during their forward passes each sparsified layer's normalised input and its target are
collected under ``no_grad`` (no extra forward), then the predictors are trained (``predictor_steps`` Adam steps,
SmoothL1, optional elastic neuron pruning) and frozen. The last calibration batch is held out to
report the **recall** of the exact kept blocks (``lemo/recall_layer{i}``, ``lemo/recall``, and the
log). Predictors are not module parameters: no optimizer state, never all-reduced; they live in this
callback's ``state_dict`` with their shapes, so resume restores them, and
:meth:`TokenElimination.save_predictors` / ``predictors_path`` move them between runs. Under DDP every
rank collects and trains, then rank 0's predictors (and thresholds) are broadcast, so ranks agree.
:meth:`TokenElimination.calibrate` does the same offline from batches you pass in.

**Scores before the rotary embedding** (``score_positions``): ``"pre_rope"`` (default) scores, like the
released code (``block_attn_pool`` on ``query_states``/``key_states`` before ``apply_rotary_pos_emb``), the
projections (after Qwen3's q/k norms) before the rotary embedding, for the exact scorer, the predictor
target, the recall reference and the threshold initialisation alike; the predictor, which sees no
positions, then learns a position-free target. ``"post_rope"`` (parity with this project's earlier
releases) scores the rotated queries and keys the attention itself uses; the paper does not say which.
Predictors record the setting and are refused by a run with the other one.

**Predictor target** (``predictor_target``): ``"released"`` (default) is the released code's block max of
``sum_h ReLU(q k^T) / 16`` without causal mask or ``1/sqrt(d)``, and at run time the predicted matrix is
column-summed over all valid query blocks. ``"exact"`` (a proposal: the spec notes the two differ in
details, §8) trains on the exact profiling matrix itself (causal, ``1/sqrt(d)``; the loss covers the
causal block pairs only) and reduces the prediction exactly as the exact scorer does (causal pairs,
``symmetrize``, column sum), so the predictor imitates the scores its recall is measured against.

**Threshold policy.** Per-layer thresholds ``T_l`` on the scorer's scale; when not given they are
initialised as the mean block score over the calibration batches (Algorithm 1, step 1). The paper's
finite-difference refinement of ``T_l`` (step 2) is not implemented: its metric, epsilon and eta are
unspecified and the released runs use fixed ratios (spec §8).

**MLP backward channel pruning** (``mlp_backward_keep``, default off): the released code's
approximation (spec §3.5): exact MLP forward, backward through the top channels only. It needs frozen
MLP weights (LoRA on attention only).

Departures and proposals (spec [I] items), all flagged:

* ``score_positions="post_rope"`` (not the default) departs from the released code, which scores before
  the rotary embedding (see above);
* the predictor linears have no bias, as in the released ``PrunableAttnPredictor`` (its inference twin,
  ``PrunableAttnPredictorInfer``, declares biases; predictors saved with biases by earlier versions of
  this project still load);
* batch size > 1 with padding (the released code supports batch 1): per-sample selection; pad blocks
  are never kept; a sample keeping fewer blocks than another fills the gap with masked filler slots;
* a sequence whose length is not a multiple of ``block_size`` is padded for scoring (spec: "pad it");
  a sequence of one block or less is left dense (logged once);
* selection uses fp32 scores and a stable sort, so activation checkpointing recomputes the same blocks;
* attention among kept tokens uses PyTorch SDPA directly (causal, or an explicit mask with padding);
  sliding-window attention (Mistral/Qwen2 option) is not applied inside eliminated layers;
* predictors are trained on the model as it is during the dense calibration steps (the base model
  with a LoRA head at initialisation), not offline on RedPajama; they are not refreshed later.

Supported backbones (:data:`FAMILIES`): ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` (its q/k norms are
applied before the rotary embedding, as in ``transformers``). Layers, q/k/v/o projections, q/k norms,
scaling and the rotary recipe come from :mod:`lightning_peft.architectures`; any other family is refused
in one sentence naming its ``model_type`` and what it lacks (:data:`NEEDS`: e.g. GPT-2's learned
positions and fused ``c_attn``, BERT's bidirectional encoder).
"""

from __future__ import annotations

import types
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.architectures import (
    AttentionParts,
    attention_facts,
    attention_parts,
    base_model,
    block_stacks,
    get_path,
    require,
)
from lightning_peft.backbones import unwrap_hf
from lightning_peft.callbacks._lemo_calibration import PredictorCalibration, TokenEliminationError
from lightning_peft.callbacks._lemo_ops import (
    BlockPredictor,
    block_to_token_index,
    channel_pruned_mlp,
    exact_block_scores,
    pad_to_blocks,
    predicted_block_scores,
    select_blocks,
    sparse_attention,
    valid_blocks,
)

#: the families TokenElimination claims (tested in tests/test_lemo*.py and tests/test_family_matrix.py): their
#: attention module is called with ``position_embeddings`` and their layout comes from the architecture table
FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
#: what the mechanism needs from a family (names from :data:`lightning_peft.architectures.NEEDS`)
NEEDS: tuple[str, ...] = ("causal", "rope", "full_rotary", "split_qkv", "plain_scores")


class TokenElimination(PredictorCalibration, L.Callback):
    """LeMo / JENGA contextual token elimination for long-context fine-tuning (see the module docstring).

    Args:
        block_size: tokens per block (paper: 64).
        keep_ratio: fraction of blocks kept in every sparsified layer (released code: 0.4).
        dense_layers: layers that never eliminate; ``"auto"`` = layers ``0 .. n/2 - 2`` and the last one.
        layer_ratios: per-layer keep ratios overriding ``keep_ratio`` (``{layer: ratio}``).
        policy: ``"ratio"`` (top-k, deterministic memory) or ``"threshold"`` (the paper's form).
        thresholds: per-layer thresholds for ``policy="threshold"`` (default: calibrated means).
        scorer: ``"predictor"`` (paper's runtime path) or ``"exact"`` (reference; needs full Q K).
        symmetrize: add ``triu(B^T, 1)`` before the column sum of exact scores (released code).
        score_positions: ``"pre_rope"`` (released code: queries and keys before the rotary embedding) or
            ``"post_rope"`` (the rotated ones; a departure kept for parity), for every score and target.
        warmup_steps: dense optimizer steps before elimination (calibration steps always run dense,
            whatever this says).
        ramp_steps: steps over which the keep ratio falls linearly from 1 to its target.
        calibration_batches: training batches whose activations train the predictors (the last is
            held out for the recall report when there are two or more).
        predictor_steps, predictor_lr, predictor_hidden, predictor_loss: predictor training (Adam
            0.9/0.95, warm-up 20 steps; hidden ``[h1, h2]``, ``h2=None`` means ``block * head_dim``).
        predictor_target: ``"released"`` (the released code's non-causal target) or ``"exact"`` (the exact
            profiling matrix, reduced like the exact scorer; a proposal, see the module docstring).
        elastic_pruning: remove predictor neurons that are mostly dead during training (spec §3.4).
        predictors_path: load trained predictors saved by :meth:`save_predictors` (shapes checked).
        mlp_backward_keep: keep this fraction of MLP channels in the backward (None: off).
        apply_in_eval: also eliminate in validation/test (default: dense evaluation).
        seed: predictor initialisation and sampling.
    """

    def __init__(
        self,
        block_size: int = 64,
        keep_ratio: float = 0.4,
        dense_layers: list[int] | str = "auto",
        layer_ratios: dict[int, float] | None = None,
        policy: str = "ratio",
        thresholds: dict[int, float] | None = None,
        scorer: str = "predictor",
        symmetrize: bool = True,
        score_positions: str = "pre_rope",
        warmup_steps: int = 0,
        ramp_steps: int = 0,
        calibration_batches: int = 4,
        predictor_steps: int = 300,
        predictor_lr: float = 1e-3,
        predictor_hidden: list[int | None] | None = None,
        predictor_loss: str = "smooth_l1",
        predictor_target: str = "released",
        elastic_pruning: bool = False,
        predictors_path: str | None = None,
        mlp_backward_keep: float | None = None,
        apply_in_eval: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if int(block_size) < 1:
            raise TokenEliminationError(f"block_size={block_size} must be a positive number of tokens (paper: 64).")
        self._check_ratio("keep_ratio", keep_ratio)
        for layer, ratio in (layer_ratios or {}).items():
            self._check_ratio(f"layer_ratios[{layer}]", ratio)
        if mlp_backward_keep is not None:
            self._check_ratio("mlp_backward_keep", mlp_backward_keep)
        if policy not in ("ratio", "threshold"):
            raise TokenEliminationError(f"policy={policy!r} is not one of 'ratio', 'threshold'.")
        if predictor_target not in ("released", "exact"):
            raise TokenEliminationError(f"predictor_target={predictor_target!r} is not one of 'released', 'exact'.")
        if score_positions not in ("pre_rope", "post_rope"):
            raise TokenEliminationError(f"score_positions={score_positions!r} is not one of 'pre_rope' (released "
                                        "code), 'post_rope'.")
        if scorer not in ("predictor", "exact"):
            raise TokenEliminationError(f"scorer={scorer!r} is not one of 'predictor', 'exact'.")
        if dense_layers != "auto" and not isinstance(dense_layers, (list, tuple)):
            raise TokenEliminationError(f"dense_layers={dense_layers!r} must be 'auto' or a list of layer indices.")
        if calibration_batches < 1:
            raise TokenEliminationError(f"calibration_batches={calibration_batches} must be at least 1.")
        self.block_size = int(block_size)
        self.keep_ratio = float(keep_ratio)
        self.dense_layers = dense_layers if dense_layers == "auto" else [int(i) for i in dense_layers]
        self.layer_ratios = {int(k): float(v) for k, v in (layer_ratios or {}).items()}
        self.policy = policy
        self.thresholds = {int(k): float(v) for k, v in thresholds.items()} if thresholds else None
        self.scorer = scorer
        self.symmetrize = bool(symmetrize)
        self.score_positions = score_positions
        if int(warmup_steps) < 0 or int(ramp_steps) < 0:
            raise TokenEliminationError(f"warmup_steps={warmup_steps} and ramp_steps={ramp_steps} must be >= 0.")
        self.warmup_steps = int(warmup_steps)
        self.ramp_steps = int(ramp_steps)
        self.calibration_batches = int(calibration_batches)
        self.predictor_steps = int(predictor_steps)
        self.predictor_lr = float(predictor_lr)
        self.predictor_hidden = list(predictor_hidden) if predictor_hidden else [128, None]
        self.predictor_loss = predictor_loss
        self.predictor_target = predictor_target
        self.elastic_pruning = bool(elastic_pruning)
        self.predictors_path = predictors_path
        self.mlp_backward_keep = mlp_backward_keep
        self.apply_in_eval = bool(apply_in_eval)
        self.seed = int(seed)

        self.predictors: dict[int, BlockPredictor] = {}
        self.recall: dict[int, float] = {}
        self.selection_log: list[tuple[int, torch.Tensor]] | None = None  # tests: set to [] to record
        self.last_kept_fraction: dict[int, torch.Tensor] = {}
        self._hf: nn.Module | None = None
        self._layers: nn.ModuleList | None = None
        self._arch: Any = None
        self._parts: dict[int, AttentionParts] = {}
        self._sparse: dict[int, float] = {}
        self._patched: list[nn.Module] = []
        self._hooks: list[Any] = []
        self._token_valid: torch.Tensor | None = None
        self._step = 0
        self._calibrated_at = 0  # the optimizer step after which calibration ended
        self._collect: dict[int, list[tuple[torch.Tensor, ...]]] | None = None
        self._seen_calibration = 0
        self._pending_state: dict[str, Any] | None = None
        self._said_short = False

    @staticmethod
    def _check_ratio(name: str, value: Any) -> None:
        if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise TokenEliminationError(f"{name}={value!r} must be in (0, 1]; e.g. 0.4 keeps 40% of the blocks.")

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module) -> TokenElimination:
        """Patch the sparsified layers of ``model`` (a HF causal LM, possibly inside a PeftModel)."""
        if self._hf is not None:
            if unwrap_hf(model) is self._hf:
                return self
            self.detach()
        hf = unwrap_hf(model)
        self._arch = require(hf, component="TokenElimination", needs=NEEDS, families=FAMILIES,
                             error=TokenEliminationError)
        self._hf = hf
        self._layers = block_stacks(hf)[0]
        n_layers = len(self._layers)
        dense = default_dense_layers(n_layers) if self.dense_layers == "auto" else set(self.dense_layers)
        bad = sorted(i for i in list(dense) + list(self.layer_ratios) if not 0 <= i < n_layers)
        if bad:
            raise TokenEliminationError(
                f"layer index {bad[0]} is outside this model's {n_layers} layers (0..{n_layers - 1})."
            )
        self._sparse = {i: self.layer_ratios.get(i, self.keep_ratio) for i in range(n_layers) if i not in dense}
        if not self._sparse:
            rank_zero_warn("TokenElimination: every layer is dense (dense_layers covers all); nothing is eliminated.")
        if attention_facts(hf).sliding_window:
            rank_zero_warn("TokenElimination: sliding-window attention is not applied inside eliminated layers "
                           "(kept tokens attend causally to all kept tokens).")
        if self.mlp_backward_keep is not None:
            self._check_frozen_mlps()
        body = base_model(hf)
        self._hooks.append(body.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        self._parts = {i: attention_parts(hf, self._layers[i]) for i in self._sparse}
        for i in self._sparse:
            self._patch(self._parts[i].module, self._attention_forward(i, self._parts[i]))
            if self.mlp_backward_keep is not None:
                mlp = get_path(self._layers[i], self._arch.roles["down"].rsplit(".", 1)[0])
                self._patch(mlp, self._mlp_forward(i, mlp))
        if self.predictors_path and not self.predictors:
            self.load_predictors(self.predictors_path)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._restore(state)
        return self

    def detach(self) -> None:
        """Undo :meth:`attach` (the model is unchanged afterwards)."""
        for module in self._patched:
            del module.forward
        for hook in self._hooks:
            hook.remove()
        self._patched, self._hooks, self._hf, self._layers, self._parts = [], [], None, None, {}

    def _patch(self, module: nn.Module, forward: Any) -> None:
        module.forward = types.MethodType(forward, module)
        self._patched.append(module)

    def _check_frozen_mlps(self) -> None:
        roles = self._arch.roles
        for i in self._sparse:
            for role in ("gate", "up", "down"):
                proj = get_path(self._layers[i], roles[role])
                name = roles[role].split(".", 1)[-1]
                if type(proj) is not nn.Linear or proj.weight.requires_grad or proj.bias is not None:
                    if type(proj) is not nn.Linear:
                        what = f"wrapped by the head ({type(proj).__module__}.{type(proj).__name__})"
                    else:
                        what = "trainable" if proj.weight.requires_grad else "a linear with a bias"
                    raise TokenEliminationError(
                        f"mlp_backward_keep={self.mlp_backward_keep} needs frozen, plain MLP linears, but layer {i} "
                        f"mlp.{name} is {what}; "
                        "put the head on attention only (e.g. LoRA target_modules [q_proj, k_proj, v_proj, o_proj]) "
                        "or leave mlp_backward_keep unset."
                    )
        act = getattr(self._hf.config, "hidden_act", "silu")
        if act != "silu":
            raise TokenEliminationError(f"mlp_backward_keep supports SiLU MLPs only; this model uses {act!r}.")

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pre-hook on the decoder body: remember the 2-D padding mask of this forward, and switch off the
        KV cache that transformers 5 builds by default (a training forward needs none, and the eliminated
        layers could not fill it)."""
        mask = kwargs.get("attention_mask")
        self._token_valid = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if module.training and kwargs.get("past_key_values") is None:
            kwargs["use_cache"] = False
        return args, kwargs

    # ------------------------------------------------------------------ schedule
    def current_ratio(self, layer: int) -> float | None:
        """Keep ratio of ``layer`` at the current step; None while it runs dense."""
        start = max(self.warmup_steps, self._calibrated_at)
        if layer not in self._sparse or self._step < start or self._needs_calibration():
            return None
        target = self._sparse[layer]
        if self.ramp_steps <= 0:
            return target
        frac = min(1.0, (self._step - start + 1) / self.ramp_steps)
        return 1.0 - frac * (1.0 - target)

    def set_step(self, step: int) -> None:
        """Set the optimizer step the schedule reads (the Trainer does this every batch)."""
        self._step = int(step)

    def _needs_calibration(self) -> bool:
        return bool(self._sparse) and (
            (self.scorer == "predictor" and not self.predictors)
            or (self.policy == "threshold" and self.thresholds is None)
        )

    # ------------------------------------------------------------------ the patched forwards
    def _attention_forward(self, layer: int, parts: AttentionParts):
        original = parts.module.forward
        owner = self

        def forward(module, hidden_states, position_embeddings=None, attention_mask=None,
                    past_key_values=None, **kwargs):
            dense = lambda: original(hidden_states, position_embeddings=position_embeddings,
                                     attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
            if position_embeddings is None or past_key_values is not None:
                return dense()
            if owner._collect is not None and module.training:
                owner._collect_layer(layer, parts, hidden_states, position_embeddings)
                return dense()
            ratio = owner.current_ratio(layer)
            if ratio is None or not (module.training or owner.apply_in_eval):
                return dense()
            if hidden_states.shape[1] <= owner.block_size:
                if not owner._said_short:
                    rank_zero_info(f"TokenElimination: sequence of {hidden_states.shape[1]} tokens fits in one block "
                                   f"(block_size={owner.block_size}); nothing to eliminate, running dense.")
                    owner._said_short = True
                return dense()
            return owner._eliminate(layer, parts, hidden_states, position_embeddings, ratio), None

        return forward

    def _mlp_forward(self, layer: int, mlp: nn.Module):
        original = mlp.forward
        owner = self

        def forward(module, x):
            if torch.is_grad_enabled() and module.training and owner.current_ratio(layer) is not None:
                return channel_pruned_mlp(module, x, owner.mlp_backward_keep)
            return original(x)

        return forward

    def _valid(self, hidden: torch.Tensor) -> torch.Tensor:
        valid = self._token_valid
        if valid is None or valid.shape != hidden.shape[:2]:
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return valid.to(hidden.device)

    def block_scores(self, layer: int, attn: AttentionParts, x: torch.Tensor, position_embeddings: tuple,
                     token_valid: torch.Tensor) -> torch.Tensor:
        """Runtime block scores of ``layer`` (fp32 ``[B, nb]``) from its normalised input ``x``."""
        cos, sin = self._score_rotary(position_embeddings)
        with torch.no_grad():
            if self.scorer == "exact":
                return exact_block_scores(attn, x, cos, sin, self.block_size, token_valid, self.symmetrize)
            return self._predicted(layer, x, valid_blocks(token_valid, self.block_size))

    def _score_rotary(self, position_embeddings: tuple) -> tuple:
        """``(cos, sin)`` the scores are taken with: ``(None, None)`` (before the rotary embedding) by default."""
        return (None, None) if self.score_positions == "pre_rope" else tuple(position_embeddings)

    def _predicted(self, layer: int, x: torch.Tensor, bvalid: torch.Tensor, predictors: dict | None = None
                   ) -> torch.Tensor:
        predictor = (predictors or self.predictors)[layer]
        return predicted_block_scores(predictor(x), bvalid, exact_target=self.predictor_target == "exact",
                                      symmetrize=self.symmetrize)

    def _eliminate(self, layer: int, attn: AttentionParts, x: torch.Tensor, position_embeddings: tuple,
                   ratio: float) -> torch.Tensor:
        n = x.shape[1]
        b = self.block_size
        token_valid = self._valid(x)
        scores = self.block_scores(layer, attn, x, position_embeddings, token_valid)
        bvalid = valid_blocks(token_valid, b)
        if self.policy == "ratio":
            block_idx, slot_kept = select_blocks(scores, bvalid, ratio=ratio)
        else:
            block_idx, slot_kept = select_blocks(scores, bvalid, threshold=self.thresholds[layer])
        tok_idx = block_to_token_index(block_idx, b)
        tok_valid = pad_to_blocks(token_valid, b, dim=1)
        tok_kept = torch.gather(tok_valid, 1, tok_idx) & slot_kept.repeat_interleave(b, dim=1)
        cos, sin = position_embeddings
        out = sparse_attention(attn, pad_to_blocks(x, b), pad_to_blocks(cos, b), pad_to_blocks(sin, b),
                               tok_idx, tok_kept)
        if self.selection_log is not None:
            self.selection_log.append((layer, tok_idx.clone()))
        # a tensor: no host sync in the training step (read when logging)
        self.last_kept_fraction[layer] = tok_kept.sum() / token_valid.sum().clamp_min(1)
        return out[:, :n]

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.attach(pl_module.model)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detach()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        for p in self.predictors.values():
            p.to(device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.set_step(trainer.global_step)
        if self._needs_calibration() and self._collect is None and self._seen_calibration < self.calibration_batches:
            self.begin_collection()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._collect is not None:
            self._seen_calibration += 1
            if self._seen_calibration >= self.calibration_batches:
                self.finish_calibration(progress=trainer.is_global_zero and trainer.progress_bar_callback is not None)
                self._calibrated_at = trainer.global_step  # the ramp starts from here
                self._agree(trainer)
                if self.recall:
                    mean = sum(self.recall.values()) / len(self.recall)
                    rank_zero_info("TokenElimination: predictors trained; held-out recall of the exact kept blocks "
                                   + ", ".join(f"layer {i}: {r:.3f}" for i, r in sorted(self.recall.items()))
                                   + f" (mean {mean:.3f}).")
        active = [f for i, f in self.last_kept_fraction.items() if self.current_ratio(i) is not None]
        if active:
            pl_module.log("lemo/kept_fraction", float(sum(active)) / len(active), batch_size=_batch_size(batch))
        if self.recall:
            pl_module.log("lemo/recall", sum(self.recall.values()) / len(self.recall), batch_size=_batch_size(batch))

def default_dense_layers(n_layers: int) -> set[int]:
    """The layers ``dense_layers="auto"`` keeps dense: ``0 .. n/2 - 2`` and the last one (spec §3.2; released
    Llama code: ``layer_idx < 15`` and ``layer_idx == 31`` on 32 layers)."""
    return set(range(n_layers // 2 - 1)) | {n_layers - 1}


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) and "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    return 1


__all__ = ["FAMILIES", "NEEDS", "TokenElimination", "TokenEliminationError", "default_dense_layers"]
