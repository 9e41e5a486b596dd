"""peft's prompt-learning types for ``PeftHead``, run through :class:`~lightning_peft.heads.PromptHead`.

Each type's virtual tokens come from peft's public ``PeftModel.get_prompt`` (the learned prompt
embeddings, or for prefix tuning the learned per-layer keys/values as a cache); the shared
``PromptHead`` forward puts them in front of the sequence, extends the mask (and labels), calls the
transformers model and strips the virtual positions from the logits, which is what peft's own forward
does. Generation stays with peft's ``generate`` (``PeftHead`` attaches a ``PeftModel``).

* **Prompt tuning** (Lester et al., 2021) and **P-tuning** (Liu et al., 2021): input-level tokens.
* **Prefix tuning** (Li & Liang, 2021): a per-layer prefix. Since transformers 5.25 encoder
  classifiers (BERT, RoBERTa, ...) take their key/value cache as ``cache=`` and no longer list
  ``past_key_values``; the prefix is then passed under that name. An encoder that takes neither is
  refused in one sentence that points to prompt tuning.
* **CPT** (Blau et al., 2025, "Context-aware Prompt Tuning"): the context tokens are the prompt; its
  loss (token-type weighting with decay) is part of the method, computed by peft's public
  ``CPTEmbedding.calculate_loss`` on the extended labels and token types.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lightning_peft.heads.base import HeadError, is_classifier
from lightning_peft.heads.peft_types import PeftType, model_dims, register
from lightning_peft.heads.prompt import PromptHead


def prefix_needs_cache_argument(model: nn.Module) -> bool:
    """Whether prefix tuning on this classifier must pass its prefix as ``cache=`` (see the module doc).

    False where the classifier or its encoder lists ``past_key_values``; True where the encoder takes
    ``cache``; an encoder that takes neither is refused."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    params = set(inspect.signature(model.forward).parameters) | set(inspect.signature(encoder.forward).parameters)
    if "past_key_values" in params:
        return False
    if "cache" in params:
        return True
    kind = getattr(model.config, "model_type", type(model).__name__)
    raise HeadError(
        f"PeftHead PREFIX_TUNING cannot attach to {type(model).__name__}: its {kind!r} encoder takes no key/value "
        "cache, which prefix tuning needs; use {'peft_type': 'PROMPT_TUNING'} (virtual tokens in the input) instead."
    )


class PeftPrompt(PromptHead):
    """``PromptHead`` hooks answered by an attached ``PeftModel`` (its prompt encoder is the trainable part)."""

    def __init__(self, prefix: bool = False) -> None:
        self.prefix = prefix
        self.prefix_keyword = "past_key_values"

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.base_model  # for prompt learning, the transformers model itself

    def virtual_embeddings(self, model: nn.Module, batch_size: int) -> torch.Tensor | None:
        return None if self.prefix else model.get_prompt(batch_size=batch_size)

    def prefix_cache(self, model: nn.Module, batch_size: int, seq_len: int) -> Any | None:
        if not self.prefix:
            return None
        if is_classifier(self.language_model(model)):
            return model.get_prompt(batch_size=batch_size)
        return model.get_prompt(batch_size=batch_size, max_cache_len=seq_len + self.prefix_length(model))

    def prefix_length(self, model: nn.Module) -> int:
        return model.active_peft_config.num_virtual_tokens

    def prefix_argument(self, model: nn.Module) -> str:
        return self.prefix_keyword


class PromptLearningType(PeftType):
    """Input-level virtual tokens: ``num_virtual_tokens * hidden`` trainable values."""

    def __init__(self, peft_type: str, fields: dict[str, Any]) -> None:
        super().__init__(peft_type, fields)
        self.prompt = self.make_prompt()

    def make_prompt(self) -> PeftPrompt:
        return PeftPrompt()

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        return self.prompt.forward(model, inputs)

    def disabled(self, model: nn.Module) -> Any:
        return self.prompt.disabled(model)


@register("PROMPT_TUNING")
class PromptTuningType(PromptLearningType):
    def formula(self, model: nn.Module) -> int:
        return self.fields["num_virtual_tokens"] * model_dims(model)[0]


@register("P_TUNING")
class PTuningType(PromptLearningType):
    """P-tuning: the prompt comes out of a trainable encoder (MLP/LSTM); no formula (it depends on the encoder)."""


@register("MULTITASK_PROMPT_TUNING")
class MultitaskPromptTuningType(PeftType):
    """Needs ``task_ids`` in the forward, which no DataModule here provides: runs through peft as it is."""


@register("PREFIX_TUNING")
class PrefixTuningType(PromptLearningType):
    """Per-layer prefix: ``num_virtual_tokens * layers * 2 * kv_width`` without reparametrisation."""

    def make_prompt(self) -> PeftPrompt:
        return PeftPrompt(prefix=True)

    def before_attach(self, model: nn.Module) -> None:
        if is_classifier(model) and prefix_needs_cache_argument(model):
            self.prompt.prefix_keyword = "cache"

    def formula(self, model: nn.Module) -> int | None:
        if self.fields.get("prefix_projection"):
            return None
        _, layers, kv = model_dims(model)
        return self.fields["num_virtual_tokens"] * layers * 2 * kv


class CptPrompt(PeftPrompt):
    """CPT's forward: context tokens as the prompt, their ids (masked by token type) as labels, peft's CPT loss."""

    def extend_labels(self, model: nn.Module, labels: torch.Tensor, n_virtual: int) -> torch.Tensor:
        config = model.active_peft_config
        prefix = torch.tensor(config.cpt_token_ids, dtype=labels.dtype, device=labels.device)
        return torch.cat([prefix.expand(labels.shape[0], -1), labels], dim=1)

    def call(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        from peft import CPTEmbedding

        types = kwargs.pop("input_type_mask", None)
        labels = kwargs.pop("labels", None)
        out = self.language_model(model)(**kwargs)
        if labels is None:
            return out
        config = model.active_peft_config
        n = len(config.cpt_token_ids)
        if types is None:
            types = torch.full((labels.shape[0], labels.shape[1] - n), 4, device=labels.device, dtype=labels.dtype)
        prefix_types = torch.tensor(config.cpt_tokens_type_mask, dtype=labels.dtype, device=labels.device)
        shifted = torch.where(types > 0, types + prefix_types.max(), types)  # the batch's types after the context's
        type_mask = torch.cat([prefix_types.expand(labels.shape[0], -1), shifted], dim=1)
        counted = (type_mask > 0) & (type_mask % 4 == 0)
        labels = labels.masked_fill(~counted, -100)
        return CPTEmbedding.calculate_loss(out, labels, type_mask, config)


@register("CPT")
class CptType(PromptLearningType):
    own_loss = True
    tasks = ("causal-lm",)

    def set_defaults(self, fields: dict[str, Any]) -> None:
        if "cpt_token_ids" in fields:
            # Proposal (peft has no usable default): the context tokens all count, as one input
            # template that ends in an output token, so response tokens keep their label type.
            n = len(fields["cpt_token_ids"])
            fields.setdefault("cpt_mask", [1] * n)
            fields.setdefault("cpt_tokens_type_mask", [1] * (n - 1) + [4])

    def make_prompt(self) -> PeftPrompt:
        return CptPrompt()

    def forward_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        labels = batch["labels"]
        # CPT token types: 4 marks tokens whose labels count, 1 the rest; 0 is padding
        types = torch.where(labels != -100, 4, 1) * batch["attention_mask"].to(labels.dtype)
        return {"labels": labels, "input_type_mask": types}

    def formula(self, model: nn.Module) -> int:
        return len(self.fields["cpt_token_ids"]) * model_dims(model)[0]
