"""Tokenized documents -> fixed-length training sequences.

Two packing modes:

- ``overflow`` (HF course ch.7 §6): each document is cut into ``seq_len`` chunks and only full chunks are kept,
  as ``tokenizer(..., truncation=True, return_overflowing_tokens=True)`` followed by a length filter does.
  Tails shorter than ``seq_len`` are lost (about 14 % of code tokens at ``seq_len=1024``).
- ``concat`` (book ch.10 ``ConstantLengthDataset``): documents are joined with EOS and the stream is cut into
  windows, so only the final tail of the whole stream is lost.

Positions are expressed as a :class:`Cursor` ``(epoch, raw_index, offset)``: the next window starts ``offset`` tokens
into the token list of the document with that raw index (its ids plus EOS in concat mode). A cursor is all a
resumed stream needs to continue exactly, even in the middle of a buffer of several tokenized documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

PACKING_MODES = ("concat", "overflow")


@dataclass(frozen=True)
class Cursor:
    """Where the next window starts: pass ``epoch`` over the source, document ``raw_index``, token ``offset``."""

    epoch: int = 0
    raw_index: int = 0
    offset: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.raw_index, self.offset]


def check_mode(mode: str) -> str:
    if mode not in PACKING_MODES:
        raise ValueError(f"packing={mode!r} is not one of {PACKING_MODES}")
    return mode


class Packer:
    """Streaming packer: feed tokenized documents, take full windows, ask where the next window starts.

    ``add`` appends documents to a buffer; ``windows`` returns every full window available. ``cursor`` names the
    document and offset of the first token still buffered, so ``Packer`` restarted from that cursor (feeding
    that document again, then the following ones, with ``skip=offset``) yields the identical continuation.
    """

    def __init__(self, *, seq_len: int, eos_id: int | None, mode: str = "concat"):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.mode = check_mode(mode)
        if mode == "concat" and eos_id is None:
            raise ValueError("concat packing needs an EOS token id to separate documents")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self._parts: list[np.ndarray] = []  # token arrays still (partly) buffered
        self._raw: list[tuple[int, int]] = []  # (epoch, raw index) of each part's document
        self._first_offset = 0  # tokens of _parts[0] already emitted or skipped
        self.tokens_in = 0  # document tokens received (EOS excluded)
        self.tokens_out = 0  # document tokens emitted inside windows (EOS excluded)
        self._next = (0, 0)  # (epoch, raw index) after the last document added

    def add(self, raw_index: int, ids: Iterable[int], *, skip: int = 0, epoch: int = 0) -> None:
        """Buffer one document; ``skip`` drops its first tokens (resuming at a cursor offset)."""
        assert not (skip and self._parts), "skip only applies to the first document after a resume"
        ids = np.asarray(ids, dtype=np.int64)
        self.tokens_in += len(ids)
        self._next = (epoch, raw_index + 1)
        if self.mode == "concat":
            ids = np.append(ids, self.eos_id)
        else:  # overflow: only whole chunks of this document ever count
            ids = ids[: len(ids) // self.seq_len * self.seq_len]
        if skip >= len(ids):
            return
        if not self._parts:
            self._first_offset = skip
        self._parts.append(ids)
        self._raw.append((epoch, raw_index))

    @property
    def buffered(self) -> int:
        """Tokens waiting in the buffer."""
        return sum(len(p) for p in self._parts) - self._first_offset

    def cursor(self) -> Cursor:
        """Start of the next window; with an empty buffer, the raw index after the last document added."""
        if not self._parts:
            return Cursor(*self._next, 0)
        return Cursor(*self._raw[0], self._first_offset)

    def windows(self, limit: int | None = None) -> np.ndarray:
        """Up to ``limit`` (default: all) full windows now available, shape (n, seq_len); they leave the buffer."""
        n = self.buffered // self.seq_len
        n = n if limit is None else min(n, limit)
        if n == 0:
            return np.zeros((0, self.seq_len), dtype=np.int64)
        used = n * self.seq_len
        stream = self._front(used)  # (used,)
        out = stream.reshape(n, self.seq_len)
        self._drop(used)
        if self.mode == "concat":
            self.tokens_out += int((out != self.eos_id).sum())
        else:
            self.tokens_out += used
        return out

    def _front(self, count: int) -> np.ndarray:
        """The first ``count`` buffered tokens, concatenating only the arrays needed."""
        pieces, have = [], -self._first_offset
        for part in self._parts:
            pieces.append(part)
            have += len(part)
            if have >= count:
                break
        return np.concatenate(pieces)[self._first_offset : self._first_offset + count]

    def _drop(self, count: int) -> None:
        """Forget ``count`` tokens from the front, keeping whole arrays for the documents still in use."""
        count += self._first_offset
        while self._parts and count >= len(self._parts[0]):
            count -= len(self._parts[0])
            self._parts.pop(0)
            self._raw.pop(0)
        self._first_offset = count if self._parts else 0


def iter_windows(
    docs: Iterable[tuple[int, np.ndarray]],
    *,
    seq_len: int,
    eos_id: int | None,
    mode: str,
    start: Cursor | None = None,
) -> Iterator[tuple[np.ndarray, Cursor]]:
    """(window, cursor after it) for ``(raw_index, ids)`` documents; ``start`` resumes mid-document."""
    packer = Packer(seq_len=seq_len, eos_id=eos_id, mode=mode)
    for raw_index, ids in docs:
        skip = start.offset if start is not None and raw_index == start.raw_index else 0
        packer.add(raw_index, ids, skip=skip)
        while len(window := packer.windows(limit=1)):
            yield window[0], packer.cursor()


def chunk_with_word_ids(
    ids: Iterable[Iterable[int]], word_ids: Iterable[Iterable[int | None]], chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The course's ``group_texts`` for masked LM: concatenate documents and cut ``chunk_size`` chunks, dropping
    the final remainder, with word ids carried along.

    Word ids are made unique across documents (each document's ids are offset by the number of words before it),
    so whole-word masking never joins the last word of one document with the first word of the next. Tokens
    without a word (special tokens: ``None``) get -1. Returns (input_ids, word_ids), each (n_chunks, chunk_size).
    """
    id_parts, word_parts, offset = [], [], 0
    for doc_ids, doc_words in zip(ids, word_ids):
        words = np.array([-1 if w is None else w for w in doc_words], dtype=np.int64)
        if len(words) != len(doc_ids):
            raise ValueError(f"a document has {len(doc_ids)} tokens but {len(words)} word ids")
        id_parts.append(np.asarray(doc_ids, dtype=np.int64))
        word_parts.append(np.where(words >= 0, words + offset, -1))
        offset += int(words.max()) + 1 if (words >= 0).any() else 0
    if not id_parts:
        return np.zeros((0, chunk_size), np.int64), np.zeros((0, chunk_size), np.int64)
    all_ids, all_words = np.concatenate(id_parts), np.concatenate(word_parts)
    n = len(all_ids) // chunk_size * chunk_size
    return all_ids[:n].reshape(-1, chunk_size), all_words[:n].reshape(-1, chunk_size)
