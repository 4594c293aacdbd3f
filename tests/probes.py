"""Callbacks the tests inject into real ``lmrecipes fit`` runs (class paths in a config) to see inside them."""

from __future__ import annotations

import hashlib
import json

import torch
from lightning.pytorch.callbacks import Callback

IGNORE_INDEX = -100


class RowLog(Callback):
    """One JSON line per row a rank trains on (padding draws left out): a hash of its tokens and label."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        rows = []
        for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            if int(label) == IGNORE_INDEX:
                continue  # a padding draw of the last global batch: it counts for nothing
            tokens = ids[mask.bool()].tolist() + [int(label)]
            rows.append(hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16])
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write("".join(json.dumps({"step": trainer.global_step, "row": r}) + "\n" for r in rows))


class FullStateDump(Callback):
    """When training starts (a checkpoint restored), rank 0 saves the full, unsharded model weights and first
    optimizer's per-parameter states (keys ``<parameter>.<state>``), gathered from every rank."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(pl_module, options=options)  # collectives: every rank calls
        optimizer = get_optimizer_state_dict(pl_module, trainer.optimizers[0], options=options)
        if trainer.is_global_zero:
            states = {f"{p}.{k}": v for p, s in optimizer["state"].items() for k, v in s.items()}
            torch.save({"model": model, "optimizer": states}, self.path)
