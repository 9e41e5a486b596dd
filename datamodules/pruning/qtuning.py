"""Q-Tuning: joint sample and token pruning on the Error-Uncertainty plane.

Wang et al., "Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning for
Efficient Supervised Fine-Tuning", arXiv 2509.23873 (2025). Implemented from the formulas of the
project page and the behaviour of the (since deleted) official code, as summarised in
``shared/methods/q_tuning.md``.

Per training micro-batch:

1. **EU plane.** Every sample gets an *error* (perplexity over its response tokens) and an
   *uncertainty* (mean predictive entropy) from the current model (:func:`.scoring.token_stats`,
   :func:`eu_coordinates`).
2. **Sample triage.** Quantile thresholds are found by bisection (:func:`bisect_quadrants`) so
   that Q2 (high error, low uncertainty) and Q4 (low error, high uncertainty) together hold about
   ``sample_ratio`` of the batch; everything else (Q1, Q3) is dropped. If fewer than
   ``K = max(1, round(B * sample_ratio))`` samples fall in Q2 or Q4, the rest are filled up in
   decreasing order of ``|p~ - e~|`` of the min-max-normalised coordinates (:func:`fill_up`); a
   fill-up sample with ``p~ >= e~`` is *Q2-like*. More than K are all kept (as in the official code).
3. **Token pruning.** Only in Q2 and Q2-like samples: the neighbour-smoothed score
   ``s_i = (1 - lam) * PPL_i + lam * (PPL_{i-1} + PPL_{i+1})`` (sum of the neighbours; a prompt
   neighbour counts 1, as in the official code, padding and the sequence edges 0) ranks the response
   tokens, and the ``need`` highest-scoring ones over the whole batch leave the loss
   (``token_weights = 0``), where ``need`` is what it takes to bring the batch down to
   ``round(tot * sample_ratio * token_ratio)`` tokens
   (:func:`plan_pruning`). Q4 samples always stay whole. Pruned tokens stay in the input.

**Passes this pruner costs** (``scoring_pass="separate"``, the only mode): one forward **without
gradients**, in eval mode, over the full micro-batch, run here in the DataModule's
``on_after_batch_transfer``; then the ordinary training forward + backward over the *kept rows
only* (trailing columns that are padding in every kept row are cut first). The no-grad pass pays for
itself because it removes ``1 - sample_ratio`` of the rows from the forward + backward (the official
code masks the loss of a full-batch forward, which saves nothing). No forward with gradients is ever
run twice. The scoring pass is made cheap without changing what it computes (:mod:`.scoring`,
``fast_scoring=True``): the decoder body runs once, the LM head only at the positions the plan reads
(response positions, or every non-pad position with ``entropy_positions="all"``), a LoRA layer runs
its own adapter path with dropout off (no merged copy of any weight: the pass needs no memory beyond the
bare backbone's no-grad forward but rank-``r`` intermediates), and loss and entropy come from one
``log_softmax`` per position. The per-sample decision (bisection, fill-up) runs on host copies of
the ``(B,)`` vectors, and the logged counts leave the device in one transfer.

Departures from the paper / official code (all flagged):

* ``entropy_positions="response"`` (default) averages entropy over response positions; ``"all"``
  (official) over every non-pad position, prompt included.
* ``budget_positions="response"`` (default) counts the token budget over response positions only;
  ``"all"`` (official) counts every non-pad position.
* The loss is the per-token mean over kept response tokens (``TokenCrossEntropy`` with
  ``token_weights``), not the official mean over all non-pad positions.
* A kept sample never loses its last response token (at most one token per sample above budget), so
  no kept sample or micro-batch becomes empty.
* Samples without any response token are never kept (they carry no loss); a batch in which *no*
  sample has a response token is returned unchanged (with a warning), since there is nothing to score.
* Selection is per micro-batch and per DDP rank (as in the official code); no all-gather.
* Prompt neighbours in the smoothed token score: ``prompt_neighbour_ppl=1.0`` (default) matches the
  official code, where a prompt position's PPL is ``exp(0) = 1`` (its loss is 0 under label -100), so
  the first response token's left neighbour adds ``lam * 1``; ``0.0`` treats prompt neighbours like
  padding (this package before issue 12, the spec's proposal). Padding and the sequence edges count 0
  either way.

The pruner reads ``attention_mask`` and ``labels`` only, never the pad id, so tokenizers without a
pad token work (the collators pad with EOS then). Its decisions keep no state across steps (each
depends only on the current model and batch), so resume continues exactly; its ``state_dict`` holds
only the EU-plane points recorded so far in the epoch, so a resumed run's plot shows the whole epoch.
Logged every step (through the module): ``pruning/kept_samples``, ``pruning/kept_tokens``,
``pruning/kept_token_fraction``, ``pruning/q1`` … ``pruning/q4``, ``pruning/alpha``; at each epoch end
an EU-plane scatter plot goes to the logger (TensorBoard ``add_figure`` / W&B ``log_image``) and to
``<log_dir>/eu_plane/epoch_<n>.png``, drawn from the pruner's ``on_train_epoch_end`` hook, which the
DataModule calls on every rank (no callback to add).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from lightning_peft.objectives import IGNORE_INDEX

from . import PRUNING_STATS_KEY, BatchPruner, check_ratio
from .scoring import check_precision, reference_logits, score_tokens, token_stats


# ---------------------------------------------------------------------------------------- pure scoring
def eu_coordinates(token_loss: torch.Tensor, token_entropy: torch.Tensor, response_mask: torch.Tensor,
                   entropy_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``ppl = exp(mean loss over response_mask)`` and ``ent = mean entropy over entropy_mask``.

    Samples with an empty mask get ``ppl = 1`` / ``ent = 0`` (the official exp(0)).
    """
    r = response_mask.float()
    e = entropy_mask.float()
    ppl = torch.exp((token_loss.float() * r).sum(1) / r.sum(1).clamp(min=1))
    ent = (token_entropy.float() * e).sum(1) / e.sum(1).clamp(min=1)
    return ppl, ent


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    return torch.quantile(x.double(), q)  # linear interpolation, like numpy's default


def bisect_quadrants(ppl: torch.Tensor, ent: torch.Tensor, sample_ratio: float, lo: float = 0.0,
                     hi: float = 0.49, tol: float = 0.01, max_iter: int = 10):
    """Q2 / Q4 masks by bisection on the quantile level ``a`` (the official last iterate).

    ``Q2 = ppl > quantile(ppl, 1-a) & ent <= quantile(ent, a)``,
    ``Q4 = ppl <= quantile(ppl, a) & ent > quantile(ent, 1-a)``. Returns ``(q2, q4, a, thresholds)``
    with ``thresholds = (P_lo, P_hi, E_lo, E_hi)``.
    """
    ppl, ent = ppl.double(), ent.double()
    n = ppl.numel()
    a = (lo + hi) / 2
    q2 = q4 = torch.zeros(n, dtype=torch.bool, device=ppl.device)
    th = (0.0, 0.0, 0.0, 0.0)
    for _ in range(max_iter):
        a = (lo + hi) / 2
        p_hi, p_lo = _quantile(ppl, 1 - a), _quantile(ppl, a)
        e_lo, e_hi = _quantile(ent, a), _quantile(ent, 1 - a)
        q2 = (ppl > p_hi) & (ent <= e_lo)
        q4 = (ppl <= p_lo) & (ent > e_hi)
        th = (float(p_lo), float(p_hi), float(e_lo), float(e_hi))
        f = float((q2 | q4).sum()) / n
        if abs(f - sample_ratio) < tol:
            break
        if f < sample_ratio:
            lo = a
        else:
            hi = a
    return q2, q4, a, th


def fill_up(ppl: torch.Tensor, ent: torch.Tensor, q2: torch.Tensor, q4: torch.Tensor, k: int,
            eligible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask and Q2-like mask after filling ``q2 | q4`` up to ``k`` samples.

    The others are taken in decreasing order of ``max(p~ - e~, e~ - p~)`` (batch min-max normalised;
    ties by index); an added sample with ``p~ >= e~`` is Q2-like. Only ``eligible`` samples are added.
    """
    keep = q2 | q4
    q2like = torch.zeros_like(keep)
    if eligible is None:
        eligible = torch.ones_like(keep)
    missing = k - int(keep.sum())
    if missing <= 0:
        return keep, q2like

    def norm(x):
        x = x.double()
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else torch.zeros_like(x)

    pn, en = norm(ppl), norm(ent)
    dist = torch.maximum(pn - en, en - pn)
    dist = torch.where(keep | ~eligible, torch.full_like(dist, -math.inf), dist)
    order = torch.sort(dist, descending=True, stable=True).indices
    for i in order[:missing].tolist():
        if dist[i] == -math.inf:
            break
        keep[i] = True
        q2like[i] = bool(pn[i] >= en[i])
    return keep, q2like


def smoothed_scores(token_ppl: torch.Tensor, region: torch.Tensor, lam: float, prompt: torch.Tensor | None = None,
                    prompt_ppl: float = 1.0) -> torch.Tensor:
    """``s_i = (1-lam) PPL_i + lam (PPL_{i-1} + PPL_{i+1})`` over the last dimension, 0 outside ``region``.

    A neighbour in ``prompt`` (a bool mask of non-pad positions outside ``region``, e.g. prompt tokens)
    contributes ``prompt_ppl``; any other neighbour outside ``region`` (padding, the sequence edges)
    counts as 0. The released code gives a prompt neighbour ``exp(0) = 1`` (its loss is 0 under label -100).
    """
    p = torch.where(region, token_ppl.double(), torch.zeros_like(token_ppl, dtype=torch.float64))
    if prompt is not None:
        p = torch.where(prompt & ~region, torch.full_like(p, float(prompt_ppl)), p)
    left = F.pad(p[..., :-1], (1, 0))
    right = F.pad(p[..., 1:], (0, 1))
    s = (1 - lam) * p + lam * (left + right)
    return torch.where(region, s, torch.zeros_like(s))


def plan_pruning(token_loss: torch.Tensor, token_entropy: torch.Tensor, response_mask: torch.Tensor,
                 valid_mask: torch.Tensor, sample_ratio: float, token_ratio: float, lam: float = 0.5,
                 entropy_positions: str = "response", budget_positions: str = "response",
                 drop: str = "highest", prompt_neighbour_ppl: float = 1.0) -> dict[str, Any]:
    """The whole Q-Tuning decision from per-token quantities (a pure function; all label-aligned).

    Args:
        token_loss / token_entropy: ``(B, S)`` from :func:`token_stats`.
        response_mask: ``(B, S)`` bool, label != -100 (and not padding).
        valid_mask: ``(B, S)`` bool, non-pad positions of the shifted batch (``attention_mask[:, 1:]``
            aligned to labels, column 0 False).
        drop: ``"highest"`` (the method) or ``"lowest"`` (the ``fwise`` ablation).
        prompt_neighbour_ppl: what a non-pad, non-response neighbour (a prompt token) contributes to the
            smoothed score (released code: 1; padding and the sequence edges always count 0).

    Returns a dict with ``keep`` (B,), ``token_keep`` (B, S) bool over response tokens, ``q1``..``q4``,
    ``q2like``, ``ppl``, ``ent``, ``alpha``, ``thresholds``, ``target``, ``tot``, ``need``.
    """
    response_mask = response_mask.bool()
    valid_mask = valid_mask.bool()
    has_resp = response_mask.any(1)
    ent_mask = response_mask if entropy_positions == "response" else valid_mask
    ppl, ent = eu_coordinates(token_loss, token_entropy, response_mask, ent_mask)
    # the per-sample decision runs on host copies of the (B,) vectors: one transfer instead of a host
    # sync per bisection step on an accelerator
    device = response_mask.device
    ppl, ent, has_resp_c = ppl.double().cpu(), ent.double().cpu(), has_resp.cpu()
    b = ppl.numel()
    q2, q4, alpha, th = bisect_quadrants(ppl, ent, sample_ratio)
    q2, q4 = q2 & has_resp_c, q4 & has_resp_c
    k = min(max(1, round(b * sample_ratio)), int(has_resp_c.sum()))
    keep, q2like = fill_up(ppl, ent, q2, q4, k, eligible=has_resp_c)
    # quadrant labels for logging / plotting: Q1 high-high, Q3 low-low (relative to the medians of the
    # thresholds, like the project page's partition lines)
    p_mid, e_mid = (th[0] + th[1]) / 2, (th[2] + th[3]) / 2
    q1 = ~q2 & ~q4 & (ppl > p_mid) & (ent > e_mid)
    q3 = ~q2 & ~q4 & ~q1
    keep, q2like, q1, q2, q3, q4 = (t.to(device) for t in (keep, q2like, q1, q2, q3, q4))

    count_mask = response_mask if budget_positions == "response" else valid_mask
    tot = int(count_mask.sum())
    target = round(tot * sample_ratio * token_ratio)
    dropped_by_samples = int(count_mask[~keep].sum())
    need = max(0, tot - target - dropped_by_samples)
    token_keep = response_mask & keep[:, None]
    cand = response_mask & (keep & (q2 | q2like))[:, None]
    if need > 0 and token_ratio < 1 and cand.any():
        tok_ppl = torch.exp(token_loss.double())
        score = smoothed_scores(tok_ppl, response_mask, lam, prompt=valid_mask & ~response_mask,
                                prompt_ppl=prompt_neighbour_ppl)
        key = score if drop == "highest" else -score
        flat = torch.where(cand, key, torch.full_like(key, -math.inf)).flatten()
        n_drop = min(need, int(cand.sum()))
        idx = torch.sort(flat, descending=True, stable=True).indices[:n_drop]
        dropped = torch.zeros_like(flat, dtype=torch.bool)
        dropped[idx] = True
        dropped = dropped.view_as(cand)
        token_keep = token_keep & ~dropped
        # never empty a kept sample: give back its lowest-ranked dropped token
        emptied = keep & has_resp & ~token_keep.any(1)
        for i in emptied.nonzero().flatten().tolist():
            row = torch.where(dropped[i], key[i], torch.full_like(key[i], math.inf))
            token_keep[i, int(torch.argmin(row))] = True
    return {"keep": keep, "token_keep": token_keep, "q1": q1, "q2": q2, "q3": q3, "q4": q4,
            "q2like": q2like, "ppl": ppl, "ent": ent, "alpha": alpha, "thresholds": th,
            "target": target, "tot": tot, "need": need}


def apply_plan(batch: dict[str, Any], plan: dict[str, Any], trim: bool = True) -> dict[str, Any]:
    """Drop the rows not in ``plan["keep"]`` (every tensor the same way) and add ``token_weights``.

    With ``trim``, columns after the last non-pad position of the kept rows (``attention_mask`` 0 in
    every kept row, so right padding only) are cut from every ``(B, S, ...)`` tensor: the training
    forward then runs on the kept rows' own width. Under causal attention this changes no output.
    """
    keep = plan["keep"]
    b = keep.numel()
    width = batch["labels"].shape[1]
    weights = plan["token_keep"].to(torch.float32)
    old = batch.get("token_weights")
    if old is not None:
        weights = weights * old.to(weights.dtype)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == b:
            out[key] = value[keep]
        else:
            out[key] = value
    out["token_weights"] = weights[keep]
    mask = out.get("attention_mask")
    if trim and mask is not None and mask.dim() == 2 and mask.shape[0] > 0:
        cols = mask.bool().any(0).nonzero()
        new_width = int(cols.max()) + 1 if cols.numel() else width
        if new_width < width:
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (mask.shape[0], width):
                    out[key] = value[:, :new_width]
    return out


# ---------------------------------------------------------------------------------------- the pruner
class QTuning(BatchPruner):
    """Q-Tuning sample + token pruner (see the module docstring).

    Args:
        sample_ratio: ``r_sample`` in (0, 1], the share of samples to keep (paper grid 0.125-0.5).
        token_ratio: ``r_token`` in (0, 1]; the batch keeps ``sample_ratio * token_ratio`` of its tokens.
        lam: neighbour weight lambda of the smoothed token score (official default 0.5).
        entropy_positions: ``"response"`` (default) or ``"all"`` (official parity: prompt included).
        budget_positions: ``"response"`` (default) or ``"all"`` (official parity: prompt included).
        drop: ``"highest"`` (the method) or ``"lowest"`` (the ``fwise`` ablation).
        prompt_neighbour_ppl: the PPL a prompt neighbour contributes to the smoothed token score: 1.0
            (default, the official code's ``exp(0)``) or 0.0 (like padding); a number >= 0.
        plot_every_epoch: draw the EU-plane scatter plot at each training epoch end.
        fast_scoring: score with the decoder body plus the LM head at the needed positions only, in eval
            mode (:mod:`.scoring`; same function, float rounding differs at ~1e-6 relative); False runs
            the module's plain forward (the reference). Backbones or heads the fast route does not know
            always take the reference route.
        trim_padding: after dropping rows, cut the columns that are padding in every kept row.
        scoring_precision: precision of the scoring pass. ``None`` (default): the training forward's
            (the trainer's precision plugin, e.g. bf16 autocast under ``precision="bf16-mixed"``);
            ``"bf16-mixed"`` / ``"16-mixed"``: autocast the scoring pass only, a cheaper pass on
            hardware with fast bf16 while training stays fp32 (statistics move by ~1e-2 relative, so a
            sample at a quadrant threshold may switch); ``"32"``: always fp32. See :mod:`.scoring`.
    """

    def __init__(self, sample_ratio: float = 0.25, token_ratio: float = 0.5, lam: float = 0.5,
                 entropy_positions: str = "response", budget_positions: str = "response",
                 drop: str = "highest", plot_every_epoch: bool = True, fast_scoring: bool = True,
                 trim_padding: bool = True, scoring_precision: str | None = None,
                 prompt_neighbour_ppl: float = 1.0) -> None:
        check_ratio("sample_ratio", sample_ratio)
        check_ratio("token_ratio", token_ratio)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam={lam} must be in [0, 1]; the paper's default is 0.5.")
        for name, value in (("entropy_positions", entropy_positions), ("budget_positions", budget_positions)):
            if value not in ("response", "all"):
                raise ValueError(f"{name}={value!r} must be 'response' (default) or 'all' (official parity).")
        if drop not in ("highest", "lowest"):
            raise ValueError(f"drop={drop!r} must be 'highest' (the method) or 'lowest' (the fwise ablation).")
        if (isinstance(prompt_neighbour_ppl, bool) or not isinstance(prompt_neighbour_ppl, (int, float))
                or not 0.0 <= float(prompt_neighbour_ppl) < math.inf):
            raise ValueError(f"prompt_neighbour_ppl={prompt_neighbour_ppl!r} must be a number >= 0; use 1.0 (the "
                             "official code) or 0.0 (prompt neighbours count like padding).")
        self.sample_ratio = float(sample_ratio)
        self.token_ratio = float(token_ratio)
        self.lam = float(lam)
        self.entropy_positions = entropy_positions
        self.budget_positions = budget_positions
        self.drop = drop
        self.plot_every_epoch = plot_every_epoch
        self.fast_scoring = bool(fast_scoring)
        self.trim_padding = bool(trim_padding)
        self.scoring_precision = check_precision(scoring_precision)
        self.prompt_neighbour_ppl = float(prompt_neighbour_ppl)
        self._points: list[tuple[float, float, int]] = []
        self._thresholds: tuple[float, float, float, float] | None = None
        self._points_epoch = 0  # the training epoch the recorded points belong to

    def __repr__(self) -> str:
        return (f"QTuning(sample_ratio={self.sample_ratio}, token_ratio={self.token_ratio}, lam={self.lam}, "
                f"entropy_positions={self.entropy_positions!r}, budget_positions={self.budget_positions!r})")

    # ---------------------------------------------------------------- state (the epoch's plot points)
    def state_dict(self) -> dict[str, Any]:
        """The EU-plane points recorded so far in the epoch (plain lists; decisions keep no state)."""
        return {"epoch": self._points_epoch, "points": [list(p) for p in self._points],
                "thresholds": None if self._thresholds is None else list(self._thresholds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._points_epoch = int(state.get("epoch", 0))
        self._points = [(float(p), float(e), int(q)) for p, e, q in state.get("points", [])]
        th = state.get("thresholds")
        self._thresholds = None if th is None else tuple(float(v) for v in th)

    # ---------------------------------------------------------------- scoring pass
    @staticmethod
    def score_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The reference scoring pass: the no-grad, eval-mode forward of ``model`` (a ``PeftModule``) over
        the full batch, logits aligned with the labels."""
        return reference_logits(model, batch)

    def masks(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Label-aligned ``(response, valid, needed)`` masks: response tokens, non-pad positions (column 0
        never) and the positions whose loss or entropy the plan reads."""
        labels = batch["labels"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(labels)
        valid = torch.zeros_like(labels, dtype=torch.bool)
        valid[:, 1:] = mask[:, 1:].bool()
        response = (labels != IGNORE_INDEX) & mask.bool()
        response[:, 0] = False
        needed = response if self.entropy_positions == "response" else response | valid
        return response, valid, needed

    def plan_from_stats(self, loss: torch.Tensor, ent: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
        response, valid, _ = self.masks(batch)
        return plan_pruning(loss, ent, response, valid, self.sample_ratio, self.token_ratio, self.lam,
                            self.entropy_positions, self.budget_positions, self.drop, self.prompt_neighbour_ppl)

    def plan(self, logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
        """The decision from full logits (the reference route)."""
        loss, ent = token_stats(logits, batch["labels"], self.masks(batch)[2])
        return self.plan_from_stats(loss, ent, batch)

    def score(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-aligned per-token ``(loss, entropy)`` of the current model at the needed positions."""
        return score_tokens(model, batch, self.masks(batch)[2], fast=self.fast_scoring,
                            precision=self.scoring_precision, context=self.context)

    def __call__(self, batch: dict[str, Any], model: Any = None) -> dict[str, Any]:
        if model is None:
            raise ValueError("QTuning needs the current model to score the batch; the DataModule passes "
                             "model=trainer.lightning_module (call pruner(batch, model=module) yourself).")
        labels = batch["labels"]
        if labels.dim() != 2:
            raise ValueError(f"QTuning works on causal-LM batches (labels of shape (B, S)); got {tuple(labels.shape)}.")
        if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("QTuning got a training batch with no response tokens (all labels -100); it is "
                           "passed through unpruned. Check the prompt masking / max_length.")
            return batch
        plan = self.plan_from_stats(*self.score(model, batch), batch)
        out = apply_plan(batch, plan, trim=self.trim_padding)
        counts = torch.stack([plan[k].sum() for k in ("keep", "token_keep", "q1", "q2", "q3", "q4", "q2like")])
        counts = torch.cat([counts, (labels != IGNORE_INDEX).sum().reshape(1)]).tolist()  # one host sync
        kept_samples, kept_tokens, q1, q2, q3, q4, q2like, labelled = counts
        stats = {
            "kept_samples": float(kept_samples), "kept_tokens": float(kept_tokens),
            "kept_token_fraction": kept_tokens / max(1, labelled),
            "q1": float(q1), "q2": float(q2), "q3": float(q3), "q4": float(q4), "q2like": float(q2like),
            "alpha": float(plan["alpha"]),
        }
        out[PRUNING_STATS_KEY] = stats
        self._record(plan)
        return out

    # ---------------------------------------------------------------- EU-plane plot
    def _record(self, plan: dict[str, Any]) -> None:
        if not self.plot_every_epoch:
            return
        epoch = self.context.epoch if self.context is not None else 0
        if epoch != self._points_epoch:  # points restored from (or left by) another epoch
            self._points, self._points_epoch = [], epoch
        quad = torch.full_like(plan["keep"], 0, dtype=torch.long)
        for i, name in enumerate(("q1", "q2", "q3", "q4"), start=1):
            quad[plan[name]] = i
        quad[plan["q2like"]] = 5
        quad[~plan["keep"] & (quad == 0)] = 3
        for p, e, q in zip(plan["ppl"].tolist(), plan["ent"].tolist(), quad.tolist()):
            self._points.append((p, e, q))
        self._thresholds = plan["thresholds"]

    def plot(self, path: str | None = None, title: str = "EU plane"):
        """A matplotlib figure of the recorded (ppl, entropy) points coloured by quadrant; saved to ``path``."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        names = {1: "Q1 noise (drop)", 2: "Q2 misconception (keep, prune tokens)", 3: "Q3 redundant (drop)",
                 4: "Q4 calibration (keep whole)", 5: "Q2-like fill-up"}
        colors = {1: "tab:red", 2: "tab:blue", 3: "tab:gray", 4: "tab:green", 5: "tab:cyan"}
        for q, label in names.items():
            pts = [(p, e) for p, e, qq in self._points if qq == q]
            if pts:
                ax.scatter([p for p, _ in pts], [e for _, e in pts], s=8, c=colors[q], label=label)
        if self._thresholds is not None:
            p_lo, p_hi, e_lo, e_hi = self._thresholds
            ax.axvline((p_lo + p_hi) / 2, color="k", lw=0.8, ls="--")
            ax.axhline((e_lo + e_hi) / 2, color="k", lw=0.8, ls="--")
        ax.set_xlabel("perplexity (error)")
        ax.set_ylabel("mean entropy (uncertainty)")
        ax.set_title(title)
        ax.legend(fontsize=6)
        fig.tight_layout()
        if path is not None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fig.savefig(path)
        return fig

    def on_train_epoch_end(self, trainer: Any) -> None:
        """Draw the epoch's EU-plane plot (called by the DataModule on every rank; rank 0 draws), through
        :func:`~lightning_peft.figures.log_figure`: ``<run folder>/eu_plane/epoch_<n>.png`` and every
        logger that takes images, under the key ``pruning/eu_plane``."""
        if not self._points:
            return
        from lightning_peft.figures import log_figure, run_folder

        epoch = int(trainer.current_epoch)
        folder = run_folder(trainer)  # a collective under DDP: every rank calls it (log_figure does too)

        def draw():
            os.makedirs(os.path.join(folder, "eu_plane"), exist_ok=True)
            return self.plot(title=f"EU plane, epoch {epoch}")

        log_figure(trainer, "pruning/eu_plane", draw, step=trainer.global_step,
                   filename=os.path.join("eu_plane", f"epoch_{epoch}.png"))
        self._points = []

__all__ = ["QTuning", "apply_plan", "bisect_quadrants", "eu_coordinates", "fill_up", "plan_pruning",
           "smoothed_scores", "token_stats"]
