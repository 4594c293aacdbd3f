"""Callbacks: data statistics, epochs counted from the data, the end-of-run report (export + sample), prediction
writing. Token throughput and MFU: ``lmrecipes.throughput``."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lmrecipes.data.position import windows_done
from lmrecipes.ranks import gather_from_ranks


class DataStats(pl.Callback):
    """Logs the DataModule's ``data_stats()`` (documents kept, tokens tokenized, packed fraction) every N steps."""

    def __init__(self, *, every_n_steps: int = 50):
        """
        Args:
            every_n_steps: optimizer steps between logs.
        """
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats_fn = getattr(trainer.datamodule, "data_stats", None)
        if stats_fn is None or trainer.global_step % self.every_n_steps:
            return
        stats = stats_fn()
        if stats:
            pl_module.log_dict({k: float(v) for k, v in stats.items()}, reduce_fx="sum")


class EpochsFromData(pl.Callback):
    """``trainer.max_epochs`` over an endless stream of pre-tokenized windows (the course's "one epoch"): sets
    ``max_steps`` to those epochs' optimizer steps, counted from the data, before the schedule is built.

    Lightning cannot count an iterable loader (``estimated_stepping_batches`` would be ``max_steps`` = -1, a
    silently wrong schedule); the DataModule's ``batches_per_epoch()`` can, once the token file exists.
    """

    steps: int | None = None  # the max_steps it set

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        count = getattr(trainer.datamodule, "batches_per_epoch", None)
        if stage != "fit" or count is None or trainer.max_steps != -1 or trainer.max_epochs in (None, -1):
            return
        batches = count()
        if batches is None:
            return  # streamed: RecipeModule.configure_optimizers asks for max_steps
        steps = trainer.max_epochs * batches // trainer.accumulate_grad_batches
        if steps < 1:
            raise ValueError(
                f"{trainer.max_epochs} epoch(s) of {batches} batches per rank make no optimizer step with "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}; add data or lower batch_size"
            )
        trainer.fit_loop.epoch_loop.max_steps = steps  # what Trainer(max_steps=...) sets; no public setter
        self.steps = steps
        rank_zero_info(
            f"max_epochs={trainer.max_epochs}: {batches:,} batches per rank per epoch -> max_steps={steps:,}"
        )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        """Resumed on another number of processes: the steps already done were steps of the old world, so the
        steps left are counted from the windows left (else a 2 -> 1 resize would train half the data twice)."""
        dm = trainer.datamodule
        state = checkpoint.get(type(dm).__qualname__) if dm is not None else None
        if self.steps is None or not state or not state.get("ranks"):
            return
        old_world, saved = len(state["ranks"]), state["ranks"][0]
        if old_world == trainer.world_size and not saved.get("base"):
            return  # never resized: every step so far was a step of this world size
        batch_size, accumulate = dm.loader.batch_size, trainer.accumulate_grad_batches
        windows = dm.batches_per_epoch() * batch_size * trainer.world_size  # windows of one epoch, all ranks
        done = windows_done(base=saved.get("base", 0), consumed=saved["consumed"], world_size=old_world,
                            batch_size=batch_size)  # fmt: skip
        left = max(0, trainer.max_epochs * windows - done)
        steps = checkpoint["global_step"] + math.ceil(left / (trainer.world_size * batch_size * accumulate))
        trainer.fit_loop.epoch_loop.max_steps = self.steps = steps
        rank_zero_info(
            f"max_epochs={trainer.max_epochs} resumed on {trainer.world_size} processes (saved by {old_world}): "
            f"{done:,} of {trainer.max_epochs * windows:,} windows done -> max_steps={steps:,}"
            + ("; the learning-rate schedule keeps the length it was built with"
               if trainer.strategy.restore_checkpoint_after_setup else "")
        )  # fmt: skip


@torch.no_grad()
def evaluate_loss(pl_module: pl.LightningModule, dataloader, max_batches: int | None = None) -> float:
    """Token-weighted mean validation loss over (the first ``max_batches`` of) ``dataloader`` on this rank."""
    was_training = pl_module.training
    pl_module.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(pl_module.device) for k, v in batch.items()}
        loss_sum, n = pl_module.eval_loss_sum(batch)
        total += loss_sum.double().cpu()
        count += int(n)
    pl_module.train(was_training)
    return float(total / max(1, count))


class RecipeReport(pl.Callback):
    """The offline demo's report: perplexity before/after training, export, and a sample completion."""

    def __init__(
        self,
        *,
        export_dir: str | None = None,
        export: bool = True,
        prompts: list[str] | None = None,
        max_new_tokens: int = 48,
        max_batches: int | None = None,
    ):
        """
        Args:
            export_dir: export the trained model here at the end of fit (default: ``export`` in the run folder,
                ``trainer.default_root_dir``).
            export: export (and complete the prompts) at all.
            prompts: prompts to complete with the exported model.
            max_new_tokens: tokens per completion.
            max_batches: validation batches for the before/after perplexity (default: trainer.limit_val_batches
                when it is a count, else all).
        """
        self.max_batches = max_batches
        self.export_dir, self.export = export_dir, export
        self.prompts = prompts or []
        self.max_new_tokens = max_new_tokens
        self.before: float | None = None
        self.start_step = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.export and self.export_dir is None:
            self.export_dir = str(Path(trainer.default_root_dir) / "export")

    def on_train_start(self, trainer, pl_module) -> None:
        # Not on_fit_start: a resumed run's step is restored only after it (it would call step 0 "before training").
        if trainer.datamodule is not None and self._limit(trainer) != 0:
            self.start_step = trainer.global_step
            self.before = evaluate_loss(pl_module, trainer.datamodule.val_dataloader(), self._limit(trainer))

    def on_fit_end(self, trainer, pl_module) -> None:
        from lmrecipes.sharding import unsharded_module

        pl_module = unsharded_module(pl_module)  # FSDP2: every rank gathers the shards, rank 0 gets the model
        if not trainer.is_global_zero:
            return
        lines = []
        if self._limit(trainer) != 0:
            after = evaluate_loss(pl_module, trainer.datamodule.val_dataloader(), self._limit(trainer))
            lines.append(
                f"validation perplexity after {trainer.global_step} steps: {math.exp(after):.2f} "
                f"(loss {after:.4f})"
            )
        if self.before is not None:
            lines.insert(
                0,
                f"validation perplexity {self._start_label()}: {math.exp(self.before):.2f} "
                f"(loss {self.before:.4f})",
            )
        if self.export:
            lines += self._export_and_sample(trainer, pl_module)
        rank_zero_info("\n".join(["", "=" * 72, *lines, "=" * 72]))

    def _start_label(self) -> str:
        return "before training" if self.start_step == 0 else f"at step {self.start_step} (resumed)"

    def _limit(self, trainer) -> int | None:
        if self.max_batches is not None:
            return self.max_batches
        limit = trainer.limit_val_batches
        return limit if isinstance(limit, int) else None

    def _export_and_sample(self, trainer, pl_module) -> list[str]:
        from lmrecipes.curves import run_curves
        from lmrecipes.export import fill_mask, generate, model_card, record_class, save_hf_folder

        out = Path(self.export_dir)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = {
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "hyper_parameters": dict(pl_module.hparams),
            "datamodule_hyper_parameters": dict(trainer.datamodule.hparams),
        }
        record_class(pl_module, checkpoint, trainer)
        save_hf_folder(pl_module, out, card=model_card(checkpoint), curves=run_curves(checkpoint))
        lines = [f"exported the model to {out}"]
        if getattr(pl_module, "pipeline_task", "text-generation") == "fill-mask":
            for prompt, predictions in zip(self.prompts, fill_mask(str(out), self.prompts)):
                lines += [f"--- {prompt!r}:"] + [
                    f"{p['token_str']!r:>16}  {p['score']:.3f}" for p in predictions
                ]
            return lines
        for prompt, completions in zip(
            self.prompts, generate(str(out), self.prompts, max_new_tokens=self.max_new_tokens)
        ):
            lines += [f"--- completion of {prompt!r}:", prompt + completions[0]]
        return lines


class PredictionWriter(BasePredictionWriter):
    """``lmrecipes predict`` output: one row per input, in input order — id, predicted label name, probabilities.

    Each rank predicts its share; rank 0 gathers, orders by row and writes ``.jsonl`` or ``.csv`` (by suffix),
    through a temporary file so an interrupted run never leaves a truncated file behind.
    """

    def __init__(self, *, output: str | None = None):
        """
        Args:
            output: file to write, ``.jsonl`` or ``.csv`` (default: ``predictions.jsonl`` in the run folder,
                ``trainer.default_root_dir``).
        """
        super().__init__(write_interval="epoch")
        if output is not None and not output.endswith((".jsonl", ".csv")):
            raise ValueError(f"PredictionWriter output={output!r} must end in .jsonl or .csv")
        self.output = None if output is None else Path(output)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.output is None:
            self.output = Path(trainer.default_root_dir) / "predictions.jsonl"

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = {int(i): p.tolist() for batch in predictions for i, p in zip(batch["index"], batch["probs"])}
        rows = {k: v for part in gather_from_ranks(rows) for k, v in part.items()}
        if trainer.is_global_zero:
            id2label = pl_module.model.config.id2label  # the names export writes; hparams may lack them
            names = [id2label[i] for i in range(len(id2label))]
            self._write(rows, trainer.datamodule.prediction_ids(), names)

    def _write(self, rows: dict[int, list[float]], ids: list, names: list[str]) -> None:
        import csv
        import json

        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output.with_name(self.output.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f) if self.output.suffix == ".csv" else None
            if writer:
                writer.writerow(["id", "label", *[f"prob_{n}" for n in names]])
            for i in sorted(rows):
                probs = rows[i]
                label = names[max(range(len(probs)), key=probs.__getitem__)]
                if writer:
                    writer.writerow([ids[i], label, *[f"{p:.6f}" for p in probs]])
                else:
                    f.write(
                        json.dumps({"id": ids[i], "label": label, "probs": dict(zip(names, probs))}) + "\n"
                    )
        tmp.replace(self.output)
        rank_zero_info(f"wrote {len(rows):,} predictions to {self.output}")
