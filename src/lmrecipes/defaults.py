"""What every run gets unless its config says otherwise: the run folder's callbacks, loggers and checkpoint I/O.

A run's folder is ``trainer.default_root_dir`` (``runs/<name>`` in the shipped configs); checkpoints, logs, the
export and ``curves.png`` go under it. The CLI adds each default below whose class the config does not give, so a
variant config states only what differs and never drops its base's logger by restating a list:

- callbacks: ModelCheckpoint (the top-level ``checkpoint:`` arguments, ``dirpath`` ``<run>/checkpoints`` and
  ``save_last``: what ``--ckpt_path last`` needs), LearningRateMonitor (per step), TokenThroughput and DataStats
  (where the DataModule counts its data, ``data_stats()``), and the run's plumbing: Preemption, NonFiniteLoss,
  EpochsFromData, Curves, ExactResume;
- loggers: TensorBoardLogger (``<run>/tensorboard``) and CSVLogger (``<run>/csv``, which curves.png is drawn from);
- plugins: AtomicCheckpointIO.

A config's own callback or logger of one of these classes replaces the default (a ModelCheckpoint without
``dirpath`` still saves into ``<run>/checkpoints``); ``trainer.enable_checkpointing: false`` and
``trainer.logger: false`` turn the checkpoint and the loggers off.
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO


def as_list(value) -> list:
    """A trainer argument that takes one object or a list of them, as a new list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def run_root(trainer_config) -> str:
    """The run's folder: ``trainer.default_root_dir``, else the working directory (as Lightning does)."""
    return str(trainer_config.get("default_root_dir") or os.getcwd())


def missing(given: list, defaults: list) -> list:
    """The ``defaults`` whose class none of ``given`` is an instance of."""
    return [d for d in defaults if not any(isinstance(g, type(d)) for g in given)]


def run_callbacks(
    given: list, *, root: str, checkpoint: dict | None, counts_data: bool, checkpointing: bool = True
) -> list:
    """``given`` followed by the default callbacks of a run in ``root`` that it lacks.

    Args:
        given: the config's ``trainer.callbacks``, instantiated.
        root: the run folder.
        checkpoint: arguments of the default ModelCheckpoint (the top-level ``checkpoint:`` section).
        counts_data: the DataModule reports ``data_stats()`` (streamed/packed text): add TokenThroughput, DataStats.
        checkpointing: ``trainer.enable_checkpointing`` (False: no default ModelCheckpoint).
    """
    from lmrecipes.callbacks import DataStats, EpochsFromData
    from lmrecipes.curves import Curves
    from lmrecipes.resilience import NonFiniteLoss, Preemption
    from lmrecipes.resume import ExactResume
    from lmrecipes.throughput import TokenThroughput

    folder = os.path.join(root, "checkpoints")
    folder = folder if "://" in folder else os.path.realpath(folder)  # local: as ModelCheckpoint stores it
    defaults = [LearningRateMonitor(logging_interval="step")]
    if checkpointing:
        defaults.insert(0, ModelCheckpoint(**{"save_last": True, **(checkpoint or {})}))
    if counts_data:
        defaults += [TokenThroughput(), DataStats()]
    defaults += [Preemption(), NonFiniteLoss(), EpochsFromData(), Curves(), ExactResume()]
    callbacks = list(given) + missing(given, defaults)
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            # Lightning's own default is the first logger's version folder: not one place --ckpt_path last finds.
            callback.dirpath = folder
    return callbacks


def run_loggers(given, *, root: str) -> list | bool:
    """The config's ``trainer.logger`` with the default loggers of a run in ``root`` that it lacks, first (the
    first logger's folder holds the saved config.yaml); ``False`` stays off."""
    if given is False:
        return False
    given = [] if given is True else as_list(given)
    defaults = [TensorBoardLogger(save_dir=root, name="tensorboard"), CSVLogger(save_dir=root, name="csv")]
    return missing(given, defaults) + given


def run_plugins(given) -> list:
    """The config's ``trainer.plugins`` with atomic checkpoint writes unless it chose its own CheckpointIO."""
    from lmrecipes.checkpoints import AtomicCheckpointIO

    plugins = as_list(given)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def check_resume_callbacks(callbacks: list) -> None:
    """``--ckpt_path last`` silently starts from scratch without a ModelCheckpoint that has dirpath and save_last."""
    if any(isinstance(c, ModelCheckpoint) and c.dirpath and c.save_last for c in callbacks):
        return
    raise ValueError(
        "--ckpt_path last needs a ModelCheckpoint with save_last: true (the default one has it; a ModelCheckpoint "
        "in trainer.callbacks replaces it, and trainer.enable_checkpointing: false removes it): otherwise Lightning "
        "finds no last.ckpt and silently starts from scratch"
    )
