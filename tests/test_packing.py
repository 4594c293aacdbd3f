"""Packing with exact values: overflow chunks, EOS-joined windows, the streaming Packer and its resume cursor."""

import bisect
import colorsys
import keyword
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from lmrecipes.bpe import train_bpe_tokenizer
from lmrecipes.data.packing import (
    Cursor,
    Packer,
    check_mode,
    iter_windows,
)
from lmrecipes.data.pretokenize import encode_batch

EOS = 0
# Four hand-made documents (raw index, ids): one spanning a window edge, one short, one empty, one long.
DOCS = [(0, [1, 2, 3, 4, 5]), (1, [6, 7, 8]), (2, []), (3, [9, 10, 11, 12, 13, 14, 15])]
# EOS-joined: 1 2 3 4 5 0 | 6 7 8 0 | 0 | 9 10 11 12 13 14 15 0  (19 tokens -> 4 windows of 4, tail of 3 lost)
CONCAT_WINDOWS = [[1, 2, 3, 4], [5, 0, 6, 7], [8, 0, 0, 9], [10, 11, 12, 13]]
CONCAT_CURSORS = [(0, 0, 4), (0, 1, 2), (0, 3, 1), (0, 3, 5)]
OVERFLOW_WINDOWS = [[1, 2, 3, 4], [9, 10, 11, 12]]


def _arrays(docs):
    return [np.asarray(ids, dtype=np.int64) for _, ids in docs]


def _lengths_docs(lengths: list[int]) -> list[tuple[int, list[int]]]:
    """Documents with the given lengths and globally unique ids 1, 2, 3, ... (never the EOS id 0)."""
    docs, next_id = [], 1
    for raw, n in enumerate(lengths):
        docs.append((raw, list(range(next_id, next_id + n))))
        next_id += n
    return docs


# Lengths chosen around seq_len values 2..8: empty, 1 token, shorter than a window, exact, several windows.
LENGTHS = [0, 1, 3, 5, 0, 0, 2, 17, 4, 8, 1, 0, 9, 16, 7, 0, 3, 25, 6, 2]


def _expected_stream(docs, mode: str, seq_len: int) -> np.ndarray:
    """The tokens every window sequence must reproduce, in order."""
    if mode == "concat":
        return np.concatenate([np.asarray([*ids, EOS], dtype=np.int64) for _, ids in docs])
    kept = [ids[: len(ids) // seq_len * seq_len] for _, ids in docs]
    return np.asarray([t for ids in kept for t in ids], dtype=np.int64)


# ---------------------------------------------------------------- one-shot forms (references for the Packer)


def overflow_chunks(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Full ``seq_len`` chunks of one document, shape (n_chunks, seq_len); the short tail is dropped."""
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len]).reshape(n, seq_len)


def concat_windows(docs: Iterable[np.ndarray], seq_len: int, eos_id: int) -> np.ndarray:
    """All full windows of the EOS-joined stream of ``docs``, shape (n, seq_len) (the one-shot form of ``Packer``)."""
    parts = []
    eos = np.array([eos_id], dtype=np.int64)
    for ids in docs:
        parts.append(np.asarray(ids, dtype=np.int64))
        parts.append(eos)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def test_overflow_chunks_exact():
    ids = np.arange(1, 11)
    assert overflow_chunks(ids, 4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert overflow_chunks(ids, 5).tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert overflow_chunks(ids, 11).shape == (0, 11)
    assert overflow_chunks(np.zeros(0, dtype=np.int64), 3).shape == (0, 3)


def test_concat_windows_exact_and_only_final_tail_lost():
    out = concat_windows(_arrays(DOCS), 4, EOS)
    assert out.tolist() == CONCAT_WINDOWS
    assert concat_windows([], 4, EOS).shape == (0, 4)
    # With unique ids: every document token appears once, in order, and only the last 3 stream tokens are lost.
    docs = _lengths_docs(LENGTHS)
    for seq_len in (2, 3, 5, 8):
        stream = _expected_stream(docs, "concat", seq_len)
        out = concat_windows(_arrays(docs), seq_len, EOS)
        assert out.shape == (len(stream) // seq_len, seq_len)
        assert np.array_equal(out.reshape(-1), stream[: out.size])
        assert len(stream) - out.size < seq_len


# ---------------------------------------------------------------- Packer


def test_packer_concat_exact_values_and_counts():
    packer = Packer(seq_len=4, eos_id=EOS, mode="concat")
    assert packer.cursor() == Cursor(0, 0, 0)
    for raw, ids in DOCS:
        packer.add(raw, ids)
    assert packer.buffered == 19
    assert packer.windows(limit=1).tolist() == CONCAT_WINDOWS[:1]
    assert packer.cursor() == Cursor(0, 0, 4)
    assert packer.windows(limit=2).tolist() == CONCAT_WINDOWS[1:3]
    assert packer.cursor() == Cursor(0, 3, 1)
    assert packer.windows().tolist() == CONCAT_WINDOWS[3:]
    assert packer.cursor() == Cursor(0, 3, 5)
    assert packer.windows().shape == (0, 4)
    assert packer.buffered == 3
    # 15 document tokens in, 13 of them inside windows (4 + 3 + 2 + 4; EOS not counted), 14 15 lost in the tail.
    assert (packer.tokens_in, packer.tokens_out) == (15, 13)


def test_packer_overflow_exact_values_and_counts():
    packer = Packer(seq_len=4, eos_id=None, mode="overflow")
    for raw, ids in DOCS:
        packer.add(raw, ids)
    assert packer.buffered == 8  # only whole chunks of each document are buffered
    assert packer.windows(limit=1).tolist() == OVERFLOW_WINDOWS[:1]
    assert packer.cursor() == Cursor(0, 3, 0)
    assert packer.windows(limit=5).tolist() == OVERFLOW_WINDOWS[1:]
    assert packer.cursor() == Cursor(0, 4, 0)  # empty buffer: the raw index after the last document added
    assert (packer.tokens_in, packer.tokens_out) == (15, 8)


def test_packer_empty_buffer_cursor_points_past_last_document():
    packer = Packer(seq_len=4, eos_id=EOS, mode="concat")
    packer.add(7, [1, 2, 3], epoch=2)
    assert packer.windows().tolist() == [[1, 2, 3, 0]]
    assert packer.buffered == 0
    assert packer.cursor() == Cursor(2, 8, 0)


@pytest.mark.parametrize("mode", ["concat", "overflow"])
@pytest.mark.parametrize("seq_len", [2, 3, 5, 8])
def test_packer_keeps_every_token_once_in_order(mode, seq_len):
    docs = _lengths_docs(LENGTHS)
    stream = _expected_stream(docs, mode, seq_len)
    packer = Packer(seq_len=seq_len, eos_id=EOS, mode=mode)
    out = []
    for raw, ids in docs:
        packer.add(raw, ids)
        out.append(packer.windows())
    out = np.concatenate(out).reshape(-1)
    assert np.array_equal(out, stream[: len(out)])
    assert len(stream) - len(out) < seq_len
    if mode == "overflow":
        assert len(out) == len(stream)  # overflow loses each document's tail, never a whole chunk
        assert np.array_equal(
            out.reshape(-1, seq_len),
            np.concatenate([overflow_chunks(np.asarray(i), seq_len) for _, i in docs]),
        )
    else:
        assert np.array_equal(out.reshape(-1, seq_len), concat_windows(_arrays(docs), seq_len, EOS))
    doc_tokens = sum(LENGTHS)
    assert packer.tokens_in == doc_tokens
    assert packer.tokens_out == int((out != EOS).sum())


def _reference_run(docs, *, seq_len, mode, group):
    """Feed documents ``group`` at a time, taking windows one by one; every stopping point with its cursor."""
    packer = Packer(seq_len=seq_len, eos_id=EOS, mode=mode)
    windows, stops = [], [(0, packer.cursor())]
    for start in range(0, len(docs), group):
        for raw, ids in docs[start : start + group]:
            packer.add(raw, ids)
            stops.append((len(windows), packer.cursor()))
        while len(window := packer.windows(limit=1)):
            windows.append(window[0])
            stops.append((len(windows), packer.cursor()))
    return windows, stops


def _resumed_windows(docs, cursor: Cursor, *, seq_len, mode):
    packer = Packer(seq_len=seq_len, eos_id=EOS, mode=mode)
    out = []
    for raw, ids in docs:
        if raw < cursor.raw_index:
            continue
        packer.add(raw, ids, skip=cursor.offset if raw == cursor.raw_index else 0)
        out.extend(packer.windows())
    return out


@pytest.mark.parametrize("mode", ["concat", "overflow"])
@pytest.mark.parametrize("seq_len", [2, 3, 5])
@pytest.mark.parametrize("group", [1, 3, len(LENGTHS)])
def test_packer_cursor_resumes_identically_at_every_stop(mode, seq_len, group):
    docs = _lengths_docs(LENGTHS)
    windows, stops = _reference_run(docs, seq_len=seq_len, mode=mode, group=group)
    assert len(windows) > 10
    for emitted, cursor in stops:
        rest = _resumed_windows(docs, cursor, seq_len=seq_len, mode=mode)
        assert len(rest) == len(windows) - emitted, (emitted, cursor)
        for got, want in zip(rest, windows[emitted:]):
            assert np.array_equal(got, want), (emitted, cursor)


def test_packer_cursor_does_not_depend_on_grouping():
    docs = _lengths_docs(LENGTHS)
    for mode in ("concat", "overflow"):
        one = _reference_run(docs, seq_len=3, mode=mode, group=1)
        everything = _reference_run(docs, seq_len=3, mode=mode, group=len(docs))
        assert [w.tolist() for w in one[0]] == [w.tolist() for w in everything[0]]
        # The cursor after each window is the same however many documents were buffered ahead of it (a cursor
        # at a document start may name that document or, with an empty buffer, the raw index after the last).
        grouped = {n: c for n, c in everything[1] if n}
        mid_document = [(n, c) for n, c in one[1] if n and c.offset]
        assert len(mid_document) > 5
        for n, cursor in mid_document:
            assert grouped[n] == cursor


# ---------------------------------------------------------------- iter_windows


def test_iter_windows_exact_windows_and_cursors():
    got = list(iter_windows(DOCS, seq_len=4, eos_id=EOS, mode="concat"))
    assert [w.tolist() for w, _ in got] == CONCAT_WINDOWS
    assert [c.as_list() for _, c in got] == [list(c) for c in CONCAT_CURSORS]
    got = list(iter_windows(DOCS, seq_len=4, eos_id=None, mode="overflow"))
    assert [w.tolist() for w, _ in got] == OVERFLOW_WINDOWS
    # One document at a time: after A's only chunk the buffer is empty, so the cursor names the next raw index.
    assert [c.as_list() for _, c in got] == [[0, 1, 0], [0, 4, 0]]


@pytest.mark.parametrize("mode", ["concat", "overflow"])
def test_iter_windows_resume_from_every_cursor(mode):
    docs = _lengths_docs(LENGTHS)
    full = list(iter_windows(docs, seq_len=3, eos_id=EOS, mode=mode))
    for k, (_, cursor) in enumerate(full):
        later = [(raw, ids) for raw, ids in docs if raw >= cursor.raw_index]
        rest = list(iter_windows(later, seq_len=3, eos_id=EOS, mode=mode, start=cursor))
        assert [w.tolist() for w, _ in rest] == [w.tolist() for w, _ in full[k + 1 :]]
        assert [c for _, c in rest] == [c for _, c in full[k + 1 :]]


# ---------------------------------------------------------------- errors


def test_invalid_arguments_raise_value_error():
    with pytest.raises(ValueError, match="seq_len"):
        Packer(seq_len=1, eos_id=EOS)
    with pytest.raises(ValueError, match="packing="):
        Packer(seq_len=4, eos_id=EOS, mode="pad")
    with pytest.raises(ValueError, match="EOS"):
        Packer(seq_len=4, eos_id=None, mode="concat")
    with pytest.raises(ValueError, match="packing="):
        check_mode("chunks")
    with pytest.raises(ValueError):
        list(iter_windows(DOCS, seq_len=4, eos_id=EOS, mode="grouped"))
    assert Packer(seq_len=2, eos_id=None, mode="overflow").mode == "overflow"


# ---------------------------------------------------------------- against the course's tokenizer call


@pytest.fixture(scope="module")
def tokenizer():
    texts = [Path(m.__file__).read_text() for m in (bisect, colorsys, keyword)]
    return train_bpe_tokenizer(texts, vocab_size=300, progress=False)


def test_overflow_matches_tokenizer_return_overflowing_tokens(tokenizer):
    texts = [
        Path(colorsys.__file__).read_text()[:900],
        "import pandas as pd\n",  # shorter than one window: contributes nothing
        "",
        Path(bisect.__file__).read_text()[:2500],
        "def f(x):\n    return x * 2\n" * 7,
    ]
    ctx = 32
    # The course: tokenize with truncation + overflow, then keep only chunks of exactly ctx tokens.
    enc = tokenizer(texts, truncation=True, max_length=ctx, return_overflowing_tokens=True)
    course = [
        (sample, ids)
        for sample, ids in zip(enc["overflow_to_sample_mapping"], enc["input_ids"])
        if len(ids) == ctx
    ]
    ids = encode_batch(tokenizer, texts)  # after the truncating call: must still see whole documents
    assert [len(d) for d in ids] == [len(tokenizer(t)["input_ids"]) for t in texts]
    ours = [
        (i, chunk.tolist()) for i, doc in enumerate(ids) for chunk in overflow_chunks(np.asarray(doc), ctx)
    ]
    assert len(ours) > 20
    assert ours == course
    packer = Packer(seq_len=ctx, eos_id=tokenizer.eos_token_id, mode="overflow")
    for raw, doc in enumerate(ids):
        packer.add(raw, doc)
    assert packer.windows().tolist() == [c for _, c in course]
    assert packer.tokens_in == sum(len(d) for d in ids)
    assert packer.tokens_out == len(course) * ctx


def test_encode_batch_ignores_truncation_left_on_the_backend(tokenizer, tmp_path):
    text = Path(bisect.__file__).read_text()
    whole = tokenizer(text)["input_ids"]
    assert len(whole) > 100
    tokenizer(text, truncation=True, max_length=16)  # leaves truncation set on the Rust backend
    assert tokenizer.backend_tokenizer.truncation is not None
    short = tokenizer("x = 1\n")["input_ids"]
    tokenizer(text, truncation=True, max_length=16)
    assert encode_batch(tokenizer, [text, "x = 1\n"]) == [whole, short]
    assert (
        tokenizer.backend_tokenizer.truncation["max_length"] == 16
    )  # the caller's tokenizer is left as it was
    tokenizer(text, truncation=True, max_length=16)
    tokenizer.save_pretrained(tmp_path)  # ... and in the saved tokenizer.json
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.backend_tokenizer.truncation is not None
    assert encode_batch(reloaded, [text]) == [whole]
