"""Training tokens/s and MFU, logged every few optimizer steps with one wait for the GPU per interval."""

from __future__ import annotations

import math
import time
import warnings

import lightning.pytorch as pl
import torch

from lmrecipes.flops import device_peak_flops, matmul_params, transformer_flops_per_token
from lmrecipes.portable import hf_model


class TokenThroughput(pl.Callback):
    """Logs ``train/tokens_per_sec`` (all ranks together), ``train/tokens_per_sec_per_device`` and, where each
    rank's device has a known peak (``lmrecipes.flops.PEAK_FLOPS``), ``train/mfu`` (mean over ranks, each rank
    against its own device's peak) and ``train/mfu_min`` (the slowest rank); on CUDA ``train/peak_memory_gib``
    (the most any rank's device has held since the start).

    Lightning's ThroughputMonitor waits for the GPU after every batch; here tokens and FLOPs are counted from each
    batch's shape (host metadata, no wait), and the clock is read after one ``cuda.synchronize`` per logging
    interval, so a step's kernels stay queued behind the next. Validation time is left out of the rates.
    """

    def __init__(self, *, every_n_steps: int | None = None, peak_flops: float | None = None):
        """
        Args:
            every_n_steps: optimizer steps per measurement (default: ``trainer.log_every_n_steps``).
            peak_flops: this device's peak FLOP/s, for a device the table lacks (default: from the table).
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"TokenThroughput every_n_steps={every_n_steps} must be at least 1")
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"TokenThroughput peak_flops={peak_flops} must be a positive FLOP/s figure")
        self.every_n_steps, self.peak_flops = every_n_steps, peak_flops
        self.last: dict[str, float] = {}  # the last logged figures
        self._params: tuple = (None, 0)  # (model, its matmul parameter count), counted once
        self._t0: float | None = None
        self._tokens = self._flops = self._excluded = 0.0
        self._step0 = 0
        self.flops_per_batch: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.peak_flops is None:
            name, self.peak_flops = device_peak_flops(pl_module.device)
            if self.peak_flops is None and pl_module.device.type == "cuda":
                warnings.warn(
                    f"TokenThroughput knows no peak FLOP/s for {name!r} (lmrecipes.flops.PEAK_FLOPS): MFU is not "
                    "logged; give it as callback argument peak_flops",
                    stacklevel=1,
                )
        self._restart(trainer, pl_module)

    def _restart(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        self._tokens = self._flops = self._excluded = 0.0

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":  # the clock must not stop while kernels are still queued
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        batch_size, seq_len = batch["input_ids"].shape  # (B, T): T of this batch, packed or padded
        model = hf_model(pl_module)
        if self._params[0] is not model:
            self._params = (model, matmul_params(model))
        per_token = transformer_flops_per_token(model, seq_len, self._params[1])
        self.flops_per_batch = int(per_token * batch_size * seq_len)  # this batch's, for whoever reads it
        self._tokens += batch_size * seq_len
        self._flops += per_token * batch_size * seq_len

    def on_validation_start(self, trainer, pl_module) -> None:
        self._v0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._t0 is not None and trainer.state.fn == "fit":
            self._excluded += time.perf_counter() - self._v0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        if self._t0 is None or trainer.global_step - self._step0 < every:
            return
        self._sync(pl_module)
        seconds = max(time.perf_counter() - self._t0 - self._excluded, 1e-9)
        mfu = self._flops / seconds / self.peak_flops if self.peak_flops else math.nan
        cuda = pl_module.device.type == "cuda"
        memory = torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if cuda else math.nan
        mine = torch.tensor(
            [self._tokens / seconds, mfu, memory], dtype=torch.float32, device=pl_module.device
        )
        ranks = trainer.strategy.all_gather(mine).reshape(-1, 3).cpu()  # (world, 3): one collective
        self.last = {
            "train/tokens_per_sec": float(ranks[:, 0].sum()),
            "train/tokens_per_sec_per_device": float(ranks[:, 0].mean()),
        }
        if not ranks[:, 1].isnan().any():
            self.last |= {"train/mfu": float(ranks[:, 1].mean()), "train/mfu_min": float(ranks[:, 1].min())}
        if cuda:
            self.last["train/peak_memory_gib"] = float(
                ranks[:, 2].max()
            )  # the fullest device since the start
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last, step=trainer.global_step)
        self._restart(trainer, pl_module)
