"""lightning_peft.figures.log_figure: one helper for every logger that takes images (CSV -> PNG in the run
folder, TensorBoard add_figure, W&B log_image), a collective on every rank, drawing on rank 0 only."""

from __future__ import annotations

import glob
import os

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_peft.figures import log_figure


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot(1, 1, 1).imshow([[0.0, 1.0], [1.0, 0.0]])
    return fig


def _trainer(logger):
    return L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
                     enable_model_summary=False)


def test_csv_logger_gets_a_png_in_its_version_folder(tmp_path):
    logger = CSVLogger(str(tmp_path), name="run", version=3)
    path = log_figure(_trainer(logger), "method/mask", _figure, step=7)
    assert path == os.path.join(logger.log_dir, "method_mask_step7.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_logger_writes_to_default_root_dir(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=str(tmp_path))
    assert log_figure(trainer, "m", _figure(), step=0, filename="pic.png") == str(tmp_path / "pic.png")
    assert (tmp_path / "pic.png").is_file()


def test_tensorboard_logger_receives_the_image(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    path = log_figure(_trainer(logger), "method/mask", _figure, step=5)
    logger.experiment.flush()
    assert os.path.isfile(path) and os.path.dirname(path) == logger.log_dir
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "method/mask" in events.Tags()["images"]
    (image,) = events.Images("method/mask")
    assert image.step == 5 and image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_offline_logger_receives_the_image(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lp-test")
    try:
        path = log_figure(_trainer(logger), "method/mask", _figure, step=4)
        run_dir = logger.experiment.dir
    finally:
        wandb.finish()
    assert os.path.dirname(path) == str(tmp_path)  # a W&B run folder is the logger's save_dir
    images = glob.glob(os.path.join(run_dir, "media", "images", "method", "mask_*.png"))  # wandb numbers its own steps
    assert len(images) == 1, os.listdir(run_dir)


class _NonZeroRank:
    """A rank other than 0: counts the collective, must never draw."""

    is_global_zero = False
    default_root_dir = "/nonexistent"
    loggers = ()

    def __init__(self):
        self.collectives = 0

    @property
    def log_dir(self):
        self.collectives += 1
        return "/nonexistent/run"


def test_other_ranks_join_the_collective_and_do_not_draw():
    rank1 = _NonZeroRank()

    def never():
        raise AssertionError("rank 1 drew")

    assert log_figure(rank1, "m", never, step=0) is None
    assert rank1.collectives == 1  # trainer.log_dir broadcasts: every rank must call it


def test_a_failing_figure_is_a_warning_not_a_failed_run(tmp_path):
    def broken():
        raise RuntimeError("no fonts")

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"Could not draw 'm' at step 2 \(RuntimeError: no fonts\)"):
        assert log_figure(trainer, "m", broken, step=2) is None


def test_hft_and_greentrainer_pictures_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from helpers import cpu_trainer
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_peft import CausalLM
    from lightning_peft.callbacks import GreenTrainer, HalfFineTuning
    from lightning_peft.datamodules import SyntheticSFTDataModule
    from lightning_peft.heads import FullFineTune

    callbacks = (("hft/mask", HalfFineTuning(seed=0)), ("greentrainer/mask", GreenTrainer(interval_unit="step")))
    for tag, callback in callbacks:
        module = CausalLM(backbone="tiny-llama", head=FullFineTune(), backbone_config={"num_hidden_layers": 1})
        logger = TensorBoardLogger(str(tmp_path), name=tag.split("/")[0], version=0)
        data = SyntheticSFTDataModule(task="copy", num_train=8, num_val=4, batch_size=4, num_digits=2, seed=0)
        cpu_trainer(tmp_path, 1, [callback], logger=logger, enable_checkpointing=False).fit(module, datamodule=data)
        logger.experiment.flush()
        events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
        events.Reload()
        assert tag in events.Tags()["images"], events.Tags()
        assert glob.glob(os.path.join(logger.log_dir, "*.png"))  # and the PNG in the run folder
