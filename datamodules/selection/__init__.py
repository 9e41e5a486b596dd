"""Dataset-level selection: choose once, over the whole training set, which rows to train on.

* :class:`DatasetSelector` — the contract (rank 0 decides, indices broadcast and saved).
* :class:`RandomSubset` — a seeded random ``budget`` of the rows, optionally after a response-length filter.

Every DataModule takes ``selector:`` (a ``class_path`` in YAML).
"""

from .base import DatasetSelector, SelectionError
from .random_subset import RandomSubset

__all__ = ["DatasetSelector", "RandomSubset", "SelectionError"]
