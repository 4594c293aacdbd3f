"""Masked-LM recipe end to end on a tiny real BERT and real stdlib docstrings: data, validate, fit, export, fill-mask."""

from __future__ import annotations

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
from lmrecipes.data.packing import chunk_with_word_ids

REPO = Path(__file__).resolve().parents[1]
OFFLINE = str(REPO / "configs" / "mlm" / "offline.yaml")


def stdlib_docstrings() -> list[dict]:
    """One record per stdlib module: its docstrings joined (real English text about code)."""
    import collections
    import email.message
    import json as json_module
    import logging
    import pathlib
    import unittest

    records = []
    for module in (
        collections,
        email.message,
        json_module,
        logging,
        pathlib,
        unittest,
        inspect,
        os,
        subprocess,
    ):
        members = [getattr(module, n) for n in dir(module) if not n.startswith("_")]
        docs = [inspect.getdoc(m) for m in members if callable(m) and inspect.getdoc(m)]
        for k in range(0, len(docs), 6):  # several documents per module
            records.append({"content": "\n\n".join(docs[k : k + 6]), "path": f"{module.__name__}#{k}"})
    return records


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, corpus jsonl): a 2-layer BERT with a WordPiece vocabulary trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    records = stdlib_docstrings()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        (r["content"] for r in records), trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=64)
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(model_dir)
    return model_dir, corpus


def mlm_args(tiny_bert, *extra: str) -> list[str]:
    model_dir, corpus = tiny_bert
    return [
        "--config", OFFLINE,
        "--model.init_args.pretrained", str(model_dir), "--data.init_args.tokenizer", str(model_dir),
        "--data.init_args.train_source", str(corpus), "--data.init_args.heldout_fraction", "0.3",
        "--data.init_args.chunk_size", "32", "--data.init_args.batch_size", "8", "--data.init_args.eval_size", "40",
        "--data.init_args.max_docs", "null", "--data.init_args.progress", "false",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--model.init_args.lr", "5e-3", "--model.init_args.warmup_steps", "0",
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
    ppl = validate_ppl(mlm_args(tiny_bert, "--data.init_args.whole_word_mask", "true"), capsys)
    assert ppl > 1
    with pytest.raises(ValueError, match="chunk_size=128 exceeds"):
        main(["validate", *mlm_args(tiny_bert, "--data.init_args.chunk_size", "128")])


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
