"""Reading user data files: the formats this package accepts, :class:`DataError` (bad data or a bad
data setting, with the fix in the message), row loading, column checks, capping and splitting.

Split out of ``common.py``, which re-exports every name here.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

JSON_EXTENSIONS = (".json", ".jsonl")
CSV_EXTENSIONS = (".csv", ".tsv")
PARQUET_EXTENSIONS = (".parquet",)
FORMATS_HELP = "a .json/.jsonl, .csv/.tsv or .parquet file, or a folder written by Dataset.save_to_disk"


class DataError(ValueError):
    """User data (or a data setting) that cannot be turned into batches; the message says the fix."""


# ----------------------------------------------------------------------------------------- files
def load_rows(path: str, what: str = "data", label_first_lines: bool = False):
    """Read ``path`` into a ``datasets.Dataset``.

    JSON/JSONL, CSV (``.tsv``: tab-separated, with a header) and Parquet go through
    ``datasets.load_dataset``; a folder is read with ``datasets.load_from_disk`` (the ``train``
    split of a ``DatasetDict``). With ``label_first_lines`` any other file is read as plain text, one
    sample per line, ``<label> <text>`` (the SST-2 / TREC layout), into columns ``label`` and ``text``.
    """
    import datasets

    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise DataError(f"The {what} file {str(path)!r} does not exist; check the path (it is read relative to "
                        f"{os.getcwd()!r}).")
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError as err:
            raise DataError(f"The {what} folder {str(path)!r} is not a dataset written by save_to_disk; give "
                            f"{FORMATS_HELP}.") from err
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise DataError(f"The {what} folder {str(path)!r} holds splits {sorted(ds)} but no 'train' split; "
                                "save the split you want on its own with save_to_disk.")
        return ds
    suffix = p.suffix.lower()
    if suffix in JSON_EXTENSIONS:
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
    elif suffix in CSV_EXTENSIONS:
        kwargs = {"sep": "\t"} if suffix == ".tsv" else {}
        ds = datasets.load_dataset("csv", data_files=str(p), split="train", **kwargs)
    elif suffix in PARQUET_EXTENSIONS:
        ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
    elif label_first_lines:
        ds = _label_first_lines(p)
    else:
        raise DataError(f"The {what} file {str(path)!r} has an unknown format {suffix or '(no extension)'!r}; "
                        f"give {FORMATS_HELP}.")
    if len(ds) == 0:
        raise DataError(f"The {what} file {str(path)!r} has no rows; give a file with at least one sample.")
    return ds


def _label_first_lines(p: Path):
    import datasets

    labels: list[Any] = []
    texts: list[str] = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(None, 1)
            label = parts[0]
            labels.append(int(label) if label.lstrip("-").isdigit() else label)
            texts.append(parts[1] if len(parts) > 1 else "")
    if not labels:
        raise DataError(f"The file {str(p)!r} has no rows; give a file with one '<label> <text>' sample per line.")
    return datasets.Dataset.from_dict({"label": labels, "text": texts})


def require_columns(ds, fields: list[str], path: str, setting: str) -> None:
    """Raise :class:`DataError` naming the first of ``fields`` that ``ds`` lacks, and the columns it has."""
    for field in fields:
        if field not in ds.column_names:
            raise DataError(f"Field {field!r} (from {setting}) is not in {str(path)!r}, whose columns are "
                            f"{ds.column_names}; set {setting} to one of them.")


def cap_rows(ds, max_samples: int | None):
    """The first ``max_samples`` rows (all when None)."""
    if max_samples is None or len(ds) <= max_samples:
        return ds
    return ds.select(range(max_samples))


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` row indices: a seeded random ``fraction`` of ``range(n)`` (at least one row) is val."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_fraction={fraction} must be in [0, 1); use e.g. 0.02 for 2% validation rows.")
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(f"val_fraction={fraction} leaves no training rows out of {n}; lower val_fraction.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return train, val


def to_text(value: Any) -> str:
    return "" if value is None else str(value)
