"""Any method of Hugging Face ``peft``, chosen by ``peft_type`` in one plain dict.

```yaml
head:
  class_path: lightning_peft.heads.PeftHead
  init_args:
    config: {peft_type: IA3, target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}
```

The dict holds exactly the fields the user sets (``--print_config`` stays short); every other field
keeps peft's default. ``task_type`` is filled in from the backbone. Method-specific duties:

* **AdaLoRA**: the rank allocator is stepped after every optimizer step (``update_and_allocate``),
  ``total_step`` defaults to the run's number of optimizer steps, and the orthogonality regulariser
  is added to the objective (peft adds it only when it computes the loss itself, which we do not).
* **CPT** computes its own loss (its token-type weighting is part of the method), so the objective
  uses the loss returned by the model.
* **Prompt tuning / P-tuning** prepend virtual tokens; the module drops their logits.
* **Prefix tuning on an encoder classifier** (BERT, RoBERTa, ...): since transformers 5.25 these
  models take their key/value cache as ``cache=`` and no longer list ``past_key_values``, which
  peft's classifier path looks for. The head then runs the forward itself with peft's public
  ``get_prompt`` (the learned per-layer keys/values as a cache) and the attention mask extended by
  the virtual tokens, exactly what peft does on older releases; an encoder that takes neither is
  refused in one sentence that points to prompt tuning.

Trainable-parameter formulas exist for LORA, ADALORA, IA3, VERA, OFT, BOFT, PROMPT_TUNING,
PREFIX_TUNING and CPT; other types attach and train but report no formula.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from lightning_peft.heads._peft import PeftBackedHead, classifier_parameters, peft_task_type
from lightning_peft.heads.base import HeadError, is_classifier
from lightning_peft.heads.lora import targeted_linears

MERGEABLE = {"LORA", "ADALORA", "IA3", "VERA", "OFT", "BOFT", "LOHA", "LOKR"}
IDENTITY_AT_INIT = {"LORA", "ADALORA", "IA3", "VERA", "OFT", "BOFT", "LOHA", "LOKR"}
PROMPT_LEARNING = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "CPT", "MULTITASK_PROMPT_TUNING"}
OWN_LOSS = {"CPT"}
CAUSAL_ONLY = {"CPT"}
_PLACEHOLDER_TOTAL_STEP = 10**9


def _dims(model: nn.Module) -> tuple[int, int, int]:
    """(hidden size, number of layers, key/value width) of a transformers config."""
    c = model.config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or c.d_model
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None) or c.num_layers
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return hidden, layers, head_dim * kv_heads


def _prefix_needs_cache_argument(model: nn.Module) -> bool:
    """Whether prefix tuning on this classifier must pass its prefix as ``cache=`` (see the module doc).

    False where peft's own path works (the classifier or its encoder lists ``past_key_values``); True
    where the encoder takes ``cache``; an encoder that takes neither is refused."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    params = set(inspect.signature(model.forward).parameters) | set(inspect.signature(encoder.forward).parameters)
    if "past_key_values" in params:
        return False
    if "cache" in params:
        return True
    kind = getattr(model.config, "model_type", type(model).__name__)
    raise HeadError(
        f"PeftHead PREFIX_TUNING cannot attach to {type(model).__name__}: its {kind!r} encoder takes no key/value "
        "cache, which prefix tuning needs; use {'peft_type': 'PROMPT_TUNING'} (virtual tokens in the input) instead."
    )


class PeftHead(PeftBackedHead):
    """Any ``peft`` method: ``config`` is a plain dict with ``peft_type`` and that method's fields.

    Args:
        config: e.g. ``{"peft_type": "IA3", "target_modules": [...], "feedforward_modules": [...]}``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        if not isinstance(config, dict) or "peft_type" not in config:
            raise HeadError(f"PeftHead config {config!r} needs a 'peft_type' key, e.g. {{'peft_type': 'IA3', ...}}.")
        self.config_dict = dict(config)
        self.peft_type = str(config["peft_type"]).upper()
        known = sorted(str(k.value if hasattr(k, "value") else k) for k in PEFT_TYPE_TO_CONFIG_MAPPING)
        if self.peft_type not in known:
            raise HeadError(f"Unknown peft_type {config['peft_type']!r}; choose one of {', '.join(known)}.")
        self.fields = {k: v for k, v in config.items() if k != "peft_type"}
        if self.peft_type == "CPT" and "cpt_token_ids" in self.fields:
            # Proposal (peft has no usable default): the context tokens all count, as one input
            # template that ends in an output token, so response tokens keep their label type.
            n = len(self.fields["cpt_token_ids"])
            self.fields.setdefault("cpt_mask", [1] * n)
            self.fields.setdefault("cpt_tokens_type_mask", [1] * (n - 1) + [4])
        self.target_modules = self.fields.get("target_modules")
        self._user_total_step = "total_step" in self.fields

    # plain values for YAML / checkpoints
    def init_args(self) -> dict[str, Any]:
        return {"config": copy.deepcopy(self.config_dict)}

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.peft_type in MERGEABLE

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.peft_type in IDENTITY_AT_INIT

    @property
    def own_loss(self) -> bool:
        return self.peft_type in OWN_LOSS

    @property
    def tasks(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("causal-lm",) if self.peft_type in CAUSAL_ONLY else ("causal-lm", "sequence-classification")

    def forward_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.peft_type != "CPT":
            return {}
        labels = batch["labels"]
        # CPT token types: 4 marks tokens whose labels count, 1 the rest; 0 is padding
        types = torch.where(labels != -100, 4, 1) * batch["attention_mask"].to(labels.dtype)
        return {"labels": labels, "input_type_mask": types}

    def attach(self, model: nn.Module) -> nn.Module:
        self._prefix_via_cache = False
        if self.peft_type == "PREFIX_TUNING" and is_classifier(model):
            self._prefix_via_cache = _prefix_needs_cache_argument(model)
        return super().attach(model)

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        if not getattr(self, "_prefix_via_cache", False):
            return model(**inputs)
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        n_virtual = model.active_peft_config.num_virtual_tokens
        cache = model.get_prompt(batch_size=ids.shape[0])
        if mask is not None:
            mask = torch.cat([mask.new_ones(ids.shape[0], n_virtual), mask], dim=1)
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        return model.base_model(input_ids=ids, attention_mask=mask, cache=cache, **rest)

    def peft_config(self, model: nn.Module):
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        fields = dict(self.fields)
        if self.peft_type == "ADALORA" and "total_step" not in fields:
            fields["total_step"] = _PLACEHOLDER_TOTAL_STEP  # replaced in on_fit_start
        fields.setdefault("task_type", peft_task_type(model))
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type]
        try:
            return cls(**fields)
        except TypeError as err:
            import dataclasses

            names = sorted(f.name for f in dataclasses.fields(cls))
            raise HeadError(f"PeftHead {self.peft_type}: {err}; its fields are {names}.") from err

    # ----------------------------------------------------------------- formula
    def expected_trainable_parameters(self, model: nn.Module) -> int | None:
        f, t = self.fields, self.peft_type
        hidden, layers, kv = _dims(model)
        targets = self.target_modules
        total: int | None = 0
        if t == "LORA":
            r = f.get("r", 8)
            for _, d_in, d_out in targeted_linears(model, targets or "all-linear"):
                total += r * (d_in + d_out) + (d_out if f.get("use_dora") else 0)
        elif t == "ADALORA":
            r = f.get("init_r", 12)
            total = sum(r * (d_in + d_out) + r for _, d_in, d_out in targeted_linears(model, targets))
        elif t == "IA3":
            ff = set(f.get("feedforward_modules") or [])
            for name, d_in, d_out in targeted_linears(model, targets):
                total += d_in if name.rsplit(".", 1)[-1] in ff else d_out
        elif t == "VERA":
            r = f.get("r", 256)
            total = sum(d_out + r for _, _, d_out in targeted_linears(model, targets))
        elif t == "OFT":
            for _, d_in, _ in targeted_linears(model, targets):
                r, b = f.get("r", 0), f.get("oft_block_size", 32)
                n, b = (r, d_in // r) if r else (d_in // b, b)
                total += n * b * (b - 1) // 2
        elif t == "BOFT":
            # peft falls back to one butterfly factor when its CUDA extension is unavailable
            factor = f.get("boft_n_butterfly_factor", 1) if torch.cuda.is_available() else 1
            for _, d_in, d_out in targeted_linears(model, targets):
                b = f.get("boft_block_size") or d_in // f["boft_block_num"]
                total += factor * (d_in // b) * b * b + d_out
        elif t == "PROMPT_TUNING":
            total = f["num_virtual_tokens"] * hidden
        elif t == "PREFIX_TUNING" and not f.get("prefix_projection"):
            total = f["num_virtual_tokens"] * layers * 2 * kv
        elif t == "CPT":
            total = len(f["cpt_token_ids"]) * hidden
        else:
            total = None
        return None if total is None else total + classifier_parameters(model)

    # ----------------------------------------------------------------- AdaLoRA duties
    def on_fit_start(self, model: nn.Module, total_steps: int) -> None:
        if self.peft_type != "ADALORA" or self._user_total_step:
            return
        cfg = model.peft_config["default"]
        if cfg.tinit >= total_steps - cfg.tfinal:
            raise HeadError(
                f"AdaLoRA tinit={cfg.tinit} + tfinal={cfg.tfinal} leave no budgeting phase in {total_steps} "
                "optimizer steps; lower tinit/tfinal or train for more steps."
            )
        cfg.total_step = int(total_steps)

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        if self.peft_type == "ADALORA":
            model.base_model.update_and_allocate(global_step)

    def extra_state(self, model: nn.Module) -> dict[str, Any]:
        """AdaLoRA: the rank allocator's importance averages and the rank pattern, so resume is exact."""
        if self.peft_type != "ADALORA":
            return {}
        alloc = model.base_model.rankallocator
        cfg = model.peft_config["default"]
        state = {k: {n: t.detach().clone() for n, t in getattr(alloc, k).items()}
                 for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
        state["rank_pattern"] = {n: [bool(x) for x in v] for n, v in (cfg.rank_pattern or {}).items()}
        state["total_step"] = int(cfg.total_step)
        return state

    def load_extra_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        if self.peft_type != "ADALORA" or not state:
            return
        alloc = model.base_model.rankallocator
        for k in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            getattr(alloc, k).clear()
            getattr(alloc, k).update({n: t.clone() for n, t in state[k].items()})
        cfg = model.peft_config["default"]
        cfg.rank_pattern = dict(state["rank_pattern"]) or None
        cfg.total_step = state["total_step"]

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        """AdaLoRA's orthogonality penalty ``w * mean ||P P^T - I||_F^2`` over its P (A) and Q (B)."""
        if self.peft_type != "ADALORA":
            return None
        weight = model.peft_config["default"].orth_reg_weight
        if weight <= 0:
            return None
        terms = []
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                m = p if "lora_A" in name else p.T
                eye = torch.eye(m.shape[0], device=m.device, dtype=m.dtype)
                terms.append(torch.linalg.matrix_norm(m @ m.T - eye, ord="fro"))
        return weight * torch.stack(terms).mean() if terms else None
