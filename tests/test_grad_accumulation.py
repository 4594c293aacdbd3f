"""Gradient accumulation gives the big batch's gradient, for every recipe (torchtitan's rule).

Each recipe's training loss is summed over tokens (rows) and divided by the number of valid tokens (rows, or their
weights) in the whole optimizer step, so 2 micro-batches of 8 give the gradient of one batch of 16 even when the
micro-batches hold different numbers of valid tokens (masked positions, padding rows, key-token weights)."""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lmrecipes.losses import IGNORE_INDEX

ROWS, T, VOCAB = 16, 12, 100


def step_grads(make_module, rows: list[dict], batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    """The gradients of one optimizer step of a real Trainer (left on the parameters after the step)."""
    module = make_module()
    trainer = pl.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=batch_size))
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_accumulation_matches_big_batch(make_module, rows: list[dict]) -> float:
    big = step_grads(make_module, rows, batch_size=ROWS, accumulate=1)
    accumulated = step_grads(make_module, rows, batch_size=ROWS // 2, accumulate=2)
    assert sorted(big) == sorted(accumulated) and len(big) > 10
    assert all(g.abs().sum() > 0 for g in big.values() if g.dim() > 1)
    worst = max(float((big[n] - accumulated[n]).abs().max()) for n in big)
    print(f"max |grad(16) - grad(2 x 8)| = {worst:.2e}")
    assert worst < 1e-6
    return worst


def ids(generator: torch.Generator, rows: int = ROWS) -> torch.Tensor:
    return torch.randint(5, VOCAB, (rows, T), generator=generator)  # (R, T)


@pytest.mark.parametrize("loss", ["ce", "keytoken", "keytoken_course"])
def test_causal_lm_accumulation_is_the_big_batch(tiny_bert, loss):
    from transformers import AutoTokenizer

    from lmrecipes.models.clm import CausalLM

    tokenizer_dir = str(tiny_bert[0])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    keys = tokenizer.convert_tokens_to_ids(["the", "of"])
    input_ids = ids(torch.Generator().manual_seed(0))  # (16, T)
    # key tokens crowd the first micro-batch: its weights differ from the second's
    input_ids[:8, ::2] = keys[0]
    input_ids[8:12, 1] = keys[1]

    def make():
        torch.manual_seed(0)
        config = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32,
                  "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip
        return CausalLM(config=config, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, seq_len=T,
                        tokenizer_path=tokenizer_dir, loss=loss, keytokens=["the", "of"])  # fmt: skip

    assert_accumulation_matches_big_batch(make, [{"input_ids": r} for r in input_ids])


def mlm_rows() -> list[dict]:
    """Even rows hold 6 masked positions, odd rows 1: micro-batches (and DDP ranks) of unequal weight."""
    input_ids = ids(torch.Generator().manual_seed(1))  # (16, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[::2, :6] = input_ids[::2, :6]
    labels[:8, 6] = input_ids[:8, 6]  # and the first micro-batch a few more
    labels[1::2, 3] = input_ids[1::2, 3]
    input_ids[labels != IGNORE_INDEX] = 4  # [MASK]
    return [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels)]


def make_mlm():
    from lmrecipes.models.mlm import MaskedLM

    torch.manual_seed(0)
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 32, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # fmt: skip
    return MaskedLM(config=config, vocab_size=VOCAB, seq_len=T)


def test_masked_lm_accumulation_is_the_big_batch():
    assert_accumulation_matches_big_batch(make_mlm, mlm_rows())


@pytest.mark.slow
def test_masked_lm_on_two_ddp_processes_is_the_big_batch(tmp_path):
    """2 processes x batch 8 (rank 0 with 6-7 masked positions per row, rank 1 with 1-2) give batch 16's gradient."""
    out = tmp_path / "grads.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = Path(__file__).with_name("ddp_grads.py")
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    big = step_grads(make_mlm, mlm_rows(), batch_size=ROWS, accumulate=1)
    assert sorted(big) == sorted(ddp)
    worst = max(float((big[n] - ddp[n]).abs().max()) for n in big)
    print(f"max |grad(16) - grad(2 ranks x 8)| = {worst:.2e}")
    assert worst < 1e-6


@pytest.fixture(scope="module")
def encoder_without_dropout(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    BertForMaskedLM(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("loss", ["ce", "weighted_ce"])
def test_classification_accumulation_is_the_big_batch(encoder_without_dropout, loss):
    from lmrecipes.models.classification import SequenceClassifier

    generator = torch.Generator().manual_seed(2)
    input_ids = ids(generator)  # (16, T)
    labels = torch.randint(0, 2, (ROWS,), generator=generator)
    labels[13:] = IGNORE_INDEX  # the epoch's last batch, padded: 5 real rows in the second micro-batch
    rows = [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab}
        for i, lab in zip(input_ids, labels)
    ]
    weights = [1.0, 3.0] if loss == "weighted_ce" else None

    def make():
        torch.manual_seed(0)
        return SequenceClassifier(pretrained=encoder_without_dropout, loss=loss, class_weights=weights)

    assert_accumulation_matches_big_batch(make, rows)
