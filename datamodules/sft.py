"""Supervised fine-tuning data: prompt/response pairs from local files, with the prompt masked.

Each row becomes ``prompt tokens + response tokens + EOS``; only the response and EOS are trained
(``labels`` is ``-100`` on the prompt and on padding). The prompt is either
``prompt_template.format(**row)`` or ``row[prompt_field]``, optionally wrapped in the tokenizer's chat
template. Example (GSM8K)::

    data:
      class_path: lightning_peft.datamodules.SFTDataModule
      init_args:
        train_file: ../shared/data/gsm8k/train.jsonl
        prompt_template: "Question: {question}\\nAnswer: "
        response_field: answer
        max_length: 256
        val_fraction: 0.02
"""

from __future__ import annotations

import string
from typing import Any

from .common import (
    BaseDataModule,
    CausalLMCollator,
    DataError,
    cap_rows,
    check_sft_examples,
    encode_sft,
    load_rows,
    pad_id_of,
    require_columns,
    split_indices,
    to_text,
)
from .pruning import BatchPruner
from .selection import DatasetSelector


def template_fields(template: str) -> list[str]:
    """The row fields a ``str.format`` template reads (``{a}``, ``{a[0]}`` and ``{a.b}`` all read ``a``)."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise DataError(f"prompt_template {template!r} is not a valid format string ({err}); write literal "
                        "braces as '{{' and '}}'.") from err
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = name.split(".")[0].split("[")[0]
        if base == "" or base.isdigit():
            raise DataError(f"prompt_template {template!r} has a positional field {{{name}}}; name a data field "
                            "such as {question}, or write literal braces as '{{' and '}}'.")
        if base not in fields:
            fields.append(base)
    return fields


class SFTDataModule(BaseDataModule):
    """Prompt/response SFT from JSON/JSONL/CSV/Parquet files or a ``save_to_disk`` folder.

    Args:
        train_file: training data (``.json``/``.jsonl``, ``.csv``/``.tsv``, ``.parquet``, or a
            ``save_to_disk`` folder; a ``DatasetDict`` gives its ``train`` split).
        val_file: validation data (same formats); or use ``val_fraction``.
        test_file: test data (same formats).
        val_fraction: hold out this seeded random fraction of ``train_file`` for validation.
        prompt_template: ``str.format`` template over the row's fields, e.g. ``"Question: {question}\\n"``.
        prompt_field: the field holding the prompt (instead of ``prompt_template``).
        response_field: the field holding the response.
        use_chat_template: wrap the prompt as a user turn in the tokenizer's chat template (with the
            generation prompt); the response follows it.
        system_prompt: a system turn before the user turn (chat template only).
        max_length: longest sequence; longer samples lose the prompt's start first (see ``encode_sft``).
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
        prompt_template: str | None = None,
        prompt_field: str | None = None,
        response_field: str = "response",
        use_chat_template: bool = False,
        system_prompt: str | None = None,
        max_length: int = 512,
        batch_size: int = 8,
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
        self.prompt_template = prompt_template
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
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
        if (prompt_template is None) == (prompt_field is None):
            raise DataError("Set exactly one of prompt_template (e.g. 'Question: {question}\\nAnswer: ') and "
                            f"prompt_field (the column holding the prompt); got prompt_template={prompt_template!r}, "
                            f"prompt_field={prompt_field!r}.")
        if prompt_template is not None:
            template_fields(prompt_template)  # fail early on a malformed template
        if val_file is not None and self.val_fraction > 0:
            raise DataError(f"Both val_file={val_file!r} and val_fraction={val_fraction} are set; use one of them.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction={val_fraction} must be in [0, 1); use e.g. 0.02 for 2% validation rows.")
        if system_prompt is not None and not use_chat_template:
            raise DataError("system_prompt is only used with the chat template; set use_chat_template: true "
                            "or put the text into prompt_template.")
        self._raw: dict[str, Any] = {}

    # ------------------------------------------------------------------ rows
    def _load_raw(self, split: str) -> tuple[Any, str] | None:
        """``(dataset, path)`` of ``split`` before tokenization, or None when it has no data."""
        if split in ("train", "val") and "train" not in self._raw:
            rows = cap_rows(load_rows(self.train_file, "train"), self.max_samples)
            if self.val_fraction > 0:
                train_idx, val_idx = split_indices(len(rows), self.val_fraction, self.seed)
                self._raw["val"] = (rows.select(val_idx), self.train_file)
                rows = rows.select(train_idx)
            self._raw["train"] = (rows, self.train_file)
        if split not in self._raw:
            path = {"val": self.val_file, "test": self.test_file}.get(split)
            self._raw[split] = None if path is None else (cap_rows(load_rows(path, split), self.max_samples), path)
        return self._raw[split]

    def prompts_and_responses(self, ds: Any, path: str) -> tuple[list[str], list[str]]:
        """Render every row's prompt text (chat template included) and response text."""
        require_columns(ds, [self.response_field], path, "response_field")
        if self.prompt_template is not None:
            fields = template_fields(self.prompt_template)
            for field in fields:
                if field not in ds.column_names:
                    raise DataError(f"prompt_template names field {field!r}, which is not in {str(path)!r}, whose "
                                    f"columns are {ds.column_names}; use one of those in the template.")
            columns = {f: ds[f] for f in fields}
            prompts = []
            for i in range(len(ds)):
                row = {f: "" if columns[f][i] is None else columns[f][i] for f in fields}
                try:
                    prompts.append(self.prompt_template.format(**row))
                except (IndexError, KeyError, AttributeError, ValueError) as err:
                    raise DataError(f"prompt_template {self.prompt_template!r} fails on row {i} of {str(path)!r} "
                                    f"({type(err).__name__}: {err}); fix the template or that row.") from err
        else:
            require_columns(ds, [self.prompt_field], path, "prompt_field")
            prompts = [to_text(v) for v in ds[self.prompt_field]]
        responses = [to_text(v) for v in ds[self.response_field]]
        if self.use_chat_template:
            prompts = self._chat(prompts)
        return prompts, responses

    def _chat(self, prompts: list[str]) -> list[str]:
        tok = self._tokenizer
        if not getattr(tok, "chat_template", None):
            raise DataError(f"use_chat_template is true but the tokenizer {type(tok).__name__} has no chat template; "
                            "set use_chat_template: false and use prompt_template, or use a chat model's tokenizer.")
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return [
            tok.apply_chat_template(system + [{"role": "user", "content": p}], add_generation_prompt=True,
                                    tokenize=False)
            for p in prompts
        ]

    # ------------------------------------------------------------------ Lightning
    def setup(self, stage: str | None = None) -> None:
        self.resolve_tokenizer()
        self.check_max_length()
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for split in wanted.get(stage or "", ["train", "val", "test"]):
            if split in self._data:
                continue
            raw = self._load_raw(split)
            if raw is None:
                continue
            ds, path = raw
            prompts, responses = self.prompts_and_responses(ds, path)
            examples, stats = encode_sft(prompts, responses, self._tokenizer, self.max_length,
                                         prompt_special_tokens=not self.use_chat_template)
            check_sft_examples(examples, stats, split, self.max_length, self.response_field)
            self._data[split] = examples
        self.apply_selector(stage)

    def collator(self) -> CausalLMCollator:
        return CausalLMCollator(pad_id_of(self._tokenizer))
