"""What every DataModule here shares: errors, file reading, prompt masking, collators, the resumable
sampler, tokenizer resolution, and the base class that wires them into Lightning.

Reading order: :class:`DataError` and :func:`load_rows` (files in, from ``files.py``), :func:`encode_sft` (prompt /
response -> ``input_ids`` + masked ``labels``), the collators (examples -> padded batch),
:class:`ResumableSampler` (deterministic order, mid-epoch resume) and :class:`BaseDataModule`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_peft.datamodules.files import (  # noqa: F401  (re-exported: the names predate the split)
    CSV_EXTENSIONS,
    FORMATS_HELP,
    JSON_EXTENSIONS,
    PARQUET_EXTENSIONS,
    DataError,
    cap_rows,
    load_rows,
    require_columns,
    split_indices,
    to_text,
)
from lightning_peft.objectives import IGNORE_INDEX


# ----------------------------------------------------------------------------------------- SFT encoding
def encode_sft(prompts: list[str], responses: list[str], tokenizer: Any, max_length: int,
               prompt_special_tokens: bool = True) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenize prompt/response pairs into ``{"input_ids", "labels"}`` examples (lists of ints).

    ``input_ids`` = prompt tokens (with the tokenizer's special tokens, e.g. BOS, unless
    ``prompt_special_tokens=False``, as for a chat-templated prompt) + response tokens + EOS;
    ``labels`` = ``-100`` on the prompt, the response tokens + EOS after it (aligned with
    ``input_ids``; the model shifts). Longer than ``max_length``: the prompt is cut from the left
    (its leading special tokens, e.g. BOS, always stay) until the response fits; a response too long
    on its own keeps its start and loses the whole prompt body and the EOS.

    A sample has *no response tokens*, and is left out, when its response text is empty or when
    ``max_length`` leaves no room after the leading special tokens. Returns the examples and counts:
    ``total``, ``empty`` (empty response), ``no_room`` (no room for a response token),
    ``truncated`` (cut to fit) and ``prompt_lost`` (cut down to the special tokens alone).
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=prompt_special_tokens)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    specials = set(tokenizer.all_special_ids)
    stats = {"total": len(prompt_ids), "empty": 0, "no_room": 0, "truncated": 0, "prompt_lost": 0}
    examples = []
    for p, r in zip(prompt_ids, response_ids):
        if not r:
            stats["empty"] += 1
            continue
        head = 0
        while head < len(p) and p[head] in specials:
            head += 1
        body = p[head:]
        target = list(r) + ([eos] if eos is not None else [])
        room = max_length - head
        if room <= 0:
            stats["no_room"] += 1
            continue
        if len(body) + len(target) > room:
            stats["truncated"] += 1
            keep = max(0, room - len(target))
            if keep == 0 and body:
                stats["prompt_lost"] += 1
            body = body[len(body) - keep:] if keep else []
            target = target[:room]
        prompt = list(p[:head]) + list(body)
        examples.append({"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target})
    return examples, stats


def check_sft_examples(examples: list, stats: dict[str, int], split: str, max_length: int,
                       response_field: str = "response") -> None:
    """Fail when no sample of ``split`` kept a response token; warn (never silently) about drops and cuts."""
    dropped = stats["empty"] + stats["no_room"]
    if not examples:
        raise DataError(
            f"All {stats['total']} {split} samples have no response tokens ({stats['no_room']} cut by "
            f"max_length={max_length}, {stats['empty']} with an empty {response_field!r}); raise max_length, "
            "shorten the prompt or fix the response field."
        )
    if dropped:
        rank_zero_warn(
            f"Dropped {dropped} of {stats['total']} {split} samples that have no response tokens "
            f"({stats['no_room']} cut by max_length={max_length}, {stats['empty']} with an empty "
            f"{response_field!r}); raise max_length, shorten the prompt or fix those rows."
        )
    if stats["prompt_lost"]:
        rank_zero_warn(
            f"{stats['prompt_lost']} of {stats['total']} {split} samples are so long that max_length={max_length} "
            "cut their whole prompt (only the response start is trained); raise max_length to keep the prompts."
        )


# ----------------------------------------------------------------------------------------- collators
def pad_id_of(tokenizer: Any) -> int:
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pid is not None:
            return int(pid)
    return 0


class CausalLMCollator:
    """Right-pads ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100) to the longest sample."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ClassificationCollator:
    """Right-pads ``input_ids`` / ``attention_mask`` to the longest sample; ``labels`` is a (B,) long tensor."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------- sampler
class ResumableSampler(DistributedSampler):
    """Seeded shuffling that can resume in the middle of an epoch.

    Epoch ``e``'s order is ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``,
    padded (like ``DistributedSampler``) to a multiple of the number of replicas and dealt out
    round-robin, so rank ``r`` reads ``order[r::num_replicas]``. Lightning calls ``set_epoch`` at the
    start of every epoch. After :meth:`resume` ``(epoch, skip)``, the first pass over that epoch leaves
    out the first ``skip`` indices of the (padded) order, which is exactly the tail an uninterrupted run
    would still read; later passes and other epochs are whole.

    It subclasses ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping it
    (``num_replicas`` / ``rank`` come from the trainer).
    """

    def __init__(self, dataset: Any, seed: int = 0, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self._skip: tuple[int, int] | None = None

    def resume(self, epoch: int, skip: int) -> None:
        """Leave out the first ``skip`` indices of epoch ``epoch``'s order, once."""
        self._skip = (int(epoch), int(skip)) if skip > 0 else None

    def order(self, epoch: int) -> list[int]:
        """The whole padded order of ``epoch`` (all ranks, nothing skipped)."""
        n = len(self.dataset)
        if self.shuffle:
            indices = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            indices = list(range(n))
        pad = self.total_size - n
        while pad > 0:
            indices += indices[:pad]
            pad = self.total_size - len(indices)
        return indices

    def __iter__(self):
        indices = self.order(self.epoch)
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1]:]
            self._skip = None
        return iter(indices[self.rank::self.num_replicas])

    def __len__(self) -> int:
        # the full per-rank length even while resuming: Lightning counts the epoch's batches from it
        # (and starts its batch counter at the number already done)
        return self.num_samples


# ----------------------------------------------------------------------------------------- base class
class BaseDataModule(L.LightningDataModule):
    """Tokenizer resolution, the max-length check, dataloaders, resume state and the pruner hook.

    Subclasses set ``batch_size``, ``eval_batch_size``, ``max_length``, ``seed``, ``num_workers``,
    ``tokenizer_spec`` and ``pruner``, fill ``self._data`` (split name -> list of examples) in
    :meth:`setup`, and say which collator batches them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tokenizer: Any = None
        self._data: dict[str, list[dict[str, Any]]] = {}
        self._train_sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None
        #: training-row indices kept by ``selector`` (None: no selector, or not selected yet)
        self.selected_indices: list[int] | None = None
        self._train_pool: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ checks on the plain values
    def _check_common(self) -> None:
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DataError(f"{name}={value!r} must be a positive integer; set e.g. {name}: 8.")
        if self.eval_batch_size is not None and (not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1):
            raise DataError(f"eval_batch_size={self.eval_batch_size!r} must be a positive integer or null.")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise DataError(f"num_workers={self.num_workers!r} must be 0 or more; use 0 to load in the main process.")

    # ------------------------------------------------------------------ tokenizer
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` (a Hugging Face tokenizer object); lets ``setup()`` run without a trainer."""
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        """The tokenizer in use (None until ``set_tokenizer`` or ``setup``)."""
        return self._tokenizer

    def _lightning_module(self) -> Any:
        trainer = self.trainer
        if trainer is None:
            return None
        try:
            return trainer.lightning_module
        except (AttributeError, RuntimeError):
            return None

    def resolve_tokenizer(self) -> Any:
        """``set_tokenizer``'s, else ``load_tokenizer(tokenizer)``, else the model's (``tokenizer=None``)."""
        if self._tokenizer is None:
            if self.tokenizer_spec is not None:
                from lightning_peft.backbones import load_tokenizer

                self._tokenizer = load_tokenizer(self.tokenizer_spec)
            else:
                tok = getattr(self._lightning_module(), "tokenizer", None)
                if tok is None:
                    raise DataError(
                        f"{type(self).__name__} has tokenizer=None, which means the model's tokenizer, but there is "
                        "no trainer with a model; pass tokenizer='tiny-llama' (or another backbone spec) or call "
                        "set_tokenizer(tok) before setup()."
                    )
                self._tokenizer = tok
        return self._tokenizer

    def check_max_length(self) -> None:
        """``max_length`` must not exceed the backbone's maximum positions (when a trainer has a model)."""
        from lightning_peft.backbones import max_positions

        model = getattr(self._lightning_module(), "model", None)
        if model is None:
            return
        limit = max_positions(model)
        if limit is not None and self.max_length > limit:
            raise DataError(
                f"max_length={self.max_length} exceeds the backbone's maximum of {limit} positions; "
                f"set max_length to {limit} or less."
            )

    # ------------------------------------------------------------------ dataloaders
    def collator(self) -> Any:
        raise NotImplementedError

    def _split(self, split: str) -> list[dict[str, Any]]:
        if split not in self._data:
            raise DataError(f"{type(self).__name__} has no {split} data yet; call setup() first "
                            f"(the Trainer does this for you).")
        return self._data[split]

    def train_dataloader(self) -> DataLoader:
        self._select_if_needed()
        data = self._split("train")
        trainer = self.trainer
        world, rank = (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)
        sampler = ResumableSampler(data, seed=self.seed, num_replicas=world, rank=rank)
        if self._resume is not None:
            epoch, skip = self._resume
            sampler.resume(epoch, skip)
            # an epoch saved as finished resumes at the next one; starting there matters with workers,
            # whose first indices are drawn before Lightning calls set_epoch
            sampler.set_epoch(epoch if skip < sampler.total_size else epoch + 1)
            self._resume = None
        self._train_sampler = sampler
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collator(),
                          num_workers=self.num_workers, persistent_workers=False)

    def _eval_loader(self, split: str) -> DataLoader | list:
        data = self._data.get(split)
        if not data:
            return []
        return DataLoader(data, batch_size=self.eval_batch_size or self.batch_size, shuffle=False,
                          collate_fn=self.collator(), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        if "test" not in self._data:
            raise DataError(f"{type(self).__name__} has no test data; set test_file (and call setup('test')).")
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        """Predictions run over the test split."""
        return self.test_dataloader()

    # ------------------------------------------------------------------ pruning
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches go through the pruner: it is bound to this batch's :class:`PrunerContext`
        (a ``TokenSelector`` pruner is also registered as ``module.token_selector``), then called."""
        trainer = self.trainer
        pruner = getattr(self, "pruner", None)
        if pruner is not None and trainer is not None and trainer.training:
            module = trainer.lightning_module
            from lightning_peft.datamodules.pruning import PrunerContext
            from lightning_peft.objectives import TokenSelector

            if hasattr(pruner, "bind"):
                pruner.bind(PrunerContext.of(trainer, module))
            if isinstance(pruner, TokenSelector):
                module.token_selector = pruner
            batch = pruner(batch, model=module)
        return batch

    # ------------------------------------------------------------------ dataset selection
    def apply_selector(self, stage: str | None) -> None:
        """Subclasses call this at the end of ``setup``: the ``selector`` (if any) chooses the training rows.

        Without a trainer (``dm.setup("fit")`` in Python) it selects at once. Under a trainer it selects in
        the first ``train_dataloader()``, which Lightning calls on every rank (the broadcast inside is a
        collective) *after* restoring a checkpoint: ``setup`` runs before the restore and cannot tell a
        resumed run by public API, and a resumed run must take the saved indices
        (:meth:`load_state_dict`) instead of selecting again.
        """
        if getattr(self, "selector", None) is None or "train" not in self._data or stage not in (None, "fit"):
            return
        if self._train_pool is None:
            self._train_pool = self._data["train"]
        if self.trainer is None:
            self._select_if_needed()

    def _select_if_needed(self) -> None:
        if getattr(self, "selector", None) is None or self._train_pool is None or self.selected_indices is not None:
            return
        self._use_selection(self.selector.run(self._train_pool, self, self.trainer))

    def _use_selection(self, indices: list[int]) -> None:
        pool = self._train_pool
        if pool is None:
            raise DataError(f"{type(self).__name__} has saved selected_indices but no training rows yet; "
                            "call setup('fit') before load_state_dict.")
        if indices and max(indices) >= len(pool):
            raise DataError(f"Saved selected_indices reach row {max(indices)} but the training set has {len(pool)} "
                            "rows; resume with the same training data as the checkpoint.")
        self.selected_indices = [int(i) for i in indices]
        self._data["train"] = [pool[i] for i in self.selected_indices]

    def notify_train_epoch_end(self) -> None:
        """Called by the module's ``on_train_epoch_end`` on every rank; passes the epoch end to the pruner."""
        pruner = getattr(self, "pruner", None)
        if pruner is not None and hasattr(pruner, "on_train_epoch_end") and self.trainer is not None:
            pruner.on_train_epoch_end(self.trainer)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands (for a mid-epoch resume) and the pruner's state (``pruner``)."""
        trainer = self.trainer
        state: dict[str, Any] = {}
        if trainer is not None:
            state = {
                "epoch": int(trainer.current_epoch),
                "batches_done": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
                "world_size": int(trainer.world_size),
            }
            if self.selected_indices is not None:
                state["selected_indices"] = list(self.selected_indices)
        pruner = getattr(self, "pruner", None)
        if pruner is not None and hasattr(pruner, "state_dict"):
            state["pruner"] = pruner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pruner = getattr(self, "pruner", None)
        if pruner is not None and hasattr(pruner, "load_state_dict") and "pruner" in state_dict:
            pruner.load_state_dict(state_dict["pruner"])
        if "batches_done" not in state_dict:
            return
        if state_dict.get("selected_indices") is not None and getattr(self, "selector", None) is not None:
            self._use_selection(list(state_dict["selected_indices"]))
        skip = int(state_dict["batches_done"]) * self.batch_size * int(state_dict.get("world_size", 1))
        self._resume = (int(state_dict["epoch"]), skip)
        if self._train_sampler is not None:
            self._train_sampler.resume(*self._resume)
