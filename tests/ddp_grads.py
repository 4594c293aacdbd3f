"""Run by test_grad_accumulation: one optimizer step of its tiny MLM on 2 DDP processes (batch 8 each, rows
split by Lightning's DistributedSampler: even rows to rank 0, odd to rank 1); rank 0 saves the gradients."""

import sys

import lightning.pytorch as pl
import torch
from test_grad_accumulation import make_mlm, mlm_rows
from torch.utils.data import DataLoader

if __name__ == "__main__":
    module = make_mlm()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(mlm_rows(), batch_size=8))
    if trainer.global_rank == 0:
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        torch.save(grads, sys.argv[1])
