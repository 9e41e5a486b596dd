"""A generated SFT task, no files needed: the project's offline default and smoke test.

``addition``: prompt ``"123+456="``, response ``"579"`` (operands drawn uniformly from
``0 .. 10**num_digits - 1``, written without leading zeros). ``copy``: prompt ``"0815="`` (exactly
``num_digits`` random digits), response ``"0815"``. With ``reverse_answer`` the response's digits are
reversed (``"975"``), which a small model learns much faster, because it then writes the sum from
the lowest digit up, the order in which carries are known.

Samples are drawn from ``random.Random(seed)`` without repeats: the first ``num_train`` distinct
problems are the training split, the next ``num_val`` the validation split and the next ``num_val``
the test split, so the splits are disjoint and the same seed always gives the same data.
"""

from __future__ import annotations

import random

from .common import BaseDataModule, CausalLMCollator, DataError, check_sft_examples, encode_sft, pad_id_of
from .pruning import BatchPruner
from .selection import DatasetSelector

TASKS = ("addition", "copy")


def generate_problems(task: str, num_digits: int, count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` distinct ``(prompt, answer)`` pairs of ``task``, drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    top = 10**num_digits
    space = top * top if task == "addition" else top
    if count > space:
        raise DataError(f"task={task!r} with num_digits={num_digits} has only {space} distinct problems but "
                        f"num_train + 2 * num_val = {count}; lower num_train/num_val or raise num_digits.")
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[str, str]] = []
    while len(out) < count:
        if task == "addition":
            key: tuple[int, ...] = (rng.randrange(top), rng.randrange(top))
        else:
            key = (rng.randrange(top),)
        if key in seen:
            continue
        seen.add(key)
        if task == "addition":
            a, b = key
            out.append((f"{a}+{b}=", str(a + b)))
        else:
            digits = str(key[0]).zfill(num_digits)
            out.append((f"{digits}=", digits))
    return out


class SyntheticSFTDataModule(BaseDataModule):
    """Generated prompt/response data (``addition`` or ``copy``), masked like :class:`SFTDataModule`.

    Args:
        task: ``"addition"`` or ``"copy"``.
        num_digits: digits per operand (addition) or per string (copy).
        num_train: training samples.
        num_val: validation samples (and as many test samples).
        max_length: longest sequence.
        batch_size: training batch size (per device).
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        tokenizer: a backbone spec whose tokenizer to use; None uses the model's.
        seed: data generation and shuffling seed.
        num_workers: DataLoader worker processes.
        pruner: a :class:`~lightning_peft.datamodules.pruning.BatchPruner` applied to training batches.
        reverse_answer: write the response's digits in reverse order (easier to learn).
        selector: a :class:`~lightning_peft.datamodules.selection.DatasetSelector` that chooses the training
            rows once before training (kept as ``selected_indices``, indices into the tokenised rows).
    """

    def __init__(
        self,
        task: str = "addition",
        num_digits: int = 3,
        num_train: int = 4000,
        num_val: int = 200,
        max_length: int = 32,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        tokenizer: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
        pruner: BatchPruner | None = None,
        reverse_answer: bool = False,
        selector: DatasetSelector | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pruner", "selector"])
        self.task = task
        self.num_digits = num_digits
        self.num_train = num_train
        self.num_val = num_val
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.tokenizer_spec = tokenizer
        self.seed = seed
        self.num_workers = num_workers
        self.pruner = pruner
        self.selector = selector
        self.reverse_answer = reverse_answer
        self._check_common()
        if task not in TASKS:
            raise DataError(f"Unknown synthetic task {task!r}; choose one of {', '.join(TASKS)}.")
        if not isinstance(num_digits, int) or num_digits < 1:
            raise DataError(f"num_digits={num_digits!r} must be a positive integer; use e.g. 3.")
        if num_train < 1 or num_val < 0:
            raise DataError(f"num_train={num_train} must be at least 1 and num_val={num_val} at least 0.")

    def problems(self) -> dict[str, list[tuple[str, str]]]:
        """``{"train", "val", "test"}`` -> ``(prompt, response)`` text pairs (the response reversed if asked)."""
        pairs = generate_problems(self.task, self.num_digits, self.num_train + 2 * self.num_val, self.seed)
        if self.reverse_answer:
            pairs = [(p, r[::-1]) for p, r in pairs]
        n, v = self.num_train, self.num_val
        return {"train": pairs[:n], "val": pairs[n:n + v], "test": pairs[n + v:]}

    def setup(self, stage: str | None = None) -> None:
        tok = self.resolve_tokenizer()
        self.check_max_length()
        if self._data:
            return
        for split, pairs in self.problems().items():
            if not pairs:
                continue
            examples, stats = encode_sft([p for p, _ in pairs], [r for _, r in pairs], tok, self.max_length)
            check_sft_examples(examples, stats, split, self.max_length)
            self._data[split] = examples
        self.apply_selector(stage)

    def collator(self) -> CausalLMCollator:
        return CausalLMCollator(pad_id_of(self._tokenizer))
