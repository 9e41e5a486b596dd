"""SparseAdapter: He, Ding, Dong, Zhang, Tao, "SparseAdapter: An Easy Approach for Improving the
Parameter-Efficiency of Adapters", Findings of EMNLP 2022 (arXiv 2210.04284); mechanics from the
official code (github.com/Shwai-He/SparseAdapter at b190084), the paper text beyond the abstract was
not available.

Bottleneck adapters (:class:`~lightning_peft.heads.bottleneck.BottleneckAdapter`) are pruned once, at
initialisation: every entry of each adapter's ``W_down`` and ``W_up`` gets a saliency score, the
``sparsity`` fraction with the lowest scores is masked, and the binary masks stay fixed. The forward
multiplies the weights by the masks (masked entries get exactly zero gradient, so AdamW's moments stay
zero and its decoupled weight decay keeps them at zero), the masked weights are also zeroed in place,
and after every optimizer step they are zeroed again (cheap insurance). Biases (and norms) stay dense.

Criteria (``criterion``):

* ``snip``: ``|theta * g|``, ``g`` the gradient of the loss summed over the scoring batches;
* ``grasp``: ``theta * (H g)`` (Wang et al., 2020), the Hessian-gradient product by double backprop;
  the highest scores are kept (removing the highest ``-theta * H g`` as the paper does); the paper's
  softmax temperature is not applied (the loss is the module's objective as it is);
* ``synflow``: a data-free score computed per adapter as an isolated linear network (a proposal: the
  official code runs SynFlow on the whole model, which needs all-ones inputs a token model does not
  take): ``R = 1^T |W_up| |W_down| 1`` summed over adapters, score ``|theta * dR/dtheta|``, one shot;
* ``magnitude``: ``|theta|``; ``random``: standard normal noise from a generator seeded with ``seed``.

``snip`` and ``grasp`` need training batches: :meth:`calibration_batches` asks ``PeftModule`` for
``prune_batches`` of them at train start (the :meth:`Head.on_calibration_batches` hook; the model is put
in eval mode while scoring, as in the official code). Data-free criteria prune in :meth:`on_fit_start`.
Under DDP the scores are summed over ranks before thresholding, so every rank keeps the same masks.

``scope="global"`` (the official default) keeps the top ``round((1 - sparsity) * N)`` entries over all
``N`` adapter weights; ``"local"`` does so per tensor. ``sparsity`` is the paper's *sparse ratio* (the
pruned fraction; the official code's ``sparsity`` is the keep ratio).

Init: the base adapter defaults to ``init="bert"`` here, because with a zero ``W_up`` SNIP scores every
up-projection weight 0 (the trade-off the spec documents); ``base={"init": "zero_up"}`` restores the
exact identity at init (with SNIP every ``W_up`` entry then ties at score 0, so use another criterion).

Large-Sparse (``large_sparse=kappa``): bottleneck ``kappa * m`` with sparsity ``1 - 1/kappa``, so the
non-zero weights equal those of the dense ``m`` adapter while the biases grow by ``(kappa - 1) m``.

Masks are saved with the head (``head_state_dict`` entries ``<adapter>.down_mask``/``.up_mask``) and in
Lightning checkpoints (:meth:`extra_state`), and re-applied on load, so pruned weights stay exactly zero
through training, checkpoint and resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_peft.heads.base import Head, HeadError
from lightning_peft.heads.bottleneck import BottleneckAdapter, BottleneckModule, adapters

CRITERIA = ("snip", "grasp", "synflow", "magnitude", "random")
DATA_CRITERIA = ("snip", "grasp")
BASE_DEFAULTS: dict[str, Any] = {"placement": "houlsby", "bottleneck": 64, "init": "bert"}
MASKS = ("down_mask", "up_mask")


def _weights(module: BottleneckModule) -> tuple[nn.Parameter, nn.Parameter]:
    return module.down_weight, module.up_weight


def keep_masks(scores: list[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Boolean masks keeping the highest scores: ``round((1 - sparsity) * N)`` of all ``N`` entries
    (``scope="global"``) or of each tensor's entries (``"local"``). Ties are broken by ``torch.topk``."""
    def top(flat: torch.Tensor) -> torch.Tensor:
        keep = round((1.0 - sparsity) * flat.numel())
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        mask[torch.topk(flat.float(), keep, sorted=False).indices] = True
        return mask

    if scope == "local":
        return [top(s.flatten()).view_as(s) for s in scores]
    flat = top(torch.cat([s.flatten() for s in scores]))
    return [m.view_as(s) for m, s in zip(flat.split([s.numel() for s in scores]), scores)]


class SparseAdapter(Head):
    """Bottleneck adapters pruned at initialisation (see the module docstring).

    Args:
        base: BottleneckAdapter settings (``placement``, ``bottleneck``, ``activation``, ``init``,
            ``train_layernorm``, ``scale``); defaults ``{placement: houlsby, bottleneck: 64, init: bert}``.
        sparsity: pruned fraction of the adapter weights (the paper's sparse ratio; 0.4 recommended).
        criterion: ``snip`` (default), ``grasp``, ``synflow``, ``magnitude`` or ``random``.
        scope: ``global`` (one threshold over all adapters) or ``local`` (per tensor).
        prune_batches: training batches scored by ``snip``/``grasp``.
        large_sparse: Large-Sparse factor ``kappa``: bottleneck ``kappa * m``, sparsity ``1 - 1/kappa``
            (leave ``sparsity`` unset then).
        seed: seed of the ``random`` criterion's generator.
    """

    def __init__(self, base: dict[str, Any] | None = None, sparsity: float | None = 0.4, criterion: str = "snip",
                 scope: str = "global", prune_batches: int = 4, large_sparse: float | None = None,
                 seed: int = 0) -> None:
        self.base = dict(base or {})
        self.sparsity = sparsity
        self.criterion = criterion
        self.scope = scope
        self.prune_batches = prune_batches
        self.large_sparse = large_sparse
        self.seed = seed
        if criterion not in CRITERIA:
            raise HeadError(f"SparseAdapter criterion={criterion!r} is unknown; use one of {list(CRITERIA)}.")
        if scope not in ("global", "local"):
            raise HeadError(f"SparseAdapter scope={scope!r} is unknown; use 'global' or 'local'.")
        if not isinstance(prune_batches, int) or prune_batches < 1:
            raise HeadError(f"SparseAdapter prune_batches={prune_batches!r} must be a positive integer (e.g. 4).")
        settings = {**BASE_DEFAULTS, **self.base}
        if large_sparse is not None:
            if large_sparse < 1:
                raise HeadError(f"SparseAdapter large_sparse={large_sparse!r} must be a factor >= 1 (e.g. 2 or 5).")
            if sparsity is not None and abs(sparsity - (1 - 1 / large_sparse)) > 1e-9:
                raise HeadError(f"SparseAdapter large_sparse={large_sparse} sets the sparsity to 1 - 1/kappa; "
                                f"leave sparsity unset (null) instead of {sparsity}.")
            settings["bottleneck"] = round(large_sparse * settings["bottleneck"])
        elif sparsity is None:
            raise HeadError("SparseAdapter sparsity=None needs large_sparse=kappa; give a sparsity in [0, 1).")
        self.effective_sparsity = 1 - 1 / large_sparse if large_sparse is not None else float(sparsity)
        if not 0.0 <= self.effective_sparsity < 1.0:
            raise HeadError(f"SparseAdapter sparsity={sparsity!r} must be in [0, 1) (the pruned fraction, e.g. 0.4).")
        try:
            self.adapter = BottleneckAdapter(**settings)
        except TypeError as err:
            raise HeadError(f"SparseAdapter base={self.base!r} has a key BottleneckAdapter does not take ({err}); "
                            "use placement, bottleneck, activation, init, train_layernorm or scale.") from None
        self.identity_at_init = self.adapter.identity_at_init

    # ----------------------------------------------------------------- attach and counts
    def attach(self, model: nn.Module) -> nn.Module:
        return self.adapter.attach(model)

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        """Allocated (``requires_grad``) parameters: those of the dense bottleneck adapter of size ``m'``."""
        return self.adapter.expected_trainable_parameters(model)

    def expected_unpruned_parameters(self, model: nn.Module) -> int:
        """The "non-zero" count after pruning: ``round((1 - s) * sum 2dm)`` weights (global scope; per tensor
        when local) + the dense rest (biases ``d + m`` per adapter, trained norms, a classifier's output layer)."""
        m, s = self.adapter.bottleneck, self.effective_sparsity
        widths = self._widths(model)
        if self.scope == "global":
            weights = round((1 - s) * sum(2 * d * m for d in widths))
        else:
            weights = sum(2 * round((1 - s) * d * m) for d in widths)
        return self.adapter.expected_trainable_parameters(model) - sum(2 * d * m for d in widths) + weights

    def _widths(self, model: nn.Module) -> list[int]:
        from lightning_peft.architectures import out_features

        return [out_features(proj) for _, _, proj in self.adapter._sites(model)]

    @staticmethod
    def unpruned_parameters(model: nn.Module) -> int:
        """Trainable parameters of an attached model minus the masked (pruned) adapter weights."""
        masked = sum(int((~getattr(a, k)).sum()) for _, a in adapters(model) for k in MASKS
                     if getattr(a, k) is not None)
        return sum(p.numel() for p in model.parameters() if p.requires_grad) - masked

    def disabled(self, model: nn.Module):
        return self.adapter.disabled(model)

    # ----------------------------------------------------------------- pruning
    @staticmethod
    def pruned(model: nn.Module) -> bool:
        found = adapters(model)
        return bool(found) and all(a.down_mask is not None for _, a in found)

    def calibration_batches(self, model: nn.Module) -> int:
        return self.prune_batches if self.criterion in DATA_CRITERIA and not self.pruned(model) else 0

    def on_fit_start(self, model: nn.Module, total_steps: int) -> None:
        if self.criterion not in DATA_CRITERIA and not self.pruned(model):
            self.prune(model)

    def on_calibration_batches(self, model: nn.Module, batches: list[dict[str, Any]],
                               loss_fn: Callable[[dict[str, Any]], torch.Tensor]) -> None:
        if not self.pruned(model):
            self.prune(model, batches, loss_fn)

    def prune(self, model: nn.Module, batches: list[dict[str, Any]] | None = None,
              loss_fn: Callable[[dict[str, Any]], torch.Tensor] | None = None) -> None:
        """Score every adapter weight with the criterion, keep the top ``1 - sparsity`` and fix the masks."""
        found = [a for _, a in adapters(model)]
        if not found:
            raise HeadError("SparseAdapter.prune found no adapter in this model; "
                            "call it on the model attach() returned.")
        if self.criterion in DATA_CRITERIA and not batches:
            raise HeadError(f"SparseAdapter criterion={self.criterion!r} scores on training batches and got none; "
                            "train under Trainer.fit (PeftModule hands them over) or pass batches and loss_fn.")
        params = [w for a in found for w in _weights(a)]
        scores = self.scores(model, params, batches or [], loss_fn)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for s in scores:
                torch.distributed.all_reduce(s)  # the same masks on every rank
        masks = keep_masks(scores, self.effective_sparsity, self.scope)
        for i, a in enumerate(found):
            a.set_masks(masks[2 * i], masks[2 * i + 1])

    def scores(self, model: nn.Module, params: list[nn.Parameter], batches: list[dict[str, Any]],
               loss_fn: Callable[[dict[str, Any]], torch.Tensor] | None) -> list[torch.Tensor]:
        """One saliency tensor per weight in ``params`` (higher = kept)."""
        if self.criterion == "magnitude":
            return [p.detach().abs() for p in params]
        if self.criterion == "random":
            g = torch.Generator().manual_seed(self.seed)
            return [torch.randn(p.shape, generator=g).to(p.device) for p in params]
        if self.criterion == "synflow":
            return self._synflow(params)
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                grads = self._summed_grads(params, batches, loss_fn)
                if self.criterion == "snip":
                    return [(p.detach() * g).abs() for p, g in zip(params, grads)]
                return self._grasp(params, grads, batches, loss_fn)
        finally:
            model.train(was_training)

    @staticmethod
    def _summed_grads(params: list[nn.Parameter], batches: list[dict[str, Any]],
                      loss_fn: Callable[[dict[str, Any]], torch.Tensor]) -> list[torch.Tensor]:
        total = [torch.zeros_like(p) for p in params]
        for batch in batches:
            for acc, g in zip(total, torch.autograd.grad(loss_fn(batch), params)):
                acc.add_(g)
        return total

    @staticmethod
    def _grasp(params: list[nn.Parameter], grads: list[torch.Tensor], batches: list[dict[str, Any]],
               loss_fn: Callable[[dict[str, Any]], torch.Tensor]) -> list[torch.Tensor]:
        """``theta * H g`` with ``H g = d/dtheta (g_stop . dL/dtheta)``. The fused attention kernels have no
        double backward, so attention runs on PyTorch's math kernel here (public ``sdpa_kernel``)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        hg = [torch.zeros_like(p) for p in params]
        with sdpa_kernel(SDPBackend.MATH):
            for batch in batches:
                first = torch.autograd.grad(loss_fn(batch), params, create_graph=True)
                dot = sum((f * g).sum() for f, g in zip(first, grads))
                for acc, part in zip(hg, torch.autograd.grad(dot, params)):
                    acc.add_(part)
        return [p.detach() * h for p, h in zip(params, hg)]

    @staticmethod
    def _synflow(params: list[nn.Parameter]) -> list[torch.Tensor]:
        leaves = [p.detach().abs().double().requires_grad_(True) for p in params]
        with torch.enable_grad():
            flow = sum((up @ (down @ torch.ones(down.shape[1], dtype=down.dtype, device=down.device))).sum()
                       for down, up in zip(leaves[0::2], leaves[1::2]))
            grads = torch.autograd.grad(flow, leaves)
        return [(leaf * g).detach().to(p.dtype) for leaf, g, p in zip(leaves, grads, params)]

    def on_optimizer_step(self, model: nn.Module, global_step: int) -> None:
        if not self.pruned(model):
            raise HeadError(f"{self!r} reached an optimizer step unpruned: criterion {self.criterion!r} prunes on "
                            "training batches at train start, so train under Trainer.fit or call head.prune() first.")
        for _, a in adapters(model):
            a.apply_masks()

    # ----------------------------------------------------------------- state: the masks travel with the head
    @staticmethod
    def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": getattr(a, k).detach().clone() for n, a in adapters(model)
                for k in MASKS if getattr(a, k) is not None}

    def _set_masks(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        for name, a in adapters(model):
            if f"{name}.down_mask" in masks:
                a.set_masks(masks[f"{name}.down_mask"], masks[f"{name}.up_mask"])

    def head_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {**super().head_state_dict(model), **self._masks(model)}

    def load_head_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        masks = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in MASKS}
        params = {k: v for k, v in state.items() if k not in masks}
        own = {n for n, p in model.named_parameters() if p.requires_grad}
        unknown = [k for k in masks if k.rsplit(".", 1)[0] not in dict(adapters(model))]
        if own != set(params) or unknown:
            raise HeadError(f"SparseAdapter state does not fit this model (missing {sorted(own - set(params))[:3]}, "
                            f"unknown {sorted(set(params) - own)[:3] + unknown[:3]}); load it into a model built "
                            "with the same backbone and head configuration.")
        self._set_masks(model, masks)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in params.items():
                named[name].copy_(value)
        for _, a in adapters(model):
            a.apply_masks()

    def extra_state(self, model: nn.Module) -> dict[str, Any]:
        return {"masks": self._masks(model)}

    def load_extra_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        self._set_masks(model, state.get("masks") or {})
