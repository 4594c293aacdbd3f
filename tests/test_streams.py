"""Token caches and pre-tokenized window streams over a real source tree and tokenizer (the streamed path is\ntested in test_shards.py)."""

import functools
import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lmrecipes.bpe import train_bpe_tokenizer
from lmrecipes.data.prepared import WindowStream
from lmrecipes.data.pretokenize import (
    window_starts,
)
from lmrecipes.data.stream import is_heldout, path_is_heldout

SEQ_LEN, BATCH = 16, 4
TOKENS_PER_BATCH = SEQ_LEN * BATCH


def _synthetic_file(i: int) -> str:
    """Python-looking code whose length varies from one line to ~60 lines."""
    lines = (i * 7) % 19 + 1 if i % 9 else 55
    head = "import pandas as pd\n" if i % 4 == 0 else f"import os  # module {i}\n"
    body = "".join(f"    value_{j} = x * {i + j} + {j % 5}\n" for j in range(lines))
    return f"{head}\n\ndef function_{i}(x):\n{body}    return value_{lines - 1}\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~40 .py files (with exact and whitespace-only duplicates, an empty file) and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("stream")
    tree = root / "tree"
    contents = {f"pkg{i % 3}/mod_{i}.py": _synthetic_file(i) for i in range(34)}
    contents["pkg0/short.py"] = "x = 1\n"  # shorter than one window
    contents["pkg1/copy_of_5.py"] = contents["pkg2/mod_5.py"]
    contents["pkg2/copy_of_8.py"] = contents["pkg2/mod_8.py"]
    # The same as mod_12 once whitespace is removed: a duplicate for codeparrot-style dedup.
    contents["copy_of_12.py"] = contents["pkg0/mod_12.py"].replace("    ", "\t")
    contents["pkg1/empty.py"] = ""
    contents["pkg1/blank.py"] = "\n   \n"
    for rel, text in contents.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    (tree / "README.txt").write_text("not python")
    tokenizer = train_bpe_tokenizer(list(contents.values()), vocab_size=300, progress=False)
    tokenizer.save_pretrained(root / "tokenizer")
    return tree, str(root / "tokenizer")


def _joined(docs, eos: int) -> np.ndarray:
    return np.concatenate([np.asarray([*ids, eos], dtype=np.int64) for _, ids in docs])


def _take(stream, n: int) -> list[dict]:
    iterator = iter(stream)
    batches = [next(iterator) for _ in range(n)]
    del iterator  # shuts DataLoader workers down
    return batches


# ---------------------------------------------------------------- pre-tokenized windows


def test_window_starts_exact():
    lengths = np.array([5, 0, 9, 3])
    # concat: 5+1, 0+1, 9+1, 3+1 = 21 tokens -> windows at 0, 4, 8, 12, 16 (the last token is lost).
    assert window_starts(lengths, seq_len=4, mode="concat").tolist() == [0, 4, 8, 12, 16]
    # overflow: documents at offsets 0, 5, 5, 14 (no EOS); full chunks: one in doc 0, two in doc 2.
    assert window_starts(lengths, seq_len=4, mode="overflow").tolist() == [0, 5, 9]
    assert window_starts(np.array([3, 2]), seq_len=4, mode="overflow").tolist() == []


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_window_stream_uses_every_window_exactly_once_per_epoch(world_size, workers):
    """52 windows, batches of 3: 52 divides by no world_size * 3, so global batches straddle epoch boundaries."""
    seq_len, batch_size = 8, 3
    starts = window_starts(np.array([40, 0, 77, 13, 150, 99, 31]), seq_len=seq_len, mode="concat")
    tokens = np.arange(int(starts[-1]) + seq_len, dtype=np.uint16)  # a window's first token is its start
    assert len(starts) == 52
    steps = -(-3 * 52 // (world_size * batch_size))  # enough steps for three epochs on every rank
    per_rank = []
    for rank in range(world_size):
        stream = WindowStream(
            tokens, starts, seq_len=seq_len, batch_size=batch_size, seed=7, rank=rank, world_size=world_size
        )
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        batches = list(itertools.islice(iter(loader), steps))
        assert [b["position"][2].item() for b in batches] == list(range(1, steps + 1))  # DataLoader order
        for b in batches:
            x = b["input_ids"]  # (B, T)
            assert x.dtype == torch.int64 and x.shape == (batch_size, seq_len)
            assert torch.equal(x, x[:, :1] + torch.arange(seq_len))
        per_rank.append([b["input_ids"][:, 0].tolist() for b in batches])
    # Interleave as the ranks step together: step s, rank 0, rank 1, ...
    run = [w for s in range(steps) for mine in per_rank for w in mine[s]]
    epochs = [run[e * 52 : (e + 1) * 52] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(starts.tolist())  # every window once, none twice
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_window_stream_resume_and_too_small():
    seq_len = 4
    starts = window_starts(np.array([30, 50, 17]), seq_len=seq_len, mode="concat")
    tokens = np.arange(200, dtype=np.uint16)
    make = functools.partial(
        WindowStream, tokens, starts, seq_len=seq_len, batch_size=5, seed=3, rank=1, world_size=2
    )
    full = _take(make(), 12)  # 24 windows, 10 per global batch: crosses epoch boundaries mid-batch
    for k in (0, 3, 4, 5, 8):
        resume = {"consumed": k + 1, "cursors": {0: full[k]["position"][1:].tolist()}}
        resumed = _take(make(resume=resume), 12 - k - 1)
        for got, want in zip(resumed, full[k + 1 :], strict=True):
            assert torch.equal(got["input_ids"], want["input_ids"]), k
            assert torch.equal(got["position"], want["position"]), k
    with pytest.raises(ValueError, match="cannot fill a batch"):
        WindowStream(tokens, starts[:9], seq_len=4, batch_size=5, seed=0, rank=0, world_size=2)


def test_is_heldout_is_stable_and_near_the_fraction():
    paths = [f"/repo/pkg{i // 100}/module_{i}.py" for i in range(10_000)]
    held = [is_heldout({"path": p}, 0.05) for p in paths]
    # Exact values: a change of hash or arithmetic would silently move documents between train and validation.
    assert [i for i, h in enumerate(held[:300]) if h] == [4, 6, 47, 55, 73, 90, 91, 93, 100, 122, 143, 146, 156,
                                                           160, 165, 207, 211, 223, 292]  # fmt: skip
    # split_key, where a source has one, decides instead of the path
    assert [is_heldout({"path": "elsewhere", "split_key": p}, 0.05) for p in paths[:300]] == held[:300]
    assert abs(sum(held) / len(paths) - 0.05) <= 0.01
    wider = [path_is_heldout(p, 0.2) for p in paths]
    assert abs(sum(wider) / len(paths) - 0.2) <= 0.01
    assert all(w for h, w in zip(held, wider) if h)  # a larger fraction only adds documents
    assert not any(path_is_heldout(p, 0.0) for p in paths[:100])
    assert all(path_is_heldout(p, 1.0) for p in paths[:100])


def test_heldout_split_does_not_depend_on_where_the_tree_lives(tmp_path):
    """Two copies of one tree in different folders hold out the same files (a venv path must not change it)."""
    from lmrecipes.data.sources import SourceTree
    from lmrecipes.data.stream import is_heldout

    for copy in ("one", "two/deeper"):
        for i in range(200):
            (tmp_path / copy / f"pkg{i % 7}").mkdir(parents=True, exist_ok=True)
            (tmp_path / copy / f"pkg{i % 7}" / f"m{i}.py").write_text(f"x = {i}\n")
    held = [
        sorted(
            doc["split_key"]
            for _, doc in SourceTree(roots=[tmp_path / c], progress=False).iter_raw()
            if is_heldout(doc, 0.2)
        )  # fmt: skip
        for c in ("one", "two/deeper")
    ]
    assert held[0] == held[1] and 20 < len(held[0]) < 60
