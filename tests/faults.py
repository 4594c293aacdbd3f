"""Fault injection for the resilience tests, loaded by the real CLI as callbacks (``PYTHONPATH=tests``).

``StepLog`` records what every rank trained on (a hash of each batch and its loss) so runs can be compared batch
by batch; ``SignalAt`` sends a real signal to its own process after a chosen optimizer step; ``PoisonOnce``
makes one rank's loss NaN for one step by setting a weight to NaN (restored afterwards, as if the fault were in
that rank's data).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def batch_hash(batch: dict) -> str:
    ids = batch["input_ids"].detach().cpu().contiguous()
    return hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:16]


class StepLog(Callback):
    """Append one JSON line per trained batch: rank, global step before it, batch index, batch hash, loss."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {
            "rank": trainer.global_rank,
            "step": trainer.global_step,  # after this batch's optimizer step (if any)
            "batch_idx": batch_idx,
            "hash": batch_hash(batch),
            "loss": float(loss),
        }
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(row) + "\n")


def read_log(path: str | Path) -> dict[int, list[dict]]:
    """Rows per rank; a resumed run re-logs nothing it did not train, so the last row of a (rank, step) wins."""
    rows: dict[int, dict[tuple, dict]] = {}
    for file in sorted(Path(path).parent.glob(Path(path).name + ".rank*")):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["rank"], {})[(row["step"], row["batch_idx"])] = row
    return {rank: [by_key[k] for k in sorted(by_key)] for rank, by_key in rows.items()}


class SignalAt(Callback):
    """Send ``signal_name`` to this process (on ``rank`` only, or on every rank when ``rank`` is None) at the end
    of the first batch that leaves the global step at ``step``, or of batch ``batch`` (which may fall in the middle
    of a gradient accumulation window)."""

    def __init__(
        self,
        step: int | None = None,
        batch: int | None = None,
        signal_name: str = "SIGTERM",
        rank: int | None = None,
        group: bool = False,
    ) -> None:
        self.step, self.batch, self.signal_name, self.rank = step, batch, signal_name, rank
        self.group = (
            group  # the whole process group, DataLoader workers included, as SLURM signals a job step
        )
        self._sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        due = trainer.global_step == self.step if self.batch is None else batch_idx == self.batch
        if self._sent or not due:
            return
        if self.rank is None or trainer.global_rank == self.rank:
            self._sent = True
            signum = getattr(signal, self.signal_name)
            os.killpg(os.getpgid(0), signum) if self.group else os.kill(os.getpid(), signum)


class PoisonOnce(Callback):
    """Before the batch that makes optimizer step ``step`` + 1, set one weight to NaN on ``rank``; restore it after
    the (skipped) optimizer step so every rank holds the same weights again."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank = step, rank
        self._saved: torch.Tensor | None = None

    def _weight(self, pl_module) -> torch.Tensor:
        return next(p for p in pl_module.parameters() if p.dim() == 2)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and self._saved is None:
            weight = self._weight(pl_module)
            self._saved = weight.detach().clone()
            with torch.no_grad():
                weight[0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._saved is not None:
            with torch.no_grad():
                self._weight(pl_module).copy_(self._saved)
            self._saved = None
