"""Exact resume: a run stopped and resumed continues as the uninterrupted run would have, batch for batch.

The DataModules own the data position (``data/position.py``); ``ExactResume`` owns the rest, so a LightningModule
is only model + loss + step + optimizer: every rank's RNG states in each checkpoint (restored right before the
first step), the learning rate recomputed for the resumed schedule, two fixes to Lightning 2.6's resume, and the
check that every rank chose the same checkpoint. ``RecipeCLI`` adds it to every run that lacks it.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lmrecipes.checkpoints_sharded import sharded_identity
from lmrecipes.optim import sync_scheduler_lr
from lmrecipes.ranks import distributed, gather_from_ranks


class ExactResume(Callback):
    """Restores what a checkpoint's model, optimizer, loops and data position leave out, so resuming is exact.

    ``resume_from`` is the checkpoint this process resolved for ``--ckpt_path`` (the CLI sets it; None: from
    scratch). Each rank resolves on its own, so ``setup`` checks that they agree before the first collective.
    """

    def __init__(self) -> None:
        self.resume_from: str | None = None
        self._rng_to_restore: dict | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_same_resume(self.resume_from)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        # Every rank's generators (dropout differs per rank once they diverge), not only rank 0's.
        meta = checkpoint.setdefault("lmrecipes", {})
        meta["rng"] = gather_from_ranks(rng_state())
        meta["seed"] = os.environ.get("PL_GLOBAL_SEED")

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        meta = checkpoint.get("lmrecipes", {})
        states = meta.get("rng")
        if states is None:
            return
        saved_seed, seed = meta.get("seed"), os.environ.get("PL_GLOBAL_SEED")
        if saved_seed != seed:
            rank_zero_warn(
                f"seed_everything changed from {saved_seed} to {seed} since the checkpoint was written; the "
                "checkpoint's RNG states are restored, so training continues as the original run would have"
            )
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds RNG states for {len(states)} ranks, this run has {trainer.world_size}: "
                "dropout draws continue from this run's seed instead"
            )
            return
        self._rng_to_restore = states[trainer.global_rank]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            sync_scheduler_lr(config.scheduler)
        if trainer.global_step > 0:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    mark_saved(callback, trainer.global_step)
        restart_finished_epoch(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        # Restored right before the first step after resuming: the uninterrupted run drew nothing from the global
        # generators between its save and this step (the DataModules give every DataLoader its own generator).
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


def mark_saved(callback: ModelCheckpoint, step: int) -> None:
    """Tell ``callback`` that ``step`` (the one resumed from) is saved already.

    Lightning 2.6 does not restore ModelCheckpoint's last saved step, so after resuming at step s (a multiple of
    every_n_train_steps) with gradient accumulation it saves again after the first micro-batch, in the middle of
    an accumulation window: that checkpoint has lost the micro-batch's gradient and does not resume exactly.
    """
    # Private: no public setter; tests/test_resume.py fails if Lightning renames it or stops skipping on it.
    callback._last_global_step_saved = step


def restart_finished_epoch(trainer: pl.Trainer) -> None:
    """Start the epoch's batch count afresh when resuming from a checkpoint written once an epoch's batches were
    all trained: Lightning 2.6 starts the next epoch but keeps the old count, runs one batch as that epoch's last
    and steps the optimizer on it alone, shifting every gradient accumulation window after it."""
    batches = trainer.fit_loop.epoch_loop.batch_progress.current
    if math.isfinite(trainer.num_training_batches) and batches.completed >= trainer.num_training_batches:
        batches.reset()


def check_same_resume(chosen: str | None) -> None:
    """Every rank resolves ``--ckpt_path`` on its own; ranks that chose different checkpoints (or some none) would
    hang in their first collective, so compare (by name and size: mount points may differ between nodes)."""
    if not distributed():
        return
    mine = None
    if chosen is not None:
        if os.path.isfile(chosen):
            mine = f"{Path(chosen).name} ({os.path.getsize(chosen)} bytes)"
        elif os.path.isdir(chosen):  # a sharded checkpoint: its marker says which save it is
            mine = f"{Path(chosen).name} ({sharded_identity(chosen)})"
        else:
            mine = str(chosen)
    everyone = gather_from_ranks(mine)
    if any(choice != everyone[0] for choice in everyone):
        detail = "; ".join(f"rank {rank}: {choice or 'none'}" for rank, choice in enumerate(everyone))
        raise ValueError(
            f"the ranks chose different checkpoints to resume from ({detail}): check that every node sees the "
            "same checkpoint folder"
        )


# -- RNG states: dropout (and anything else drawn from the global generators) continues exactly on resume --


def rng_state() -> dict:
    """This process's global RNG states as plain types and tensors (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value):
    # random.setstate needs tuples; a checkpoint round trip may give lists
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
