"""Masked-LM recipe end to end on a tiny real BERT and real stdlib docstrings: data, validate, fit, export, fill-mask."""

from __future__ import annotations

import csv
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmrecipes.cli import main
from lmrecipes.data.groups import grouped
from lmrecipes.data.packing import chunk_with_word_ids

REPO = Path(__file__).resolve().parents[1]
OFFLINE = str(REPO / "configs" / "mlm" / "offline.yaml")


def mlm_args(tiny_bert, *extra: str) -> list[str]:
    model_dir, corpus = tiny_bert
    return [
        "--config", OFFLINE,
        "--model.init_args.pretrained", str(model_dir), "--data.init_args.tokenizer", str(model_dir),
        "--data.init_args.source.train_source", str(corpus), "--data.init_args.source.heldout_fraction", "0.3",
        "--data.init_args.chunking.chunk_size", "32", "--data.init_args.loader.batch_size", "8", "--data.init_args.chunking.eval_size", "40",
        "--data.init_args.source.max_docs", "null", "--data.init_args.progress", "false",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--model.init_args.optimizer.lr", "5e-3", "--model.init_args.optimizer.warmup_steps", "0",
        *extra,
    ]  # fmt: skip


def test_chunk_with_word_ids_exact():
    ids, words = chunk_with_word_ids([[101, 5, 6, 7, 102], [101, 8, 9, 102], [101, 4]],
                                     [[None, 0, 0, 1, None], [None, 0, 1, None], [None, 0]], 3)  # fmt: skip
    assert ids.tolist() == [[101, 5, 6], [7, 102, 101], [8, 9, 102]]  # remainder [101, 4] dropped
    assert words.tolist() == [[-1, 0, 0], [1, -1, -1], [2, 3, -1]]  # doc 2's words shifted past doc 1's


def validate_ppl(args: list[str], capsys) -> float:
    capsys.readouterr()
    main(["validate", *args])
    return parse_ppl(capsys.readouterr().out)


def parse_ppl(printed: str) -> float:
    """val/ppl from Lightning's results table."""
    return float(re.search(r"val/ppl\W+([0-9.eE+-]+)", printed).group(1))


def test_validate_is_reproducible_and_fit_lowers_perplexity(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = mlm_args(tiny_bert)
    first, second = validate_ppl(args, capsys), validate_ppl(args, capsys)
    assert first == second  # the evaluation set is masked once, from a seed
    main(["fit", *args, "--trainer.max_steps", "40", "--trainer.val_check_interval", "20"])
    after = validate_ppl(
        [*args, "--ckpt_path", str(tmp_path / "runs/mlm-offline/checkpoints/last.ckpt")], capsys
    )
    assert after < 0.75 * first
    export = tmp_path / "runs/mlm-offline/export"
    assert (export / "model.safetensors").is_file()
    capsys.readouterr()
    main(
        [
            "fill-mask",
            str(export),
            "this method returns the [MASK] of the list.",
            "--top_k",
            "3",
            "--json_out",
            "true",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert len(printed[0]["predictions"]) == 3
    assert all(0 <= p["score"] <= 1 for p in printed[0]["predictions"])


def test_whole_word_variant_and_bad_chunk_size(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ppl = validate_ppl(mlm_args(tiny_bert, "--data.init_args.masking.whole_word_mask", "true"), capsys)
    assert ppl > 1
    with pytest.raises(ValueError, match="chunk_size=128 exceeds"):
        main(["validate", *mlm_args(tiny_bert, "--data.init_args.chunking.chunk_size", "128")])


@pytest.mark.slow
def test_eval_perplexity_identical_on_one_and_two_processes(tiny_bert, tmp_path, monkeypatch, capsys):
    """The same eval set gives the same perplexity in one process and under 2-process DDP (gloo)."""
    monkeypatch.chdir(tmp_path)
    single = validate_ppl(mlm_args(tiny_bert), capsys)
    cmd = [sys.executable, "-m", "lmrecipes", "validate", *mlm_args(tiny_bert), "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--quiet"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert parse_ppl(proc.stdout) == pytest.approx(single, rel=1e-5)


def train_losses(run: Path) -> dict[int, float]:
    """step -> train/loss over every CSV log under ``run`` (a resumed fit writes a new version folder)."""
    losses = {}
    for path in sorted(run.glob("**/metrics.csv")):
        with open(path) as f:
            losses.update(
                {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
            )
    return losses


@pytest.mark.parametrize(("stops", "accumulate"), [([3, 8, 12], 1), ([3, 7, 10], 2)])
def test_fit_resumed_mid_epoch_logs_the_uninterrupted_losses(
    tiny_bert, tmp_path, monkeypatch, stops, accumulate
):
    """37 chunks in batches of 8: 5 batches an epoch, the last one padded. A fit stopped and resumed twice with
    ``--ckpt_path last`` trains on the same chunks with the same masks (and, dropout on, the same dropout draws:
    every rank's RNG states are in the checkpoint) as one uninterrupted fit. Accumulating 2 batches, an epoch is
    3 steps (the last on one batch): stopping after step 3 stops at the epoch's end, where Lightning resumes with a
    stale batch count unless the module resets it."""
    args = mlm_args(tiny_bert, "--data.init_args.chunking.train_size", "37", "--trainer.limit_val_batches", "0",
                    "--model.init_args.optimizer.lr_schedule", "constant",
                    "--trainer.accumulate_grad_batches", str(accumulate))  # fmt: skip
    runs = {}
    for name, ends in (("whole", stops[-1:]), ("resumed", stops)):
        monkeypatch.chdir((tmp_path / name).mkdir() or tmp_path / name)
        for k, stop in enumerate(ends):
            main(["fit", *args, "--trainer.max_steps", str(stop), *(["--ckpt_path", "last"] if k else [])])
        runs[name] = train_losses(tmp_path / name)
    assert sorted(runs["whole"]) == sorted(runs["resumed"]) and len(runs["whole"]) == stops[-1]
    for step, loss in runs["whole"].items():
        assert runs["resumed"][step] == pytest.approx(loss, abs=1e-6), step


def test_fit_resumed_from_a_checkpoint_on_an_epochs_last_batch(tiny_bert, tmp_path, monkeypatch):
    """Accumulating 2 of 5 batches an epoch: step 3 ends on the epoch's last batch, where a ModelCheckpoint saves
    before the epoch closes. Resuming from it, steps 4-6 match the uninterrupted fit."""
    monkeypatch.chdir(tmp_path)
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": "ckpts",
                "every_n_train_steps": 3,
                "save_top_k": -1,
                "filename": "{step}",
            },
        }
    ]
    args = ["fit", *mlm_args(tiny_bert, "--data.init_args.chunking.train_size", "37", "--trainer.limit_val_batches", "0",
                              "--model.init_args.optimizer.lr_schedule", "constant", "--trainer.accumulate_grad_batches", "2",
                              "--trainer.callbacks", json.dumps(callbacks))]  # fmt: skip
    main(args)
    main([*args, "--ckpt_path", "ckpts/step=3.ckpt"])
    (whole, resumed) = [
        train_losses(path.parent) for path in sorted(tmp_path.glob("runs/mlm-offline/csv/*/metrics.csv"))
    ]
    assert sorted(whole) == list(range(6)) and sorted(resumed) == [3, 4, 5]
    for step, loss in resumed.items():
        assert loss == pytest.approx(whole[step], abs=1e-6), step


@pytest.mark.slow
def test_two_process_fit_resumed_mid_epoch_logs_the_uninterrupted_losses(tiny_bert, tmp_path):
    """2-process DDP, 37 chunks, 8 per rank: 3 steps an epoch (the last padded on both ranks). A fit resumed from
    the checkpoint of step 4 (mid epoch 2) logs the uninterrupted fit's losses for steps 5-8, dropout on."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "runs/mlm-offline/checkpoints", "every_n_train_steps": 1,
                                "save_top_k": -1, "filename": "{step}"}}]  # fmt: skip
    args = ["fit", *mlm_args(tiny_bert, "--data.init_args.chunking.train_size", "37", "--trainer.limit_val_batches", "0",
                              "--trainer.max_steps", "8", "--trainer.callbacks", json.dumps(callbacks)),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--quiet"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for resume in ([], ["--ckpt_path", "runs/mlm-offline/checkpoints/step=4.ckpt"]):
        cmd = [sys.executable, "-m", "lmrecipes", *args, *resume]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted(tmp_path.glob("runs/mlm-offline/csv/*/metrics.csv"))
    losses = []
    for path in logs:
        with open(path) as f:
            losses.append(
                {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
            )
    whole, resumed = losses
    assert sorted(whole) == list(range(8)) and sorted(resumed) == list(range(4, 8))
    for step, loss in resumed.items():
        assert loss == pytest.approx(whole[step], abs=1e-6), step


def test_documents_are_chunked_whole_even_when_the_tokenizer_truncates(tiny_bert, tmp_path):
    """A tokenizer.json saved with truncation on (MiniLM's: 128) must not cut documents before chunking."""
    from transformers import AutoTokenizer

    from lmrecipes.data.mlm import MaskedTextDataModule

    model_dir, corpus = tiny_bert
    truncating = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.backend_tokenizer.enable_truncation(16)
    tok.save_pretrained(truncating)
    kwargs = {"train_source": str(corpus), "chunk_size": 32, "heldout_fraction": 0.3, "progress": False}
    plain = MaskedTextDataModule(**grouped(MaskedTextDataModule, tokenizer=str(model_dir), **kwargs))._chunks(
        "train", None
    )[0]
    cut = MaskedTextDataModule(**grouped(MaskedTextDataModule, tokenizer=str(truncating), **kwargs))._chunks(
        "train", None
    )[0]
    assert torch.equal(plain, cut)
    texts = MaskedTextDataModule(
        **grouped(MaskedTextDataModule, tokenizer=str(model_dir), **kwargs)
    )._documents("train")
    total = sum(len(tok(t, truncation=False)["input_ids"]) for t in texts)  # [CLS] doc [SEP] each
    assert len(plain) == total // 32


def test_tokenizer_without_mask_token_is_refused(tmp_path):
    from lmrecipes.bpe import train_bpe_tokenizer
    from lmrecipes.data.mlm import MaskedTextDataModule

    texts = [inspect.getdoc(f) or "" for f in (json.dumps, json.loads, os.path.join, re.sub)] * 20
    train_bpe_tokenizer(texts, vocab_size=300, progress=False).save_pretrained(tmp_path / "bpe")
    with pytest.raises(ValueError, match="has no mask token"):
        MaskedTextDataModule(
            **grouped(
                MaskedTextDataModule,
                tokenizer=str(tmp_path / "bpe"),
                train_source=str(tmp_path),
                progress=False,
            )
        )


def test_masked_only_head_gives_the_full_logits_loss(tiny_bert):
    """The head applied at masked positions only gives the same loss as full logits (BERT and DistilBERT heads)."""
    from transformers import BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    from lmrecipes.models.mlm import masked_lm_loss_sum, masked_logits

    torch.manual_seed(0)
    distil = DistilBertForMaskedLM(
        DistilBertConfig(n_layers=2, dim=32, hidden_dim=64, n_heads=2, vocab_size=200)
    )
    for model in (BertForMaskedLM.from_pretrained(tiny_bert[0]), distil):
        model.eval()
        ids = torch.randint(5, 200, (4, 24))
        labels = torch.where(torch.rand(ids.shape) < 0.2, ids, torch.full_like(ids, -100))
        full_sum, full_n = masked_lm_loss_sum(model(input_ids=ids).logits, labels)
        part_sum, part_n = masked_lm_loss_sum(*masked_logits(model, ids, labels))
        assert int(full_n) == int(part_n) > 0
        assert float(part_sum) == pytest.approx(float(full_sum), rel=1e-5)
