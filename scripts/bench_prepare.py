"""``lmrecipes prepare`` benchmark: tokens/s with 1 and 2 processes, dedup memory, first batch after a resume.

    HF_HUB_OFFLINE=1 python scripts/bench_prepare.py [--max-chars 40000000] [--digests 1000000] [--smoke]

- ``prepare``: this installation's Python files (written once to a JSONL file, so reading costs the same for
  every run) built into a prepared folder by ``lmrecipes.data.prepare.prepare`` (what the command runs) with
  ``num_proc`` 1 and 2; tokens/s counts the tokens written over the whole build (reading, filters, dedup,
  tokenization, checksums, manifest). The machine's load average is printed with it: the 2-process speed-up
  needs two idle cores.
- ``dedup_memory``: bytes per document of the global first-occurrence dedup (``first_occurrences`` on 8-byte
  digests, the digest array included; peak traced by tracemalloc) against a Python set of the same digests
  (8-byte ``bytes``), for documents of which a tenth are duplicates.
- ``resume_first_batch``: seconds from opening the prepared folder to the first batch of a ``WindowStream``
  resumed at 0 % and at 90 % of an epoch (median of 5).

Prints one JSON object per line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import datasets  # noqa: F401  imported before the timed builds, which would otherwise pay for it once
import numpy as np

from lmrecipes.bpe import train_bpe_tokenizer
from lmrecipes.data.prepare import PrepareSpec, first_occurrences, prepare
from lmrecipes.data.prepared import PreparedData, WindowStream
from lmrecipes.data.sources import open_source, sanitize_text


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def write_corpus(path: Path, max_chars: int) -> int:
    """The first ``max_chars`` characters of this installation's Python files as JSONL; returns the documents."""
    docs, chars = 0, 0
    with open(path, "w") as out:
        for _, doc in open_source("python-install", on_error="skip", progress=False).iter_raw():
            text = sanitize_text(doc["content"])
            out.write(json.dumps({"content": text, "path": doc["path"]}) + "\n")
            docs, chars = docs + 1, chars + len(text)
            if chars >= max_chars:
                break
    return docs


def bench_prepare(work: Path, corpus: Path, tokenizer: str, shard_chars: int) -> Path:
    spec = PrepareSpec(make_source=functools.partial(open_source, str(corpus)), source_fingerprint="bench",
                       tokenizer_path=tokenizer, shard_chars=shard_chars)  # fmt: skip
    rates = {}
    for num_proc in (1, 2):
        out = work / f"prepared-{num_proc}"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        prepare(spec, out, num_proc=num_proc)
        seconds = time.perf_counter() - start
        manifest = json.loads((out / "manifest.json").read_text())
        rates[num_proc] = manifest["tokens"] / seconds
        emit({"bench": "prepare", "num_proc": num_proc, "seconds": round(seconds, 2), "tokens": manifest["tokens"],
              "documents": manifest["counts"]["documents"], "shards": len(manifest["shards"]),
              "tokens_per_s": round(rates[num_proc]), "load_avg_1min_before": load, "cpus": os.cpu_count()})  # fmt: skip
    # One process already tokenizes on every core (the Rust tokenizer's own thread pool); forked processes run
    # single-threaded. RAYON_NUM_THREADS=1 gives each process one core, which shows what --num_proc itself adds.
    threads = os.environ.get("RAYON_NUM_THREADS", "all cores")
    emit({"bench": "prepare_summary", "speedup_2_vs_1": round(rates[2] / rates[1], 2), "goal": 1.7,
          "tokenizer_threads_per_process": threads})  # fmt: skip
    return work / "prepared-2"


def bench_dedup_memory(n: int) -> None:
    rng = np.random.default_rng(0)
    tracemalloc.start()
    digests = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    digests[n - n // 10 :] = digests[: n // 10]  # a tenth repeat earlier documents
    kept = first_occurrences(digests)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(kept) == n - n // 10
    raw = digests.tobytes()
    tracemalloc.start()
    seen = {raw[i : i + 8] for i in range(0, 8 * n, 8)}  # the bytes objects and the set's table
    _, set_peak = tracemalloc.get_traced_memory()
    assert len(seen) == len(kept)
    tracemalloc.stop()
    emit({"bench": "dedup_memory", "documents": n, "bytes_per_doc": round(peak / n, 1),
          "python_set_bytes_per_doc": round(set_peak / n, 1), "goal_bytes_per_doc": 40})  # fmt: skip


def first_batch_seconds(folder: Path, fraction: float, seq_len: int, batch_size: int) -> float:
    start = time.perf_counter()
    data = PreparedData(folder)
    files, starts = data.windows(seq_len)
    consumed = int(fraction * len(starts) // batch_size)
    stream = WindowStream([data.tokens(i) for i in range(len(data.manifest["shards"]))], starts, files=files,
                          seq_len=seq_len, batch_size=batch_size, seed=0, rank=0, world_size=1,
                          resume={"consumed": consumed, "cursors": {}})  # fmt: skip
    next(iter(stream))
    return time.perf_counter() - start


def bench_resume(folder: Path, seq_len: int, batch_size: int) -> None:
    times = {f: statistics.median(first_batch_seconds(folder, f, seq_len, batch_size) for _ in range(5))
             for f in (0.0, 0.9)}  # fmt: skip
    emit({"bench": "resume_first_batch", "seconds_at_0": round(times[0.0], 4), "seconds_at_90": round(times[0.9], 4),
          "ratio": round(times[0.9] / times[0.0], 2), "goal_ratio": 1.5})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--max-chars", type=int, default=40_000_000, help="characters of Python code to prepare"
    )
    parser.add_argument("--shard-chars", type=int, default=2_000_000, help="characters per shard file")
    parser.add_argument("--digests", type=int, default=1_000_000, help="synthetic documents for dedup memory")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI checks that the script runs)")
    args = parser.parse_args()
    if args.smoke:
        args.max_chars, args.shard_chars, args.digests, args.vocab_size = 400_000, 40_000, 10_000, 500
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = write_corpus(work / "corpus.jsonl", args.max_chars)
        texts = [json.loads(line)["content"] for line in open(work / "corpus.jsonl")][:2000]
        log(f"corpus: {docs} documents; training a {args.vocab_size}-token tokenizer")
        train_bpe_tokenizer(texts, vocab_size=args.vocab_size, progress=False).save_pretrained(work / "tok")
        folder = bench_prepare(work, work / "corpus.jsonl", str(work / "tok"), args.shard_chars)
        bench_dedup_memory(args.digests)
        bench_resume(folder, seq_len=128, batch_size=8)


if __name__ == "__main__":
    main()
