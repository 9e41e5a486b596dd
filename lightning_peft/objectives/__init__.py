"""Objectives: each owns the forward it needs and returns ``LossOutput(loss, logs, predictions)``.

Swappable through ``model.objective`` in YAML. The contract, the token-weight / token-selection channel
and the shared per-token cross-entropy live in :mod:`lightning_peft.objectives.base`.
"""

from lightning_peft.objectives.base import (
    IGNORE_INDEX,
    LogitsObjective,
    LossOutput,
    Objective,
    TokenSelector,
    next_token_cross_entropy,
    per_token_cross_entropy,
)
from lightning_peft.objectives.losses import ClassificationCrossEntropy, TokenCrossEntropy
from lightning_peft.objectives.segmented import SegmentedTokenCrossEntropy

#: the objectives a user picks in YAML (every one has a row in tests/test_objectives.py)
OBJECTIVES = (TokenCrossEntropy, SegmentedTokenCrossEntropy, ClassificationCrossEntropy)

__all__ = ["IGNORE_INDEX", "OBJECTIVES", "ClassificationCrossEntropy", "LogitsObjective", "LossOutput", "Objective",
           "SegmentedTokenCrossEntropy", "TokenCrossEntropy", "TokenSelector", "next_token_cross_entropy",
           "per_token_cross_entropy"]
