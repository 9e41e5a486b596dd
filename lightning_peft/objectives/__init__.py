"""Objectives: model outputs + batch -> loss. Swappable through ``model.objective`` in YAML."""

from lightning_peft.objectives.losses import ClassificationCrossEntropy, Objective, TokenCrossEntropy

__all__ = ["ClassificationCrossEntropy", "Objective", "TokenCrossEntropy"]
