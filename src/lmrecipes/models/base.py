"""What every recipe's LightningModule shares: the training step, its loss normalised by the valid tokens
(rows) of the whole optimizer step on every rank, AdamW + warmup schedule, token-weighted perplexity, and
the class name export needs. Subclasses own the model, the loss (:meth:`RecipeModule.loss_sum`) and their
(explicit) arguments; what resuming exactly needs lives in ``lmrecipes.resume.ExactResume``."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torchmetrics import SumMetric

from lmrecipes.models.speed import allow_tf32
from lmrecipes.optim import OptimizerConfig, build_optimizer
from lmrecipes.ranks import max_over_ranks


class RecipeModule(pl.LightningModule):
    """Base for the recipes' modules; subclasses set ``self.model`` and define :meth:`loss_sum`."""

    def __init__(self, optimizer: OptimizerConfig | dict) -> None:
        super().__init__()
        self.optimizer_config = OptimizerConfig.of(optimizer)
        self.val_loss_sum, self.val_tokens = SumMetric(), SumMetric()
        # this rank's loss normaliser so far in the optimizer step
        self._step_norm: torch.Tensor | None = None
        # what the summed loss is divided by in the backward pass: fixed for the run (see training_step)
        self._grad_unit: float | None = None

    def setup(self, stage: str) -> None:
        allow_tf32(self.trainer.strategy.root_device)  # once per run, on the device it runs on; not at import

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
        # Worth the micro-batch's mean (logged, seen by callbacks) but carries the gradient of sum / unit, which
        # on_before_optimizer_step rescales to sum / (the normaliser of the whole step): a per-micro-batch mean
        # would weigh a micro-batch with few valid tokens like one with many. The unit is one constant for every
        # micro-batch and rank (the largest normaliser of the run's first micro-batch, kept in checkpoints), so the
        # rescaling is exact while gradients keep the size a mean gives them: a raw sum would make them thousands
        # of times larger, and an fp16 GradScaler would skip the first steps until its scale came down.
        if self._grad_unit is None:
            self._grad_unit = float(max(1, max_over_ranks(math.ceil(float(norm)), norm.device)))
        return mean + (total - total.detach()) / self._grad_unit

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradients hold sum / (unit * accumulate_grad_batches * world_size): Lightning divides each
        # micro-batch's loss by the second, DDP and FSDP average over ranks. Make them sum / (valid tokens or rows of
        # the whole step on every rank): the gradient of one big batch, as torchtitan normalises. Runs before
        # gradient clipping.
        if self._step_norm is None:
            return
        # A tensor all along, no float(): reading the step's normaliser on the host would wait for the GPU every
        # step. One multi-tensor multiply instead of one kernel launch per parameter.
        norm = self.trainer.strategy.reduce(self._step_norm, reduce_op="sum")
        self._step_norm = None
        step_size = self._grad_unit * self.trainer.accumulate_grad_batches * self.trainer.world_size
        scale = torch.where(norm > 0, step_size / norm.clamp(min=torch.finfo(norm.dtype).tiny), 0.0)
        # One multiply per gradient dtype, the fp32 scale cast for each group: under bf16-true (or with mixed
        # dtypes) no group's scale is rounded through another group's dtype.
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.parameters():
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for dtype, grads in by_dtype.items():
            torch._foreach_mul_(grads, scale.to(dtype))

    def configure_model(self) -> None:
        # --trainer.strategy fsdp2: shard each transformer block, then the model (a no-op under any other strategy)
        from lmrecipes.sharding import configure_sharding

        configure_sharding(self)

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
                "data.packing.pretokenize: true with trainer.max_epochs so the epochs are counted from the data "
                f"(streamed data has no length; Lightning estimated {total})"
            )
        optimizer, scheduler = build_optimizer(self.model, self.optimizer_config, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Here, not in a callback: export needs the class of any RecipeModule checkpoint, also one written by a
        # plain Trainer without the CLI's callbacks, or with save_weights_only (which skips callbacks' hooks).
        from lmrecipes.export import record_class

        record_class(self, checkpoint, self.trainer)
        checkpoint["lmrecipes"]["grad_unit"] = (
            self._grad_unit
        )  # a resumed run rounds its gradients the same way

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._grad_unit = checkpoint.get("lmrecipes", {}).get("grad_unit")
