"""The sequence(-pair) classification LightningModule: a pretrained encoder with a classification head."""

from __future__ import annotations

from dataclasses import asdict

import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import Accuracy, F1Score

from lmrecipes.losses import IGNORE_INDEX, classification_loss_sum
from lmrecipes.models.base import RecipeModule
from lmrecipes.optim import OptimizerConfig
from lmrecipes.paths import resolve_pretrained

LOSSES = ("ce", "weighted_ce")
# course ch.3 §3: the Trainer's defaults (learning_rate=5e-5, weight_decay=0, linear schedule, no warmup)
DEFAULT_OPTIMIZER = OptimizerConfig()


class SequenceClassifier(RecipeModule):
    """``AutoModelForSequenceClassification``; logs loss, accuracy and F1 (binary for 2 classes, else macro)."""

    pipeline_task = "text-classification"

    def __init__(
        self,
        *,
        pretrained: str,
        num_labels: int = 2,
        label_names: list[str] | None = None,
        tokenizer_path: str | None = None,
        loss: str = "ce",
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
    ):
        """
        Args:
            pretrained: folder (e.g. one exported by the MLM recipe), Hub id or ``package://module/folder``.
            num_labels: linked from the data.
            label_names: linked from the data; saved as the exported model's id2label / label2id.
            tokenizer_path: linked from the data; exported with the model.
            loss: ``ce`` or ``weighted_ce`` (``class_weights`` per class).
            class_weights: one weight per class for ``weighted_ce``.
            label_smoothing: cross-entropy label smoothing.
            optimizer: AdamW and its schedule (default: the course's, ch.3 §3).
        """
        super().__init__(optimizer)
        # checkpoints' hyper-parameters hold plain types only (weights_only loading): the optimizer as a dict
        optimizer = asdict(self.optimizer_config)
        self.save_hyperparameters()
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r} is not one of {LOSSES}")
        names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
        if len(names) != num_labels:
            raise ValueError(f"model.label_names has {len(names)} names for num_labels={num_labels}")
        weights = None
        if loss == "weighted_ce":
            if not class_weights or len(class_weights) != num_labels:
                raise ValueError(
                    f"loss=weighted_ce needs model.class_weights with {num_labels} values, got {class_weights}"
                )
            weights = torch.tensor(class_weights, dtype=torch.float)
        self.register_buffer("class_weights", weights, persistent=False)
        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(
            resolve_pretrained(pretrained), num_labels=num_labels,
            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        )  # fmt: skip
        # from_pretrained returns eval mode and Lightning keeps each module's mode: dropout would stay off in fit.
        self.model.train()
        task = {"task": "binary"} if num_labels == 2 else {"task": "multiclass", "num_classes": num_labels}
        f1 = {} if num_labels == 2 else {"average": "macro"}
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric(**task, **(f1 if name == "f1" else {}))
            for stage in ("val", "test") for name, metric in (("acc", Accuracy), ("f1", F1Score))
        })  # fmt: skip
        # Not self.log(sync_dist=True): Lightning's synced mean floor-divides the integer count of rows by the
        # world size, so ranks holding 33 + 32 rows give a wrong val/loss. MeanMetric syncs float sums exactly.
        self.metrics.update({f"{stage}_loss": MeanMetric() for stage in ("val", "test")})

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.model(**inputs).logits  # (B, C)

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return classification_loss_sum(self(batch), batch["labels"], class_weights=self.class_weights,
                                       label_smoothing=self.hparams.label_smoothing)  # fmt: skip

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the batch's valid rows, their weight); padding rows (label -100) count for nothing, and
        a batch of nothing but padding (the epoch's last, so every DDP rank steps) gives a zero loss."""
        total, norm = classification_loss_sum(logits, labels, class_weights=self.class_weights,
                                               label_smoothing=self.hparams.label_smoothing)  # fmt: skip
        return total / norm.clamp(min=torch.finfo(total.dtype).tiny), norm

    def _evaluate(self, batch: dict, stage: str) -> None:
        logits, labels = self(batch), batch["labels"]  # (B, C), (B,)
        keep = labels != IGNORE_INDEX
        # a mean over the rows' (class) weights: weigh it by their sum
        loss, weight = self._loss(logits, labels)
        self.metrics[f"{stage}_loss"].update(loss, weight)
        self.log(f"{stage}/loss", self.metrics[f"{stage}_loss"])
        preds = logits.argmax(-1)[keep]
        for name in ("acc", "f1"):
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(preds, labels[keep])
            self.log(f"{stage}/{name}", metric, prog_bar=name == "acc")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:  # no perplexity here; torchmetrics objects sync themselves
        pass

    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"index": batch["index"], "probs": self(batch).float().softmax(-1)}
