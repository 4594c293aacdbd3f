"""TokenThroughput's FLOPs come from each batch's shape, never from an assumed sequence length."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lmrecipes.callbacks import TokenThroughput, transformer_flops_per_token
from lmrecipes.models.clm import CausalLM


def test_flops_per_batch_follow_each_batchs_length():
    model = CausalLM(config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}, vocab_size=32,
                     bos_token_id=0, eos_token_id=0, seq_len=64, optimizer={"warmup_steps": 0})  # fmt: skip
    shapes = [(4, 8), (2, 24), (3, 16)]  # (B, T): none is the module's seq_len, nor 1,024
    batches = [{"input_ids": torch.zeros(shape, dtype=torch.long)} for shape in shapes]
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(module.flops_per_batch)

    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[TokenThroughput(window_size=2), Record()])  # fmt: skip
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    expected = [int(transformer_flops_per_token(model.model, t) * b * t) for b, t in shapes]
    assert seen == expected
    params = sum(p.numel() for p in model.model.parameters())
    assert expected[0] == int((6 * params + 12 * 1 * 16 * 8) * 4 * 8)  # PaLM's formula, by hand
