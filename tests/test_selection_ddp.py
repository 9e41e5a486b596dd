"""HalfFineTuning / GreenTrainer on 2 CPU processes through the CLI with the DEFAULT logger and pictures on
(issue 12, defect 0: GreenTrainer drew on rank 0 only and read ``trainer.log_dir``, a collective, so both
processes waited forever). The ranks' decisions (masks) are compared, not only their parameters, which
DDP keeps equal whatever each rank selected."""

from __future__ import annotations

import glob

import pytest
import torch
from helpers import REPO, run_cli_ranks


@pytest.mark.ddp
def test_greentrainer_ddp_cli_with_default_logger_and_pictures_finishes(tmp_path):
    dump = tmp_path / "dump"
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning_peft.callbacks.GreenTrainer\n"
        "      init_args: {rho: 0.5, interval: 2, interval_unit: step}\n"  # plot: true (the default)
        "    - class_path: helpers.DumpTrainable\n"
        f"      init_args: {{out_dir: {dump}}}\n"
    )
    # the command of the defect report, shortened; no --trainer.logger: the CLI's default logger
    args = ["--config", str(REPO / "examples" / "quickstart.yaml"), "--config", str(extra),
            "--model.head", "lightning_peft.heads.FullFineTune",
            "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--data.init_args.num_train", "128", "--data.init_args.batch_size", "8"]
    r0, r1 = run_cli_ranks(args, tmp_path, dump)  # a hang fails here (subprocess timeout)
    assert r0["step"] == r1["step"] == 5
    g0, g1 = r0["callbacks"]["GreenTrainer"], r1["callbacks"]["GreenTrainer"]
    assert [h["step"] for h in g0["history"]] == [0, 2, 4]
    assert g0["candidates"] == g1["candidates"]
    assert [h["mask"] for h in g0["history"]] == [h["mask"] for h in g1["history"]]  # same selections
    assert any(not all(h["mask"]) and any(h["mask"]) for h in g0["history"])
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    pictures = sorted(p.rsplit("/", 1)[1] for p in glob.glob(str(tmp_path / "run" / "**" / "greentrainer_sel*.png"),
                                                               recursive=True))
    assert pictures == ["greentrainer_sel1.png", "greentrainer_sel2.png", "greentrainer_sel3.png"]  # rank 0 drew
