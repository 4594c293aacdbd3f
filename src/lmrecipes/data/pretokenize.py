"""Tokenize a corpus once into a memory-mapped token file that later runs reuse.

The cache folder is named by a fingerprint of everything that decides its content (source, filters, held-out
split, tokenizer, packing mode; window starts are computed at load time, so any sequence length reuses it), so a
changed source or tokenizer builds a new one instead of silently reusing stale tokens. Files are written under a temporary name and renamed, so an interrupted build
never leaves a half-written cache that a later run would trust.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmrecipes.data.sources import sanitize_text


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full serialisation (vocab, merges, normaliser, special tokens)."""
    return hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode(), digest_size=8).hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=8).hexdigest()


def whole_document_backend(tokenizer):
    """The tokenizer's Rust backend with truncation and padding off (a copy only when they are on).

    A call with truncation=True, or a tokenizer.json saved with it (MiniLM's has max_length 128), leaves it set on
    the backend, which would silently cut every document to max_length when encoding whole documents.
    """
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        backend = copy.deepcopy(backend)
        backend.no_truncation()
        backend.no_padding()
    return backend


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one call to the Rust tokenizer (no special tokens, no length warnings)."""
    encodings = whole_document_backend(tokenizer).encode_batch(
        [sanitize_text(t) for t in texts], add_special_tokens=False
    )
    return [e.ids for e in encodings]


def tokenize_groups(
    docs: Iterable[tuple[int, dict]], tokenizer, *, group: int = 64
) -> Iterator[tuple[int, list[int]]]:
    """``(raw_index, ids)`` for documents, tokenized ``group`` at a time (batched calls are much faster)."""
    batch: list[tuple[int, dict]] = []

    def flush():
        ids = encode_batch(tokenizer, [d["content"] for _, d in batch])
        yield from zip((r for r, _ in batch), ids)

    for item in docs:
        batch.append(item)
        if len(batch) == group:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def window_starts(doc_lengths: np.ndarray, *, seq_len: int, mode: str) -> np.ndarray:
    """Start offsets of every training window in the token file (EOS-joined docs for concat, full chunks for overflow)."""
    if mode == "concat":
        total = int((doc_lengths + 1).sum())
        return np.arange(0, total - seq_len + 1, seq_len, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)])[:-1]  # no EOS in overflow files
    chunks = doc_lengths // seq_len  # (docs,)
    starts = np.repeat(offsets, chunks) + seq_len * (
        np.arange(chunks.sum()) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    )
    return starts.astype(np.int64)


def build_token_file(
    folder: Path,
    docs: Iterable[tuple[int, dict]],
    tokenizer,
    *,
    mode: str,
    progress: bool = True,
) -> dict:
    """Write ``tokens.bin`` (uint16/uint32) and ``doc_lengths.npy`` into ``folder`` atomically; returns stats."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    tmp = folder / f"tokens.bin.tmp{os.getpid()}"
    lengths = []
    with open(tmp, "wb") as out, tqdm(desc="pre-tokenizing", unit=" docs", disable=not progress) as bar:
        for _, ids in tokenize_groups(docs, tokenizer):
            if mode == "concat":
                ids = [*ids, tokenizer.eos_token_id]
            np.asarray(ids, dtype=dtype).tofile(out)
            lengths.append(len(ids) - (mode == "concat"))
            bar.update()
    np.save(folder / "doc_lengths.npy", np.asarray(lengths, dtype=np.int64))
    stats = {"documents": len(lengths), "tokens": int(sum(lengths)), "dtype": np.dtype(dtype).name}
    (folder / "meta.json").write_text(json.dumps(stats))
    os.replace(tmp, folder / "tokens.bin")  # last: its presence marks a complete cache
    return stats


def load_token_file(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(memory-mapped tokens, per-document lengths, stats) of a finished cache."""
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
    return tokens, np.load(folder / "doc_lengths.npy"), meta


def ensure_token_file(
    root: Path,
    key_parts: dict,
    make_docs: Callable[[], Iterable[tuple[int, dict]]],
    tokenizer,
    *,
    mode: str,
    progress: bool = True,
) -> Path:
    """The cache folder for ``key_parts``, building it first when it is missing or incomplete."""
    folder = Path(root) / cache_key(key_parts)
    if not (folder / "tokens.bin").exists():
        build_token_file(folder, make_docs(), tokenizer, mode=mode, progress=progress)
        (folder / "key.json").write_text(json.dumps(key_parts, indent=2, sort_keys=True))
    return folder
