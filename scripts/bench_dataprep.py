"""Data-prep benchmark: the HF course's two chunking recipes, as published, against this project's packing.

    HF_HUB_OFFLINE=1 python scripts/bench_dataprep.py [--max-docs 1000] [--ctx 128 1024] [--repeats 3]

Every contender starts from the same in-memory texts (Python files of this installation) and the same fast
tokenizer, and is timed end to end (tokenization included, best of ``--repeats``) until it holds an (n, ctx)
array of training sequences:

- ``raw_tokenizer``: batched tokenization only (64 docs per call), no chunking: the ceiling.
- ``course_overflow``: course ch.7 §6 ``tokenize`` (truncation + return_overflowing_tokens, keep full chunks)
  through ``Dataset.map(batched=True)``.
- ``course_group_texts``: course ch.7 §3 ``group_texts`` (``sum(lists, [])``) after a tokenizing map;
  ``course_group_texts_chain`` is the same with ``itertools.chain`` (the later HF examples' fix).
- ``lmrecipes_concat`` / ``lmrecipes_overflow``: ``encode_batch`` in groups of 64 feeding ``Packer``.

Repeats go round-robin over the methods; a method is not repeated after a run longer than ``--patience`` s.
The sum()-based ``group_texts`` costs (docs per map batch) x (tokens per map batch): with up to 1000 docs it
grows quadratically with the corpus, so the gap to it widens with ``--max-docs``.

Prints one JSON object per line on stdout: an ``env`` line, a ``dataprep`` line per method and ctx, a
``dataprep_summary`` line per ctx; progress goes to stderr. ``mb_per_s`` counts UTF-8 megabytes of text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import chain

import datasets
import numpy as np
import tokenizers
import torch
import transformers

from lmrecipes.bpe import train_bpe_tokenizer
from lmrecipes.data.filters import DEFAULT_KEYWORDS, FilterPipeline
from lmrecipes.data.packing import Packer
from lmrecipes.data.pretokenize import encode_batch
from lmrecipes.data.sources import open_source, sanitize_text

GROUP = 64  # documents per encode_batch call, as lmrecipes.data.pretokenize.tokenize_groups uses


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_corpus(max_docs: int, max_chars: int | None, keywords: bool) -> list[str]:
    """The first documents of the Python installation (sanitised once, so every contender sees the same text)."""
    keep = FilterPipeline(keywords=list(DEFAULT_KEYWORDS)) if keywords else (lambda doc: True)
    texts, chars = [], 0
    for _, doc in open_source("python-install", on_error="skip", progress=False).iter_raw():
        if not keep(doc):
            continue
        texts.append(sanitize_text(doc["content"]))
        chars += len(texts[-1])
        if len(texts) >= max_docs or (max_chars is not None and chars >= max_chars):
            break
    return texts


def get_tokenizer(path: str | None, texts: list[str], vocab_size: int):
    if path:
        return transformers.AutoTokenizer.from_pretrained(path)
    return train_bpe_tokenizer(texts[:200], vocab_size=vocab_size, progress=False)


# --- contenders: (texts, tokenizer, ctx) -> (n, ctx) array, or the token lists for raw_tokenizer -------------


def raw_tokenizer(texts, tok, ctx):
    return [ids for i in range(0, len(texts), GROUP) for ids in encode_batch(tok, texts[i : i + GROUP])]


def course_overflow(texts, tok, ctx):
    def tokenize(element):  # course ch.7 §6 as published (context_length -> ctx)
        outputs = tok(
            element["content"],
            truncation=True,
            max_length=ctx,
            return_overflowing_tokens=True,
            return_length=True,
        )
        input_batch = []
        for length, input_ids in zip(outputs["length"], outputs["input_ids"]):
            if length == ctx:
                input_batch.append(input_ids)
        return {"input_ids": input_batch}

    raw = datasets.Dataset.from_dict({"content": texts})
    ds = raw.map(tokenize, batched=True, remove_columns=raw.column_names, keep_in_memory=True)
    return dataset_array(ds, ctx)


def make_group_texts(ctx, concat):
    def group_texts(examples):  # course ch.7 §3 (chunk_size = ctx); `concat` is sum(..., []) or chain
        concatenated_examples = {k: concat(examples[k]) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // ctx) * ctx
        result = {
            k: [t[i : i + ctx] for i in range(0, total_length, ctx)] for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    return group_texts


def grouped(texts, tok, ctx, concat):
    def tokenize_function(examples):
        return tok(examples["content"])

    raw = datasets.Dataset.from_dict({"content": texts})
    ds = raw.map(tokenize_function, batched=True, remove_columns=raw.column_names, keep_in_memory=True)
    ds = ds.map(make_group_texts(ctx, concat), batched=True, keep_in_memory=True)
    return dataset_array(ds, ctx)


def dataset_array(ds, ctx) -> np.ndarray:
    if len(ds) == 0:
        return np.zeros((0, ctx), dtype=np.int64)
    return ds.with_format("numpy")[:]["input_ids"].astype(np.int64, copy=False)  # (n, ctx)


def packed(texts, tok, ctx, mode):
    packer = Packer(seq_len=ctx, eos_id=tok.eos_token_id, mode=mode)
    out = []
    for start in range(0, len(texts), GROUP):
        for raw_index, ids in enumerate(encode_batch(tok, texts[start : start + GROUP]), start):
            packer.add(raw_index, ids)
        out.append(packer.windows())
    return np.concatenate(out), packer


METHODS = {
    "raw_tokenizer": raw_tokenizer,
    "course_overflow": course_overflow,
    "course_group_texts": lambda texts, tok, ctx: grouped(texts, tok, ctx, lambda lists: sum(lists, [])),
    "course_group_texts_chain": lambda texts, tok, ctx: grouped(texts, tok, ctx, lambda x: list(chain(*x))),
    "lmrecipes_concat": lambda texts, tok, ctx: packed(texts, tok, ctx, "concat"),
    "lmrecipes_overflow": lambda texts, tok, ctx: packed(texts, tok, ctx, "overflow"),
}


def time_methods(ctx, texts, tok, ref, args) -> tuple[dict[str, list[float]], dict[str, tuple[int, int]]]:
    """Seconds of every run and (kept, sequences) per method; repeats go round-robin so load drifts hit all alike.

    A method is not repeated once a run of it took longer than ``--patience`` seconds.
    """
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    counts = {}
    for rep in range(args.repeats):
        for method in args.methods:
            if rep and min(times[method]) > args.patience:
                continue
            log(f"ctx {ctx}, repeat {rep + 1}: {method}")
            start = time.perf_counter()
            result = METHODS[method](texts, tok, ctx)
            times[method].append(time.perf_counter() - start)
            if rep == 0:
                counts[method] = check(method, result, ref, ctx, tok.eos_token_id)
            del result
    return times, counts


# --- token accounting: what each method must keep, from one reference tokenization --------------------------


def expected_kept(method: str, lengths: np.ndarray, ctx: int) -> int:
    if method in ("course_overflow", "lmrecipes_overflow"):
        return int((lengths // ctx * ctx).sum())
    if method.startswith("course_group_texts"):  # remainder dropped per map batch of 1000 documents
        sums = np.add.reduceat(lengths, np.arange(0, len(lengths), 1000))
        return int((sums // ctx * ctx).sum())
    return int(lengths.sum())  # raw_tokenizer


def check(method, result, ref, ctx, eos_id) -> tuple[int, int]:
    """(tokens kept, sequences) of one result, asserting it matches the reference tokenization."""
    lengths = np.array([len(ids) for ids in ref])
    if method == "raw_tokenizer":
        assert result == ref, "raw_tokenizer differs from the reference tokenization"
        return int(lengths.sum()), 0
    if method.startswith("lmrecipes"):
        seqs, packer = result
        kept = packer.tokens_out
        if method == "lmrecipes_concat":
            stream = np.concatenate([np.append(np.asarray(ids, dtype=np.int64), eos_id) for ids in ref])
            assert np.array_equal(seqs.ravel(), stream[: seqs.size]), "concat windows != EOS-joined stream"
            assert len(seqs) == len(stream) // ctx, "concat left a full window unpacked"
            assert kept == int((stream[: seqs.size] != eos_id).sum())
            return kept, len(seqs)
    else:
        seqs, kept = result, result.size
    assert seqs.shape[1:] == (ctx,), f"{method}: shape {seqs.shape}"
    assert kept == expected_kept(method, lengths, ctx), f"{method}: kept {kept} tokens, expected otherwise"
    return kept, len(seqs)


def record(method, ctx, corpus, ref, kept, sequences, times) -> dict:
    tokens_in, seconds = sum(map(len, ref)), min(times)
    return {
        "bench": "dataprep",
        "method": method,
        "ctx": ctx,
        "docs": corpus["docs"],
        "chars": corpus["chars"],
        "tokens_in": tokens_in,
        "tokens_kept": kept,
        "kept_fraction": round(kept / tokens_in, 6),
        "sequences": sequences,
        "seconds": round(seconds, 4),
        "runs": len(times),
        "tokens_per_s": round(tokens_in / seconds),
        "mb_per_s": round(corpus["bytes"] / 1e6 / seconds, 3),
    }


def summary(ctx: int, rows: dict[str, dict]) -> dict:
    concat = rows["lmrecipes_concat"]
    vs_group = rows["course_group_texts"]["seconds"] / concat["seconds"]
    vs_raw = concat["seconds"] / rows["raw_tokenizer"]["seconds"]
    return {
        "bench": "dataprep_summary",
        "ctx": ctx,
        "concat_vs_group_texts": round(vs_group, 2),
        "concat_vs_raw_tokenizer": round(vs_raw, 3),
        "concat_kept_fraction": concat["kept_fraction"],
        "course_overflow_kept_fraction": rows["course_overflow"]["kept_fraction"],
        "targets": {
            "concat_vs_group_texts>=2": vs_group >= 2,
            "concat_within_10pct_of_raw": vs_raw <= 1.10,
            "concat_kept>=0.999_at_1024": concat["kept_fraction"] >= 0.999 if ctx == 1024 else None,
        },
    }


def env_line(args, tok) -> dict:
    versions = {m.__name__: m.__version__ for m in (torch, transformers, tokenizers, datasets, np)}
    return {"bench": "env", **versions, "cpu_count": os.cpu_count()} | {
        "loadavg_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews every timing
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "unset"),
        "tokenizer": args.tokenizer or f"trained here on the first 200 docs, vocab {len(tok)}",
        "repeats": args.repeats,
        "patience_s": args.patience,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--max-docs", type=int, default=1000, help="documents to take (1000: one full course map batch)")
    add("--max-chars", type=int, default=None, help="stop taking documents past this many characters")
    add("--keywords", action="store_true", help="keep only documents passing the course's keyword filter")
    add("--ctx", type=int, nargs="+", default=[128, 1024], help="sequence lengths")
    add("--repeats", type=int, default=3, help="timed runs per method; the best one is reported")
    add("--patience", type=float, default=30.0, help="no repeat of a method after a run this long (s)")
    add("--tokenizer", default=None, help="tokenizer folder (default: train one on the first 200 docs)")
    add("--vocab-size", type=int, default=8192, help="vocabulary of the tokenizer trained here")
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add(
        "--smoke",
        action="store_true",
        help="tiny sizes, one run: checks that the script works (tests/test_benchmarks.py); measures nothing",
    )
    args = parser.parse_args()
    if args.smoke:
        args.max_docs, args.ctx, args.repeats, args.vocab_size = 40, [128], 1, 500
    return args


def main() -> None:
    args = parse_args()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # the course's calls warn about docs longer than 1024 tokens

    texts = load_corpus(args.max_docs, args.max_chars, args.keywords)
    corpus = {"docs": len(texts), "chars": sum(map(len, texts)), "bytes": sum(len(t.encode()) for t in texts)}
    log(f"corpus: {corpus}")
    tok = get_tokenizer(args.tokenizer, texts, args.vocab_size)
    print(json.dumps(env_line(args, tok)), flush=True)
    ref = raw_tokenizer(texts, tok, 0)  # untimed reference for the token accounting
    for ctx in args.ctx:
        times, counts = time_methods(ctx, texts, tok, ref, args)
        rows = {m: record(m, ctx, corpus, ref, *counts[m], times[m]) for m in times}
        for row in rows.values():
            print(json.dumps(row), flush=True)
        if {"lmrecipes_concat", "course_group_texts", "raw_tokenizer", "course_overflow"} <= rows.keys():
            print(json.dumps(summary(ctx, rows)), flush=True)


if __name__ == "__main__":
    main()
