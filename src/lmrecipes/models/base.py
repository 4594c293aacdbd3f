"""What every recipe's LightningModule shares: the training step, its loss normalised by the valid tokens (rows) of
the whole optimizer step on every rank, AdamW + warmup schedule, LR resync on resume, token-weighted perplexity,
every rank's RNG states in checkpoints, two Lightning resume fixes, and the metadata export needs. Subclasses own
the model, the loss (:meth:`RecipeModule.loss_sum`) and their (explicit) arguments."""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics import SumMetric

from lmrecipes.checkpoints import check_same_resume, rng_state, set_rng_state
from lmrecipes.optim import OptimizerConfig, build_optimizer, sync_scheduler_lr
from lmrecipes.ranks import gather_from_ranks


class RecipeModule(pl.LightningModule):
    """Base for the recipes' modules; subclasses set ``self.model`` and define :meth:`loss_sum`."""

    def __init__(self, optimizer: OptimizerConfig | dict) -> None:
        super().__init__()
        self.optimizer_config = OptimizerConfig.of(optimizer)
        self.val_loss_sum, self.val_tokens = SumMetric(), SumMetric()
        self._rng_to_restore: dict | None = None
        # this rank's loss normaliser so far in the optimizer step
        self._step_norm: torch.Tensor | None = None

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(the training loss summed over the batch's tokens or rows, its normaliser: their number or weight)."""
        raise NotImplementedError

    def eval_loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, token count) behind ``val/loss`` and ``val/ppl``: the training loss unless overridden."""
        return self.loss_sum(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, norm = self.loss_sum(batch)
        norm = norm.detach().to(total.dtype)
        self._step_norm = norm if self._step_norm is None else self._step_norm + norm
        mean = total.detach() / norm.clamp(min=torch.finfo(total.dtype).tiny)  # 0 for a batch of padding only
        self.log("train/loss", mean, prog_bar=True)
        # Worth the micro-batch's mean (logged, seen by callbacks) but carries the gradient of the sum, which
        # on_before_optimizer_step divides by the normaliser of the whole step: a per-micro-batch mean would weigh
        # a micro-batch with few valid tokens like one with many.
        return mean + (total - total.detach())

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradients hold sum / (accumulate_grad_batches * world_size): Lightning divides each micro-batch's loss
        # by the first, DDP and FSDP average over ranks. Make them sum / (valid tokens or rows of the whole step on
        # every rank): the gradient of one big batch, as torchtitan normalises. Runs before gradient clipping.
        if self._step_norm is None:
            return
        norm = float(self.trainer.strategy.reduce(self._step_norm, reduce_op="sum"))
        self._step_norm = None
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / norm if norm > 0 else 0.0
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.update_eval_loss(*self.eval_loss_sum(batch))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.update_eval_loss(*self.eval_loss_sum(batch))

    def update_eval_loss(self, loss_sum: torch.Tensor, count: torch.Tensor) -> None:
        """Accumulate a batch's summed token loss and token count (synced over ranks at epoch end)."""
        self.val_loss_sum.update(loss_sum)
        self.val_tokens.update(count)

    def on_validation_epoch_end(self) -> None:
        # Synced sums over every batch of every rank: the token-weighted mean, not a mean of batch means.
        loss = (self.val_loss_sum.compute() / self.val_tokens.compute().clamp(min=1)).item()
        self.val_loss_sum.reset()
        self.val_tokens.reset()
        self.log_dict({"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}, prog_bar=True)

    on_test_epoch_end = on_validation_epoch_end

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError(
                "the learning-rate schedule needs the number of optimizer steps: set trainer.max_steps, or "
                "data.pretokenize: true with trainer.max_epochs so the epochs are counted from the data "
                f"(streamed data has no length; Lightning estimated {total})"
            )
        optimizer, scheduler = build_optimizer(self.model, self.optimizer_config, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            check_same_resume(getattr(self.trainer, "lmrecipes_resume_from", None))

    def on_train_start(self) -> None:
        for config in self.trainer.lr_scheduler_configs:
            sync_scheduler_lr(config.scheduler)
        # Lightning 2.6 does not restore ModelCheckpoint's last saved step, so after resuming at step s (a multiple
        # of every_n_train_steps) with gradient accumulation it saves again after the first micro-batch, in the
        # middle of an accumulation window: that checkpoint has lost the micro-batch's gradient and does not
        # resume exactly. The step we resumed from is saved already.
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and self.trainer.global_step > 0:
                callback._last_global_step_saved = self.trainer.global_step
        # Lightning 2.6, resuming from a checkpoint written once an epoch's batches were all trained: it starts the
        # next epoch but keeps the old batch count, runs one batch as that epoch's last and steps the optimizer on
        # it alone, shifting every gradient accumulation window after it. Start the epoch's count afresh.
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current
        if (
            math.isfinite(self.trainer.num_training_batches)
            and batches.completed >= self.trainer.num_training_batches
        ):
            batches.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from lmrecipes.export import record_class

        record_class(self, checkpoint)
        # Every rank's generators (dropout differs per rank once they diverge), not only rank 0's.
        checkpoint["lmrecipes"]["rng"] = gather_from_ranks(rng_state())
        checkpoint["lmrecipes"]["seed"] = os.environ.get("PL_GLOBAL_SEED")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("lmrecipes", {}).get("rng")
        if states is None or self._trainer is None:  # no trainer: loaded for export, nothing to resume
            return
        world = self.trainer.world_size
        saved_seed, seed = checkpoint["lmrecipes"].get("seed"), os.environ.get("PL_GLOBAL_SEED")
        if saved_seed != seed:
            rank_zero_warn(
                f"seed_everything changed from {saved_seed} to {seed} since the checkpoint was written; the "
                "checkpoint's RNG states are restored, so training continues as the original run would have"
            )
        if len(states) != world:
            rank_zero_warn(
                f"the checkpoint holds RNG states for {len(states)} ranks, this run has {world}: "
                "dropout draws continue from this run's seed instead"
            )
            return
        self._rng_to_restore = states[self.trainer.global_rank]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Restored right before the first step after resuming: the uninterrupted run drew nothing from the global
        # generators between its save and this step (the DataModules give every DataLoader its own generator).
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
