"""The masked-LM LightningModule: domain adaptation of a pretrained encoder (or MLM from scratch)."""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

from lmrecipes.losses import IGNORE_INDEX
from lmrecipes.models.base import RecipeModule
from lmrecipes.optim import OptimizerConfig
from lmrecipes.paths import resolve_pretrained

# course ch.7 §3: learning_rate=2e-5, weight_decay=0.01, the Trainer's linear schedule without warmup
DEFAULT_OPTIMIZER = OptimizerConfig(lr=2e-5, weight_decay=0.01)


def masked_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over labelled positions, their number); labels -100 elsewhere, no shift.
    Takes (B, T, V)/(B, T) or already-selected (N, V)/(N,)."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
    return loss, (labels != IGNORE_INDEX).sum()


def masked_logits(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels at the masked positions only, (N, V) and (N,).

    With 15 % masking, projecting every position onto a 30k vocabulary spends ~85 % of the head's FLOPs and most of
    the activation memory on positions without a label; the encoder runs once, the head only where it is needed.
    BERT-style (``cls``) and DistilBERT-style (``vocab_projector``) heads are supported; others get full logits.
    """
    keep = labels != IGNORE_INDEX  # (B, T)
    if hasattr(model, "cls") or hasattr(model, "vocab_projector"):
        hidden = model.base_model(input_ids=input_ids).last_hidden_state[keep]  # (N, H)
        if hasattr(model, "cls"):
            logits = model.cls(hidden)
        else:
            hidden = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
            logits = model.vocab_projector(hidden)
        return logits, labels[keep]  # (N, V), (N,)
    return model(input_ids=input_ids).logits[keep], labels[keep]


def build_masked_lm(*, pretrained: str | None, config: dict | None, vocab_size: int):
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    if pretrained:  # from_pretrained returns eval mode, which Lightning keeps: dropout would stay off
        return AutoModelForMaskedLM.from_pretrained(resolve_pretrained(pretrained)).train()
    return BertForMaskedLM(BertConfig(**{**(config or {}), "vocab_size": vocab_size}))


class MaskedLM(RecipeModule):
    """Masked LM (BERT/DistilBERT/MiniLM...); logs ``train/loss``, ``val/loss`` and ``val/ppl`` over masked tokens."""

    pipeline_task = "fill-mask"

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        config: dict | None = None,
        vocab_size: int = 30522,
        seq_len: int = 128,
        tokenizer_path: str | None = None,
        optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
    ):
        """
        Args:
            pretrained: folder, Hub id or ``package://module/folder`` of a masked-LM (or encoder) checkpoint; a
                checkpoint without an MLM head (a sentence encoder) gets a freshly initialised head.
            config: ``BertConfig`` keys for an MLM trained from scratch (when ``pretrained`` is None).
            vocab_size: linked from the tokenizer.
            seq_len: linked from the data (``chunk_size``); must fit the model's position embeddings.
            tokenizer_path: linked from the data; exported with the model.
            optimizer: AdamW and its schedule (default: the course's, ch.7 §3).
        """
        super().__init__(optimizer)
        # checkpoints' hyper-parameters hold plain types only (weights_only loading): the optimizer as a dict
        optimizer = asdict(self.optimizer_config)
        self.save_hyperparameters()
        self.model = build_masked_lm(pretrained=pretrained, config=config, vocab_size=vocab_size)
        cfg = self.model.config
        if vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but the model's vocabulary has {cfg.vocab_size}"
            )
        if seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"data.chunking.chunk_size={seq_len} exceeds the model's maximum length {cfg.max_position_embeddings}"
            )

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_lm_loss_sum(*masked_logits(self.model, batch["input_ids"], batch["labels"]))
