"""The ``lightning-peft`` command: LightningCLI (fit, validate, test, predict) plus ``export``.

```bash
lightning-peft fit --config examples/quickstart.yaml
lightning-peft export --ckpt_path runs/quickstart/checkpoints/last.ckpt --out merged/ --merge true
lightning-peft sstoken-history --config examples/sstoken_alpaca.yaml   # SSToken's offline history cache
```
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
from torch.optim import Optimizer

from lightning_peft.modules import PeftModule, _plain


class PeftCLI(LightningCLI):
    """LightningCLI whose ``optimizer:`` / ``lr_scheduler:`` sections are handed to the module.

    The module builds the optimizer itself from the head's parameter groups (so per-group learning
    rates and frozen parameters are respected) instead of ``model.parameters()``. Only public
    LightningCLI API is used: automatic optimizer configuration is switched off
    (``auto_configure_optimizers=False``), the two sections are added in :meth:`add_arguments_to_parser`
    and, once the classes exist, :meth:`after_instantiate_classes` passes them to
    :meth:`~lightning_peft.modules.PeftModule.set_optimizer`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)

    def subcommand_config(self) -> Any:
        """The instantiated config of the running subcommand (the whole config when there is none)."""
        config = self.config_init
        return config.get(str(self.subcommand), config) if self.subcommand else config

    def after_instantiate_classes(self) -> None:
        config = self.subcommand_config()
        optimizer, scheduler = config.get("optimizer"), config.get("lr_scheduler")
        if not optimizer:
            if scheduler:
                raise ValueError("lr_scheduler is set without optimizer; add an optimizer: section (e.g. "
                                 "class_path: torch.optim.AdamW) so the scheduler has one to drive.")
            return
        if not isinstance(self.model, PeftModule):
            raise ValueError(f"optimizer: is handed to a PeftModule, but the model is {type(self.model).__name__}; "
                             "use a lightning_peft module (CausalLM, SequenceClassifier).")
        self.model.set_optimizer(_plain(optimizer), _plain(scheduler) if scheduler else None)


def export_main(argv: list[str]) -> dict[str, Any]:
    from jsonargparse import ArgumentParser

    from lightning_peft.export import export

    parser = ArgumentParser(prog="lightning-peft export", description=export.__doc__)
    parser.add_function_arguments(export)
    cfg = parser.parse_args(argv)
    report = export(**cfg.as_dict())
    diff = report.get("max_abs_logit_diff")
    check = f"; reloaded and checked: max |Δlogit| = {diff:.2e}" if diff is not None else ""
    print(f"Exported to {report['out']} ({', '.join(report['files'])}){check}")
    return report


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def embedded_default() -> str:
    """The packaged copy of ``examples/quickstart.yaml`` (used when a subcommand gets no config)."""
    from importlib.resources import files

    return str(files("lightning_peft") / "configs" / "quickstart.yaml")


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    if argv and argv[0] == "sstoken-history":  # SSToken's offline history cache (datamodules/pruning/history_cache.py)
        from lightning_peft.datamodules.pruning.history_cache import cli_main

        cli_main(argv[1:])
        return
    rest = argv[1:]
    gives_config = any(a in ("-c", "--config") or a.startswith(("--config=", "--model", "--data")) for a in rest)
    if argv and argv[0] in SUBCOMMANDS and not gives_config and not any(a in ("-h", "--help") for a in rest):
        # `lightning-peft fit` alone runs the embedded default: tiny-llama + LoRA on a generated task
        argv = [argv[0], "--config", embedded_default(), *rest]
    PeftCLI(
        PeftModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


if __name__ == "__main__":
    main()
