"""The blocks x tensors pictures of HalfFineTuning and GreenTrainer (matplotlib ``Figure`` objects; no
pyplot state, no files: :func:`lightning_peft.figures.log_figure` saves and sends them)."""

from __future__ import annotations

import re
from typing import Any

from lightning_peft.callbacks._hft_layout import short_labels

_TRAIN, _FROZEN = "#2b8cbe", "#d9d9d9"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def hft_figure(rows: list[str], cols: list[str], grid: list[list[bool]], columns: dict[str, list[str]],
               blocks: str, title: str) -> Any:
    """HFT's mask: one row per block, one column per category tensor (``cols`` are ``category:label``)."""
    from matplotlib.colors import ListedColormap

    values = [[1.0 if v else 0.0 for v in row] for row in grid]
    labels = short_labels([c.split(":", 1)[1] for c in cols])
    fig = _figure(max(6.0, 1.2 + 0.65 * len(cols)), 1.9 + 0.34 * len(rows))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(values, cmap=ListedColormap([_FROZEN, _TRAIN]), vmin=0, vmax=1, aspect="auto")
    for r, row in enumerate(grid):
        for c, v in enumerate(row):
            ax.text(c, r, "train" if v else "frozen", ha="center", va="center", fontsize=7,
                    color="white" if v else "#555555")
    ax.set_xticks(range(len(cols)), labels=labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=[str(i) for i in range(len(rows))], fontsize=8)
    ax.set_ylabel(f"block ({blocks}.i)", fontsize=8)
    centers, start = [], 0
    for names in columns.values():  # separators between categories, their names on top
        if start:
            ax.axvline(start - 0.5, color="black", linewidth=1.5)
        centers.append(start + (len(names) - 1) / 2)
        start += len(names)
    top = ax.secondary_xaxis("top")
    top.set_xticks(centers, labels=list(columns), fontsize=9, fontweight="bold")
    top.tick_params(length=0)
    fig.suptitle(title, fontsize=8)
    return fig


_LAYER = re.compile(r"^(?P<pre>.*?)\.(?P<idx>\d+)\.(?P<role>.+)$")


def mask_figure(names: list[str], mask: dict[str, bool], title: str = "",
                where: dict[str, tuple[int, str]] | None = None) -> Any:
    """GreenTrainer's mask as a blocks x tensors grid: rows are the blocks (deepest at the bottom) plus one
    row for the tensors outside the blocks, columns the tensors' paths inside a block.

    ``where`` maps a name to ``(block index, path in the block)`` (from the architecture table); without
    it, a name's first numbered part is taken as the block index.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap

    cells: dict[tuple[str, str], bool] = {}
    layers: list[int] = []
    roles: list[str] = []
    other: list[str] = []
    for n in names:
        if where is not None and n in where:
            idx, role = where[n]
        elif where is None and (m := _LAYER.match(n)):
            idx, role = int(m["idx"]), m["role"]
        else:
            short = n.replace("model.", "").replace(".weight", ".w").replace(".bias", ".b")
            other.append(short)
            cells[("other", short)] = mask[n]
            continue
        if idx not in layers:
            layers.append(idx)
        if role not in roles:
            roles.append(role)
        cells[(str(idx), role)] = mask[n]
    rows = [str(i) for i in sorted(layers, reverse=True)] + (["other"] if other else [])
    cols = roles + other
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in cells.items():
        grid[rows.index(r), cols.index(c)] = 1.0 if v else 0.0
    fig = _figure(max(6.0, 0.45 * len(cols) + 2), max(2.5, 0.35 * len(rows) + 2))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(np.ma.masked_invalid(grid), cmap=ListedColormap([_FROZEN, "#2ca02c"]), vmin=0, vmax=1, aspect="auto")
    ax.set_facecolor("white")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c.replace(".weight", ".w").replace(".bias", ".b") for c in cols], rotation=60,
                       ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"layer {r}" if r != "other" else "outside blocks" for r in rows], fontsize=7)
    ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    selected = sum(bool(v) for v in mask.values())
    ax.set_title(f"{title}\n{selected}/{len(mask)} tensors train (green); grey: frozen", fontsize=8)
    return fig
