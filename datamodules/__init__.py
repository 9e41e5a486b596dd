"""DataModules: files (or a generated task) -> tokenized, prompt-masked, padded batches.

* :class:`SFTDataModule` — prompt/response pairs for causal LMs (labels ``-100`` on the prompt).
* :class:`ClassificationDataModule` — text (or text pairs) with class labels.
* :class:`SyntheticSFTDataModule` — a generated task (addition, copy) for offline runs and tests.

Every DataModule shuffles with a seeded, resumable sampler, takes an optional
:class:`~lightning_peft.datamodules.pruning.BatchPruner` and an optional
:class:`~lightning_peft.datamodules.selection.DatasetSelector`, and raises :class:`DataError` (a
``ValueError``) with one sentence naming the bad value and the fix.
"""

from .classification import ClassificationDataModule
from .common import DataError, ResumableSampler
from .pruning import BatchPruner, QTuning, SSToken
from .selection import DatasetSelector, RandomSubset
from .sft import SFTDataModule
from .synthetic import SyntheticSFTDataModule

__all__ = [
    "BatchPruner",
    "ClassificationDataModule",
    "DataError",
    "DatasetSelector",
    "QTuning",
    "RandomSubset",
    "SSToken",
    "ResumableSampler",
    "SFTDataModule",
    "SyntheticSFTDataModule",
]
