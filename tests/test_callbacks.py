"""TokenThroughput's FLOPs come from each batch's shape, never from an assumed sequence length; the FLOPs formula
and the peak table checked by hand; MFU logged against the device's peak."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmrecipes.flops import matmul_params, peak_flops, transformer_flops_per_token
from lmrecipes.models.clm import CausalLM
from lmrecipes.throughput import TokenThroughput

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}


def tiny_module() -> CausalLM:
    return CausalLM(config=TINY, vocab_size=32, bos_token_id=0, eos_token_id=0, seq_len=64,
                    optimizer={"warmup_steps": 0})  # fmt: skip


def fit(module, batches, callbacks, **trainer_args) -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, **trainer_args)  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))


def test_flops_per_batch_follow_each_batchs_length():
    model = tiny_module()
    shapes = [(4, 8), (2, 24), (3, 16)]  # (B, T): none is the module's seq_len, nor 1,024
    batches = [{"input_ids": torch.zeros(shape, dtype=torch.long)} for shape in shapes]
    seen, throughput = [], TokenThroughput(every_n_steps=2)

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(throughput.flops_per_batch)

    fit(model, batches, [throughput, Record()], max_steps=3)
    expected = [int(transformer_flops_per_token(model.model, t) * b * t) for b, t in shapes]
    assert seen == expected
    # PaLM's formula by hand: 6 N + 12 L H Q T, N without the 64 x 16 position table
    params = sum(p.numel() for p in model.model.parameters()) - 64 * 16
    assert expected[0] == int((6 * params + 12 * 1 * 16 * 8) * 4 * 8)


def test_gpt2_124m_flops_per_token_worked_example():
    with torch.device("meta"):  # the shape is all the formula needs
        model = GPT2LMHeadModel(GPT2Config())
    # V d (tied wte / lm_head) + L (12 d^2 + 13 d) + 2 d (ln_f); the 1,024 x 768 position table does no matmul
    n = 50257 * 768 + 12 * (12 * 768**2 + 13 * 768) + 2 * 768
    assert n == 123_653_376 == matmul_params(model)
    # 6 N = 741,920,256 and 12 L H Q T = 12 x 12 x 768 x 1024 = 113,246,208
    assert transformer_flops_per_token(model, 1024) == 855_166_464
    assert transformer_flops_per_token(model, 128) == 741_920_256 + 12 * 12 * 768 * 128


@pytest.mark.parametrize(
    ("name", "tflops"),
    [("NVIDIA H200", 989), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
     ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
     ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("NVIDIA A10G", 125), ("NVIDIA RTX A6000", 154.8),
     ("NVIDIA GeForce RTX 4090", 165.2), ("Tesla V100-SXM2-16GB", 125), ("Tesla V100-PCIE-32GB", 112),
     ("Tesla T4", 65), ("NVIDIA GeForce GTX 1080", None)],
)  # fmt: skip
def test_peak_table_matches_torch_device_names(name, tflops):
    assert peak_flops(name) == (None if tflops is None else tflops * 1e12)


def test_mfu_is_tokens_times_flops_over_the_peak_and_cpu_alone_logs_none():
    batches = [{"input_ids": torch.randint(0, 32, (2, 16))} for _ in range(6)]
    given = TokenThroughput(every_n_steps=2, peak_flops=1e9)
    fit(tiny_module(), batches, [given], max_steps=6)
    per_token = transformer_flops_per_token(tiny_module().model, 16)
    rate = given.last["train/tokens_per_sec"]
    assert rate > 0 and given.last["train/tokens_per_sec_per_device"] == rate  # one rank
    assert given.last["train/mfu"] == pytest.approx(rate * per_token / 1e9, rel=1e-5)
    assert given.last["train/mfu_min"] == given.last["train/mfu"]
    unknown = TokenThroughput(every_n_steps=2)  # a CPU has no peak: tokens/s only, and no warning
    fit(tiny_module(), batches, [unknown], max_steps=6)
    assert "train/tokens_per_sec" in unknown.last and "train/mfu" not in unknown.last


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"peak_flops": -1.0}])
def test_throughput_arguments_are_checked(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TokenThroughput(**kwargs)
