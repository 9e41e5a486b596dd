"""Export a trained run: a merged Hugging Face folder, or the unmerged adapter.

* ``merge=True``: the head is folded into the base weights and ``save_pretrained`` writes a plain
  Hugging Face folder (model + tokenizer) that ``AutoModelFor*.from_pretrained`` loads.
* ``merge=False``: peft-backed heads write a peft adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained``; other heads write
  ``head_config.json`` + ``head.safetensors``.

Unless ``verify=False``, the export is reloaded and its logits compared with the trained model's on
a probe input; a difference above ``atol`` (in float64) is an error.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from lightning_peft.checkpoints import load_module
from lightning_peft.heads._peft import PeftBackedHead


def _probe(module, text: str = "12+34=46. The quick brown fox") -> dict[str, torch.Tensor]:
    enc = module.tokenizer(text, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _auto_class(module):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if module.task == "sequence-classification" else AutoModelForCausalLM


def export(ckpt_path: str, out: str, merge: bool = True, verify: bool = True, atol: float = 1e-5) -> dict[str, Any]:
    """Write ``out`` from the checkpoint; returns a small report (files, max logit difference)."""
    module = load_module(ckpt_path)
    probe = _probe(module)
    reference = None
    if verify:  # compared in float64 so that float32 re-association does not count as a difference
        with torch.no_grad():
            reference = module.head.forward(copy.deepcopy(module.model).double(), probe).logits
    os.makedirs(out, exist_ok=True)
    head = module.head
    if merge:
        merged = head.merge(module.model)
        merged.save_pretrained(out)
        module.tokenizer.save_pretrained(out)
        reload = lambda: _auto_class(module).from_pretrained(out)
    elif isinstance(head, PeftBackedHead):
        head.export_adapter(module.model, out)
        module.tokenizer.save_pretrained(out)

        def reload():
            from peft import PeftModel

            return PeftModel.from_pretrained(fresh_backbone(module), out)
    else:
        head.save(module.model, out)
        reload = None
    with open(os.path.join(out, "lightning_peft_export.json"), "w") as f:
        json.dump({"ckpt_path": os.path.abspath(ckpt_path), "merged": merge, "head": head.config()}, f, indent=2)
    report: dict[str, Any] = {"out": out, "files": sorted(os.listdir(out))}
    if verify and reload is not None:
        model = reload().eval().double()
        with torch.no_grad():
            logits = (model(**probe) if merge else head.forward(model, probe)).logits
        if logits.shape[1] > reference.shape[1]:
            logits = logits[:, -reference.shape[1]:]
        if reference.shape[1] > logits.shape[1]:
            reference = reference[:, -logits.shape[1]:]
        diff = (logits - reference).abs().max().item()
        report["max_abs_logit_diff"] = diff
        if diff > atol:
            raise RuntimeError(f"Exported model differs from the trained one (max |Δlogit| = {diff:.3g} > {atol}).")
    return report


def fresh_backbone(module) -> torch.nn.Module:
    """The bare backbone a module was built on, loaded again from its spec."""
    from lightning_peft.backbones import load_backbone

    hp = module.hparams
    model, _ = load_backbone(
        hp["backbone"], task=module.task, num_labels=hp.get("num_labels"), dtype=hp.get("dtype"),
        gguf_file=hp.get("gguf_file"), config_overrides=hp.get("backbone_config"),
    )
    return model
