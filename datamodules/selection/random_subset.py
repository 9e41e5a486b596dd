"""``RandomSubset``: a seeded random ``budget`` of the training rows (the simplest selector, and the
baseline every data-selection method is compared against)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from lightning_peft.datamodules.selection.base import DatasetSelector, SelectionError
from lightning_peft.objectives.losses import IGNORE_INDEX


class RandomSubset(DatasetSelector):
    """Keep ``budget`` training rows drawn uniformly without replacement with ``random.Random(seed)``.

    Args:
        budget: number of rows to keep (at most the number of training rows).
        seed: the draw's seed (the same seed and rows give the same subset).
        min_response_tokens: first leave out rows with fewer response tokens (labels other than
            ``-100``) than this; 0 keeps every row. Classification rows (no token labels) always count.
    """

    def __init__(self, budget: int, seed: int = 0, min_response_tokens: int = 0) -> None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise SelectionError(f"RandomSubset budget={budget!r} must be a positive integer; set e.g. budget: 1000.")
        if not isinstance(min_response_tokens, int) or min_response_tokens < 0:
            raise SelectionError(f"RandomSubset min_response_tokens={min_response_tokens!r} must be 0 or more.")
        self.budget = budget
        self.seed = seed
        self.min_response_tokens = min_response_tokens

    def select(self, rows: Sequence[dict[str, Any]], datamodule: Any) -> list[int]:
        candidates = [i for i, row in enumerate(rows) if self._long_enough(row)]
        if not candidates:
            raise SelectionError(f"RandomSubset min_response_tokens={self.min_response_tokens} leaves no rows out "
                                 f"of {len(rows)}; lower min_response_tokens.")
        if self.budget > len(candidates):
            raise SelectionError(f"RandomSubset budget={self.budget} exceeds the {len(candidates)} eligible "
                                 f"training rows; set budget to {len(candidates)} or less.")
        return sorted(random.Random(self.seed).sample(candidates, self.budget))

    def _long_enough(self, row: dict[str, Any]) -> bool:
        labels = row.get("labels")
        if labels is None:  # a classification row (one class label): always eligible
            return True
        return sum(1 for t in labels if t != IGNORE_INDEX) >= self.min_response_tokens
