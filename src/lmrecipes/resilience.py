"""Callbacks that keep long runs alive: save-and-exit on preemption signals, and a policy for non-finite losses.

Both decide together on every rank (one scalar collective per optimizer step), so a signal or a NaN that only one
rank sees never leaves the others waiting in a collective. ``RecipeCLI`` adds both to every run that lacks them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lmrecipes.ranks import distributed, max_over_ranks


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; exits with 128 + the signal number."""


class Preemption(Callback):
    """On a signal (SIGTERM; SLURM's pre-kill ``--signal=USR1@120``), finish the current optimizer step, save
    ``last.ckpt`` and exit with 128 + the signal number; under SLURM, requeue the job first on ``requeue_signals``.

    Replaces Lightning's SIGTERM handling for training: Lightning's handler broadcasts from inside the signal
    handler (a collective the other ranks do not expect) and exits without a checkpoint.
    """

    def __init__(
        self,
        *,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        requeue_signals: tuple[str, ...] = ("SIGUSR1",),
        checkpoint: str | None = None,
    ) -> None:
        """
        Args:
            signals: signal names that trigger save-and-exit.
            requeue_signals: of those, the ones after which rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (when
                running under SLURM). Not SIGTERM: ``scancel`` sends it, and a cancelled job must stay cancelled.
            checkpoint: where to save; default: ``last.ckpt`` in the ModelCheckpoint's ``dirpath``.
        """
        for name in (*signals, *requeue_signals):
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ValueError(f"Preemption: {name!r} is not a signal name (e.g. 'SIGTERM', 'SIGUSR1')")
        self.signals, self.requeue_signals, self.checkpoint = (
            tuple(signals),
            tuple(requeue_signals),
            checkpoint,
        )
        self._received, self._pid = 0, os.getpid()
        self._previous: dict[int, object] = {}
        self._step_at_start = -1

    def _handler(self, signum: int, frame) -> None:
        # Only record it: saving needs a step boundary and every rank (collectives), not a signal handler.
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker (SLURM signals every process): the main process handles it
        if not self._received:
            self._received = signum
            print(
                f"lmrecipes: received {signal.Signals(signum).name}: saving after the current step",
                flush=True,
            )

    def _install(self) -> None:
        self._pid = os.getpid()
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning registers its handlers later (after restoring a checkpoint, before the sanity check and before
        # the training DataLoader forks its workers). Ours go in right after, so they are the ones in force from
        # then on, in the workers too: Lightning's SIGTERM handler broadcasts from inside the handler (a collective
        # the other ranks do not expect) and exits without a checkpoint, and its SLURM SIGUSR1 handler saves
        # mid-step from inside the handler. Lightning's teardown restores the handlers it found.
        # Private: no public hook runs between that registration and the run; tests/test_resume.py checks it.
        connector = getattr(trainer, "_signal_connector", None)
        if stage != "fit" or connector is None:
            return
        register = connector.register_signal_handlers

        def register_then_install() -> None:
            register()
            self._install()

        connector.register_signal_handlers = register_then_install

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A Lightning without the hook above: install at the latest moment that still works.
        if not self._previous:
            self._install()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()  # after the last step a signal acts as usual (final validation, export)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._step_at_start:
            return  # mid gradient accumulation: saving here would lose the accumulated gradients
        signum = max_over_ranks(self._received, trainer.strategy.root_device)
        if not signum:
            return
        path, owner = self._path(trainer)
        if owner is not None:
            # ModelCheckpoint's public record of its last checkpoint is saved in the checkpoint and restored on
            # resume: naming this file there makes its next save replace it, not write last-v1.ckpt beside it.
            owner.last_model_path = path
        # every rank takes part (positions and RNG states are gathered); a full checkpoint, said explicitly
        trainer.save_checkpoint(path, weights_only=False)
        name = signal.Signals(signum).name
        requeued = self._requeue(trainer) if name in self.requeue_signals else ""
        rank_zero_info(
            f"lmrecipes: stopped by {name} after step {trainer.global_step}; saved {path}{requeued}. "
            "Resume with --ckpt_path last."
        )
        raise Preempted(128 + signum)

    def _path(self, trainer: pl.Trainer) -> tuple[str, ModelCheckpoint | None]:
        """Where to save, and the ModelCheckpoint whose ``last.ckpt`` that is (None: a file of our own)."""
        if self.checkpoint:
            return self.checkpoint, None
        found = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        if not found:
            return str(Path(trainer.default_root_dir) / "preempted.ckpt"), None
        cb = min(found, key=lambda cb: not cb.save_last)  # the first one that keeps a last.ckpt, if any
        path = str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
        return path, cb if cb.save_last else None

    @staticmethod
    def _requeue(trainer: pl.Trainer) -> str:
        job = os.environ.get("SLURM_JOB_ID")
        if job is None or not trainer.is_global_zero:
            return ""
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        except OSError as err:  # no scontrol on PATH (in a container): exit with the signal's code
            rank_zero_warn(f"scontrol requeue {job} failed: {err}")
            return f"; requeueing job {job} FAILED (no scontrol)"
        if result.returncode != 0:
            rank_zero_warn(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
            return f"; requeueing job {job} FAILED"
        return f"; requeued SLURM job {job}"


class NonFiniteLoss(Callback):
    """A NaN/inf loss on any rank skips that optimizer step on every rank (weights and optimizer moments are left
    unchanged, the schedule moves on), with a warning naming the step, batch and ranks; ``policy="stop"``, or more
    than ``max_consecutive`` skipped steps in a row, stops the run with an error instead."""

    def __init__(self, *, policy: str = "skip", max_consecutive: int = 5) -> None:
        """
        Args:
            policy: ``skip`` (drop the step on all ranks) or ``stop`` (raise at the first non-finite loss).
            max_consecutive: skipped steps in a row after which ``skip`` gives up (the run has diverged).
        """
        if policy not in ("skip", "stop"):
            raise ValueError(f"NonFiniteLoss: policy={policy!r} is not one of ('skip', 'stop')")
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteLoss: max_consecutive={max_consecutive} must be >= 1")
        self.policy, self.max_consecutive = policy, max_consecutive
        self.skipped = self._in_a_row = 0
        self._bad: torch.Tensor | None = None
        self._batches: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batches.append(batch_idx)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # Kept on the device across the accumulation window: no host sync per micro-batch.
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad, batches = self._bad, self._batches
        self._bad, self._batches = None, []
        local = int(bad is not None and bool(bad))
        ranks = self._bad_ranks(trainer, local)
        if not ranks:
            self._in_a_row = 0
            return
        where = (
            f"non-finite loss at optimizer step {trainer.global_step + 1} (epoch {trainer.current_epoch}, "
            f"batch {'/'.join(map(str, batches))}) on rank(s) {ranks}"
        )
        self.skipped += 1
        self._in_a_row += 1
        if self.policy == "stop" or self._in_a_row > self.max_consecutive:
            reason = (
                "" if self.policy == "stop" else f" ({self._in_a_row} steps in a row: the run has diverged)"
            )
            raise FloatingPointError(f"{where}{reason}; stopping. Lower the learning rate or check the data.")
        rank_zero_warn(f"{where}: step skipped on every rank ({self.skipped} skipped so far)")
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
        pl_module.log("train/skipped_steps", float(self.skipped))

    @staticmethod
    def _bad_ranks(trainer: pl.Trainer, local: int) -> list[int]:
        if not distributed():
            return [0] if local else []
        flags = torch.zeros(torch.distributed.get_world_size(), device=trainer.strategy.root_device)
        flags[torch.distributed.get_rank()] = local
        torch.distributed.all_reduce(flags)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"]
