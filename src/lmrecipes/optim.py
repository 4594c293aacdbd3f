"""AdamW parameter groups and warmup schedules counted in optimizer steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmrecipes.data.groups import Group

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimizerConfig(Group):
    """AdamW and its learning-rate schedule; the defaults are the Hugging Face Trainer's.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW decay, not applied to biases and norm weights.
        betas: AdamW betas.
        eps: AdamW epsilon.
        lr_schedule: ``linear``, ``cosine`` or ``constant`` after the warmup.
        warmup_steps: linear warmup from 0, in optimizer steps.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (``linear`` and ``cosine``).
    """

    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm-like modules: torch's norm layers and any class named like ``*LayerNorm``/``*RMSNorm``."""
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
    name = type(module).__name__
    return isinstance(module, norm_types) or name.endswith(("LayerNorm", "RMSNorm", "Norm"))


def split_decay_params(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of parameters with and without weight decay.

    No decay on every bias and on every weight of a normalisation layer, found by module type. The course and
    the book match the string ``"LayerNorm.weight"``, which misses GPT-2's ``ln_1``/``ln_2``/``ln_f`` and so
    decays them towards 0; matching by type does not depend on attribute names.
    """
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if param_name.endswith("bias") or is_norm_module(module):
                no_decay.add(full)
    # named_parameters() deduplicates tied weights (GPT-2's lm_head shares wte), so each tensor is listed once.
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n in names if n not in no_decay], [n for n in names if n in no_decay]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and (bias + norm) parameters with ``weight_decay=0``."""
    params = dict(model.named_parameters())
    decay, no_decay = split_decay_params(model)
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]


def warmup_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier for optimizer step ``s``: linear warmup to 1, then cosine/linear decay to ``min_lr_ratio``.

    Not ``transformers.get_scheduler``: its linear schedule has no ``min_lr_ratio`` floor and its cosine ones rise
    again after ``num_training_steps``; test_optim checks every step against it where the two agree."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r} is not one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"the schedule needs a positive number of optimizer steps, got {total_steps}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:  # same ramp as transformers' get_*_schedule_with_warmup
            return step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return multiplier


# Devices with torch's fused AdamW kernel (one kernel for every tensor of a group). torch >= 2.4 has a CPU one too,
# and it is what the Hugging Face Trainer picks by default ("adamw_torch_fused"): on CPU torch's own default is the
# per-tensor loop, which cost the tiny bench model more than its forward pass (scripts/bench_train.py profile).
FUSED_DEVICES = ("cuda", "cpu")


def adamw_kernel(params: list[torch.Tensor]) -> dict:
    """``fused=True`` when every parameter is on a device with the fused kernel, else torch's own default (the
    multi-tensor kernel where the device has one)."""
    devices = {p.device.type for p in params}
    if devices and devices <= set(FUSED_DEVICES):
        return {"fused": True}
    return {"foreach": None}


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, *, total_steps: int, fused: bool | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and a per-step LambdaLR; ``fused`` defaults to :func:`adamw_kernel`'s
    choice for the parameters' device (call it once the model is on its device: Lightning does)."""
    c = config
    groups = param_groups(model, c.weight_decay)
    params = [p for g in groups for p in g["params"]]
    kernel = adamw_kernel(params) if fused is None else {"fused": fused or None}
    optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, **kernel)
    lr_lambda = warmup_lambda(c.lr_schedule, c.warmup_steps, total_steps, c.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def sync_scheduler_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each group's LR to what the schedule gives at the restored step.

    A restored optimizer carries the LR of the run that saved it; when the resumed run's schedule differs
    (``max_steps`` extended, say), that stale LR would be used for one step before the scheduler steps again.
    """
    for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
