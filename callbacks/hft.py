"""Half Fine-Tuning (HFT): full fine-tuning in which each round trains a structured half of the blocks.

Hui, Zhang, Wang, Xu, Sun, Wu, *HFT: Half Fine-Tuning for Large Language Models*, arXiv 2404.18466
(ACL 2025). Spec: ``shared/methods/hft.md``.

At the start of each *round* (a fine-tuning stage: SFT, DPO, one task of a continual-learning
sequence) a random but structured half of every block's weight tensors is frozen at its current value
and the other half, plus the embeddings and the LM head, trains. Nothing is reset. The mask is a
deterministic function of ``(seed, round)``.

Category-level selection (the paper's default; spec §3.1), per block ``l`` of ``L`` blocks:

* **attention**: 2 of the 4 matrices {Q, K, V, O}, uniformly at random;
* **FFN**: 2 of {gate, up, down} in a random ``floor(L/2)`` of the blocks and 1 in the others (odd
  ``L``: the extra block gets 1 or 2 at random, the spec's proposal), so exactly half over the model;
* **norms**: 1 of the 2 norm weights;
* embeddings and the LM head train (``train_embeddings=False`` freezes them); a tied pair is one tensor.

The general rule for a category with ``k`` tensors per block: ``k/2`` per block when ``k`` is even;
``ceil(k/2)`` in a random half of the blocks and ``floor(k/2)`` in the rest when ``k`` is odd.

Architectures: the block list and each block's tensors come from the architecture table
(:mod:`lightning_peft.architectures`, see :mod:`lightning_peft.callbacks._hft_layout`), so every family
there with one stack of blocks works: Llama, Mistral, Qwen2/3, Gemma/Gemma-2, Phi-3, GPT-2, GPT-NeoX,
OPT, BLOOM, BERT, RoBERTa. Per block, **attention** is the table's q/k/v/o (2 of 4), or the fused qkv
and o (1 of 2); **FFN** is gate/up/down (2-or-1 of 3), or up/down, or the fused gate_up and down (1 of
2); **norms** are the block norms (1 of 2; 2 of 4 in Gemma-2). T5 (two stacks) is refused in one sentence.

A fused QKV (GPT-2, Phi-3, GPT-NeoX, BLOOM) cannot be half-frozen without splitting it, so its two
attention tensors are treated as one category of 2 and one is trained per block: training the fused
tensor trains 3 of the paper's 4 matrices, the output projection 1, i.e. 2 of 4 on average over the
blocks. ``balance="count"`` alternates them so the trainable attention count is within one block of 50%.
**[proposal]** Phi-3's fused ``gate_up`` is treated the same way in the FFN (1 of {gate_up, down}), and
Gemma-2's four block norms follow the general rule (2 of 4).

``groups`` replaces the table's categories (each regex must match, in full, the name of exactly one
module relative to every block); for a model the table does not know, ``blocks`` names its block list::

    blocks: model.layers
    groups: {attention: ['self_attn\\.qkv_proj', 'self_attn\\.o_proj'],
             ffn: ['mlp\\.gate_up_proj', 'mlp\\.down_proj'],
             norm: [input_layernorm, post_attention_layernorm]}

Where this implementation departs from the paper, or fills gaps it leaves (proposals, from the spec):

* **[proposal]** the final norm, position/token-type embeddings' norm, pooler, classifier and any other
  tensor outside the blocks train (like embeddings); block tensors that no category names (e.g. Qwen-3
  ``q_norm``) train too, with a warning; a bias always follows its weight matrix.
* **[proposal]** ``balance="count"``: for GQA models (K and V smaller than Q and O) "2 of 4" is not half
  by count; with ``"count"`` the pair of each block is drawn among those that keep the running
  trainable count of the category closest to half (e.g. {Q,K}, {Q,V}, {O,K}, {O,V}). The default
  ``"category"`` is the paper's rule.
* **[proposal]** a round is one ``fit`` by default (``round_every="fit"``; the next round starts when
  user code calls :meth:`HalfFineTuning.new_round` between fits). ``"epoch"`` / ``"step"`` with
  ``every_n`` re-draw inside one fit; at such a change the optimizer state of tensors that become frozen
  is dropped, so stale moments can never be applied to them later (they restart fresh when trained again).
* Only category-level selection is implemented (not the paper's model-/layer-level ablations), and
  ``update_ratio`` is structurally 0.5.

Mechanics:

* A frozen tensor has ``requires_grad=False`` and ``grad=None`` (never a zero tensor), so autograd
  skips its weight-gradient GEMM (the method's speed-up) and AdamW applies neither momentum nor weight
  decay to it. The optimizer is built over every candidate tensor; frozen ones are skipped by it.
* DDP: every candidate tensor stays trainable through ``setup`` so the strategy registers it when it
  wraps the model and the optimizer covers it; the mask is applied from ``on_fit_start`` (after the wrap).
  Because the set of tensors with gradients differs from the one DDP registered, DDP needs
  ``find_unused_parameters=True`` (``strategy: ddp_find_unused_parameters_true``); a wrapped model
  without it is refused at ``on_fit_start`` (the shared guards live in ``callbacks/_selection.py``).
  Ranks agree without communication: the mask is drawn from a local
  ``random.Random`` seeded with (seed, round) (the global RNGs are never touched); rank 0's seed is
  broadcast at setup and, at every new mask, rank 0's mask digest is broadcast and compared (a
  mismatch stops every rank with an error).
* Checkpoints: :meth:`state_dict` holds the seed, the round, the explicit list of trainable tensor
  names and the step/epoch at which the round began. On resume the saved mask is re-applied (not
  re-drawn) before the optimizer state is loaded. The module must keep full checkpoints (frozen tensors
  changed in earlier rounds), which ``FullFineTune`` does.
* Logs ``hft/round``, ``hft/trainable_fraction`` (of all parameters) and ``hft/block_trainable_fraction``
  (of the block tensors) to every logger, and draws the blocks x tensors grid of the mask to
  ``<log_dir>/hft_round{r}.png`` (also sent to TensorBoard / W&B loggers, through
  :func:`lightning_peft.figures.log_figure` on every rank). Plotting never stops training.

YAML (``examples/hft.yaml``)::

    model:
      class_path: lightning_peft.CausalLM
      init_args:
        backbone: tiny-llama
        head:
          class_path: lightning_peft.heads.FullFineTune
    trainer:
      callbacks:
        - class_path: lightning_peft.callbacks.HalfFineTuning
          init_args: {seed: 0, round_every: fit}
      # under DDP:  strategy: ddp_find_unused_parameters_true
"""

from __future__ import annotations

import itertools
import os
import random
import weakref
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_peft.callbacks._hft_layout import HFTError, Layout, build_layout, check_groups
from lightning_peft.callbacks._selection import SelectionCallback, apply_mask, candidate_names, target
from lightning_peft.callbacks._selection_plot import hft_figure

ROUND_EVERY = ("fit", "epoch", "step")
BALANCE = ("category", "count")


class HalfFineTuning(SelectionCallback):
    """Half Fine-Tuning (Hui et al. 2024, arXiv 2404.18466): each round, a structured half trains.

    See the module docstring for the selection rule, the supported architectures, the departures from
    the paper and the DDP handling.

    Args:
        seed: seed of the masks (a mask is a function of ``(seed, round)``); None uses the run's seed
            (``seed_everything``'s ``PL_GLOBAL_SEED``), or 0.
        round_every: ``"fit"`` (one round per fit; :meth:`new_round` starts the next one), ``"epoch"`` or
            ``"step"`` (a new round every ``every_n`` epochs / optimizer steps).
        every_n: epochs or optimizer steps per round (``round_every`` ``"epoch"`` / ``"step"``).
        train_embeddings: train the input embeddings and the LM head (the paper does).
        balance: ``"category"`` (the paper: any 2 of 4 attention tensors) or ``"count"`` (pairs that keep
            the trainable count closest to half, for GQA models; a proposal).
        groups: categories replacing the architecture table's: category -> list of regexes, each
            matching in full the name of one module relative to a block (``{"attention": [...], ...}``).
        blocks: for a model the architecture table does not know, the dotted path of its block
            ``nn.ModuleList`` in the attached model (needs ``groups``).
        first_round: round index of the first round (a later stage run as its own command).
        plot: draw the mask grid to ``<log_dir>/hft_round{r}.png`` and send it to image-capable loggers.
    """

    component = "HalfFineTuning"
    error = HFTError

    def __init__(
        self,
        seed: int | None = None,
        round_every: str = "fit",
        every_n: int = 1,
        train_embeddings: bool = True,
        balance: str = "category",
        groups: dict[str, list[str]] | None = None,
        first_round: int = 0,
        plot: bool = True,
        blocks: str | None = None,
    ) -> None:
        if round_every not in ROUND_EVERY:
            raise HFTError(f"HalfFineTuning round_every={round_every!r} is not one of {ROUND_EVERY}; pick one.")
        if isinstance(every_n, bool) or not isinstance(every_n, int) or every_n < 1:
            raise HFTError(f"HalfFineTuning every_n={every_n!r} must be a positive integer.")
        if balance not in BALANCE:
            raise HFTError(f"HalfFineTuning balance={balance!r} is not one of {BALANCE}; pick one.")
        if isinstance(first_round, bool) or not isinstance(first_round, int) or first_round < 0:
            raise HFTError(f"HalfFineTuning first_round={first_round!r} must be a non-negative integer.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise HFTError(f"HalfFineTuning seed={seed!r} must be an integer or null.")
        self.groups = check_groups(groups)
        if blocks is not None and (not isinstance(blocks, str) or not blocks):
            raise HFTError(f"HalfFineTuning blocks={blocks!r} must be the dotted path of a block list, e.g. 'layers'.")
        self.blocks = blocks
        self.seed = seed
        self.round_every = round_every
        self.every_n = every_n
        self.train_embeddings = train_embeddings
        self.balance = balance
        self.first_round = first_round
        self.plot = plot
        # state (all of it in state_dict)
        self.round = first_round
        self._trainable: list[str] | None = None  # the current round's mask, once drawn
        self._round_start_step = 0
        self._round_start_epoch = 0
        # per-process bookkeeping (not state)
        self._layouts: weakref.WeakKeyDictionary[nn.Module, Layout] = weakref.WeakKeyDictionary()
        self._restored = False  # load_state_dict ran for the coming fit
        self._reset_counters = False
        self._in_fit = False
        self.report: dict[str, Any] = {}

    # ================================================================= public API
    def new_round(self) -> int:
        """Start the next round: the next mask is drawn for ``round + 1`` (at the next fit, or at the
        next accumulation boundary when called during a fit). Returns the new round index."""
        self.round += 1
        self._trainable = None
        return self.round

    @property
    def trainable_names(self) -> list[str] | None:
        """Names (in the attached model) of the tensors the current round trains; None before a draw."""
        return None if self._trainable is None else list(self._trainable)

    def select(self, model: nn.Module, round: int | None = None) -> list[str]:
        """The trainable tensor names for ``(seed, round)`` (default: the current round); no side effect."""
        model = target(model)
        return self._draw(model, self.round if round is None else round)

    def apply(self, model: nn.Module) -> list[str]:
        """Freeze this round's frozen half of ``model`` (a module or a LightningModule), drawing the mask
        if needed; for training loops without a Trainer. Returns the trainable names."""
        model = target(model)
        self._candidate_names(model)
        if self.seed is None:
            self.seed = _default_seed()
        if self._trainable is None:
            self._trainable = self._draw(model, self.round)
        self._apply_mask(model)
        return list(self._trainable)

    def mask_grid(self, model: nn.Module) -> tuple[list[str], list[str], list[list[bool]]]:
        """``(row labels, column labels, rows)``: for each block, whether each category tensor trains."""
        model = target(model)
        layout = self.layout(model)
        trainable = set(self._trainable or [])
        cols = [(c, label) for c, labels in layout.columns.items() for label in labels]
        rows = [[slot.params[0] in trainable for cat in layout.columns for slot in layout.slots[cat][layer]]
                for layer in range(layout.n_layers)]
        return [f"{layout.blocks}.{i}" for i in range(layout.n_layers)], [f"{c}:{lab}" for c, lab in cols], rows

    def layout(self, model: nn.Module) -> Layout:
        """The block layout HFT selects from (built once per model; raises for unknown architectures)."""
        model = target(model)
        if model not in self._layouts:
            self._layouts[model] = build_layout(model, self.groups, self.blocks)
        return self._layouts[model]

    def __getstate__(self) -> dict[str, Any]:  # picklable (ddp_spawn): drop the per-model caches
        state = dict(self.__dict__)
        state["_layouts"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._layouts = weakref.WeakKeyDictionary()

    # ================================================================= Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_module(pl_module)
        self.check_strategy(trainer, refuse_sharded=False)
        model = target(pl_module)
        layout = self.layout(model)
        if layout.uncovered:
            rank_zero_warn(
                f"HalfFineTuning: block tensors {layout.uncovered[:4]} belong to no category and always train; "
                "name them in `groups` to include them in the selection."
            )
        # every candidate trains through the DDP wrap and configure_optimizers; the mask comes later
        candidates = set(self._candidate_names(model))
        for name, p in model.named_parameters():
            if name in candidates:
                p.requires_grad_(True)
        seed = self.seed if self.seed is not None else _default_seed()
        self.seed = int(trainer.strategy.broadcast(seed, src=0))
        self._restored = False

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict["seed"])
        self.round = int(state_dict["round"])
        trainable = state_dict.get("trainable")
        self._trainable = None if trainable is None else [str(n) for n in trainable]
        self._round_start_step = int(state_dict.get("round_start_step", 0))
        self._round_start_epoch = int(state_dict.get("round_start_epoch", 0))
        self._restored = True

    def _state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "round": self.round,
            "trainable": None if self._trainable is None else list(self._trainable),
            "round_start_step": self._round_start_step,
            "round_start_epoch": self._round_start_epoch,
            "round_every": self.round_every,
            "every_n": self.every_n,
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the strategy wrapped the model and built the optimizer, before the optimizer
        # state of a resumed run is loaded
        self.check_ddp(trainer)
        model = target(pl_module)
        self._in_fit = True
        self._reset_counters = not self._restored
        if self._trainable is None:
            self._trainable = self._draw(model, self.round)
        self._apply_mask(model)
        self.check_agreement(trainer, self._trainable or [], f"the round-{self.round} mask")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the loop state (global_step, current_epoch) of a resumed run is known from here on
        # strategies that restore checkpoints after setup (DeepSpeed) load the saved mask only now
        self._apply_mask(target(pl_module))
        if self._reset_counters:
            self._round_start_step = trainer.global_step
            self._round_start_epoch = trainer.current_epoch
            self._reset_counters = False
        self._announce(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.round_every == "epoch" and trainer.current_epoch - self._round_start_epoch >= self.every_n:
            self.new_round()
        if self._trainable is None:
            self._start_round(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % max(1, trainer.accumulate_grad_batches) != 0:
            return  # only at the start of an accumulation window, i.e. right after an optimizer step
        if self.round_every == "step" and trainer.global_step - self._round_start_step >= self.every_n:
            self.new_round()
        if self._trainable is None:
            self._start_round(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._in_fit = False
            self._restored = False

    # ================================================================= internals
    def _check_module(self, pl_module: L.LightningModule) -> None:
        self.check_module(pl_module)
        if getattr(pl_module, "full_checkpoint", True) is False:
            raise HFTError(
                "HalfFineTuning needs full checkpoints (frozen tensors were trained in earlier rounds), but the "
                "module has full_checkpoint=False; set `full_checkpoint: true` (or leave it unset)."
            )

    def _candidate_names(self, model: nn.Module) -> list[str]:
        """Tensors HFT may freeze: those the head left trainable, and those a mask froze (marked on the
        tensor, so a fresh callback on an already-masked model sees the same candidates)."""
        names = candidate_names(model)
        if not set(names) & set(self.layout(model).slot_params()):
            raise HFTError(
                "HalfFineTuning found no trainable block tensor in the model; attach it with "
                "`head: lightning_peft.heads.FullFineTune`."
            )
        return names

    def _draw(self, model: nn.Module, round_index: int) -> list[str]:
        """The mask of ``(seed, round)``: a function of those two values and the layout only."""
        layout = self.layout(model)
        seed = self.seed if self.seed is not None else _default_seed()
        rng = random.Random(f"HalfFineTuning/v1/{seed}/{round_index}")  # local: the global RNGs are untouched
        train: set[str] = set()
        n = layout.n_layers
        for cat, labels in layout.columns.items():
            k = len(labels)
            if k % 2 == 0:
                per_layer = [k // 2] * n
            else:  # k odd (Llama FFN: 3): ceil(k/2) in a random half of the blocks, floor(k/2) in the rest
                n_big = n // 2 + (1 if n % 2 and rng.random() < 0.5 else 0)
                big = set(rng.sample(range(n), n_big))
                per_layer = [(k + 1) // 2 if i in big else k // 2 for i in range(n)]
            run_train = run_total = 0
            for layer in range(n):
                slots = layout.slots[cat][layer]
                combos = list(itertools.combinations(range(k), per_layer[layer]))
                layer_total = sum(s.numel for s in slots)
                if self.balance == "count":  # keep the running trainable count closest to half
                    target = run_total + layer_total
                    dev = {c: abs(2 * (run_train + sum(slots[i].numel for i in c)) - target) for c in combos}
                    best = min(dev.values())
                    combos = [c for c in combos if dev[c] == best]
                chosen = rng.choice(combos)
                run_train += sum(slots[i].numel for i in chosen)
                run_total += layer_total
                for i in chosen:
                    train.update(slots[i].params)
        if self.train_embeddings:
            train.update(layout.embeddings)
        train.update(layout.other)
        train.update(layout.uncovered)
        candidates = self._candidate_names(model)
        return [name for name in candidates if name in train]

    def _apply_mask(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """Set ``requires_grad`` from the mask; frozen tensors lose any gradient. Returns the names
        that (became frozen, became trainable)."""
        candidates = self._candidate_names(model)
        trainable = set(self._trainable or [])
        unknown = sorted(trainable - set(candidates))
        if unknown:
            raise HFTError(
                f"HalfFineTuning's saved mask names tensors this model does not train ({unknown[:3]}); resume "
                "with the backbone and head the checkpoint was trained with."
            )
        changed = apply_mask(model, {name: name in trainable for name in candidates})
        self.report = self._fractions(model)
        return changed

    def _start_round(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A new round inside a fit: draw, apply, forget the optimizer state of newly frozen tensors."""
        model = target(pl_module)
        self._trainable = self._draw(model, self.round)
        frozen_now, _ = self._apply_mask(model)
        self.forget_optimizer_state(trainer, model, frozen_now)
        self._round_start_step = trainer.global_step
        self._round_start_epoch = trainer.current_epoch
        self.check_agreement(trainer, self._trainable, f"the round-{self.round} mask")
        self._announce(trainer, pl_module)

    def _fractions(self, model: nn.Module) -> dict[str, Any]:
        layout = self.layout(model)
        params = dict(model.named_parameters())
        total = sum(p.numel() for p in params.values())
        trained = sum(p.numel() for p in params.values() if p.requires_grad)
        block = layout.slot_params()
        block_total = sum(params[n].numel() for n in block)
        block_trained = sum(params[n].numel() for n in block if params[n].requires_grad)
        return {
            "round": self.round,
            "trainable_fraction": trained / max(total, 1),
            "block_trainable_fraction": block_trained / max(block_total, 1),
            "trainable_tensors": sum(1 for p in params.values() if p.requires_grad),
            "tensors": len(params),
        }

    def _announce(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rep = self.report
        metrics = {
            "hft/round": float(self.round),
            "hft/trainable_fraction": float(rep["trainable_fraction"]),
            "hft/block_trainable_fraction": float(rep["block_trainable_fraction"]),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"HalfFineTuning round {self.round}: training {rep['trainable_fraction']:.1%} of the parameters "
            f"({rep['block_trainable_fraction']:.1%} of the block tensors; {rep['trainable_tensors']}/"
            f"{rep['tensors']} tensors)."
        )
        if self.plot:  # every rank: the picture touches a collective (the run folder)
            self.draw(trainer, "hft/mask", lambda: self._figure(target(pl_module)), f"hft_round{self.round}.png")

    def _figure(self, model: nn.Module) -> Any:
        rows, cols, grid = self.mask_grid(model)
        layout = self.layout(model)
        rep = self.report or self._fractions(model)
        always = "embeddings and LM head" if self.train_embeddings else "(embeddings frozen)"
        title = (f"HFT round {self.round} (seed {self.seed}, {layout.arch}): {rep['trainable_fraction']:.1%} of "
                 f"parameters train, {rep['block_trainable_fraction']:.1%} of block tensors\n"
                 f"always trained: {always}, and the tensors outside the blocks (final norm, ...)")
        return hft_figure(rows, cols, grid, layout.columns, layout.blocks, title)


def _default_seed() -> int:
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))
    except ValueError:
        return 0


__all__ = ["HFTError", "HalfFineTuning"]
