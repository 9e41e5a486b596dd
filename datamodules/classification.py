"""Sequence classification data: text (or a text pair) and a class label per row.

Labels may be integers or strings. With ``label_names`` a string label maps to its position in the
list and an integer label must already be a position (``0 .. K-1``); without it the classes are the
sorted distinct labels of the training split (integers sort numerically), and ``label_names`` becomes
their string forms. Example (SST-2, whose files are ``<label> <sentence>`` lines)::

    data:
      class_path: lightning_peft.datamodules.ClassificationDataModule
      init_args:
        train_file: ../shared/data/sst2/stsa.binary.train
        val_file: ../shared/data/sst2/stsa.binary.dev
        label_names: [negative, positive]
"""

from __future__ import annotations

from typing import Any

from .common import (
    BaseDataModule,
    ClassificationCollator,
    DataError,
    cap_rows,
    load_rows,
    pad_id_of,
    require_columns,
    split_indices,
    to_text,
)
from .pruning import BatchPruner
from .selection import DatasetSelector


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return True
    return isinstance(value, float) and value.is_integer()


class ClassificationDataModule(BaseDataModule):
    """Text classification from JSON/JSONL/CSV/Parquet files, a ``save_to_disk`` folder, or
    ``<label> <text>`` lines (any other file name, e.g. SST-2's ``stsa.binary.train``; columns
    ``label`` and ``text``).

    Args:
        train_file: training data.
        val_file: validation data; or use ``val_fraction``.
        test_file: test data.
        val_fraction: hold out this seeded random fraction of ``train_file`` for validation.
        text_field: the text column, or two columns joined as a pair (``tokenizer(a, b)``).
        label_field: the label column.
        label_names: the classes in index order (default: inferred from the training split).
        max_length: longest sequence (longer texts are truncated).
        batch_size: training batch size (per device).
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        tokenizer: a backbone spec whose tokenizer to use; None uses the model's.
        max_samples: read only the first rows of each file (quick runs).
        seed: shuffling and ``val_fraction`` split seed.
        num_workers: DataLoader worker processes.
        pruner: a :class:`~lightning_peft.datamodules.pruning.BatchPruner` applied to training batches.
        selector: a :class:`~lightning_peft.datamodules.selection.DatasetSelector` that chooses the training
            rows once before training (kept as ``selected_indices``, indices into the tokenised rows).
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        val_fraction: float = 0.0,
        text_field: str | list[str] = "text",
        label_field: str = "label",
        label_names: list[str] | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        tokenizer: str | None = None,
        max_samples: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        pruner: BatchPruner | None = None,
        selector: DatasetSelector | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pruner", "selector"])
        self.train_file = train_file
        self.val_file = val_file
        self.test_file = test_file
        self.val_fraction = float(val_fraction)
        self.text_fields = [text_field] if isinstance(text_field, str) else list(text_field)
        self.label_field = label_field
        self.label_names = None if label_names is None else [str(n) for n in label_names]
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.tokenizer_spec = tokenizer
        self.max_samples = max_samples
        self.seed = seed
        self.num_workers = num_workers
        self.pruner = pruner
        self.selector = selector
        self._check_common()
        if not 1 <= len(self.text_fields) <= 2:
            raise DataError(f"text_field={text_field!r} must name one column or a pair of columns; "
                            "join longer inputs in the data first.")
        if val_file is not None and self.val_fraction > 0:
            raise DataError(f"Both val_file={val_file!r} and val_fraction={val_fraction} are set; use one of them.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction={val_fraction} must be in [0, 1); use e.g. 0.1 for 10% validation rows.")
        names = self.label_names
        if names is not None and (len(names) < 2 or len(set(names)) != len(names)):
            raise DataError(f"label_names={names} must list at least two distinct classes; fix the list.")
        self._raw: dict[str, Any] = {}
        self._classes: list[Any] | None = None  # inferred label values, in index order

    # ------------------------------------------------------------------ rows and labels
    def _load_raw(self, split: str) -> tuple[Any, str] | None:
        if split in ("train", "val") and "train" not in self._raw:
            rows = cap_rows(load_rows(self.train_file, "train", label_first_lines=True), self.max_samples)
            if self.val_fraction > 0:
                train_idx, val_idx = split_indices(len(rows), self.val_fraction, self.seed)
                self._raw["val"] = (rows.select(val_idx), self.train_file)
                rows = rows.select(train_idx)
            self._raw["train"] = (rows, self.train_file)
        if split not in self._raw:
            path = {"val": self.val_file, "test": self.test_file}.get(split)
            self._raw[split] = (None if path is None else
                                (cap_rows(load_rows(path, split, label_first_lines=True), self.max_samples), path))
        return self._raw[split]

    def _infer_classes(self) -> list[Any]:
        if self._classes is None:
            ds, path = self._load_raw("train")
            require_columns(ds, [self.label_field], path, "label_field")
            values = [v for v in ds[self.label_field] if v is not None]
            if values and all(_is_int(v) for v in values):
                self._classes = sorted({int(v) for v in values})
            else:
                self._classes = sorted({str(v) for v in values})
            if len(self._classes) < 2:
                raise DataError(f"The training data {str(path)!r} has {len(self._classes)} distinct label(s) "
                                f"{self._classes} in {self.label_field!r}; a classifier needs at least two classes.")
        return self._classes

    @property
    def class_names(self) -> list[str]:
        """The classes in index order: ``label_names``, or those inferred from the training split."""
        if self.label_names is not None:
            return list(self.label_names)
        return [str(c) for c in self._infer_classes()]

    @property
    def num_labels(self) -> int:
        """Number of classes (reads the training labels when ``label_names`` is not given)."""
        return len(self.class_names)

    def encode_labels(self, values: list[Any], path: str) -> list[int]:
        """Class indices of ``values``; a label outside the label set raises :class:`DataError`."""
        names = self.class_names
        if self.label_names is not None:
            by_name = {n: i for i, n in enumerate(names)}

            def lookup(v: Any) -> int | None:
                if isinstance(v, str):
                    return by_name.get(v)
                if v is not None and _is_int(v) and 0 <= int(v) < len(names):
                    return int(v)
                return None

            hint = f"string labels must be one of them, integer labels 0..{len(names) - 1}"
        else:
            classes = self._infer_classes()
            by_value = {c: i for i, c in enumerate(classes)}
            ints = isinstance(classes[0], int)

            def lookup(v: Any) -> int | None:
                if v is None:
                    return None
                if ints:
                    return by_value.get(int(v)) if _is_int(v) else None
                return by_value.get(str(v))

            hint = "inferred from the training data"
        out = []
        for v in values:
            idx = lookup(v)
            if idx is None:
                raise DataError(f"Label {v!r} in {str(path)!r} is outside label_names {names} ({hint}); fix the "
                                "data or set label_names to include it.")
            out.append(idx)
        return out

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str | None = None) -> None:
        tok = self.resolve_tokenizer()
        self.check_max_length()
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in wanted.get(stage or "", ["train", "val", "test"]):
            if split in self._data:
                continue
            raw = self._load_raw(split)
            if raw is None:
                continue
            ds, path = raw
            require_columns(ds, self.text_fields, path, "text_field")
            require_columns(ds, [self.label_field], path, "label_field")
            labels = self.encode_labels(ds[self.label_field], path)
            texts = [[to_text(v) for v in ds[f]] for f in self.text_fields]
            enc = tok(*texts, truncation=True, max_length=self.max_length)
            self._data[split] = [{"input_ids": ids, "label": y} for ids, y in zip(enc["input_ids"], labels)]
        self.apply_selector(stage)

    def collator(self) -> ClassificationCollator:
        return ClassificationCollator(pad_id_of(self._tokenizer))
