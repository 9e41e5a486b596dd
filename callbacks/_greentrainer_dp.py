"""GreenTrainer's pure arithmetic: the ρ conversion, FLOPs quantisation, selection cost and the two DPs.

Everything here works on plain numbers, in *backward order* (index 0 is the tensor closest to the
loss). ``t_dy[i]`` is what it costs to carry the error signal from tensor ``i-1`` down to tensor ``i``
(the activation-gradient FLOPs of the ops between them), ``t_dw[i]`` is tensor ``i``'s own
weight-gradient FLOPs. Training a mask ``m`` costs (spec §3.5, the official ``flops_counter``
accounting)::

    cost(m) = Σ_i m_i·t_dw_i + Σ_{i ≤ d(m)} t_dy_i,        d(m) = deepest selected index

See :mod:`lightning_peft.callbacks.greentrainer` for how the profile is measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: ρ_bp used when the requested ρ leaves no backward budget (spec §3.2, official value)
RHO_BP_FLOOR = 0.05


def backward_budget_fraction(rho: float, t_fp: float, t_bp: float) -> tuple[float, bool]:
    """Turn a total-FLOPs target ρ into a backward-FLOPs fraction ρ_bp (spec §3.2).

    ``(t_fp + ρ_bp·t_bp) / (t_fp + t_bp) = ρ``, i.e. ``ρ_bp = ρ·(1 + t_fp/t_bp) − t_fp/t_bp``.
    Returns ``(ρ_bp, clamped)``; when ``ρ_bp ≤ 0`` it is clamped to :data:`RHO_BP_FLOOR`.
    """
    ratio = t_fp / t_bp
    rho_bp = rho * (1.0 + ratio) - ratio
    if rho_bp <= 0:
        return RHO_BP_FLOOR, True
    return min(rho_bp, 1.0), False


def effective_rho(rho_bp: float, t_fp: float, t_bp: float) -> float:
    """The total-FLOPs fraction that a backward fraction ``rho_bp`` amounts to."""
    return (t_fp + rho_bp * t_bp) / (t_fp + t_bp)


def quantize(t_dy: Sequence[float], t_dw: Sequence[float], t_bp: float, tq: int = 1000
             ) -> tuple[list[int], list[int]]:
    """FLOPs in units of ``t_bp / tq``, **rounded up** (the official code floors).

    Rounding up makes the integer cost an upper bound of the real cost, so a mask within the
    integer budget ``⌊ρ_bp·tq⌋`` is within ``ρ_bp·t_bp`` real FLOPs (flooring can overshoot by one
    unit per tensor: with 40 tensors and Tq = 1000 that is 4% of the backward pass).
    """
    unit = t_bp / tq

    def q(x: float) -> int:
        return int(math.ceil(x / unit - 1e-9)) if x > 0 else 0

    return [q(x) for x in t_dy], [q(x) for x in t_dw]


def selection_cost(mask: Sequence[bool], t_dy: Sequence[float], t_dw: Sequence[float]) -> float:
    """``Σ m·t_dw + Σ_{i ≤ deepest selected} t_dy`` (0 for the empty mask)."""
    deepest = max((i for i, m in enumerate(mask) if m), default=-1)
    return sum(w for w, m in zip(t_dw, mask) if m) + sum(t_dy[: deepest + 1])


def feasible(t_dy: Sequence[int], t_dw: Sequence[int], budget: int) -> list[bool]:
    """Tensors that fit the budget on their own: ``Σ_{j ≤ i} t_dy_j + t_dw_i ≤ budget`` (spec §3.3,
    tightened by the tensor's own ``t_dw``). Only these need an importance estimate."""
    out, prefix = [], 0
    for dy, dw in zip(t_dy, t_dw):
        prefix += dy
        out.append(prefix + dw <= budget)
    return out


def exact_dp(t_dy: Sequence[int], t_dw: Sequence[int], importance: Sequence[float], budget: int
             ) -> tuple[list[bool], float]:
    """The optimal mask (spec §3.5, "recommended exact DP"), O(N·budget).

    For every candidate deepest tensor ``d``: pay ``Σ_{j ≤ d} t_dy_j + t_dw_d`` and fill the rest
    of the budget with a 0/1 knapsack over the shallower tensors (weight ``t_dw``, value
    ``max(I, 0)``). Only tensors with ``I > 0`` are ever selected. Returns ``(mask, value)``.
    """
    n = len(t_dy)
    if not (len(t_dw) == len(importance) == n):
        raise ValueError("t_dy, t_dw and importance must have the same length.")
    if budget < 0:
        return [False] * n, 0.0
    width = budget + 1
    # table[j, c]: best value of a subset of tensors 0..j-1 with Σ t_dw ≤ c
    table = np.zeros((n + 1, width), dtype=np.float64)
    best, arg = 0.0, None
    prefix_dy = 0
    for d in range(n):
        prefix_dy += int(t_dy[d])
        cap = budget - prefix_dy - int(t_dw[d])
        if importance[d] > 0 and cap >= 0 and importance[d] + table[d, cap] > best:
            best, arg = float(importance[d] + table[d, cap]), (d, cap)
        value, weight = max(float(importance[d]), 0.0), int(t_dw[d])
        row = table[d].copy()
        if value > 0 and weight < width:
            taken = table[d, : width - weight] + value
            row[weight:] = np.maximum(row[weight:], taken)
        table[d + 1] = row
    mask = [False] * n
    if arg is None:
        return mask, 0.0
    d, c = arg
    mask[d] = True
    for j in range(d, 0, -1):  # tensor j-1 was taken iff it changed the table at capacity c
        if table[j, c] != table[j - 1, c]:
            mask[j - 1] = True
            c -= int(t_dw[j - 1])
    return mask, best


def official_limit(t_dy: Sequence[int], budget: int) -> int:
    """The official feasible-region size ``N_limit``, quirk included: the number of leading tensors
    whose cumulative ``t_dy`` fits, except that when the whole chain fits the deepest is left out."""
    prefix = np.cumsum(np.asarray(t_dy, dtype=np.int64))
    over = np.nonzero(prefix > budget)[0]
    return int(over[0]) if len(over) else max(len(t_dy) - 1, 0)


def official_dp(t_dy: Sequence[int], t_dw: Sequence[int], importance: Sequence[float], budget: int
                ) -> tuple[list[bool], float]:
    """The official ``selection_DP`` recurrence, re-derived from the spec's description (§3.5), for
    parity experiments; O(N²·budget).

    ``L[k, t]``: best importance of a selection whose deepest tensor is ``k-1`` at *exact* cost ``t``
    (``L[0, 0] = 0`` is the empty selection). Selecting tensor ``k-1`` after a state ``(k_p, t_p)``
    adds ``t_dw[k-1] + Σ_{j=k_p}^{k-1} t_dy[j]``. Only the first :func:`official_limit` tensors are
    considered, and the answer is the best state over all ``(k, t)``. Always feasible, sometimes
    sub-optimal (the ``N_limit`` quirk).
    """
    n = len(t_dy)
    if budget < 0:
        return [False] * n, 0.0
    limit = min(official_limit(t_dy, budget), n)
    width = budget + 1
    neg = -np.inf
    table = np.full((limit + 1, width), neg)
    table[0, 0] = 0.0
    pred = np.full((limit + 1, width), -1, dtype=np.int64)
    dy = np.concatenate([[0], np.cumsum(np.asarray(t_dy, dtype=np.int64))])  # dy[k] = Σ_{j<k} t_dy[j]
    for k in range(1, limit + 1):
        for kp in range(k):
            delta = int(t_dw[k - 1]) + int(dy[k] - dy[kp])
            if delta >= width:
                continue
            cand = table[kp, : width - delta] + float(importance[k - 1])
            target = table[k, delta:]
            better = cand > target
            if better.any():
                target[better] = cand[better]
                pred[k, delta:][better] = kp
    k_best, t_best = np.unravel_index(int(np.argmax(table)), table.shape)
    value = float(table[k_best, t_best])
    mask = [False] * n
    k, t = int(k_best), int(t_best)
    while k > 0:
        mask[k - 1] = True
        kp = int(pred[k, t])
        t -= int(t_dw[k - 1]) + int(dy[k] - dy[kp])
        k = kp
    return mask, max(value, 0.0)


DP_ROUTINES = {"exact": exact_dp, "official": official_dp}
