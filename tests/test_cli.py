"""The CLI's optimizer:/lr_scheduler: sections reach the module through public LightningCLI API only."""

from __future__ import annotations

import lightning as L
import torch
from helpers import REPO

from lightning_peft.cli import PeftCLI
from lightning_peft.modules import PeftModule

QUICKSTART = str(REPO / "examples" / "quickstart.yaml")


def _cli(args, **kw):
    return PeftCLI(PeftModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   save_config_kwargs={"overwrite": True}, args=args, **kw)


def test_optimizer_and_scheduler_sections_build_the_modules_optimizer(tmp_path):
    cli = _cli(["--config", QUICKSTART, "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.05",
                "--optimizer.momentum", "0.5", "--lr_scheduler", "torch.optim.lr_scheduler.StepLR",
                "--lr_scheduler.step_size", "3", "--trainer.default_root_dir", str(tmp_path)], run=False)
    built = cli.model.configure_optimizers()
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.5
    assert type(sched) is torch.optim.lr_scheduler.StepLR and sched.step_size == 3
    # over the head's trainable parameters only (the frozen backbone is not handed to the optimizer)
    in_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert in_opt == cli.model.trainable_parameters() < sum(p.numel() for p in cli.model.parameters())


def test_fit_subcommand_trains_with_the_configured_optimizer(tmp_path):
    cli = _cli(["fit", "--config", QUICKSTART, "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.02",
                "--trainer.max_steps", "1", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
                "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar",
                "false", "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(tmp_path),
                "--data.init_args.num_train", "32", "--data.init_args.num_val", "0"])
    opt = cli.trainer.optimizers[0]
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.02
    assert cli.trainer.global_step == 1


def test_without_optimizer_section_the_module_default_is_kept(tmp_path):
    cli = _cli(["--config", QUICKSTART, "--optimizer", "null", "--trainer.default_root_dir", str(tmp_path)], run=False)
    opt = cli.model.configure_optimizers()
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 1e-3


def test_no_private_lightningcli_method_is_overridden():
    for name in vars(PeftCLI):
        assert not (name.startswith("_") and not name.startswith("__")), name
