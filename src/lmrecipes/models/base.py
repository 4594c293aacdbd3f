"""What every recipe's LightningModule shares: AdamW + warmup schedule, LR resync on resume, token-weighted
perplexity, and the metadata export needs. Subclasses own the model, the loss and their (explicit) arguments."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torchmetrics import SumMetric

from lmrecipes.optim import build_optimizer, sync_scheduler_lr


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
                "the learning-rate schedule needs the number of optimizer steps: set trainer.max_steps "
                f"(streamed data has no length; Lightning estimated {total})"
            )
        optimizer, scheduler = build_optimizer(
            self.model, lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas), eps=h.eps,
            schedule=h.lr_schedule, warmup_steps=h.warmup_steps, total_steps=int(total), min_lr_ratio=h.min_lr_ratio,
        )  # fmt: skip
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        for config in self.trainer.lr_scheduler_configs:
            sync_scheduler_lr(config.scheduler)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from lmrecipes.export import record_class

        record_class(self, checkpoint)
