"""The tensor operations behind :class:`lightning_peft.callbacks.TokenElimination` (LeMo / JENGA).

Everything here is plain PyTorch and independent of Lightning, so each piece can be tested against a
naive reference (``shared/methods/lemo.md`` section 6):

* :func:`block_score_matrix` / :func:`token_block_scores`: exact block informativeness (spec §3.1);
* :func:`select_blocks`: deterministic per-sample top-k (or threshold) block selection, pad blocks
  never kept, indices sorted (spec §3.2, §5);
* :func:`sparse_attention`: attention among the kept tokens only, rotary embeddings at the original
  positions, causal over the original order, scattered back with zeros for eliminated rows (§3.3);
* :class:`BlockPredictor`, :func:`train_predictors`, :func:`prune_dead_neurons`: the per-layer
  predictor MLPs, their training and the elastic size transformation (§3.4);
* :class:`ChannelPrunedMLPFunction`: the released code's approximate MLP backward (§3.5), opt-in.

Shapes: ``B`` batch, ``N`` tokens, ``b`` block size, ``nb = ceil(N / b)`` blocks, ``H`` query heads,
``d`` head dim. A sequence whose length is not a multiple of ``b`` is padded (spec: "pad it") with
positions that count as padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.architectures import AttentionParts

# ------------------------------------------------------------------------------------------ helpers


def num_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def pad_to_blocks(x: torch.Tensor, block: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` to a multiple of ``block``."""
    extra = num_blocks(x.shape[dim], block) * block - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


def valid_blocks(token_valid: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, N]`` bool (non-pad tokens) -> ``[B, nb]`` bool: a block is valid iff it holds a real token."""
    v = pad_to_blocks(token_valid.to(torch.bool), block, dim=1)
    return v.view(v.shape[0], -1, block).any(-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, H, M, d]`` with ``cos, sin [B, M, d]`` (the Llama/Qwen2/Mistral form)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def project_qk(attn: AttentionParts, x: torch.Tensor, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``[B, H, N, d]`` and keys ``[B, Hkv, N, d]`` of one block's attention (``attn`` from
    :func:`lightning_peft.architectures.attention_parts`: q/k norms applied where the family has them).

    With ``cos, sin`` they are rotated (post-RoPE); without, they are the projections before the rotary
    embedding (pre-RoPE, what the released code scores), which carry no position.
    """
    q, k = attn.states(x, want_v=False)
    if cos is None:
        return q, k
    return attn.rotate(q, cos, sin), attn.rotate(k, cos, sin)


# ------------------------------------------------------------------- exact informativeness (§3.1)


@torch.no_grad()
def block_score_matrix(q: torch.Tensor, k: torch.Tensor, block: int, *, causal: bool = True,
                       scale: float | None = None, token_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Block interaction matrix ``I(B_mn) = max_{(i,j) in block (m,n)} sum_h ReLU(S^h_ij)``, ``[B, nb, nb]``.

    ``S^h = q^h k^hT * scale`` (``scale=None`` means 1; the profiling score uses ``1/sqrt(d)``). With
    ``causal`` only ``i >= j`` contributes; pad tokens (``token_valid`` False) contribute nothing. The
    1/H factor is left out (it does not change rankings), as in the released kernel. Computed in fp32
    one query block at a time, so the full ``N x N`` matrix is never held.
    """
    bsz, heads, n, _ = q.shape
    if k.shape[1] != heads:  # grouped-query attention: each key head serves several query heads
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
    q = pad_to_blocks(q.float(), block, dim=2)
    k = pad_to_blocks(k.float(), block, dim=2)
    nb = q.shape[2] // block
    valid = torch.ones(bsz, n, dtype=torch.bool, device=q.device) if token_valid is None else token_valid.bool()
    valid = pad_to_blocks(valid, block, dim=1)  # padded tail is invalid
    pos = torch.arange(nb * block, device=q.device)
    out = q.new_zeros(bsz, nb, nb)
    for m in range(nb):
        rows = slice(m * block, (m + 1) * block)
        s = torch.matmul(q[:, :, rows], k.transpose(-1, -2))  # [B, H, b, N]
        if scale is not None:
            s = s * scale
        s = s.clamp_min_(0).sum(1)  # ReLU per head, sum over heads -> [B, b, N]
        keep = valid[:, rows, None] & valid[:, None, :]
        if causal:
            keep = keep & (pos[rows, None] >= pos[None, :])
        s = s * keep
        out[:, m] = s.view(bsz, block, nb, block).amax(dim=(1, 3))
    return out


def token_block_scores(matrix: torch.Tensor, symmetrize: bool = True) -> torch.Tensor:
    """Token-block score ``I(B^T_n) = sum_m I(B_mn)`` (column sum over query blocks), ``[B, nb]``.

    ``symmetrize`` first adds ``triu(B^T, 1)`` (the released profiling code): a block also gets credit
    for the earlier blocks it attends to, which offsets the causal bias towards early blocks.
    """
    if symmetrize:
        matrix = matrix + torch.triu(matrix.transpose(-1, -2), diagonal=1)
    return matrix.sum(dim=-2)


def exact_block_matrix(attn: AttentionParts, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                       block: int, token_valid: torch.Tensor | None) -> torch.Tensor:
    """The exact profiling matrix of a layer (causal, ``1/sqrt(d)``), ``[B, nb, nb]`` fp32, no graph.

    ``cos, sin = None, None`` scores the queries and keys before the rotary embedding (the released code).
    """
    with torch.no_grad():
        q, k = project_qk(attn, x, cos, sin)
        return block_score_matrix(q, k, block, causal=True, scale=attn.facts.head_dim ** -0.5,
                                  token_valid=token_valid)


def exact_block_scores(attn: AttentionParts, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                       block: int, token_valid: torch.Tensor | None, symmetrize: bool = True) -> torch.Tensor:
    """Exact informativeness of every block of a layer from its (normalised) input ``x``, ``[B, nb]`` fp32
    (pre-RoPE when ``cos, sin`` are None, see :func:`project_qk`)."""
    return token_block_scores(exact_block_matrix(attn, x, cos, sin, block, token_valid), symmetrize)


def causal_block_pairs(block_valid: torch.Tensor) -> torch.Tensor:
    """``[B, nb, nb]`` mask of valid (query block m, key block n) pairs with ``m >= n``."""
    nb = block_valid.shape[-1]
    tril = torch.ones(nb, nb, dtype=torch.bool, device=block_valid.device).tril()
    return block_valid[:, :, None] & block_valid[:, None, :] & tril


def predictor_target(attn: AttentionParts, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                     block: int, token_valid: torch.Tensor | None) -> torch.Tensor:
    """The predictors' training target as in the released code: block max of ``sum_h ReLU(q^h k^hT)`` with
    no causal mask and no ``1/sqrt(d)``, divided by 16; ``[B, nb, nb]``. The released code takes q and k
    before the rotary embedding (``cos, sin = None, None``), so the target carries no position, like the
    predictor's input."""
    with torch.no_grad():
        q, k = project_qk(attn, x, cos, sin)
        return block_score_matrix(q, k, block, causal=False, scale=None, token_valid=token_valid) / 16.0


# ------------------------------------------------------------------------------- selection (§3.2)


def select_blocks(scores: torch.Tensor, block_valid: torch.Tensor, *, ratio: float | None = None,
                  threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample block selection; returns ``(block_idx [B, K], slot_kept [B, K])``.

    Sample ``s`` keeps ``k_s = max(1, floor(ratio * n_valid_s))`` blocks (``ratio``) or every valid block
    with score ``>= threshold`` (at least one). Pad blocks are never kept. ``K = max_s k_s``; a sample
    with ``k_s < K`` fills its remaining slots with its next-best blocks marked ``slot_kept = False``
    (they enter no attention and their output is dropped). Ranking uses fp32 scores and a stable sort
    (ties go to the earlier block), so a recomputation under activation checkpointing selects the same
    blocks. ``block_idx`` is sorted ascending in every row (causal order).
    """
    if (ratio is None) == (threshold is None):
        raise ValueError("select_blocks needs exactly one of ratio or threshold.")
    s = scores.float().masked_fill(~block_valid, float("-inf"))
    n_valid = block_valid.sum(-1)
    if ratio is not None:
        k = torch.floor(n_valid.float() * ratio + 1e-6).long()  # 1e-6: 0.5 * 8 stays 4 in fp32
    else:
        k = ((s >= threshold) & block_valid).sum(-1)
    k = torch.minimum(k.clamp_min(1), n_valid.clamp_min(1))
    kmax = int(k.max())
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :kmax]
    kept = torch.arange(kmax, device=s.device)[None, :] < k[:, None]
    idx, perm = torch.sort(order, dim=-1, stable=True)
    return idx, torch.gather(kept, 1, perm)


def block_to_token_index(block_idx: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, K]`` block indices -> ``[B, K*b]`` token indices (into the block-padded sequence)."""
    return (block_idx[:, :, None] * block + torch.arange(block, device=block_idx.device)).flatten(1)


# ------------------------------------------------------------------------- sparse attention (§3.3)


def sparse_attention(attn: AttentionParts, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     token_idx: torch.Tensor, token_kept: torch.Tensor) -> torch.Tensor:
    """Attention of one block (``attn`` from :func:`lightning_peft.architectures.attention_parts`) over the
    kept tokens only, scattered back to full length.

    ``x [B, Np, D]`` is the block-padded normalised input, ``token_idx [B, M]`` the sorted kept token
    positions and ``token_kept [B, M]`` whether each gathered token is real (not padding, not a filler
    slot). Q/K/V are computed for the gathered tokens only, the rotary embedding is taken at their
    original positions, and each kept token attends causally to kept tokens at earlier original
    positions. The output is ``[B, Np, D]`` with exact zeros at every position not kept, so those
    tokens pass the attention sub-block through the residual alone.
    """
    bsz, n_pad, hidden = x.shape
    # advanced indexing, not torch.gather: its backward keeps only the indices, while gather's would
    # keep the whole input x alive (the activation this method exists to avoid storing)
    rows = torch.arange(bsz, device=x.device)[:, None]
    x_sel = x[rows, token_idx]
    cos_sel = cos.expand(bsz, -1, -1)[rows, token_idx]
    sin_sel = sin.expand(bsz, -1, -1)[rows, token_idx]
    m = x_sel.shape[1]
    q, k, v = attn.states(x_sel)
    q, k = attn.rotate(q, cos_sel, sin_sel), attn.rotate(k, cos_sel, sin_sel)
    dropout, scale = attn.dropout, attn.facts.scaling
    gqa = q.shape[1] != k.shape[1]
    if bool(token_kept.all()):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale,
                                             enable_gqa=gqa)
    else:
        causal = torch.ones(m, m, dtype=torch.bool, device=x.device).tril()
        mask = (causal[None] & token_kept[:, None, :]) | torch.eye(m, dtype=torch.bool, device=x.device)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout,
                                             scale=scale, enable_gqa=gqa)
    out = attn.o(out.transpose(1, 2).reshape(bsz, m, -1))
    out = out * token_kept[:, :, None].to(out.dtype)
    full = out.new_zeros(bsz, n_pad, out.shape[-1])
    return full.index_put((rows, token_idx), out)


# ------------------------------------------------------------------------------ predictors (§3.4)


class BlockPredictor(nn.Module):
    """One layer's pair of predictor MLPs (Q and K), shared across heads.

    Input: the layer's normalised hidden states ``[B, N, D]``, split into ``H`` chunks of ``d = D/H``
    raw features and grouped into blocks of ``b`` tokens: one ``b*d`` vector per (head chunk, block).
    Each MLP maps ``b*d -> h1 -> h2 -> d`` with ReLU in between (spec: ``h1 = 128``, ``h2 = b*d``).
    Predicted block matrix ``I^_mn = sum_h q^_m^h . k^_n^h`` (fp32), ``[B, nb, nb]``. The linears have no
    bias, as in the released ``AttnPredictor`` (``bias=True`` only to load predictors saved with biases).
    """

    def __init__(self, hidden_size: int, num_heads: int, block: int, h1: int = 128, h2: int | None = None,
                 dims: dict[str, list[int]] | None = None, bias: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}.")
        self.hidden_size, self.num_heads, self.block = hidden_size, num_heads, block
        self.head_chunk = hidden_size // num_heads
        self.bias = bool(bias)
        d_in = block * self.head_chunk
        h2 = d_in if h2 is None else h2
        dims = dims or {"q": [h1, h2], "k": [h1, h2]}
        self.q = self._mlp(d_in, dims["q"])
        self.k = self._mlp(d_in, dims["k"])

    def _mlp(self, d_in: int, hidden: list[int]) -> nn.Sequential:
        a, b = hidden
        bias = self.bias
        return nn.Sequential(nn.Linear(d_in, a, bias=bias), nn.ReLU(), nn.Linear(a, b, bias=bias), nn.ReLU(),
                             nn.Linear(b, self.head_chunk, bias=bias))

    def dims(self) -> dict[str, list[int]]:
        """Hidden widths of both MLPs (they shrink under elastic pruning); stored with the weights."""
        return {name: [mlp[0].out_features, mlp[2].out_features] for name, mlp in (("q", self.q), ("k", self.k))}

    def shape(self) -> dict[str, int]:
        return {"hidden_size": self.hidden_size, "num_heads": self.num_heads, "block": self.block}

    def block_features(self, x: torch.Tensor) -> torch.Tensor:
        bsz = x.shape[0]
        x = pad_to_blocks(x.float(), self.block, dim=1)
        nb = x.shape[1] // self.block
        x = x.view(bsz, nb, self.block, self.num_heads, self.head_chunk)
        return x.permute(0, 3, 1, 2, 4).reshape(bsz, self.num_heads, nb, self.block * self.head_chunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.block_features(x)
        return torch.einsum("bhmd,bhnd->bmn", self.q(feats), self.k(feats))


def predicted_block_scores(matrix: torch.Tensor, block_valid: torch.Tensor, exact_target: bool = False,
                           symmetrize: bool = True) -> torch.Tensor:
    """Runtime score from a predicted matrix, ``[B, nb]``.

    Released target (``exact_target=False``): column sum over valid query blocks, no causal mask, as in
    the released code. Exact target: the predicted matrix stands for the exact profiling matrix, so it
    is reduced the same way as :func:`exact_block_scores` (causal pairs only, optional symmetrisation,
    column sum).
    """
    if not exact_target:
        return (matrix * block_valid[:, :, None].to(matrix.dtype)).sum(-2)
    return token_block_scores(matrix * causal_block_pairs(block_valid).to(matrix.dtype), symmetrize)


class DeadNeuronCounter:
    """Counts, per hidden neuron of a predictor's first two linears, how often its pre-ReLU output is <= 0."""

    def __init__(self, predictor: BlockPredictor) -> None:
        self.predictor = predictor
        self.zero: dict[str, torch.Tensor] = {}
        self.total: dict[str, int] = {}
        self._handles = []
        for name, mlp in (("q", predictor.q), ("k", predictor.k)):
            for i in (0, 2):
                self._handles.append(mlp[i].register_forward_hook(self._hook(f"{name}.{i}")))
        self.reset()

    def _hook(self, key: str) -> Callable:
        def hook(module, args, out):
            flat = out.detach().reshape(-1, out.shape[-1])
            self.zero[key] = self.zero[key].to(flat.device) + (flat <= 0).sum(0)
            self.total[key] += flat.shape[0]
        return hook

    def reset(self) -> None:
        for name, mlp in (("q", self.predictor.q), ("k", self.predictor.k)):
            for i in (0, 2):
                self.zero[f"{name}.{i}"] = torch.zeros(mlp[i].out_features, dtype=torch.long)
                self.total[f"{name}.{i}"] = 0

    def rates(self) -> dict[str, torch.Tensor]:
        return {k: self.zero[k].float() / max(1, self.total[k]) for k in self.zero}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _shrink_pair(first: nn.Linear, second: nn.Linear, keep: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    """Drop ``first``'s output neurons (and ``second``'s matching inputs) where ``keep`` is False."""
    idx = keep.nonzero().flatten()
    new_first = nn.Linear(first.in_features, len(idx), bias=first.bias is not None).to(first.weight)
    new_second = nn.Linear(len(idx), second.out_features, bias=second.bias is not None).to(second.weight)
    with torch.no_grad():
        new_first.weight.copy_(first.weight[idx])
        if first.bias is not None:
            new_first.bias.copy_(first.bias[idx])
        new_second.weight.copy_(second.weight[:, idx])
        if second.bias is not None:
            new_second.bias.copy_(second.bias)
    return new_first, new_second


def prune_dead_neurons(predictor: BlockPredictor, rates: dict[str, torch.Tensor], tau: float) -> int:
    """Elastic size transformation: remove hidden neurons whose zero-rate is ``>= tau`` (at least one
    neuron per layer survives), shrinking the next linear's inputs to match. Returns how many went.

    A removed neuron was ``<= 0`` before its ReLU, i.e. contributed exactly 0, for every input where it
    was dead, so the predictor's function is unchanged on those inputs.
    """
    removed = 0
    for name in ("q", "k"):
        mlp = getattr(predictor, name)
        for i in (0, 2):
            keep = rates[f"{name}.{i}"].to(mlp[i].weight.device) < tau
            if not keep.any():
                keep[rates[f"{name}.{i}"].argmin()] = True
            if keep.all():
                continue
            removed += int((~keep).sum())
            mlp[i], mlp[i + 2] = _shrink_pair(mlp[i], mlp[i + 2], keep)
    return removed


def predictor_recall(pred: torch.Tensor, exact: torch.Tensor, block_valid: torch.Tensor, ratio: float) -> float:
    """Mean over samples of |top-k(predicted) ∩ top-k(exact)| / k at keep ratio ``ratio`` (spec [I])."""
    pi, pk = select_blocks(pred, block_valid, ratio=ratio)
    ei, ek = select_blocks(exact, block_valid, ratio=ratio)
    hits = []
    for s in range(pred.shape[0]):
        p = set(pi[s][pk[s]].tolist())
        e = set(ei[s][ek[s]].tolist())
        hits.append(len(p & e) / max(1, len(e)))
    return float(sum(hits) / max(1, len(hits)))


def train_predictors(
    predictors: dict[int, BlockPredictor],
    samples: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    *,
    steps: int = 400,
    lr: float = 1e-3,
    warmup: int = 20,
    loss: str = "smooth_l1",
    elastic: bool = False,
    prune_interval: int = 100,
    prune_until: int = 620,
    tau: float = 0.8,
    tau_step: float = 0.05,
    progress: bool = True,
    seed: int = 0,
    causal: bool = False,
) -> dict[str, list[float]]:
    """Train every layer's predictor on ``(x, target, block_valid)`` samples; returns the loss history.

    Adam (betas 0.9, 0.95), linear warm-up then constant lr (the released recipe, spec §3.4), one sample
    drawn per layer per step (seeded), SmoothL1 (or MSE) between predicted and target block matrices on
    valid blocks, summed over layers. With ``elastic`` the dead-neuron counters run and every
    ``prune_interval`` steps (up to ``prune_until``) neurons with zero-rate ``>= tau`` are removed, with
    ``tau`` lowered by ``tau_step`` per prune event; the optimizer is rebuilt after each event. With
    ``causal`` the loss covers the causal pairs (query block >= key block) only, for the exact target
    whose other entries are zero by definition and never read.
    """
    if loss not in ("smooth_l1", "mse"):
        raise ValueError(f"predictor loss={loss!r} is not supported; use 'smooth_l1' or 'mse'.")
    loss_fn = F.smooth_l1_loss if loss == "smooth_l1" else F.mse_loss
    layers = sorted(predictors)
    params = lambda: [p for i in layers for p in predictors[i].parameters()]
    make_opt = lambda: torch.optim.Adam(params(), lr=lr, betas=(0.9, 0.95))
    opt = make_opt()
    counters = {i: DeadNeuronCounter(predictors[i]) for i in layers} if elastic else {}
    g = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": [], "removed": []}
    bar = _progress(range(steps), progress, "training LeMo predictors")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        total = 0.0
        opt.zero_grad(set_to_none=True)
        for i in layers:
            x, target, bvalid = samples[i][int(torch.randint(len(samples[i]), (1,), generator=g))]
            pred = predictors[i](x)
            pair = causal_block_pairs(bvalid) if causal else bvalid[:, :, None] & bvalid[:, None, :]
            layer_loss = loss_fn(pred[pair], target.to(pred)[pair])
            layer_loss.backward()
            total += float(layer_loss.detach())
        opt.step()
        history["loss"].append(total)
        if elastic and (step + 1) % prune_interval == 0 and step + 1 <= prune_until:
            removed = sum(prune_dead_neurons(predictors[i], counters[i].rates(), tau) for i in layers)
            history["removed"].append(removed)
            tau = max(0.0, tau - tau_step)
            for i in layers:
                counters[i].remove()
                counters[i] = DeadNeuronCounter(predictors[i])
            opt = make_opt()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total:.4g}")
    for counter in counters.values():
        counter.remove()
    return history


def _progress(it: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with lightning
        return it
    return tqdm(it, desc=desc, leave=False)


# ------------------------------------------------------------------------------- MLP side (§3.5)


class ChannelPrunedMLPFunction(torch.autograd.Function):
    """Llama MLP ``down(SiLU(gate(x)) * up(x))`` with an exact forward and an approximate backward.

    Forward is exact for all tokens. For the backward only the ``keep`` fraction of intermediate
    channels with the largest ``||SiLU(gate)[:, c]||_2 + ||up[:, c]||_2`` (over all tokens of a sample)
    are saved, and ``dX`` is computed from them alone. The MLP weights must be frozen (no weight
    gradient is produced), as in the released code, where LoRA sits on attention only.
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, keep: float):  # noqa: D401 - autograd signature
        g = F.linear(x, w_gate)
        u = F.linear(x, w_up)
        a = F.silu(g)
        y = F.linear(a * u, w_down)
        n_keep = max(1, int(math.floor(keep * g.shape[-1] + 1e-6)))
        score = a.float().norm(dim=-2) + u.float().norm(dim=-2)  # [B, I]
        ch = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :n_keep]
        ch = torch.sort(ch, dim=-1).values
        idx = ch[:, None, :].expand(-1, g.shape[1], -1)
        ctx.save_for_backward(torch.gather(g, -1, idx), torch.gather(u, -1, idx), ch, w_gate, w_up, w_down)
        return y

    @staticmethod
    def backward(ctx, dy):
        g_s, u_s, ch, w_gate, w_up, w_down = ctx.saved_tensors
        # per-sample channel subsets: gather the weight rows each sample kept
        wd = w_down.t()[ch]          # [B, k, D]   (down: I -> D, so dA = dY @ W_down[:, S])
        wg = w_gate[ch]              # [B, k, D]
        wu = w_up[ch]                # [B, k, D]
        da = torch.matmul(dy, wd.transpose(1, 2))  # [B, N, k]
        sig = torch.sigmoid(g_s)
        silu = g_s * sig
        dg = da * u_s * (sig * (1 + g_s * (1 - sig)))
        du = da * silu
        dx = torch.matmul(dg, wg) + torch.matmul(du, wu)
        return dx, None, None, None, None


def channel_pruned_mlp(mlp: nn.Module, x: torch.Tensor, keep: float) -> torch.Tensor:
    return ChannelPrunedMLPFunction.apply(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, keep)
