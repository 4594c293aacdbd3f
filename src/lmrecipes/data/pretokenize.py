"""Tokenization helpers shared by the streamed and pre-tokenized paths: batched whole-document encoding, the
tokenizer's fingerprint and cache keys, and the start of every training window in a token stream (computed at
load time, so prepared data serves any sequence length). Prepared folders: ``data/prepare.py``."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Iterator

import numpy as np

from lmrecipes.data.sources import sanitize_text
from lmrecipes.data.splits import stable_hash


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full serialisation (vocab, merges, normaliser, special tokens)."""
    return hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode(), digest_size=8).hexdigest()


def cache_key(parts: dict) -> str:
    return stable_hash(parts)


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
