"""What every recipe's LightningModule shares: AdamW + warmup schedule, token-weighted perplexity, and the class
name export needs. Subclasses own the model, the loss and their (explicit) arguments; what resuming exactly needs
lives in ``lmrecipes.resume.ExactResume``."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torchmetrics import SumMetric

from lmrecipes.optim import build_optimizer


class RecipeModule(pl.LightningModule):
    """Base for the recipes' modules; expects ``self.model`` and the optimisation keys in ``self.hparams``
    (``lr``, ``weight_decay``, ``betas``, ``eps``, ``lr_schedule``, ``warmup_steps``, ``min_lr_ratio``)."""

    def __init__(self) -> None:
        super().__init__()
        self.val_loss_sum, self.val_tokens = SumMetric(), SumMetric()

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
        h = self.hparams
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError(
                "the learning-rate schedule needs the number of optimizer steps: set trainer.max_steps, or "
                "data.pretokenize: true with trainer.max_epochs so the epochs are counted from the data "
                f"(streamed data has no length; Lightning estimated {total})"
            )
        optimizer, scheduler = build_optimizer(
            self.model, lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas), eps=h.eps,
            schedule=h.lr_schedule, warmup_steps=h.warmup_steps, total_steps=int(total), min_lr_ratio=h.min_lr_ratio,
        )  # fmt: skip
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Here, not in a callback: export needs the class of any RecipeModule checkpoint, also one written by a
        # plain Trainer without the CLI's callbacks, or with save_weights_only (which skips callbacks' hooks).
        from lmrecipes.export import record_class

        record_class(self, checkpoint, self.trainer)
