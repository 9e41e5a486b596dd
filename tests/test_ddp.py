"""2-process CPU DDP: the quickstart runs under ``strategy=ddp`` and both ranks end identical."""

from __future__ import annotations

import pytest
import torch
from helpers import REPO, run_cli_ranks

from lightning_peft import CausalLM


@pytest.mark.ddp
def test_quickstart_ddp_two_cpu_ranks_identical(tmp_path):
    extra = tmp_path / "dump.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n    - class_path: helpers.DumpTrainable\n"
        f"      init_args: {{out_dir: {tmp_path / 'dump'}}}\n"
    )
    args = ["--config", str(REPO / "examples" / "quickstart.yaml"),
           "--config", str(extra), "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.accelerator", "cpu", "--trainer.max_steps", "6", "--trainer.limit_val_batches", "2",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
           "--data.init_args.num_train", "512", "--trainer.val_check_interval", "1.0"]
    r0, r1 = run_cli_ranks(args, tmp_path, tmp_path / "dump")
    assert r0["step"] == r1["step"] == 6
    assert r0["params"].keys() == r1["params"].keys()
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), f"ranks differ on {name}"
    init = {n: p.detach() for n, p in _quickstart_module().model.named_parameters()}
    moved = [n for n in r0["trainable"] if not torch.equal(r0["params"][n], init[n])]
    assert moved, "no trainable parameter moved"
    frozen = [n for n in r0["params"] if n not in r0["trainable"]]
    assert frozen and all(torch.equal(r0["params"][n], init[n]) for n in frozen)


def _quickstart_module():
    import yaml

    cfg = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())["model"]["init_args"]
    from lightning_peft.heads import head_from_config

    return CausalLM(backbone=cfg["backbone"], head=head_from_config(cfg["head"]))
