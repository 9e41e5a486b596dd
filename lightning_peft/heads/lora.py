"""LoRA (Hu et al., 2021) and its peft variants DoRA and rsLoRA, as a thin wrapper over ``peft``.

``W x + (alpha / r) B A x`` with ``B = 0`` at init, so the model is unchanged until training moves
``B``. rsLoRA scales by ``alpha / sqrt(r)``; DoRA adds a trained magnitude vector per output feature.
``loraplus_lr_ratio`` (LoRA+, Hayou et al., 2024) trains ``B`` with a larger learning rate.
"""

from __future__ import annotations

from torch import nn

from lightning_peft.heads._peft import PeftBackedHead, classifier_parameters, peft_task_type
from lightning_peft.heads.base import classifier_module_names, is_classifier


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def targeted_linears(model: nn.Module, target_modules: list[str] | str) -> list[tuple[str, int, int]]:
    """``(name, in, out)`` of every linear-like module that ``target_modules`` selects.

    ``"all-linear"`` follows peft: every linear layer except the output layer (LM head or classifier).
    """
    skip: set[str] = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if is_classifier(model):
        skip.update(classifier_module_names(model))
    found = []
    for name, module in model.named_modules():
        shape = _in_out(module)
        if shape is None:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if target_modules == "all-linear":
            if module is out_emb or name.split(".")[0] in skip or leaf in skip:
                continue
            found.append((name, *shape))
        elif matches_target(name, target_modules):
            found.append((name, *shape))
    return found


def matches_target(name: str, targets: list[str] | str) -> bool:
    """peft's rule for a list of names: the module's full name equals one, or ends with ``"." + one``
    (so ``output.dense`` selects every ``....output.dense``)."""
    targets = [targets] if isinstance(targets, str) else targets
    return any(name == t or name.endswith("." + t) for t in targets)


class LoRA(PeftBackedHead):
    """Low-rank adapters on the chosen linear layers.

    Args:
        r: rank of the update.
        alpha: scaling numerator (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter's input.
        target_modules: module names (e.g. ``[q_proj, v_proj]``) or ``"all-linear"``.
        use_dora: weight-decomposed LoRA (adds a magnitude vector per output feature).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        loraplus_lr_ratio: if set, ``B`` matrices train with ``lr * loraplus_lr_ratio`` (LoRA+).
    """

    mergeable = True
    identity_at_init = True

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: list[str] | str = "all-linear",
        use_dora: bool = False,
        use_rslora: bool = False,
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        if r < 1:
            raise ValueError(f"LoRA r={r} must be a positive integer; use r >= 1 (8 or 16 are common).")
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.target_modules = target_modules
        self.use_dora = use_dora
        self.use_rslora = use_rslora
        self.loraplus_lr_ratio = loraplus_lr_ratio

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
            use_dora=self.use_dora, use_rslora=self.use_rslora, task_type=peft_task_type(model),
        )

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        """``sum r * (in + out)`` over targeted layers, ``+ out`` each with DoRA, + a classifier's output layer."""
        total = 0
        for _, d_in, d_out in targeted_linears(model, self.target_modules):
            total += self.r * (d_in + d_out) + (d_out if self.use_dora else 0)
        return total + classifier_parameters(model)

    def param_groups(self, model: nn.Module):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.loraplus_lr_ratio:
            return [{"params": [p for _, p in params]}]
        b = [p for n, p in params if "lora_B" in n]
        rest = [p for n, p in params if "lora_B" not in n]
        return [{"params": rest}, {"params": b, "lr_scale": float(self.loraplus_lr_ratio)}]
