"""Batched greedy generation for evaluation (e.g. GSM8K exact match with :mod:`lightning_peft.metrics`).

:func:`generate_answers` runs ``model.generate`` without sampling over a list of prompts, a batch at a
time, with **left padding** (a decoder-only model continues from the last position of every row, so
the prompts must end at the same column; positions come from the attention mask, so a padded row
computes what it computes alone). Prompts are batched in order of length (less padding) and the
answers come back in the input order. Only the new tokens are decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _model_and_tokenizer(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """A ``PeftModule`` gives its attached model and tokenizer; a plain model needs ``tokenizer``."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "tokenizer") and hasattr(inner, "generate"):
        return inner, tokenizer if tokenizer is not None else model.tokenizer
    if not hasattr(model, "generate"):
        raise TypeError(
            f"generate_answers needs a causal LM with .generate() or a CausalLM module; got {type(model).__name__}."
        )
    if tokenizer is None:
        raise ValueError("generate_answers needs tokenizer=... for a plain model (a CausalLM module brings its own).")
    return model, tokenizer


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop_strings: list[str] | None = None,
    stop_when: Callable[[str], bool] | None = None,
    progress: bool = True,
    desc: str = "generate",
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy continuations of ``prompts`` (only the new text, special tokens removed).

    Args:
        model: a ``CausalLM`` module (its adapter is used as trained) or a Hugging Face causal LM.
        tokenizer: the tokenizer (default: the module's). A tokenizer without a pad token pads with EOS
            (the attention mask hides the padding); one with neither raises ``ValueError``.
        prompts: the prompt strings, encoded with the tokenizer's special tokens (e.g. BOS).
        max_new_tokens: the most tokens generated per prompt.
        batch_size: prompts per ``generate`` call.
        stop_strings: stop a row once its new text contains one of these; the text is cut before it.
        stop_when: stop a row once ``stop_when(new_text)`` is true (checked after every token; the text is
            kept whole), e.g. once a GSM8K answer line ``#### 42`` is complete.
        progress: show a tqdm progress bar over the prompts.
        generate_kwargs: passed to ``model.generate`` (e.g. ``repetition_penalty``).
    """
    from tqdm.auto import tqdm

    model, tokenizer = _model_and_tokenizer(model, tokenizer)
    prompts = list(prompts or [])
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be at least 1.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(
            "The tokenizer has neither a pad token nor an EOS token to pad with; set "
            "tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.unk_token)."
        )
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    if tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    kwargs.update(generate_kwargs)
    user_criteria = list(kwargs.pop("stopping_criteria", None) or [])
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding
                n = len(encoded[i])
                ids[r, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, width - n :] = 1
            criteria = list(user_criteria)
            if stop_when is not None:
                criteria.append(_StopWhen(stop_when, tokenizer, width))
            if criteria:
                from transformers import StoppingCriteriaList

                kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for r, i in enumerate(rows):
                text = tokenizer.decode(out[r, width:], skip_special_tokens=True)
                for stop in stop_strings or ():
                    text = text.split(stop, 1)[0]
                answers[i] = text
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return answers


class _StopWhen:
    """A ``StoppingCriteria`` (per row) from a predicate on the decoded new text."""

    def __init__(self, predicate: Callable[[str], bool], tokenizer: Any, prompt_width: int) -> None:
        self.predicate = predicate
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([bool(self.predicate(t)) for t in texts], dtype=torch.bool, device=input_ids.device)


__all__ = ["generate_answers"]
