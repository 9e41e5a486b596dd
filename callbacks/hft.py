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

Built-in architectures (a block is an element of the model's largest ``nn.ModuleList``):

==========  =========================================  ==========================  =============================
family      attention                                  FFN                         norms
==========  =========================================  ==========================  =============================
Llama-like  ``self_attn.{q,k,v,o}_proj`` (2 of 4)      ``mlp.{gate,up,down}_proj``  ``input_layernorm``,
                                                                                   ``post_attention_layernorm``
GPT-2       ``attn.c_attn`` (fused QKV), ``attn.c_proj``  ``mlp.c_fc``, ``mlp.c_proj``  ``ln_1``, ``ln_2``
            (1 of 2)                                   (1 of 2)
BERT        ``attention.self.{query,key,value}``,      ``intermediate.dense``,     ``attention.output.LayerNorm``,
            ``attention.output.dense`` (2 of 4)        ``output.dense`` (1 of 2)   ``output.LayerNorm``
==========  =========================================  ==========================  =============================

GPT-2 stores Q, K and V in one tensor, which cannot be half-frozen without splitting it, so its two
attention tensors are treated as one category of 2 and one is trained per block: training ``c_attn``
trains 3 of the paper's 4 matrices, ``c_proj`` trains 1, i.e. 2 of 4 on average over the blocks.
``balance="count"`` alternates them so the trainable attention count is within one block of 50%.

Other architectures raise an error that lists the block's module names; pass ``groups`` to map them,
e.g. for a fused-QKV Phi-3 block::

    groups: {attention: ['self_attn\\.qkv_proj', 'self_attn\\.o_proj'],
             ffn: ['mlp\\.gate_up_proj', 'mlp\\.down_proj'],
             norm: [input_layernorm, post_attention_layernorm]}

(each regex must match, in full, the name of exactly one module relative to every block).

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
  ``find_unused_parameters=True`` (``strategy: ddp_find_unused_parameters_true``); a DDP strategy
  without it is refused at setup. Ranks agree without communication: the mask is drawn from a local
  ``random.Random`` seeded with (seed, round) (the global RNGs are never touched); rank 0's seed is
  broadcast at setup and, at every new mask, rank 0's mask digest is broadcast and compared (a
  mismatch stops every rank with an error).
* Checkpoints: :meth:`state_dict` holds the seed, the round, the explicit list of trainable tensor
  names and the step/epoch at which the round began. On resume the saved mask is re-applied (not
  re-drawn) before the optimizer state is loaded. The module must keep full checkpoints (frozen tensors
  changed in earlier rounds), which ``FullFineTune`` does.
* Logs ``hft/round``, ``hft/trainable_fraction`` (of all parameters) and ``hft/block_trainable_fraction``
  (of the block tensors) to every logger, and draws the blocks x tensors grid of the mask to
  ``<log_dir>/hft_round{r}.png`` (also sent to TensorBoard / W&B loggers). Plotting never stops training.

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

import hashlib
import itertools
import os
import random
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

ROUND_EVERY = ("fit", "epoch", "step")
BALANCE = ("category", "count")
FROZEN_MARK = "_hft_frozen"  # set on tensors an HFT mask froze (they stay candidates for later rounds)

#: built-in block layouts: category -> one regex per tensor group, matched in full against module names
#: relative to a block. The first layout whose every regex matches exactly one module of a block wins.
ARCHITECTURES: dict[str, dict[str, list[str]]] = {
    "llama": {
        "attention": [r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj", r"self_attn\.o_proj"],
        "ffn": [r"mlp\.gate_proj", r"mlp\.up_proj", r"mlp\.down_proj"],
        "norm": [r"input_layernorm", r"post_attention_layernorm"],
    },
    "gpt2": {
        "attention": [r"attn\.c_attn", r"attn\.c_proj"],
        "ffn": [r"mlp\.c_fc", r"mlp\.c_proj"],
        "norm": [r"ln_1", r"ln_2"],
    },
    "bert": {
        "attention": [r"attention\.self\.query", r"attention\.self\.key", r"attention\.self\.value",
                      r"attention\.output\.dense"],
        "ffn": [r"intermediate\.dense", r"output\.dense"],
        "norm": [r"attention\.output\.LayerNorm", r"output\.LayerNorm"],
    },
}


class HFTError(ValueError):
    """A configuration HalfFineTuning cannot run with (one sentence naming the value and the fix)."""


@dataclass
class _Slot:
    """One selectable unit: a module's weight and bias in one block."""

    layer: int
    label: str
    params: list[str]
    numel: int


@dataclass
class _Layout:
    arch: str
    blocks: str  # name of the ModuleList of blocks
    n_layers: int
    columns: dict[str, list[str]]  # category -> labels of its tensors
    slots: dict[str, list[list[_Slot]]]  # category -> block -> slots (in column order)
    embeddings: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # outside the blocks: final norm, pooler, classifier, ...
    uncovered: list[str] = field(default_factory=list)  # inside the blocks but named by no category

    def slot_params(self) -> list[str]:
        return [p for per_layer in self.slots.values() for slots in per_layer for s in slots for p in s.params]


class HalfFineTuning(L.Callback):
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
        groups: a block layout for an architecture not built in: category -> list of regexes, each
            matching in full the name of one module relative to a block (``{"attention": [...], ...}``).
        first_round: round index of the first round (a later stage run as its own command).
        plot: draw the mask grid to ``<log_dir>/hft_round{r}.png`` and send it to image-capable loggers.
    """

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
        self.groups = _check_groups(groups)
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
        self._layouts: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()
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
        model = _target(model)
        return self._draw(model, self.round if round is None else round)

    def apply(self, model: nn.Module) -> list[str]:
        """Freeze this round's frozen half of ``model`` (a module or a LightningModule), drawing the mask
        if needed; for training loops without a Trainer. Returns the trainable names."""
        model = _target(model)
        self._candidate_names(model)
        if self.seed is None:
            self.seed = _default_seed()
        if self._trainable is None:
            self._trainable = self._draw(model, self.round)
        self._apply_mask(model)
        return list(self._trainable)

    def mask_grid(self, model: nn.Module) -> tuple[list[str], list[str], list[list[bool]]]:
        """``(row labels, column labels, rows)``: for each block, whether each category tensor trains."""
        model = _target(model)
        layout = self.layout(model)
        trainable = set(self._trainable or [])
        cols = [(c, label) for c, labels in layout.columns.items() for label in labels]
        rows = [[slot.params[0] in trainable for cat in layout.columns for slot in layout.slots[cat][layer]]
                for layer in range(layout.n_layers)]
        return [f"{layout.blocks}.{i}" for i in range(layout.n_layers)], [f"{c}:{lab}" for c, lab in cols], rows

    def layout(self, model: nn.Module) -> _Layout:
        """The block layout HFT selects from (built once per model; raises for unknown architectures)."""
        model = _target(model)
        if model not in self._layouts:
            self._layouts[model] = _build_layout(model, self.groups)
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
        self._check_strategy(trainer)
        model = _target(pl_module)
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict["seed"])
        self.round = int(state_dict["round"])
        trainable = state_dict.get("trainable")
        self._trainable = None if trainable is None else [str(n) for n in trainable]
        self._round_start_step = int(state_dict.get("round_start_step", 0))
        self._round_start_epoch = int(state_dict.get("round_start_epoch", 0))
        self._restored = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
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
        model = _target(pl_module)
        self._in_fit = True
        self._reset_counters = not self._restored
        if self._trainable is None:
            self._trainable = self._draw(model, self.round)
        self._apply_mask(model)
        self._check_agreement(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the loop state (global_step, current_epoch) of a resumed run is known from here on
        # strategies that restore checkpoints after setup (DeepSpeed) load the saved mask only now
        self._apply_mask(_target(pl_module))
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
        head = getattr(pl_module, "head", None)
        if head is not None and not getattr(head, "trains_backbone", False):
            raise HFTError(
                f"HalfFineTuning selects which backbone weights train, but head {head!r} freezes the backbone; "
                "use `head: lightning_peft.heads.FullFineTune` with this callback."
            )
        if getattr(pl_module, "full_checkpoint", True) is False:
            raise HFTError(
                "HalfFineTuning needs full checkpoints (frozen tensors were trained in earlier rounds), but the "
                "module has full_checkpoint=False; set `full_checkpoint: true` (or leave it unset)."
            )

    def _check_strategy(self, trainer: L.Trainer) -> None:
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            if not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False):
                raise HFTError(
                    "HalfFineTuning freezes tensors after DDP has wrapped the model, which needs "
                    "find_unused_parameters=True: use `strategy: ddp_find_unused_parameters_true` "
                    "(or DDPStrategy(find_unused_parameters=True))."
                )
        elif isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
            rank_zero_warn(
                f"HalfFineTuning has been tested with single-device and DDP strategies only, not "
                f"{type(strategy).__name__} (FSDP needs use_orig_params=True for mixed frozen/trainable units)."
            )

    def _candidate_names(self, model: nn.Module) -> list[str]:
        """Tensors HFT may freeze: those the head left trainable, and those an HFT mask froze (marked on
        the tensor, so a fresh callback on an already-masked model sees the same candidates)."""
        names = [n for n, p in model.named_parameters() if p.requires_grad or getattr(p, FROZEN_MARK, False)]
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
        candidates = set(self._candidate_names(model))
        trainable = set(self._trainable or [])
        unknown = sorted(trainable - candidates)
        if unknown:
            raise HFTError(
                f"HalfFineTuning's saved mask names tensors this model does not train ({unknown[:3]}); resume "
                "with the backbone and head the checkpoint was trained with."
            )
        frozen_now, trained_now = [], []
        for name, p in model.named_parameters():
            if name not in candidates:
                continue
            train = name in trainable
            if p.requires_grad and not train:
                frozen_now.append(name)
            elif train and not p.requires_grad:
                trained_now.append(name)
            p.requires_grad_(train)
            setattr(p, FROZEN_MARK, not train)
            if not train:
                p.grad = None  # None, not zeros: AdamW then applies no momentum and no weight decay
        self.report = self._fractions(model)
        return frozen_now, trained_now

    def _start_round(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A new round inside a fit: draw, apply, forget the optimizer state of newly frozen tensors."""
        model = _target(pl_module)
        self._trainable = self._draw(model, self.round)
        frozen_now, _ = self._apply_mask(model)
        params = dict(model.named_parameters())
        for opt in trainer.optimizers:
            for name in frozen_now:
                opt.state.pop(params[name], None)
        self._round_start_step = trainer.global_step
        self._round_start_epoch = trainer.current_epoch
        self._check_agreement(trainer)
        self._announce(trainer, pl_module)

    def _check_agreement(self, trainer: L.Trainer) -> None:
        """Every rank drew the same mask (they must: same seed, same round, same code)."""
        if trainer.world_size <= 1:
            return
        digest = hashlib.sha1("\n".join(self._trainable or []).encode()).hexdigest()
        same = trainer.strategy.broadcast(digest, src=0) == digest
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise RuntimeError(
                f"HalfFineTuning: ranks disagree on the round-{self.round} mask; give every rank the same "
                "`seed` and the same model."
            )

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
        if not self.plot:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank calls it
        if not trainer.is_global_zero:
            return
        try:
            path = os.path.join(log_dir, f"hft_round{self.round}.png")
            fig = self._figure(_target(pl_module))
            os.makedirs(log_dir, exist_ok=True)
            fig.savefig(path, dpi=110, bbox_inches="tight")
            self.last_plot = path
            for logger in trainer.loggers:
                kind = type(logger).__name__
                if kind == "TensorBoardLogger":
                    logger.experiment.add_figure("hft/mask", fig, global_step=trainer.global_step)
                elif kind == "WandbLogger":
                    logger.log_image(key="hft/mask", images=[path], step=trainer.global_step)
        except Exception as err:  # plotting is a convenience: never stop training for it
            rank_zero_warn(f"HalfFineTuning could not draw the round-{self.round} mask ({err!r}); training goes on.")

    def _figure(self, model: nn.Module):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure

        rows, cols, grid = self.mask_grid(model)
        layout = self.layout(model)
        values = [[1.0 if v else 0.0 for v in row] for row in grid]
        labels = _short_labels([c.split(":", 1)[1] for c in cols])
        fig = Figure(figsize=(max(6.0, 1.2 + 0.65 * len(cols)), 1.9 + 0.34 * len(rows)), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(values, cmap=ListedColormap(["#d9d9d9", "#2b8cbe"]), vmin=0, vmax=1, aspect="auto")
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                ax.text(c, r, "train" if v else "frozen", ha="center", va="center", fontsize=7,
                        color="white" if v else "#555555")
        ax.set_xticks(range(len(cols)), labels=labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), labels=[str(i) for i in range(len(rows))], fontsize=8)
        ax.set_ylabel(f"block ({layout.blocks}.i)", fontsize=8)
        centers, start = [], 0
        for names in layout.columns.values():  # separators between categories, their names on top
            if start:
                ax.axvline(start - 0.5, color="black", linewidth=1.5)
            centers.append(start + (len(names) - 1) / 2)
            start += len(names)
        top = ax.secondary_xaxis("top")
        top.set_xticks(centers, labels=list(layout.columns), fontsize=9, fontweight="bold")
        top.tick_params(length=0)
        rep = self.report or self._fractions(model)
        always = "embeddings and LM head" if self.train_embeddings else "(embeddings frozen)"
        fig.suptitle(
            f"HFT round {self.round} (seed {self.seed}, {layout.arch}): {rep['trainable_fraction']:.1%} of "
            f"parameters train, {rep['block_trainable_fraction']:.1%} of block tensors\n"
            f"always trained: {always}, and the tensors outside the blocks (final norm, ...)",
            fontsize=8,
        )
        return fig


# ===================================================================== layout helpers
def _target(module: nn.Module) -> nn.Module:
    """The attached model of a lightning_peft module (its ``.model``), else the module itself."""
    inner = getattr(module, "model", None)
    if isinstance(module, L.LightningModule) and isinstance(inner, nn.Module):
        return inner
    return module


def _default_seed() -> int:
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))
    except ValueError:
        return 0


def _check_groups(groups: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    if groups is None:
        return None
    if hasattr(groups, "as_dict"):
        groups = groups.as_dict()
    if not isinstance(groups, dict) or not groups:
        raise HFTError(f"HalfFineTuning groups={groups!r} must map category names to lists of module regexes.")
    out: dict[str, list[str]] = {}
    for cat, patterns in groups.items():
        if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)) or not patterns:
            raise HFTError(f"HalfFineTuning groups[{cat!r}]={patterns!r} must be a non-empty list of regexes.")
        for pat in patterns:
            try:
                re.compile(pat)
            except (re.error, TypeError) as err:
                raise HFTError(f"HalfFineTuning groups[{cat!r}] has an invalid regex {pat!r} ({err}).") from err
        out[str(cat)] = [str(p) for p in patterns]
    return out


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's list of transformer blocks: its ModuleList holding the most parameters."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    return best


def _own_param_modules(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


def _match(block: nn.Module, groups: dict[str, list[str]]) -> dict[str, list[str]] | str:
    """category -> the module name (relative to the block) each regex matches, or the reason it fails."""
    names = _own_param_modules(block)
    out: dict[str, list[str]] = {}
    used: set[str] = set()
    for cat, patterns in groups.items():
        out[cat] = []
        for pat in patterns:
            hits = [n for n in names if re.fullmatch(pat, n)]
            if len(hits) != 1:
                return f"{cat} regex {pat!r} matches {len(hits)} modules ({hits[:4]}), not exactly one"
            if hits[0] in used:
                return f"module {hits[0]!r} is matched by two regexes"
            used.add(hits[0])
            out[cat].append(hits[0])
    return out


def _build_layout(model: nn.Module, groups: dict[str, list[str]] | None) -> _Layout:
    found = _blocks(model)
    if found is None:
        names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        raise HFTError(
            f"HalfFineTuning found no list of blocks in {type(model).__name__} (its modules: {names[:20]}); "
            "it supports Llama-like, GPT-2 and BERT models, or blocks held in an nn.ModuleList with `groups`."
        )
    blocks_name, blocks = found
    if groups is not None:
        matched, arch = _match(blocks[0], groups), "groups"
        if isinstance(matched, str):
            raise HFTError(
                f"HalfFineTuning groups do not fit {type(model).__name__}: {matched}; the modules of block "
                f"{blocks_name}.0 are {_own_param_modules(blocks[0])}."
            )
    else:
        matched, arch = None, ""
        for arch_name, arch_groups in ARCHITECTURES.items():
            m = _match(blocks[0], arch_groups)
            if not isinstance(m, str):
                matched, arch = m, arch_name
                break
        if matched is None:
            raise HFTError(
                f"HalfFineTuning does not know the architecture {type(model).__name__}: the modules of block "
                f"{blocks_name}.0 are {_own_param_modules(blocks[0])}; pass `groups` mapping attention/ffn/norm "
                "to regexes of these names (built in: Llama-like, GPT-2, BERT)."
            )
    assert isinstance(matched, dict)
    prefix = f"{blocks_name}." if blocks_name else ""
    param_names = {id(p): n for n, p in model.named_parameters()}
    slots: dict[str, list[list[_Slot]]] = {cat: [] for cat in matched}
    covered: set[str] = set()
    for i, block in enumerate(blocks):
        modules = dict(block.named_modules())
        for cat, rel_names in matched.items():
            row = []
            for rel in rel_names:
                if rel not in modules:
                    raise HFTError(
                        f"HalfFineTuning: block {prefix}{i} has no module {rel!r} (block 0 has); blocks must "
                        "share one layout."
                    )
                ps = [(param_names[id(p)], p) for p in modules[rel].parameters(recurse=False)]
                ps = [(n, p) for n, p in ps if n not in covered]  # a tensor shared by two modules counts once
                covered.update(n for n, _ in ps)
                # the weight first: the grid shows the weight's status, the bias follows it
                ps.sort(key=lambda np_: (not np_[0].endswith("weight"), np_[0]))
                row.append(_Slot(layer=i, label=rel, params=[n for n, _ in ps], numel=sum(p.numel() for _, p in ps)))
            slots[cat].append(row)
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if isinstance(out_emb, nn.Module):
        embedding_ids.update(id(p) for p in out_emb.parameters())
    embeddings, other, uncovered = [], [], []
    for name, p in model.named_parameters():
        if name in covered:
            continue
        if name.startswith(prefix) and blocks_name:
            uncovered.append(name)
        elif id(p) in embedding_ids:
            embeddings.append(name)
        else:
            other.append(name)
    return _Layout(arch=arch, blocks=blocks_name, n_layers=len(blocks), columns=dict(matched), slots=slots,
                   embeddings=embeddings, other=other, uncovered=uncovered)


def _short_labels(labels: list[str]) -> list[str]:
    """The shortest dotted suffix of each label that is unique among the labels."""
    out = []
    for label in labels:
        parts = label.split(".")
        for k in range(1, len(parts) + 1):
            cand = ".".join(parts[-k:])
            if sum(1 for other in labels if other == cand or other.endswith("." + cand)) == 1:
                break
        out.append(cand)
    return out


__all__ = ["ARCHITECTURES", "HFTError", "HalfFineTuning"]
