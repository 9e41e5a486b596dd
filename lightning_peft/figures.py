"""Send a matplotlib figure to every logger of a run that takes images.

One helper, :func:`log_figure`, used by every callback that draws a picture:

* the figure is always saved as a PNG in the run folder (``trainer.log_dir``: the CSV or TensorBoard
  version folder, a W&B logger's ``save_dir``, or ``default_root_dir`` without a logger), so a CSV run
  gets its pictures as files;
* :class:`~lightning.pytorch.loggers.TensorBoardLogger`: ``experiment.add_figure``;
* :class:`~lightning.pytorch.loggers.WandbLogger`: ``log_image`` (a ``wandb.Image`` of the PNG);
* other loggers get the PNG file only.

``trainer.log_dir`` is a collective (it broadcasts rank 0's folder), so :func:`log_figure` must be
called on **every** rank; it draws and writes on rank 0 only. Give the figure as a callable to build
it on rank 0 alone. A failure to draw is a warning, never a failed run; the collective runs first, so
ranks never wait on each other because one rank could not draw.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

FigureLike = Any  # a matplotlib Figure, or a callable returning one (called on rank 0 only)


def run_folder(trainer: Any) -> str:
    """The run folder pictures go to. A collective: call it on every rank."""
    folder = trainer.log_dir  # broadcasts rank 0's folder: every rank must call it
    return folder or trainer.default_root_dir


def log_figure(trainer: Any, name: str, figure: FigureLike | Callable[[], FigureLike] | None, step: int,
               filename: str | None = None) -> str | None:
    """Save ``figure`` as ``<run folder>/<filename>`` and send it to every logger that takes images.

    Call on every rank (see the module docstring); only rank 0 draws. ``name`` is the logger key
    (e.g. ``"hft/mask"``); ``filename`` defaults to ``name`` with non-word characters as ``_`` and the
    step appended. Returns the PNG path on rank 0, None on other ranks or when drawing failed.
    """
    folder = run_folder(trainer)
    if not trainer.is_global_zero:
        return None
    try:
        fig = figure() if callable(figure) else figure
        if fig is None:
            return None
        filename = filename or re.sub(r"\W+", "_", name).strip("_") + f"_step{step}.png"
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, filename)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        for logger in trainer.loggers:
            _send(logger, name, fig, path, step)
        _close(fig)
        return path
    except Exception as err:  # a picture is never worth a failed run
        rank_zero_warn(f"Could not draw {name!r} at step {step} ({type(err).__name__}: {err}); training goes on.")
        return None


def _send(logger: Any, name: str, fig: Any, path: str, step: int) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_figure(name, fig, global_step=step, close=False)
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=name, images=[path], step=step)


def _close(fig: Any) -> None:
    """Release the figure if pyplot manages it (harmless for a bare ``Figure``)."""
    import matplotlib.pyplot as plt

    plt.close(fig)


__all__ = ["log_figure", "run_folder"]
