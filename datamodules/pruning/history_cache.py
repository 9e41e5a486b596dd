"""SSToken's offline history cache: the base model's per-token losses on the training set, computed once.

ssToken's history model is the base model before fine-tuning (spec §3.1; the released code computes its
per-token losses offline, ``scripts/calculate_token_loss.py``). Computing them once and looking them up per
sample makes an SSToken step cost about what a plain training step costs (no history forward). One command
writes the cache for a training config, by default **next to the training data**::

    lightning-peft sstoken-history --config examples/sstoken_alpaca.yaml
    python -m lightning_peft.datamodules.pruning.history_cache --config examples/sstoken_alpaca.yaml

It builds the config's model and DataModule (no training), tokenises the training rows exactly as training
will, runs the base model over them (a PEFT head switched off with ``Head.disabled``; a full fine-tuning
module as built, i.e. untrained) through the same no-grad history pass SSToken runs online
(:func:`lightning_peft.datamodules.pruning.scoring.lm_token_losses`, in the config's training precision), with
a progress bar, and writes the file. Where it goes: ``--out``, else the SSToken pruner's ``history_cache``
in the config, else ``<train_file>.sstoken-history.pt``. Training then reads it when the pruner has
``history_cache: <that file>`` (``--data.pruner.init_args.history_cache <file>`` on the command line).

**Keys.** Each sample's losses are stored under a hash of its token ids and its response mask (the tokens
whose label is not -100), so row order, shuffling and batching do not matter and a re-tokenised or
re-masked sample is a miss. The file also records the base model (backbone spec, ``backbone_config``,
``dtype``, ``gguf_file``: preset weights are drawn from a fixed seed) and a hash of all tokenised training
rows. A run whose base model differs from the file's, or that meets a sample the file lacks (other data,
another template, another ``max_length``), is refused in one sentence naming the file and the rebuild
command. A local-folder backbone is identified by its path: rebuild after replacing the weights there.

**Never loses work.** The file is written to a temporary name and renamed, so an interrupted build leaves
the previous file as it was; an up-to-date cache is kept (``--force`` rebuilds it); a file at the target
path that is not a history cache is never replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any

import torch

#: the ``format`` entry of a cache file
FORMAT = "lightning-peft/sstoken-history/1"
#: the default file name: ``<train_file>`` + this
SUFFIX = ".sstoken-history.pt"
COMMAND = "lightning-peft sstoken-history --config"


class HistoryCacheError(ValueError):
    """A history cache that cannot be used (missing, not a cache, built for other data or another model)."""


class HistoryCacheMiss(HistoryCacheError, KeyError):
    """A training sample the history cache has no entry for (the data or its tokenisation changed)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def rebuild_hint(config: str | None = None) -> str:
    return f"`{COMMAND} {config or '<your config>'}`"


# ---------------------------------------------------------------------------------------- keys
def sample_key(ids: torch.Tensor | list[int], labels: torch.Tensor | list[int]) -> str:
    """Key of one (unpadded) sample: a hash of its token ids and of which tokens are response (label != -100)."""
    ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
    response = (torch.as_tensor(labels, dtype=torch.int64).cpu() != -100).to(torch.uint8)
    h = hashlib.sha1(ids.numpy().tobytes())
    h.update(response.numpy().tobytes())
    return h.hexdigest()


def data_key(rows: list[dict[str, Any]]) -> str:
    """A hash of all tokenised rows in order (``input_ids`` and the response mask of each)."""
    h = hashlib.sha1()
    for row in rows:
        h.update(sample_key(row["input_ids"], row["labels"]).encode())
    return h.hexdigest()


def model_spec(module: Any) -> dict[str, Any] | None:
    """What identifies the base model of a ``CausalLM`` (plain values), or None for another model."""
    hparams = getattr(module, "hparams", None)
    if hparams is None or "backbone" not in hparams:
        return None
    return {k: hparams.get(k) for k in ("backbone", "backbone_config", "dtype", "gguf_file")}


def spec_key(spec: dict[str, Any] | None) -> str | None:
    return None if spec is None else hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def default_path(train_file: str) -> str:
    return os.fspath(train_file).rstrip("/\\") + SUFFIX


# ---------------------------------------------------------------------------------------- the file
def read_cache(path: str, config: str | None = None) -> dict[str, Any]:
    """The cache written at ``path`` (``weights_only`` load); one sentence naming the file when unusable."""
    if not os.path.exists(path):
        raise HistoryCacheError(f"SSToken's history cache {path!r} does not exist; build it with "
                                f"{rebuild_hint(config)}.")
    try:
        cache = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise HistoryCacheError(f"{path!r} is not an SSToken history cache ({type(err).__name__}); rebuild it with "
                                f"{rebuild_hint(config)}.") from err
    if not isinstance(cache, dict) or cache.get("format") != FORMAT:
        raise HistoryCacheError(f"{path!r} is not an SSToken history cache of this version; rebuild it with "
                                f"{rebuild_hint(config)}.")
    return cache


def check_model(cache: dict[str, Any], path: str, module: Any) -> None:
    """Refuse a cache built for another base model than ``module``'s (when both are known)."""
    want, have = cache.get("model_key"), spec_key(model_spec(module))
    if want is not None and have is not None and want != have:
        raise HistoryCacheError(f"SSToken's history cache {path!r} was built for base model {cache.get('model')} but "
                                f"this run's base model is {model_spec(module)}; rebuild it with "
                                f"{rebuild_hint(cache.get('config'))}.")


def lookup(cache: dict[str, Any], path: str, batch: dict[str, Any]) -> torch.Tensor:
    """Label-aligned history losses (B, S) of ``batch`` from ``cache``; 0 on padding."""
    device = batch["labels"].device
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()  # one transfer each, then host work
    mask = batch["attention_mask"].cpu().bool() if batch.get("attention_mask") is not None else torch.ones_like(
        ids, dtype=torch.bool)
    out = torch.zeros(labels.shape, dtype=torch.float32)
    losses = cache["losses"]
    for b in range(ids.shape[0]):
        value = losses.get(sample_key(ids[b][mask[b]], labels[b][mask[b]]))
        if value is None:
            raise HistoryCacheMiss(f"SSToken's history cache {path!r} has no entry for a training sample (the data, "
                                   f"its template or max_length changed); rebuild it with "
                                   f"{rebuild_hint(cache.get('config'))}.")
        out[b, mask[b]] = value.float()
    return out.to(device, non_blocking=True)


def write_cache(path: str, losses: dict[str, torch.Tensor], module: Any, rows_key: str | None,
                config: str | None = None) -> None:
    """Write the cache atomically (temporary file + rename); never replaces a file that is not a cache."""
    if os.path.exists(path) and not _is_cache(path):
        _refuse_foreign(path)
    spec = model_spec(module)
    payload = {"format": FORMAT, "model": spec, "model_key": spec_key(spec), "data_key": rows_key,
               "config": None if config is None else os.fspath(config), "samples": len(losses), "losses": losses}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(payload, tmp)
    except OSError as err:
        raise HistoryCacheError(f"Cannot write the history cache {path!r} ({err.strerror or err}); pass "
                                "--out <a writable file> and set the SSToken pruner's history_cache to it.") from err
    os.replace(tmp, path)


def _is_cache(path: str) -> bool:
    try:
        read_cache(path)
    except HistoryCacheError:
        return False
    return True


def _refuse_foreign(path: str) -> None:
    raise HistoryCacheError(f"{path!r} exists and is not an SSToken history cache; it is left untouched: pass "
                            "--out <another file> (and set the SSToken pruner's history_cache to it).")


# ---------------------------------------------------------------------------------------- building
@torch.no_grad()
def build(module: Any, rows: list[dict[str, Any]], collate: Any, path: str, batch_size: int = 8,
          config: str | None = None, context: Any = None, progress: bool = True) -> int:
    """The base model's history losses on every row of ``rows`` (tokenised examples), written to ``path``.

    ``module`` is a freshly built ``CausalLM`` (its head switched off with ``Head.disabled`` where it has
    one; a full fine-tuning module is taken as it is, i.e. untrained); ``context`` a ``PrunerContext`` whose
    ``forward_context`` gives the training precision. Rows are batched by length (less padding). Returns
    the number of samples written."""
    from tqdm.auto import tqdm

    from .scoring import precision_context
    from .sstoken import SSToken

    pruner = SSToken(history="auto", rel_warmup_fraction=0.0)
    if context is not None:
        pruner.bind(context)
    mode = pruner._mode(module)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    device = next(module.parameters()).device
    losses: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(rows), desc="SSToken history losses", unit="sample", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        with precision_context(module, None, context):  # the training forward's precision, as online
            hist = pruner.online_history(module, batch, "adapter" if mode == "adapter" else "self")
        mask = batch["attention_mask"].bool()
        for b, row in enumerate(chunk):
            losses[sample_key(row["input_ids"], row["labels"])] = hist[b][mask[b]].cpu()
        bar.update(len(chunk))
    bar.close()
    write_cache(path, losses, module, data_key(rows), config)
    return len(losses)


def main(argv: list[str] | None = None) -> str:
    """``lightning-peft sstoken-history --config CONFIG [--out FILE] [--force] [--device D] [overrides]``."""
    ap = argparse.ArgumentParser(prog="lightning-peft sstoken-history", description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", required=True, help="the training config (YAML) with an SSToken pruner")
    ap.add_argument("--out", default=None, help="cache file (default: the pruner's history_cache, else next to "
                    "the training data)")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: the data's batch_size)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = ap.parse_known_args(argv)

    import lightning as L

    from lightning_peft.cli import PeftCLI
    from lightning_peft.modules import PeftModule

    from . import PrunerContext
    from .sstoken import SSToken

    cli = PeftCLI(PeftModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                  save_config_callback=None, args=["--config", args.config, *rest])
    module, dm = cli.model, cli.datamodule
    pruner = getattr(dm, "pruner", None)
    if not isinstance(pruner, SSToken):
        raise HistoryCacheError(f"{args.config!r} has no SSToken pruner (data.init_args.pruner is {pruner!r}); the "
                                "history cache is for SSToken runs.")
    train_file = getattr(dm, "train_file", None)
    path = args.out or pruner.history_cache or (default_path(train_file) if train_file else None)
    if path is None:
        raise HistoryCacheError(f"{type(dm).__name__} has no train_file to put the cache next to; pass --out <file>.")
    dm.selector = None  # the cache covers every training row; a selector's choice is a subset of them
    dm.set_tokenizer(module.tokenizer)
    dm.setup("fit")
    rows = dm._split("train")
    rows_key = data_key(rows)
    if os.path.exists(path) and not args.force:
        if not _is_cache(path):
            _refuse_foreign(path)
        old = read_cache(path)
        if old.get("data_key") == rows_key and old.get("model_key") == spec_key(model_spec(module)):
            print(f"{path} is up to date ({old.get('samples')} samples); --force rebuilds it.")
            return path
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    module.to(device)
    context = PrunerContext.of(cli.trainer, module)
    n = build(module, rows, dm.collator(), path, args.batch_size or dm.batch_size, config=args.config,
              context=context, progress=not args.no_progress)
    print(f"Wrote the base model's history losses of {n} samples to {path}.")
    if pruner.history_cache is None or os.path.abspath(pruner.history_cache) != os.path.abspath(path):
        print(f"Train with it: set `history_cache: {path}` in the SSToken pruner's init_args "
              f"(or add --data.pruner.init_args.history_cache {path}).")
    return path


def cli_main(argv: list[str] | None = None) -> None:
    """:func:`main` for a shell: a refused cache exits with its one sentence instead of a traceback."""
    try:
        main(argv)
    except HistoryCacheError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli_main()
