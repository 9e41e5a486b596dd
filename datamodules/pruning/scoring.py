"""Per-token losses and entropies of the current model, computed cheaply for a pruner's scoring pass.

A pruner that scores a batch before the training step (QTuning) needs, at some label positions
``t``, the loss ``-log p(labels[t] | x_<t)`` and the predictive entropy of ``softmax(logits[t-1])``.
:func:`token_stats` computes both from full logits (one ``log_softmax`` per position, in fp32, in
row chunks so a large vocabulary never materialises more than a few ``chunk x vocab`` tensors).

:func:`score_tokens` gets them from a ``CausalLM`` under ``torch.no_grad()`` in eval mode, by one of
two routes that compute the same function:

* **reference**: the module's ordinary forward over the whole batch, then :func:`token_stats`;
* **fast** (when the backbone allows it, see :func:`fast_parts`): the decoder body runs on the columns
  up to the last needed position, and the LM head is applied only at the needed positions (a prompt
  or padding position costs no ``hidden x vocab`` product). The module's own layers run in eval mode
  (dropout off); each LoRA layer is merged on the fly, ``(W + s B A) x`` with the merged weight built
  when the layer is called and freed when it returns, so the pass's extra memory over the bare
  backbone's no-grad forward is one weight at a time, never a merged copy of the adapted weights
  (issue 12: merging ``W + s B A`` for every adapted weight up front held a second copy of an
  all-linear LoRA model; the adapter path, tried as well, allocates nothing weight-sized but its two
  thin rank-``r`` products over every token made a QTuning step 0.69x instead of 0.58x a full step on
  the tiny benchmark).
  The body's outputs equal the reference forward's; the LM head on gathered rows differs from the
  full-width product at the float-rounding level (tested to 1e-5 on per-token statistics; selections on
  the tests' batches are identical).

Anything the fast route does not know (prompt-learning heads, DoRA and other LoRA variants, other peft
methods, ``modules_to_save``, backbones outside :data:`FAST_MODEL_TYPES`, heads that feed extra
forward inputs) takes the reference route.

**Precision.** A pruner runs in the DataModule's ``on_after_batch_transfer``, which Lightning does not
wrap in the precision plugin's autocast, so :func:`precision_context` supplies it: by default the
scoring pass runs in the same precision as the training forward (the precision plugin's
``forward_context()``, handed to the pruner in its ``PrunerContext``: bf16 autocast under
``precision="bf16-mixed"``, plain fp32 under ``"32"``).
``precision="bf16-mixed"`` (or ``"16-mixed"``) asks for a cheaper low-precision scoring pass while the
training step stays in fp32: the per-token statistics move by bf16 rounding (about 1e-2 relative),
which can change a selection whose score sits at a threshold. Statistics are always reduced in fp32.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from lightning_peft.architectures import ARCHITECTURES, UnsupportedArchitecture, base_model, lm_head
from lightning_peft.objectives import per_token_cross_entropy

#: backbones whose causal-LM forward is ``lm_head(body(x).last_hidden_state)`` with nothing after it: the
#: causal decoders of the architecture table whose logits are not soft-capped (all but Gemma-2)
FAST_NEEDS = ("causal", "plain_logits")
FAST_MODEL_TYPES = tuple(a.model_type for a in ARCHITECTURES.values() if set(FAST_NEEDS) <= a.capabilities)
#: at most this many ``rows x vocab`` fp32 elements per chunk in :func:`token_stats`
CHUNK_ELEMENTS = 1 << 24


def _row_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits, (N,) targets -> per-row CE (0 where the target is -100) and entropy, fp32."""
    return per_token_cross_entropy(logits.float(), targets, with_entropy=True)


def _chunked(rows: torch.Tensor, targets: torch.Tensor, head, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``head`` (or nothing) and :func:`_row_stats` to ``rows`` in chunks of bounded size."""
    n = rows.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, vocab))
    ces, ents = [], []
    for i in range(0, n, step):
        z = rows[i : i + step]
        if head is not None:
            z = head(z)
        ce, ent = _row_stats(z, targets[i : i + step])
        ces.append(ce)
        ents.append(ent)
    if not ces:
        empty = rows.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(ces), torch.cat(ents)


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and entropy, **aligned with labels** (index ``t`` = predicting token ``t``).

    ``loss[b, t] = -log p(labels[b, t] | x_<t)`` from ``logits[b, t-1]`` (0 where the label is -100),
    ``entropy[b, t]`` = entropy of ``softmax(logits[b, t-1])``; column 0 is 0. With ``positions`` (a
    bool (B, S) mask) only those entries are computed, the rest are 0. fp32, one ``log_softmax`` per row.
    """
    b, s = labels.shape
    need = torch.ones(b, s - 1, dtype=torch.bool, device=labels.device) if positions is None else positions[:, 1:]
    loss = torch.zeros(b, s, dtype=torch.float32, device=logits.device)
    ent = torch.zeros_like(loss)
    if s < 2:
        return loss, ent
    ce, h = _chunked(logits[:, :-1][need], labels[:, 1:][need], None, logits.shape[-1])
    loss[:, 1:][need] = ce
    ent[:, 1:][need] = h
    return loss, ent


# ---------------------------------------------------------------------------------------- fast route
def _lora_layers(model: nn.Module) -> list[nn.Module] | None:
    """The peft tuner layers of ``model`` if all are plain LoRA ``Linear`` layers (no variant, no lora
    bias, not merged, adapters on); ``[]`` without peft layers; None when any other kind is present."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    layers = []
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            return None
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) is not LoraLinear or module.merged or module.disable_adapters:
            return None
        for name in module.active_adapters:
            if name in module.lora_A and (name in module.lora_variant or module.lora_bias.get(name, False)):
                return None
        layers.append(module)
    return layers


def fast_parts(module: Any, batch: dict[str, Any]) -> tuple[nn.Module, nn.Module, list[nn.Module]] | None:
    """``(body, lm_head, lora_layers)`` when the fast route computes the module's function, else None."""
    model = getattr(module, "model", None)
    head = getattr(module, "head", None)
    if model is None or head is None or head.forward_inputs(batch):
        return None
    parts = lm_parts(model)
    if parts is None:
        return None
    layers = _lora_layers(model)
    if layers is None:
        return None
    return (*parts, layers)


@contextlib.contextmanager
def _merged_one_layer_at_a_time(layers: list[nn.Module]):
    """During the no-grad pass, each plain LoRA ``Linear`` computes ``(W + s B A) x`` with its merged
    weight built when the layer is called and dropped when it returns: one ``W``-sized tensor alive at a
    time (never a merged copy of the model), and one dense product per layer instead of the adapter
    path's two thin rank-``r`` products over every token (cheaper on CPU when tokens >> r). Layers with
    ``fan_in_fan_out`` keep the adapter path. The instance ``forward`` is restored on exit."""
    patched = []

    def merged_forward(layer: nn.Module):
        base = layer.base_layer

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if layer.disable_adapters or layer.merged:  # switched off (or folded in) meanwhile: the base layer
                return base(x)
            weight = base.weight.detach().clone()
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    weight.addmm_(layer.lora_B[name].weight, layer.lora_A[name].weight, alpha=layer.scaling[name])
            return torch.nn.functional.linear(x, weight, base.bias)

        return forward

    try:
        for layer in layers:
            if not getattr(layer, "fan_in_fan_out", False) and isinstance(layer.base_layer, nn.Linear):
                layer.forward = merged_forward(layer)
                patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


def _fast_stats(module: Any, parts, batch: dict[str, Any], positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-aligned ``(loss, entropy)`` at ``positions``: the body over the needed columns, the LM head at
    the needed rows only. The caller has put the module in eval mode (LoRA dropout off); each LoRA layer is
    merged on the fly while it runs (:func:`_merged_one_layer_at_a_time`): one weight-sized tensor at a time."""
    body, lm_head, layers = parts
    labels = batch["labels"]
    loss = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    ent = torch.zeros_like(loss)
    with _merged_one_layer_at_a_time(layers):
        found = _needed_hidden(body, batch, positions[:, 1:])  # hidden position t-1 predicts label t
    if found is None:
        return loss, ent
    rows, targets, need, width = found
    vocab = int(getattr(lm_head, "out_features", 0) or lm_head.weight.shape[0])
    ce, h = _chunked(rows, targets, lm_head, vocab)
    loss[:, 1 : width + 1][need] = ce
    ent[:, 1 : width + 1][need] = h
    return loss, ent


def _needed_hidden(body: nn.Module, batch: dict[str, Any], need: torch.Tensor):
    """Run the decoder ``body`` on the columns up to the last needed one and return ``(rows, targets, need,
    width)``: the hidden states where ``need`` (label-aligned: ``need[:, t]`` marks label ``t + 1``) is set,
    their labels, and ``need`` cut to those ``width`` columns; None when nothing is needed. Shared by the
    pruners' scoring pass and SSToken's history pass."""
    cols = need.any(0).nonzero()
    if cols.numel() == 0:
        return None
    width = int(cols.max()) + 1
    inputs = {"input_ids": batch["input_ids"][:, :width], "use_cache": False}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"][:, :width]
    hidden = body(**inputs).last_hidden_state
    need = need[:, :width]
    return hidden[need], batch["labels"][:, 1 : width + 1][need], need, width


#: accepted values of a scoring pass's ``precision`` (None: the trainer's training precision)
SCORING_PRECISIONS = (None, "32", "32-true", "bf16-mixed", "16-mixed")


def check_precision(precision: str | None) -> str | None:
    """Return ``precision`` as a string (YAML may give 32 as an int), or raise naming the valid values."""
    value = None if precision is None else str(precision)
    if value not in SCORING_PRECISIONS:
        raise ValueError(f"scoring_precision={precision!r} is not supported; use null (the trainer's precision), "
                         "'32', 'bf16-mixed' or '16-mixed'.")
    return value


def precision_context(module: Any, precision: str | None = None, context: Any = None
                      ) -> contextlib.AbstractContextManager:
    """The autocast context of a scoring pass over ``module`` (see the module docstring, *Precision*).

    ``None``: the training forward's context, ``context.forward_context()`` of the pruner's
    :class:`~lightning_peft.datamodules.pruning.PrunerContext` (the trainer's precision plugin; no
    context: nothing);
    ``"32"``/``"32-true"``: autocast off; ``"bf16-mixed"`` / ``"16-mixed"``: autocast to bf16 / fp16 on
    the module's device type.
    """
    precision = check_precision(precision)
    if precision is None:
        forward_context = getattr(context, "forward_context", None)
        return forward_context() if forward_context is not None else contextlib.nullcontext()
    param = next(iter(module.parameters()), None)
    device_type = param.device.type if param is not None else "cpu"
    if precision in ("32", "32-true"):
        return torch.autocast(device_type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type, dtype=dtype)


@torch.no_grad()
def reference_logits(module: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The module's ordinary forward over the whole batch (eval mode, no graph), aligned with labels."""
    was_training = module.training
    module.eval()
    try:
        logits = module(batch).logits
    finally:
        module.train(was_training)
    if logits.shape[1] > batch["labels"].shape[1]:
        logits = logits[:, -batch["labels"].shape[1] :]
    return logits


@torch.no_grad()
def score_tokens(
    module: Any, batch: dict[str, Any], positions: torch.Tensor, fast: bool = True, precision: str | None = None,
    context: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-aligned per-token ``(loss, entropy)`` of ``module`` (a ``CausalLM``) at ``positions``, fp32.

    No graph is built and dropout is off (eval mode, restored afterwards). ``fast=False`` or a model the
    fast route does not know takes the reference route; ``precision`` and ``context`` (the pruner's
    ``PrunerContext``) as in :func:`precision_context` (see the module docstring).
    """
    with precision_context(module, precision, context):
        parts = fast_parts(module, batch) if fast else None
        if parts is None:
            return token_stats(reference_logits(module, batch), batch["labels"], positions)
        was_training = module.training
        module.eval()
        try:
            return _fast_stats(module, parts, batch, positions)
        finally:
            module.train(was_training)


# ---------------------------------------------------------------------------------------- a model's own losses
def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(body, lm_head)`` of a ``transformers`` causal LM (plain, or peft-wrapped with tuner layers) whose
    logits are ``lm_head(body(x).last_hidden_state)`` (a family in :data:`FAST_MODEL_TYPES`); None otherwise
    (prompt-learning peft models, other families, models without an LM head)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()  # noqa: N806
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            return None
        model = model.get_base_model()
    if getattr(getattr(model, "config", None), "model_type", None) not in FAST_MODEL_TYPES:
        return None
    body = base_model(model)
    if body is model:
        return None
    try:
        return body, lm_head(model)
    except UnsupportedArchitecture:
        return None


@torch.no_grad()
def lm_token_losses(model: nn.Module, batch: dict[str, Any], positions: torch.Tensor | None = None
                    ) -> torch.Tensor | None:
    """Label-aligned per-token loss of ``model`` (a causal LM, see :func:`lm_parts`) on ``batch`` at
    ``positions`` (a bool (B, S) mask; default every label that is not -100), 0 elsewhere, fp32.

    The same route as :func:`score_tokens`'s fast one, for a model used **as it is** (no adapter merge:
    the caller sets the state, e.g. eval mode and ``Head.disabled``, and the autocast context): the decoder
    body runs on the columns up to the last needed position, the LM head only at the needed positions, in
    chunks of at most :data:`CHUNK_ELEMENTS` logits, cross-entropy in fp32. No entropy is computed. Returns
    None when ``model`` is not one whose logits are ``lm_head(body(x))``, so the caller takes its full-logits
    route. This is the history pass of :class:`~.sstoken.SSToken`.
    """
    parts = lm_parts(model)
    if parts is None:
        return None
    body, head = parts
    labels = batch["labels"]
    loss = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    if positions is None:
        positions = labels != -100
    found = _needed_hidden(body, batch, positions[:, 1:] & (labels[:, 1:] != -100))
    if found is None:
        return loss
    rows, targets, need, width = found
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)
    step = max(1, CHUNK_ELEMENTS // vocab)
    ces = [per_token_cross_entropy(head(rows[i : i + step]), targets[i : i + step])
           for i in range(0, rows.shape[0], step)]
    loss[:, 1 : width + 1][need] = torch.cat(ces).float()
    return loss


__all__ = ["FAST_MODEL_TYPES", "SCORING_PRECISIONS", "check_precision", "fast_parts", "lm_parts", "lm_token_losses",
           "precision_context", "reference_logits", "score_tokens", "token_stats"]
