"""``PromptHead``: the base of every prompt-family method (soft prompts, prefixes, and their variants).

Soft prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning")
prepends ``m`` trainable vectors to the input embeddings; prefix tuning (Li & Liang, 2021,
"Prefix-Tuning") gives every layer ``m`` trainable key/value pairs. Both look, from the outside, like
``m`` virtual tokens in front of the sequence. This base does that bookkeeping once:

* builds ``inputs_embeds`` = ``[virtual tokens; embed(input_ids)]`` (when the method has input-level
  virtual tokens) and passes a per-layer prefix cache (when it has one);
* extends the attention mask by the virtual positions (and token ``labels`` with ``-100`` where the
  batch carries labels);
* strips the virtual positions from the logits it returns, so a caller sees one logit per real token
  (hidden states and attentions, when asked for, keep them);
* generates: ``generate(input_ids, attention_mask, ...)`` puts the virtual tokens in front of the
  prompt and returns ``[input_ids, new tokens]`` like any causal LM.

A subclass provides the trainable part (:meth:`PromptHead.build`), its virtual token embeddings
(:meth:`PromptHead.virtual_embeddings`) and optionally a per-layer prefix
(:meth:`PromptHead.prefix_cache`); :meth:`PromptHead.attach` freezes the backbone and wraps it with the
trainable part in a :class:`PromptModel`. ``PeftHead``'s prompt-learning types run through this same
forward with peft's public ``get_prompt`` as their embeddings and prefixes.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_peft.heads.base import Head, HeadError, classifier_module_names, is_classifier
from lightning_peft.objectives.losses import IGNORE_INDEX

#: batch keys a prompt method cannot honour: positions come from the (extended) attention mask
_DROPPED = ("position_ids", "token_type_ids")


class PromptModel(nn.Module):
    """A frozen backbone plus a prompt head's trainable part; calling or generating goes through the head."""

    def __init__(self, backbone: nn.Module, prompt: nn.Module, head: PromptHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt
        self._head = head  # a plain attribute: the head is not a module

    @property
    def config(self) -> Any:
        return self.backbone.config

    def forward(self, **inputs: Any) -> Any:
        return self._head.forward(self, inputs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self._head.generate(self, input_ids, attention_mask, **kwargs)


class PromptHead(Head):
    """Base class of prompt-family heads: virtual tokens in, virtual positions out.

    Subclasses implement :meth:`build` and :meth:`virtual_embeddings` (or :meth:`prefix_cache` for a
    prefix-only method); the rest is shared.
    """

    mergeable: ClassVar[bool] = False  # virtual tokens are not a weight delta
    identity_at_init: ClassVar[bool] = False  # the model sees extra tokens from the start

    # ----------------------------------------------------------------- what a subclass provides
    def build(self, backbone: nn.Module) -> nn.Module:
        """The trainable part (e.g. an ``nn.Embedding(m, d)``), built from the backbone's shapes."""
        raise NotImplementedError

    def virtual_embeddings(self, model: nn.Module, batch_size: int) -> torch.Tensor | None:
        """``(batch_size, m, d)`` vectors put in front of the input embeddings (None: no input-level tokens)."""
        return None

    def prefix_cache(self, model: nn.Module, batch_size: int, seq_len: int) -> Any | None:
        """A per-layer key/value cache the backbone attends to (None: no prefix)."""
        return None

    def prefix_length(self, model: nn.Module) -> int:
        """Positions a :meth:`prefix_cache` adds in front of the sequence (the attention mask grows by this)."""
        return 0

    def prefix_argument(self, model: nn.Module) -> str:
        """The keyword the backbone takes its cache as."""
        return "past_key_values"

    def language_model(self, model: nn.Module) -> nn.Module:
        """The transformers model to call with ``inputs_embeds`` (the backbone inside the attached model)."""
        return model.backbone if isinstance(model, PromptModel) else model

    def extend_labels(self, model: nn.Module, labels: torch.Tensor, n_virtual: int) -> torch.Tensor:
        """Token labels for the extended sequence: ``-100`` on the virtual positions."""
        pad = labels.new_full((labels.shape[0], n_virtual), IGNORE_INDEX)
        return torch.cat([pad, labels], dim=1)

    # ----------------------------------------------------------------- attach
    def attach(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        for name in classifier_module_names(model) if is_classifier(model) else []:
            getattr(model, name).requires_grad_(True)  # a classifier's new output layer always trains
        prompt = self.build(model)
        prompt.requires_grad_(True)
        return PromptModel(model, prompt, self)

    # ----------------------------------------------------------------- forward
    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model(model).get_input_embeddings()(input_ids)

    def model_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The backbone's keyword arguments with the virtual tokens in, and how many input positions they take."""
        ids = inputs["input_ids"]
        batch_size, seq_len = ids.shape
        kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels", *_DROPPED)}
        virtual = self.virtual_embeddings(model, batch_size)
        n_virtual = 0 if virtual is None else virtual.shape[1]
        if virtual is None:
            kwargs["input_ids"] = ids
        else:
            embeds = self.embed(model, ids)
            kwargs["inputs_embeds"] = torch.cat([virtual.to(embeds.dtype), embeds], dim=1)
        cache = self.prefix_cache(model, batch_size, seq_len)
        n_prefix = 0
        if cache is not None:
            kwargs[self.prefix_argument(model)] = cache
            n_prefix = self.prefix_length(model)
        mask = inputs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch_size, n_prefix + n_virtual), mask], dim=1)
        labels = inputs.get("labels")
        if labels is not None:
            kwargs["labels"] = self.extend_labels(model, labels, n_virtual) if labels.dim() == 2 else labels
        return kwargs, n_virtual

    def call(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        """Run the backbone on the extended inputs (a subclass may post-process, e.g. its own loss)."""
        return self.language_model(model)(**kwargs)

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Within the block the forward runs the backbone alone: no virtual tokens, no prefix (no parameter
        or ``requires_grad`` flag changes, so it is safe inside a step and under DDP)."""

        @contextlib.contextmanager
        def switched_off():
            previous = getattr(self, "_switched_off", False)
            self._switched_off = True
            try:
                yield
            finally:
                self._switched_off = previous

        return switched_off()

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        if getattr(self, "_switched_off", False):
            return self.language_model(model)(**{k: v for k, v in inputs.items() if k not in _DROPPED})
        kwargs, n_virtual = self.model_inputs(model, inputs)
        out = self.call(model, kwargs)
        logits = getattr(out, "logits", None)
        if n_virtual and logits is not None and logits.dim() == 3:
            out.logits = logits[:, n_virtual:]
        return out

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """Greedy/sampled continuation with the virtual tokens in front; returns ``[input_ids, new tokens]``."""
        batch_size = input_ids.shape[0]
        if self.prefix_cache(model, batch_size, input_ids.shape[1]) is not None:
            raise HeadError(f"{type(self).__name__} generation with a per-layer prefix is not supported by "
                            "PromptHead.generate; generate through a head whose prefix transformers can extend "
                            "(e.g. PeftHead PREFIX_TUNING).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs_in, _ = self.model_inputs(model, {"input_ids": input_ids, "attention_mask": attention_mask})
        user_criteria = kwargs.pop("stopping_criteria", None)
        if user_criteria:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_SeesPrompt(c, input_ids) for c in user_criteria])
        out = self.language_model(model).generate(**kwargs_in, **kwargs)
        if "inputs_embeds" not in kwargs_in:  # no virtual tokens: transformers returns [input_ids, new]
            return out
        return torch.cat([input_ids, out], dim=1)  # from inputs_embeds transformers returns only the new tokens


class _SeesPrompt:
    """Hands a stopping criterion ``[prompt ids, new tokens]``, as it would see without virtual tokens
    (generation from ``inputs_embeds`` shows the criteria only the new tokens)."""

    def __init__(self, criterion: Any, prompt_ids: torch.Tensor) -> None:
        self.criterion = criterion
        self.prompt_ids = prompt_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.criterion(torch.cat([self.prompt_ids, input_ids], dim=1), scores, **kwargs)


__all__ = ["PromptHead", "PromptModel"]
