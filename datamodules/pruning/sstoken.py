"""ssToken: self-modulated and semantic-aware token selection.

Qin et al., "ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning",
arXiv 2510.18250 (ICLR 2026). Implemented from ``shared/methods/sstoken.md``.

Per training micro-batch, every response token ``j`` of sample ``b`` gets

* the **retrospective excess loss** ``REL_j = l_his[j] - l_cur[j]`` (history minus current), min-max
  normalised over the sample's response tokens (a span below 1e-6 counts as all-zero);
* the **attention to the prompt** ``Attn_j = sum_{i < j, i not response, not pad} mean_h A_h[j, i]``
  from the last decoder layer (the row of query ``j``; prompt = the non-response tokens before it,
  which is the spec's generalised definition and equals ``i < prompt_len`` for one turn);
* ``score_j = gamma_t * REL'_j + (1 - gamma_t) * Attn_j``; the top ``ceil(rho * |R_b|)`` response tokens
  of each sample are kept (``token_weights`` 1), the rest leave the loss (0). Prompt tokens are never
  selected; the loss is ``TokenCrossEntropy``'s per-token mean over the kept tokens.

**Hand-off (no second forward with gradients).** ``__call__`` (in the DataModule's
``on_after_batch_transfer``) computes the history losses, keeps them (and ``gamma_t``) as the pending
selection for this batch and arms a forward-pre-hook on the last decoder layer; the batch carries
plain tensors only. The training forward runs once, with its usual (SDPA / flash) attention; the hook
keeps that layer's input hidden states and rotary embeddings. SSToken is a
:class:`~lightning_peft.objectives.TokenSelector` (the DataModule registers it as
``module.token_selector``): ``TokenCrossEntropy`` calls :meth:`SSToken.select_tokens` with the forward's
own per-token losses (detached); it recomputes only the last layer's attention probabilities under
``no_grad`` (layer norm, q/k projections, RoPE, causal + padding mask, softmax; K expanded for GQA)
and returns the token weights (and the ``pruning/*`` statistics) before the loss is reduced.

**Passes this pruner costs**, per step, besides the usual training forward + backward (full batch,
no rows dropped):

* history ``"adapter"`` (default with a PEFT head): one no-grad, eval-mode pass of the base model, i.e.
  the same backbone with the adapter switched off (``Head.disabled``), no extra memory;
* history ``"copy"`` (default with full fine-tuning): one no-grad pass of a frozen copy of the base
  model, rebuilt from the module's backbone spec (exact on resume, costs one model's memory);
* history ``"cache"`` (``history_cache=path``): no extra pass; per-token history losses written once
  by ``lightning-peft sstoken-history --config <config>`` (:mod:`.history_cache`) and looked up per sample;
* always: the last layer's q/k projections and attention probabilities, once, without gradients.

The online history pass (``"adapter"``, ``"copy"``) takes the scoring fast path
(:func:`.scoring.lm_token_losses`): the decoder body once, the LM head only at the response positions, in
chunks, never the full-vocabulary logits of every position (issue 12, defect 3); a backbone outside the
fast path's families, or a head that feeds extra forward inputs, gets the full forward. It runs in the
training forward's precision (:func:`.scoring.precision_context`: bf16 autocast under
``precision="bf16-mixed"``), although the DataModule hook it runs in is outside Lightning's autocast.

**The offline history cache** (the released pipeline's ``calculate_token_loss.py``, spec §3.1) is the
cheapest route and the recommended one for real runs::

    lightning-peft sstoken-history --config examples/sstoken_alpaca.yaml   # once: <train_file>.sstoken-history.pt
    lightning-peft fit --config examples/sstoken_alpaca.yaml --data.pruner.init_args.history_cache <that file>

The file is keyed by the tokenised data and the base model; a stale one (other data, another base model)
is refused in one sentence naming the file and this command (see :mod:`.history_cache`).
``"copy"`` is the default for full fine-tuning because it needs no preparation step and cannot
misalign; use ``"cache"`` when a second copy of the weights does not fit.

Departures from the official code (flagged):

* the cache is keyed by a hash of the sample's token ids and response mask rather than the dataset
  index (our batches carry no index, and the hash also catches re-tokenisation);
* the attention-only warm-up is ``rel_warmup_fraction`` of each epoch's optimizer steps (the spec's
  proposal) rather than "dataset index < 10000"; like the released flag it **resets at every epoch
  start** (issue 12, defect 7a). It is read from the ``global_step`` and ``epoch`` of the pruner's
  ``PrunerContext``, so a resumed run uses the same ``gamma_t`` as an uninterrupted one.

The pruner keeps no other state (``state_dict`` is empty); ties are broken by position (stable sort), so
selection is deterministic.

The attention recompute reads the family's recipe from :mod:`lightning_peft.architectures` (block list,
pre-attention norm, q/k projections or fused qkv, q/k norms, rotary embeddings, scaling, sliding window)
and is tested against each claimed family's own eager ``output_attentions``: every causal decoder in the
table whose positions enter through rotary or input embeddings and whose scores are plainly scaled
(Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3, GPT-2, GPT-NeoX, OPT). Gemma-2 (soft-capped scores,
alternating windows), BLOOM (ALiBi) and encoders are refused in one sentence (:data:`ATTENTION_NEEDS`).
The pruner reads ``attention_mask`` and ``labels`` only, never the pad id.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from lightning_peft.objectives import IGNORE_INDEX, TokenSelector, next_token_cross_entropy

from . import BatchPruner, PrunerContext, check_ratio
from . import history_cache as hcache
from .scoring import lm_token_losses, precision_context

HISTORY_MODES = ("auto", "adapter", "copy", "cache")


# ---------------------------------------------------------------------------------------- pure parts
def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE aligned with labels (index ``t`` = loss of token ``t``; 0 on -100 and column 0), fp32."""
    return next_token_cross_entropy(logits, labels, label_aligned=True)


def attention_to_prompt(attn: torch.Tensor, prompt_cols: torch.Tensor) -> torch.Tensor:
    """``Attn[b, j] = sum_i attn[b, j, i] * prompt_cols[b, i]`` for head-averaged ``attn`` (B, S, S)."""
    return (attn.float() * prompt_cols[:, None, :].float()).sum(-1)


def minmax_rel(rel: torch.Tensor, response: torch.Tensor, eps: float = 1e-8, flat: float = 1e-6) -> torch.Tensor:
    """Min-max of ``rel`` per sample over its response tokens (0 outside; all-zero when the span < ``flat``)."""
    rel = rel.double()
    inf = torch.full_like(rel, math.inf)
    lo = torch.where(response, rel, inf).amin(1, keepdim=True)
    hi = torch.where(response, rel, -inf).amax(1, keepdim=True)
    span = hi - lo
    out = (rel - lo) / (span + eps)
    out = torch.where((span >= flat) & response, out, torch.zeros_like(out))
    return out


def select_tokens(rel: torch.Tensor, attn_score: torch.Tensor, response: torch.Tensor, gamma: float,
                  rho: float) -> torch.Tensor:
    """Keep mask (B, S): the top ``ceil(rho * |R_b|)`` response tokens of each sample by
    ``gamma * minmax(rel) + (1 - gamma) * attn_score`` (ties: earlier position first)."""
    response = response.bool()
    score = gamma * minmax_rel(rel, response) + (1 - gamma) * attn_score.double()
    score = torch.where(response, score, torch.full_like(score, -math.inf))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    n = response.sum(1)
    k = torch.ceil(n.double() * rho - 1e-9).clamp(min=1).long()
    return (rank < k[:, None]) & response


#: what the attention recompute needs from a family (see :func:`lightning_peft.architectures.require`)
ATTENTION_NEEDS = ("causal", "lm_head", "unbiased_scores", "plain_scores")


def check_family(model: torch.nn.Module) -> Any:
    """The architecture-table entry of ``model`` if SSToken can recompute its attention, else one sentence."""
    from lightning_peft.architectures import require

    return require(model, component="SSToken", needs=ATTENTION_NEEDS)


@torch.no_grad()
def last_layer_attention(parts: Any, hidden: torch.Tensor, position_embeddings: Any,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities (B, S, S) of one decoder block, recomputed from its input
    hidden states with the family's recipe from the architecture table (``parts`` is
    :func:`lightning_peft.architectures.attention_parts`): pre-attention norm, q/k projections (fused or
    not), q/k norms where the family has them (Qwen3), rotary embeddings where it uses them, causal +
    key-padding (+ sliding-window) mask, softmax in fp32. The projections run in eval mode (dropout off,
    LoRA dropout included) and are restored afterwards, so the result is the deterministic attention of
    the current weights rather than a fresh dropout draw (issue 12, defect 2)."""
    was = parts.module.training
    parts.module.eval()
    try:
        x = parts.norm(hidden)
        q, k = parts.states(x, want_v=False)
    finally:
        parts.module.train(was)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        q, k = parts.rotate(q, cos, sin), parts.rotate(k, cos, sin)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = x.shape[1]
    scores = (q.float() @ k.float().transpose(-1, -2)) * parts.facts.scaling
    i = torch.arange(s, device=x.device)
    allowed = i[:, None] >= i[None, :]
    window = parts.facts.sliding_window
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (pad) rows -> 0
    return probs.mean(1)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-block list of a (possibly peft- or Lightning-wrapped) causal LM, from the architecture table."""
    from lightning_peft.architectures import block_stacks

    check_family(model)
    return block_stacks(model)[-1]


# ---------------------------------------------------------------------------------------- the pruner
class SSToken(BatchPruner, TokenSelector):
    """ssToken token selector (see the module docstring).

    Args:
        gamma: weight of the excess loss (1: REL only, 0: attention only); paper default 0.5.
        rho: share of each sample's response tokens kept, in (0, 1]; paper default 0.6.
        rel_warmup_fraction: share of each epoch's optimizer steps, at its start, that use gamma = 0
            (attention only; REL is ~0 while the model is still the base; the released flag resets every
            epoch). 0 disables it.
        rel_warmup_steps: an explicit number of warm-up optimizer steps at the start of each epoch
            (overrides the fraction).
        history: ``"auto"`` (``"adapter"`` with a PEFT head, else ``"copy"``), ``"adapter"``, ``"copy"``
            or ``"cache"``.
        history_cache: a file written by ``lightning-peft sstoken-history --config <config>`` (or
            :meth:`build_history_cache`); implies ``history="cache"``.
        layer: index of the decoder layer whose attention is used (-1: the last, as in the paper).
    """

    def __init__(self, gamma: float = 0.5, rho: float = 0.6, rel_warmup_fraction: float = 0.2,
                 rel_warmup_steps: int | None = None, history: str = "auto", history_cache: str | None = None,
                 layer: int = -1) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma!r} must be in [0, 1]; 0.5 is the paper's default.")
        check_ratio("rho", rho)
        if not 0.0 <= rel_warmup_fraction <= 1.0:
            raise ValueError(f"rel_warmup_fraction={rel_warmup_fraction!r} must be in [0, 1]; 0 disables the warm-up.")
        if history not in HISTORY_MODES:
            raise ValueError(f"history={history!r} must be one of {HISTORY_MODES}.")
        if history == "cache" and history_cache is None:
            raise ValueError("history='cache' needs history_cache=<file>; write it with `lightning-peft "
                             "sstoken-history --config <your config>`.")
        self.gamma = float(gamma)
        self.rho = float(rho)
        self.rel_warmup_fraction = float(rel_warmup_fraction)
        self.rel_warmup_steps = rel_warmup_steps
        self.history = "cache" if history_cache is not None else history
        self.history_cache = history_cache
        self.layer = layer
        self._cache: dict[str, torch.Tensor] | None = None
        self._history_model: torch.nn.Module | None = None
        self._hooked: Any = None
        self._armed = False
        self._captured: tuple[torch.Tensor, Any] | None = None
        self._pending: tuple[torch.Tensor | None, float] | None = None  # (history, gamma_t) of the batch

    def __repr__(self) -> str:
        return f"SSToken(gamma={self.gamma}, rho={self.rho}, history={self.history!r})"

    # ---------------------------------------------------------------- warm-up
    def gamma_at(self, context: PrunerContext | None = None) -> float:
        """gamma_t: 0 during the attention-only warm-up (the first optimizer steps of **every** epoch, as the
        released flag, which resets at each epoch start), else gamma.

        Read from ``context`` (default: the bound :class:`PrunerContext`): the step within the epoch is
        ``global_step - epoch * ceil(num_training_batches / accumulate_grad_batches)`` (Lightning steps the
        optimizer on an epoch's last batch too), so a resumed run sees the same ``gamma_t``. Without a
        context, ``gamma``; with an unknown epoch length (an iterable dataset) only ``rel_warmup_steps``
        applies, counted from the first step of training."""
        context = context if context is not None else self.context
        if context is None:
            return self.gamma
        n = context.num_training_batches
        per_epoch = math.ceil(n / max(1, context.accumulate_grad_batches)) if math.isfinite(n) else None
        steps = self.rel_warmup_steps
        if steps is None:
            if per_epoch is None or self.rel_warmup_fraction == 0:
                return self.gamma
            steps = math.ceil(self.rel_warmup_fraction * n / max(1, context.accumulate_grad_batches))
        step = int(context.global_step)
        if per_epoch is not None:
            step -= int(context.epoch) * per_epoch
        return 0.0 if step < steps else self.gamma

    # ---------------------------------------------------------------- history losses
    def _mode(self, model: Any) -> str:
        if self.history != "auto":
            return self.history
        head = getattr(model, "head", None)
        peft_model = getattr(model, "model", model)
        if hasattr(peft_model, "disable_adapter") and not getattr(head, "trains_backbone", False):
            return "adapter"
        return "copy"

    @torch.no_grad()
    def history_losses(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Per-token losses (label-aligned) of the history (= base) model on ``batch``."""
        mode = self._mode(model)
        if mode == "cache":
            return self._from_cache(model, batch)
        # the training forward's precision (the DataModule hook runs outside Lightning's autocast)
        with precision_context(model, None, self.context):
            return self.online_history(model, batch, mode)

    @torch.no_grad()
    def online_history(self, model: Any, batch: dict[str, Any], mode: str) -> torch.Tensor:
        """The history pass of ``mode``: ``"adapter"`` (``model`` with its head switched off), ``"copy"`` (a
        frozen copy of the base) or ``"self"`` (``model`` as it is, e.g. untrained), in eval mode, through the
        scoring fast path (:func:`.scoring.lm_token_losses`: LM head at the response positions only) where
        the backbone allows it, else the full forward. The caller supplies the autocast context."""
        if mode == "adapter" and (getattr(model.head, "trains_backbone", False)
                                  or not hasattr(model.model, "disable_adapter")):
            raise ValueError("history='adapter' needs a peft model (a PEFT head such as LoRA); use "
                             "history='copy' or 'cache' with full fine-tuning.")
        labels = batch["labels"]
        if mode == "copy":
            lm = self._copy_of_base(model)
            losses = lm_token_losses(lm, batch)
            if losses is None:
                logits = lm(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
                losses = token_losses(logits[:, -labels.shape[1]:], labels)
            return losses
        was = model.training
        model.eval()
        try:
            with model.head.disabled(model.model) if mode == "adapter" else contextlib.nullcontext():
                fast = not model.head.forward_inputs(batch)
                losses = lm_token_losses(model.model, batch) if fast else None
                if losses is None:
                    losses = token_losses(model(batch).logits[:, -labels.shape[1]:], labels)
        finally:
            model.train(was)
        return losses

    def _copy_of_base(self, model: Any) -> torch.nn.Module:
        if self._history_model is None:
            from lightning_peft.backbones import load_backbone

            h = model.hparams
            hist, _ = load_backbone(h["backbone"], task="causal-lm", dtype=h.get("dtype"),
                                    gguf_file=h.get("gguf_file"), config_overrides=h.get("backbone_config"))
            hist.eval().requires_grad_(False)
            self._history_model = hist
        device = next(model.parameters()).device
        return self._history_model.to(device)

    def _from_cache(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        if self._cache is None:
            cache = hcache.read_cache(self.history_cache)
            hcache.check_model(cache, self.history_cache, model)
            self._cache = cache
        return hcache.lookup(self._cache, self.history_cache, batch)

    @staticmethod
    @torch.no_grad()
    def build_history_cache(model: Any, batches: Any, path: str) -> int:
        """Write the per-token losses of ``model`` (a ``CausalLM``, taken as it is) on every batch of
        ``batches`` to ``path``; returns the number of samples. Use with ``history_cache=path``. The
        command ``lightning-peft sstoken-history --config <config>`` (:mod:`.history_cache`) does this for a
        training config with the base model and the config's own data."""
        losses: dict[str, torch.Tensor] = {}
        rows = []
        was = model.training
        model.eval()
        try:
            for batch in batches:
                hist = token_losses(model(batch).logits[:, -batch["labels"].shape[1]:], batch["labels"])
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
                for b in range(hist.shape[0]):
                    row = {"input_ids": batch["input_ids"][b][mask[b]], "labels": batch["labels"][b][mask[b]]}
                    losses[hcache.sample_key(row["input_ids"], row["labels"])] = hist[b][mask[b]].cpu()
                    rows.append(row)
        finally:
            model.train(was)
        hcache.write_cache(path, losses, model, hcache.data_key(rows))
        return len(losses)

    # ---------------------------------------------------------------- attention capture
    def _install_hook(self, model: Any) -> None:
        target = getattr(model, "model", model)
        if self._hooked is not None and self._hooked[0] is target:
            return
        from lightning_peft.architectures import attention_parts

        layer = decoder_layers(target)[self.layer]
        parts = attention_parts(target, layer)

        def pre_hook(module, args, kwargs):
            if self._armed:
                hidden = args[0] if args else kwargs["hidden_states"]
                pos = kwargs.get("position_embeddings")
                if pos is None and parts.facts.rotary is not None:  # a family that does not pass them in
                    pos = parts.position_embeddings(target, hidden)
                pos = tuple(p.detach() for p in pos) if pos is not None else None
                self._captured = (hidden.detach(), pos)

        handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self._hooked = (target, parts, handle)

    # ---------------------------------------------------------------- the step
    def __call__(self, batch: dict[str, Any], model: Any = None) -> dict[str, Any]:
        if model is None:
            raise ValueError("SSToken needs the current model; the DataModule passes model=trainer.lightning_module.")
        labels = batch["labels"]
        if labels.dim() != 2:
            raise ValueError(f"SSToken works on causal-LM batches (labels of shape (B, S)); got {tuple(labels.shape)}.")
        if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("SSToken got a training batch with no response tokens (all labels -100); it is passed "
                           "through unselected. Check the prompt masking / max_length.")
            return batch
        gamma_t = self.gamma_at()
        history = self.history_losses(model, batch) if gamma_t > 0 else None
        self._install_hook(model)
        self._armed, self._captured = True, None
        self._pending = (history, gamma_t)
        return dict(batch)

    @torch.no_grad()
    def select_tokens(self, token_loss: torch.Tensor, batch: dict[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """Called by the objective after the training forward: per-token losses (label-aligned, detached)
        -> ``(token_weights, stats)``; None when no batch of this pruner is pending (e.g. validation)."""
        if self._pending is None:
            return None
        (history, gamma_t), self._pending = self._pending, None
        self._armed = False
        if self._captured is None:
            raise RuntimeError("SSToken's attention hook saw no forward; the objective must ask for the selection "
                               "right after the training forward of the same batch.")
        hidden, pos = self._captured
        self._captured = None
        labels = batch["labels"]
        mask = batch.get("attention_mask", torch.ones_like(labels)).bool()
        response = (labels != IGNORE_INDEX) & mask
        response[:, 0] = False
        attn = last_layer_attention(self._hooked[1], hidden, pos, mask.long())
        attn_score = attention_to_prompt(attn, (~response) & mask)
        rel = (history - token_loss.float()) if history is not None else torch.zeros_like(token_loss, dtype=torch.float)
        keep = select_tokens(rel, attn_score, response, gamma_t, self.rho)
        weights = keep.to(torch.float32)
        old = batch.get("token_weights")
        if old is not None:
            weights = weights * old.to(weights.dtype)
        stats = {
            "kept_tokens": float(keep.sum()),
            "kept_token_fraction": float(keep.sum()) / max(1, int(response.sum())),
            "gamma_t": float(gamma_t),
            "rel_mean": float((rel * response).sum() / response.sum().clamp(min=1)),
            "attn_to_prompt_mean": float((attn_score * response).sum() / response.sum().clamp(min=1)),
        }
        return weights, stats


__all__ = ["ATTENTION_NEEDS", "SSToken", "attention_to_prompt", "check_family", "decoder_layers",
           "last_layer_attention", "minmax_rel", "select_tokens", "token_losses"]
