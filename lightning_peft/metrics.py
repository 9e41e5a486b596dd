"""Answer-level metrics for generated text.

GSM8K (Cobbe et al., 2021) answers end with ``#### <number>``; a model's generation is scored by the
number it commits to:

* :func:`extract_gsm8k_answer` takes the first number after the **last** ``####`` when there is one,
  otherwise the **last** number in the text (the usual fallback for models that answer in prose);
* :func:`normalize_number` makes equal numbers equal strings: thousands separators, ``$``, ``%``, a
  sentence-ending ``.`` and trailing zeros go (``"$1,200.00"`` -> ``"1200"``, ``"18.0"`` -> ``"18"``,
  ``".5"`` -> ``"0.5"``, ``"-0"`` -> ``"0"``);
* :func:`gsm8k_exact_match` compares a generation with a reference (a GSM8K ``answer`` field or a bare
  number); :class:`GSM8KExactMatch` is the same as a ``torchmetrics`` metric (sums across DDP ranks).

A minus sign counts only when it does not join two numbers (``"3-4"`` reads 3 and 4, ``"-4"`` reads
-4). Fractions such as ``3/4`` read as their two numbers; GSM8K's references are integers.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import torch
from torchmetrics import Metric

# a number: optional sign (not right after a word character or a dot), optional $, digits with optional
# thousands commas, optional decimals; or a bare decimal such as .5
_NUMBER = re.compile(r"(?<![\w.])-?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")


def normalize_number(text: str) -> str | None:
    """A canonical string for the number in ``text`` (None when it is not a number)."""
    s = text.strip().replace(",", "").replace("$", "").replace("%", "").replace(" ", "")
    s = s.rstrip(".")
    if not s:
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def find_numbers(text: str) -> list[str]:
    """Every number in ``text``, normalised, in order."""
    out = []
    for match in _NUMBER.finditer(text):
        value = normalize_number(match.group(0))
        if value is not None:
            out.append(value)
    return out


def extract_gsm8k_answer(text: str) -> str | None:
    """The committed answer of a GSM8K-style text, normalised; None when the text holds no number.

    The first number after the last ``####`` if there is one (and it holds a number), else the last
    number anywhere in the text.
    """
    if text is None:
        return None
    if "####" in text:
        after = find_numbers(text.rsplit("####", 1)[1])
        if after:
            return after[0]
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_exact_match(prediction: str, reference: str) -> bool:
    """True when the generation's answer equals the reference's (both read by :func:`extract_gsm8k_answer`)."""
    want = extract_gsm8k_answer(reference)
    got = extract_gsm8k_answer(prediction)
    return want is not None and got == want


class GSM8KExactMatch(Metric):
    """Share of generations whose extracted answer equals the reference's (``update(preds, targets)``
    with lists of strings; ``compute()`` -> a float tensor in [0, 1])."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: list[str], targets: list[str]) -> None:
        if isinstance(preds, str) or isinstance(targets, str):
            raise TypeError("GSM8KExactMatch.update takes lists of strings (preds, targets), not single strings.")
        if len(preds) != len(targets):
            raise ValueError(f"GSM8KExactMatch got {len(preds)} predictions for {len(targets)} references.")
        self.correct += sum(gsm8k_exact_match(p, t) for p, t in zip(preds, targets))
        self.total += len(targets)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


__all__ = ["GSM8KExactMatch", "extract_gsm8k_answer", "find_numbers", "gsm8k_exact_match", "normalize_number"]
