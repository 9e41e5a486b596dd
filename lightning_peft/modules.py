"""LightningModules: a backbone, a head, an objective and metrics. No method logic lives here.

``CausalLM`` and ``SequenceClassifier`` share :class:`PeftModule`, which owns

* the backbone (from :func:`lightning_peft.backbones.load_backbone`) with the head attached;
* the optimizer hook-up (the ``optimizer:`` / ``lr_scheduler:`` sections of a CLI config, or
  :meth:`PeftModule.set_optimizer` in Python), honouring per-group learning rates a head asks for;
* adapter-only checkpoints: by default a checkpoint keeps only trainable parameters (plus the head's
  config in the hyper-parameters), so the frozen backbone is rebuilt from its spec on load.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_peft.backbones import load_backbone
from lightning_peft.heads.base import Head, HeadError, head_from_config
from lightning_peft.heads.lora import LoRA
from lightning_peft.objectives import IGNORE_INDEX, ClassificationCrossEntropy, LossOutput, Objective, TokenCrossEntropy

DEFAULT_OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}


def _plain(value: Any) -> Any:
    """Namespaces and tuples from jsonargparse -> dicts and lists (checkpoints load with weights_only)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class PeftModule(L.LightningModule):
    """Base of every module: backbone + head + objective + metrics.

    Args:
        backbone: a preset (``tiny-llama``), an installed package spec, a local folder, a ``.gguf``
            file or a hub id (see :mod:`lightning_peft.backbones`).
        head: the PEFT method (default: ``LoRA()`` on all linear layers).
        objective: the loss (default: the task's cross-entropy).
        dtype: backbone dtype (``float32``, ``bfloat16``, ``float16``); None keeps the checkpoint's.
        gradient_checkpointing: activation checkpointing in the backbone.
        gguf_file: GGUF file name inside a ``backbone`` folder.
        backbone_config: overrides of the backbone config (preset sizes, e.g. ``{hidden_size: 256}``).
        full_checkpoint: keep every weight in checkpoints (default: only when the head trains the
            backbone, e.g. ``FullFineTune``).
    """

    task: ClassVar[str] = "causal-lm"

    def __init__(
        self,
        backbone: str = "tiny-llama",
        head: Head | None = None,
        objective: Objective | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        gguf_file: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        full_checkpoint: bool | None = None,
        num_labels: int | None = None,
    ) -> None:
        super().__init__()
        head = head_from_config(_plain(head)) if head is not None else LoRA()
        self.save_hyperparameters(ignore=["head", "objective"])
        self.hparams["head"] = head.config()
        self.hparams["backbone_config"] = _plain(backbone_config)
        model, tokenizer = load_backbone(
            backbone, task=self.task, num_labels=num_labels, dtype=dtype,
            gradient_checkpointing=gradient_checkpointing, gguf_file=gguf_file,
            config_overrides=_plain(backbone_config),
        )
        if self.task not in head.tasks:
            raise HeadError(f"{head!r} supports only {head.tasks}, not {self.task}; choose another head.")
        self.expected_trainable_parameters = head.expected_trainable_parameters(model)
        self.model = head.attach(model)
        self.head = head
        self.tokenizer = tokenizer
        self.objective = objective or self.default_objective()
        #: a :class:`~lightning_peft.objectives.TokenSelector` asked by token-level objectives for token
        #: weights from the training forward's own losses (the DataModule registers its pruner here)
        self.token_selector = None
        self.full_checkpoint = head.trains_backbone if full_checkpoint is None else full_checkpoint
        self.strict_loading = False  # adapter-only checkpoints hold a subset of the state
        self.optimizer_init: dict[str, Any] = dict(DEFAULT_OPTIMIZER)
        self.lr_scheduler_init: dict[str, Any] | None = None
        self.lr_scheduler_interval = "step"
        self._build_metrics()

    # ----------------------------------------------------------------- overridable parts
    def default_objective(self) -> Objective:
        raise NotImplementedError

    def _build_metrics(self) -> None:
        raise NotImplementedError

    @property
    def backbone_model(self) -> torch.nn.Module:
        """The attached model (PeftModel, or the backbone itself for heads that train it in place)."""
        return self.model

    def trainable_parameters(self) -> int:
        return Head.trainable_parameters(self.model)

    # ----------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any]) -> Any:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        inputs.update(self.head.forward_inputs(batch))
        return self.head.forward(self.model, inputs)

    def label_logits(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The forward's logits aligned with the labels (objectives call this after ``self(batch)``)."""
        if self.task == "causal-lm" and logits.shape[1] > batch["labels"].shape[1]:
            logits = logits[:, -batch["labels"].shape[1]:]  # drop virtual-token positions (prompt tuning)
        return logits

    def loss_output(self, batch: dict[str, Any]) -> LossOutput:
        """The objective's ``LossOutput(loss, logs, predictions)`` for ``batch`` (it runs the forward it needs)."""
        return self.objective.loss(self, batch)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss, logits)``; ``None`` in place of the logits when the objective never builds them whole
        (its predictions are token ids, e.g. the segmented loss)."""
        out = self.loss_output(batch)
        preds = out.predictions
        return out.loss, (preds if preds is not None and preds.is_floating_point() else None)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.loss_output(batch)
        loss = out.loss
        reg = self.head.regularization_loss(self.model)
        total = loss if reg is None else loss + reg
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if reg is not None:
            self.log("train/reg_loss", reg, batch_size=bs)
        for name, value in (batch.get("pruning_stats") or {}).items():  # set by data pruners
            self.log(f"pruning/{name}", float(value), batch_size=bs)
        for name, value in out.logs.items():  # the objective's own scalars (token selection stats, ...)
            self.log(name, value, batch_size=bs)
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        raise NotImplementedError

    def _log_eval(self, stage: str) -> None:
        raise NotImplementedError

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_train_epoch_end(self) -> None:
        """Tell the DataModule (and so its pruner) that a training epoch ended; runs on every rank."""
        trainer = self.trainer
        hook = getattr(trainer.datamodule, "notify_train_epoch_end", None) if trainer is not None else None
        if hook is not None:
            hook()

    # ----------------------------------------------------------------- optimizer
    def set_optimizer(self, optimizer: dict[str, Any] | str = "torch.optim.AdamW",
                      lr_scheduler: dict[str, Any] | None = None, **init_args: Any) -> None:
        """Choose the optimizer in Python: ``set_optimizer("torch.optim.AdamW", lr=1e-3)``."""
        if isinstance(optimizer, str):
            optimizer = {"class_path": optimizer, "init_args": init_args}
        self.optimizer_init = _plain(optimizer)
        self.lr_scheduler_init = _plain(lr_scheduler)

    def configure_optimizers(self) -> Any:
        init = _plain(self.optimizer_init)
        base_lr = init.get("init_args", {}).get("lr", 1e-3)
        groups = []
        for group in self.head.param_groups(self.model):
            group = dict(group)
            scale = group.pop("lr_scale", None)
            if scale is not None:
                group["lr"] = base_lr * scale
            if group["params"]:
                groups.append(group)
        if not groups:
            raise HeadError(f"{self.head!r} left no trainable parameter; check its target modules.")
        optimizer = instantiate_class(groups, init)
        if not self.lr_scheduler_init:
            return optimizer
        scheduler = instantiate_class(optimizer, _plain(self.lr_scheduler_init))
        schedule = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # ----------------------------------------------------------------- head hooks
    def on_fit_start(self) -> None:
        self.head.on_fit_start(self.model, int(self.trainer.estimated_stepping_batches))

    def on_train_start(self) -> None:
        """Hand the head the first ``head.calibration_batches(model)`` training batches, if it wants any
        (see :meth:`Head.on_calibration_batches`; the train dataloader is set up only from this hook on)."""
        wanted = int(self.head.calibration_batches(self.model))
        if wanted <= 0:
            return
        batches = []
        for batch in self.trainer.train_dataloader:
            batches.append(self.trainer.strategy.batch_to_device(batch))
            if len(batches) == wanted:
                break
        self.head.on_calibration_batches(self.model, batches, lambda b: self.loss_output(b).loss)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.head.on_optimizer_step(self.model, int(self.trainer.global_step))

    # ----------------------------------------------------------------- checkpoints
    def trainable_state_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["head_extra_state"] = self.head.extra_state(self.model)
        if self.full_checkpoint:
            return
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["adapter_only"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("hyper_parameters") or {}).get("head")
        if saved is not None and _plain(saved) != self.head.config():
            raise HeadError(
                f"Checkpoint was trained with head {saved} but this model has {self.head.config()}; "
                "build the model with the checkpoint's head (or use `load_from_checkpoint`)."
            )
        self.head.load_extra_state(self.model, checkpoint.get("head_extra_state") or {})
        if checkpoint.get("adapter_only"):
            missing = self.trainable_state_keys() - set(checkpoint["state_dict"])
            if missing:
                raise HeadError(
                    f"Checkpoint lacks {len(missing)} trainable tensors of this model (e.g. {sorted(missing)[0]}); "
                    "it was saved from a different head or backbone."
                )


class CausalLM(PeftModule):
    """A causal language model (``AutoModelForCausalLM``) with a PEFT head.

    Metrics: ``loss``, ``ppl`` (exp of the mean token loss), ``token_acc`` (next-token accuracy on
    response tokens) and ``seq_acc`` (all response tokens right under teacher forcing).
    """

    task = "causal-lm"

    def __init__(
        self,
        backbone: str = "tiny-llama",
        head: Head | None = None,
        objective: Objective | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        gguf_file: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        full_checkpoint: bool | None = None,
    ) -> None:
        super().__init__(backbone, head, objective, dtype, gradient_checkpointing, gguf_file,
                         backbone_config, full_checkpoint)

    def default_objective(self) -> Objective:
        return TokenCrossEntropy()

    def _build_metrics(self) -> None:
        self.eval_metrics = torch.nn.ModuleDict({
            stage: torch.nn.ModuleDict({
                "loss": MeanMetric(), "token_acc": MeanMetric(), "seq_acc": MeanMetric(),
            }) for stage in ("val", "test")
        })

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        out = self.loss_output(batch)
        loss, preds = out.loss, out.predictions
        labels = batch["labels"][:, 1:]
        if preds.is_floating_point():  # logits; an objective may instead return next-token ids [B, N-1]
            preds = preds[:, :-1].argmax(-1)
        valid = labels != IGNORE_INDEX
        n_tokens = valid.sum()
        correct = (preds == labels) & valid
        m = self.eval_metrics[stage]
        m["loss"].update(loss.detach(), weight=n_tokens.clamp(min=1))
        if n_tokens > 0:
            m["token_acc"].update(correct.sum() / n_tokens, weight=n_tokens)
        has = valid.any(1)
        if has.any():
            seq_ok = (correct | ~valid).all(1)[has].float()
            m["seq_acc"].update(seq_ok.mean(), weight=has.sum())

    def _log_eval(self, stage: str) -> None:
        m = self.eval_metrics[stage]
        loss = m["loss"].compute()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=50)))
        self.log(f"{stage}/token_acc", m["token_acc"].compute(), prog_bar=True)
        self.log(f"{stage}/seq_acc", m["seq_acc"].compute())
        for metric in m.values():
            metric.reset()

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 32, **kwargs: Any) -> list[str]:
        """Greedy generation for quick looks (one prompt at a time; no padding subtleties).

        Runs in eval mode (dropout off) and restores the module's mode afterwards."""
        outs, was_training = [], self.training
        self.eval()
        try:
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt").to(self.device)
                gen = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id, **kwargs)
                outs.append(self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        finally:
            self.train(was_training)
        return outs

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        out = self(batch)
        return out.logits.argmax(-1)


class SequenceClassifier(PeftModule):
    """A sequence classifier (``AutoModelForSequenceClassification``) with a PEFT head.

    The classifier's output layer is new and is trained by every head. Metrics: ``loss``, ``acc``,
    ``macro_f1``.

    Args:
        num_labels: number of classes (must match the DataModule's label set).
    """

    task = "sequence-classification"

    def __init__(
        self,
        backbone: str = "tiny-bert",
        num_labels: int = 2,
        head: Head | None = None,
        objective: Objective | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        gguf_file: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        full_checkpoint: bool | None = None,
    ) -> None:
        if num_labels < 2:
            raise ValueError(f"num_labels={num_labels} must be at least 2; set it to the number of classes.")
        self.num_labels = num_labels
        super().__init__(backbone, head, objective, dtype, gradient_checkpointing, gguf_file,
                         backbone_config, full_checkpoint, num_labels=num_labels)

    def default_objective(self) -> Objective:
        return ClassificationCrossEntropy()

    def _build_metrics(self) -> None:
        k = self.num_labels
        self.eval_metrics = torch.nn.ModuleDict({
            stage: torch.nn.ModuleDict({
                "loss": MeanMetric(),
                "acc": MulticlassAccuracy(num_classes=k, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes=k, average="macro"),
            }) for stage in ("val", "test")
        })

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        out = self.loss_output(batch)
        loss, logits = out.loss, out.predictions
        m = self.eval_metrics[stage]
        m["loss"].update(loss.detach(), weight=batch["labels"].numel())
        m["acc"].update(logits, batch["labels"])
        m["macro_f1"].update(logits, batch["labels"])

    def _log_eval(self, stage: str) -> None:
        m = self.eval_metrics[stage]
        self.log(f"{stage}/loss", m["loss"].compute(), prog_bar=True)
        self.log(f"{stage}/acc", m["acc"].compute(), prog_bar=True)
        self.log(f"{stage}/macro_f1", m["macro_f1"].compute())
        for metric in m.values():
            metric.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        return self(batch).logits.argmax(-1)


__all__ = ["CausalLM", "PeftModule", "SequenceClassifier"]
