"""Pure loss functions: tensors in, tensor out.

Convention for causal LM: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; the functions shift internally, so
callers pass the unshifted batch. Positions whose label is ``ignore_index`` (-100) carry no loss and do not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy, shape (B, T-1); 0 where the shifted label is ignored."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )  # (B*(T-1),)
    return losses.view(shift_labels.shape)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of valid tokens) so callers can normalise over batches and ranks.

    Shifts the labels, not the logits: ``logits[:, :-1]`` is not contiguous, so flattening it copied the whole
    (B, T, V) tensor in forward and again in backward (a profile of scripts/bench_train.py); the last position
    gets label ``ignore_index`` instead."""
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),  # (B*T, V): a view of contiguous fp32 logits
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (shift_labels != IGNORE_INDEX).sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over valid tokens (what ``GPT2LMHeadModel(labels=...)`` returns)."""
    total, count = causal_lm_loss_sum(logits, labels)
    return total / count.clamp(min=1)


def keytoken_weights(input_ids: torch.Tensor, keytoken_ids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Per-sample weight ``alpha * (1 + number of key tokens in the sample)``, shape (B,)."""
    hits = torch.isin(input_ids, keytoken_ids).sum(dim=1)  # (B,)
    return alpha * (1.0 + hits.float())


def keytoken_weighted_loss_sum(
    input_ids: torch.Tensor,
    logits: torch.Tensor,
    keytoken_ids: torch.Tensor,
    *,
    alpha: float = 1.0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted per-sample losses, its normaliser) of the HF course's (ch.7 §6) key-token weighted loss.

    Each sample's mean token loss is weighted by ``alpha * (1 + #key tokens in the sample)``, key tokens counted
    over the whole input as the course does. ``normalize=False`` is the course's formula exactly:
    ``mean(loss_per_sample * weights)`` (normaliser: the number of samples), whose scale grows with keyword
    density, so the effective learning rate moves with the data. ``normalize=True`` (our default) divides by
    ``sum(weights)`` instead, which keeps the loss a weighted mean of per-sample losses (equal to plain
    cross-entropy when no key token occurs). Uses ``input_ids`` as labels (packed data has no padding).
    """
    losses = causal_lm_token_losses(logits, input_ids)  # (B, T-1)
    valid = (input_ids[:, 1:] != IGNORE_INDEX).float()  # (B, T-1)
    loss_per_sample = losses.sum(dim=1) / valid.sum(dim=1).clamp(min=1)  # (B,)
    weights = keytoken_weights(input_ids, keytoken_ids, alpha)  # (B,)
    total = (loss_per_sample * weights).sum()
    return total, weights.sum() if normalize else torch.tensor(float(len(weights)), device=total.device)


def keytoken_weighted_loss(
    input_ids: torch.Tensor,
    logits: torch.Tensor,
    keytoken_ids: torch.Tensor,
    *,
    alpha: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """The course's key-token weighted loss over one batch: :func:`keytoken_weighted_loss_sum`'s ratio."""
    total, norm = keytoken_weighted_loss_sum(
        input_ids, logits, keytoken_ids, alpha=alpha, normalize=normalize
    )
    return total / norm


def classification_loss_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, its normaliser): the number of valid rows, or the sum of their class weights.

    ``sum / normaliser`` is ``F.cross_entropy``'s mean; a batch with no valid row (all padding) gives (0, 0), so
    callers divide with a clamp instead of special-casing it and get a zero loss with zero gradients."""
    total = F.cross_entropy(logits.float(), labels, weight=class_weights, ignore_index=IGNORE_INDEX,
                            label_smoothing=label_smoothing, reduction="sum")  # fmt: skip
    valid = labels != IGNORE_INDEX  # (B,)
    if class_weights is None:
        return total, valid.sum().to(total.dtype)
    return total, (class_weights[labels.clamp(min=0)] * valid).sum()
