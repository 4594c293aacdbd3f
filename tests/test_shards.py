"""Shard-aware streams over real sources and a real tokenizer: each document read by one stream per epoch, seeded
shuffles, exact resume that opens one shard at one block (never replaying the source), and bad input."""

import collections
import functools
import json
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from lmrecipes.bpe import train_bpe_tokenizer
from lmrecipes.data.filters import FilterPipeline
from lmrecipes.data.pretokenize import encode_batch
from lmrecipes.data.shards import Place, Shard, ShardReader, describe_change, parts_per_shard
from lmrecipes.data.sources import open_source
from lmrecipes.data.splits import is_heldout
from lmrecipes.data.stream import PackedStream, StreamSpec

SEQ_LEN, BATCH, BLOCK = 16, 4, 5
FILES = 7  # JSONL files of the corpus: more than some stream counts below, fewer than others


def _doc(i: int) -> str:
    lines = (i * 5) % 11 + 1
    return f"def f_{i}(x):\n" + "".join(f"    v{j} = x * {i + j}\n" for j in range(lines)) + "    return x\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """70 unique documents in 7 JSONL files (plus two exact copies and one empty document), a tokenizer."""
    root = tmp_path_factory.mktemp("shards")
    docs = [{"content": _doc(i), "path": f"doc{i}"} for i in range(70)]
    extra = [{"content": _doc(3), "path": "copy3"}, {"content": _doc(40), "path": "copy40"}]
    extra.append({"content": "  \n", "path": "blank"})
    rows = docs + extra
    for f in range(FILES):
        with open(root / f"part{f}.jsonl", "w") as handle:
            handle.writelines(json.dumps(d) + "\n" for d in rows[f::FILES])
    with open(root / "one.jsonl", "w") as handle:  # the same rows in one file: fewer shards than streams
        handle.writelines(json.dumps(d) + "\n" for d in rows)
    tokenizer = train_bpe_tokenizer([d["content"] for d in docs], vocab_size=300, progress=False)
    tokenizer.save_pretrained(root / "tokenizer")
    return root, str(root / "tokenizer"), {d["content"]: d["path"] for d in docs}


def _source(corpus, name="part*.jsonl"):
    return functools.partial(open_source, str(corpus[0] / name), progress=False)


def _spec(corpus, name="part*.jsonl", **overrides) -> StreamSpec:
    fields = dict(
        make_source=_source(corpus, name),
        make_filters=functools.partial(FilterPipeline, dedup=False),
        tokenizer_path=corpus[1],
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        shuffle_buffer=BLOCK,
        seed=3,
    )
    return StreamSpec(**(fields | overrides))


def _epoch_docs(corpus, name: str, stream: int, streams: int, epoch: int, dedup=False) -> list[str]:
    """Paths of the documents stream ``stream`` of ``streams`` emits in ``epoch``, in order."""
    filters = FilterPipeline(dedup=dedup)
    reader = ShardReader(_source(corpus, name)(), filters, filters, stream=stream, streams=streams, seed=3,
                         block_rows=BLOCK)  # fmt: skip
    out = []
    for group in reader.groups(Place(epoch, 0, 0, 0, 0)):
        for place, doc in group:
            if place.epoch > epoch:
                return out
            out.append(doc["path"])
    raise AssertionError("unreachable: streams are endless")


@pytest.mark.parametrize("name", ["part*.jsonl", "one.jsonl"])
@pytest.mark.parametrize("streams", [1, 2, 3, 4, 6])  # 1-3 ranks x 1 or 2 workers
def test_every_document_is_read_by_one_stream_once_per_epoch(corpus, name, streams):
    unique = sorted([*corpus[2].values(), "copy3", "copy40"])  # no dedup: copies are documents too
    orders = []
    for epoch in (0, 1):
        per_stream = [_epoch_docs(corpus, name, g, streams, epoch) for g in range(streams)]
        assert all(per_stream), "every stream gets documents"
        assert sorted(p for docs in per_stream for p in docs) == unique  # exactly once, nothing lost
        orders.append(per_stream)
    assert orders[0] != orders[1]  # reshuffled every epoch
    if name == "one.jsonl":  # the fallback: one shard split into row-interleaved parts
        assert parts_per_shard(1, streams) == streams


def test_block_shuffle_changes_the_order_within_a_file(corpus):
    shuffled = _epoch_docs(corpus, "one.jsonl", 0, 1, 0)
    filters = FilterPipeline()
    plain = ShardReader(
        _source(corpus, "one.jsonl")(), filters, filters, stream=0, streams=1, seed=3, block_rows=0
    )
    in_order = [doc["path"] for _, doc in next(plain.groups(Place(0, 0, 0, 0, 0)))]
    assert shuffled != in_order[: len(shuffled)] and sorted(shuffled[:BLOCK]) == sorted(in_order[:BLOCK])


def test_dedup_is_per_stream(corpus):
    one = _epoch_docs(corpus, "part*.jsonl", 0, 1, 0, dedup=True)
    assert sorted(one) == sorted(corpus[2].values())  # one stream: both copies dropped
    # three streams: a copy survives when it and its original are in different streams' files
    streams = [_epoch_docs(corpus, "part*.jsonl", g, 3, 0, dedup=True) for g in range(3)]
    texts = {"copy3": _doc(3), "copy40": _doc(40)} | {path: content for content, path in corpus[2].items()}
    assert all(len({texts[p] for p in docs}) == len(docs) for docs in streams)
    assert set(corpus[2].values()) <= {p for docs in streams for p in docs}


def _take(stream, n: int) -> list[dict]:
    iterator = iter(stream)
    batches = [next(iterator) for _ in range(n)]
    del iterator  # shuts DataLoader workers down
    return batches


def _tokens(batches) -> np.ndarray:
    return torch.cat([b["input_ids"].reshape(-1) for b in batches]).numpy()


def test_packed_stream_packs_its_readers_documents_across_epochs(corpus):
    tokenizer = AutoTokenizer.from_pretrained(corpus[1])
    docs = _epoch_docs(corpus, "part*.jsonl", 1, 3, 0) + _epoch_docs(corpus, "part*.jsonl", 1, 3, 1)
    text = {path: content for content, path in corpus[2].items()} | {"copy3": _doc(3), "copy40": _doc(40)}
    ids = encode_batch(tokenizer, [text[p] for p in docs])
    joined = np.concatenate([np.asarray([*i, tokenizer.eos_token_id]) for i in ids])
    stream = _tokens(
        _take(PackedStream(_spec(corpus), rank=1, world_size=3), len(joined) // (SEQ_LEN * BATCH))
    )
    assert np.array_equal(stream, joined[: len(stream)])


def _resume_state(batches) -> dict:
    """What the DataModule keeps from the batches it trained on: cursors, and each stream's seen digests."""
    cursors, seen = {}, {}
    for b in batches:
        logical, *cursor = b["position"].tolist()
        if cursors.get(logical, [None])[0] != cursor[0]:
            seen[logical] = []
        cursors[logical] = cursor
        seen.setdefault(logical, []).extend(b["seen"].tolist())
    return {"consumed": len(batches), "cursors": cursors, "seen": {k: np.array(v) for k, v in seen.items()}}


@pytest.fixture(scope="module")
def uninterrupted(corpus):
    """One stream, dedup on (each epoch drops both copies), about two and a half epochs."""
    spec = _spec(corpus, make_filters=functools.partial(FilterPipeline, dedup=True))
    return spec, _take(PackedStream(spec, rank=0, world_size=1), 150)


def test_resume_anywhere_continues_exactly_and_reads_at_most_a_block(uninterrupted):
    spec, full = uninterrupted
    epochs = [b["position"][1].item() for b in full]
    assert epochs[-1] >= 2
    fresh_reads = full[0]["stats"][0].item()
    for k in [*range(0, len(full) - 6, 4), epochs.index(1), epochs.index(2) - 1]:
        resumed = _take(PackedStream(spec, rank=0, world_size=1, resume=_resume_state(full[: k + 1])), 5)
        for got, want in zip(resumed, full[k + 1 : k + 6], strict=True):
            assert torch.equal(got["input_ids"], want["input_ids"]), k
            assert torch.equal(got["position"], want["position"]), k
        # documents read before the first resumed batch: as many as a fresh start, plus the block re-read and
        # one block of rounding (replaying the source would read everything before the position)
        assert resumed[0]["stats"][0].item() <= fresh_reads + 2 * BLOCK, k


def test_dataloader_workers_play_streams_and_resume(corpus):
    spec = _spec(corpus)
    full = _take(DataLoader(PackedStream(spec, rank=1, world_size=2), batch_size=None, num_workers=2), 24)
    assert [b["position"][0].item() for b in full] == [0, 1] * 12
    for worker in (0, 1):  # worker w of rank r of 2 is stream 2r + w of 4
        direct = _take(PackedStream(spec, rank=2 + worker, world_size=4), 12)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full[worker::2], direct))
    for consumed in (1, 6, 17):
        loader = DataLoader(PackedStream(spec, rank=1, world_size=2, resume=_resume_state(full[:consumed])),
                            batch_size=None, num_workers=2)  # fmt: skip
        for got, want in zip(_take(loader, 6), full[consumed : consumed + 6], strict=True):
            assert torch.equal(got["input_ids"], want["input_ids"]), consumed


def test_parquet_streamed_through_datasets_is_split_by_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in range(4):
        pq.write_table(
            pa.table({"content": [f"file {f} row {r}" for r in range(3)]}), tmp_path / f"p{f}.parquet"
        )
    source = open_source(str(tmp_path / "*.parquet"), streaming=True)
    shards = source.shards()
    assert [s.name for s in shards] == sorted(str(p) for p in tmp_path.glob("*.parquet"))
    rows = [doc["content"] for _, _, doc in source.iter_shard(2, row=1)]
    assert rows == ["file 2 row 1", "file 2 row 2"]  # one file, from its row
    loaded = open_source(str(tmp_path / "*.parquet"), streaming=False)  # map-style: ranges of rows
    assert [(s.name, s.size) for s in loaded.shards()] == [("rows 0-12", 12)]
    assert [r for r, _, _ in loaded.iter_shard(0, row=4, part=1, parts=3)] == [4, 7, 10]
    seen = [_paths_of(source, g, 2) for g in (0, 1)]
    assert sorted(seen[0] + seen[1]) == sorted(f"file {f} row {r}" for f in range(4) for r in range(3))
    assert {c.split(" row")[0] for c in seen[0]}.isdisjoint({c.split(" row")[0] for c in seen[1]})


def _paths_of(source, stream: int, streams: int, keep=None) -> list[str]:
    filters = FilterPipeline()
    reader = ShardReader(
        source, filters, keep or filters, stream=stream, streams=streams, seed=0, block_rows=2
    )
    out = []
    for group in reader.groups(Place(0, 0, 0, 0, 0)):
        if group and group[0][0].epoch:
            return out
        out += [doc["content"] for _, doc in group]
    return out


class _WorkerStreams(torch.utils.data.IterableDataset):
    """DataLoader worker ``w`` of ``W`` reads stream ``w`` of ``W`` of a source (what PackedStream does)."""

    def __init__(self, source):
        self.source = source

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        yield from _paths_of(self.source, info.id, info.num_workers)


def _write_parquet(folder, files: int, rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in range(files):
        pq.write_table(
            pa.table({"content": [f"file {f} row {r}" for r in range(rows)]}), folder / f"p{f}.parquet"
        )
    return str(folder / "*.parquet")


def test_streamed_parquet_shards_are_read_whole_inside_dataloader_workers(tmp_path):
    # datasets' own __iter__ splits a stream again by worker id inside a worker: a one-file shard would then
    # reach worker 0 only, and worker 1 would find its shard "empty"
    source = open_source(_write_parquet(tmp_path, files=2, rows=5), streaming=True)
    loader = DataLoader(_WorkerStreams(source), batch_size=None, num_workers=2)
    assert sorted(loader) == sorted(f"file {f} row {r}" for f in range(2) for r in range(5))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_train_stream_and_validation_split_records_without_a_path_the_same_way(tmp_path, kind):
    if kind == "jsonl":
        for f in range(2):  # blank lines between the records: they have no row number
            lines = [json.dumps({"content": f"file {f} row {r}"}) + "\n\n" for r in range(20)]
            (tmp_path / f"p{f}.jsonl").write_text("".join(lines))
        source = open_source(str(tmp_path / "*.jsonl"))
    else:
        source = open_source(_write_parquet(tmp_path, files=2, rows=20), streaming=True)
    train = _paths_of(source, 0, 1, keep=lambda doc: not is_heldout(doc, 0.5))
    val = [doc["content"] for _, doc in source.iter_raw() if is_heldout(doc, 0.5)]
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(f"file {f} row {r}" for f in range(2) for r in range(20))


def test_a_source_tree_deals_its_files_and_refuses_fewer_files_than_streams(tmp_path):
    for i in range(3):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    source = open_source(str(tmp_path), progress=False)
    everything = FilterPipeline(keywords=None)
    seen = [_paths_of(source, g, 3, keep=everything) for g in range(3)]
    assert sorted(len(s) for s in seen) == [1, 1, 1]  # one file each, none left without a document
    assert sorted(sum(seen, [])) == [f"x = {i}\n" for i in range(3)]
    with pytest.raises(
        ValueError, match=r"has 3 file\(s\), one document each, for 4 streams .* at most 3 streams"
    ):
        _paths_of(source, 3, 4, keep=everything)


def test_jsonl_shard_opens_at_its_byte_offset(corpus):
    source = _source(corpus, "one.jsonl")()
    rows = list(source.iter_shard(0))
    row, byte, doc = rows[50]
    again = list(source.iter_shard(0, row=row, byte=byte))
    assert [(r, b, d["path"]) for r, b, d in again] == [(r, b, d["path"]) for r, b, d in rows[50:]]
    parts = [list(source.iter_shard(0, part=p, parts=3)) for p in range(3)]
    assert sorted(r for part in parts for r, _, _ in part) == list(range(len(rows)))


def test_empty_shard_and_empty_stream_are_named(corpus, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": _doc(1)}) + "\n")
    (tmp_path / "b.jsonl").write_text("\n")
    source = open_source(str(tmp_path / "*.jsonl"))
    filters = FilterPipeline()
    with pytest.raises(ValueError, match=r"shard '.*b\.jsonl' of the source is empty"):
        for reader_stream in (0, 1):
            reader = ShardReader(
                source, filters, filters, stream=reader_stream, streams=2, seed=0, block_rows=4
            )
            next(reader.groups(Place(0, 0, 0, 0, 0)))
    keyword = FilterPipeline(keywords=["no-such-keyword"])
    reader = ShardReader(_source(corpus)(), keyword, keyword, stream=0, streams=2, seed=0, block_rows=4)
    with pytest.raises(ValueError, match="stream 0 of 2 .* received no training documents"):
        next(group for group in reader.groups(Place(0, 0, 0, 0, 0)) if group)


def test_a_changed_shard_list_is_described():
    saved = [["a", 10], ["b", 20], ["c", 30]]
    now = [Shard("a", 10), Shard("b", 25), Shard("d", 5)]
    assert describe_change(saved, now) == "added ['d'] (1); removed ['c'] (1); resized ['b'] (1)"
    assert describe_change(saved, [Shard("a", 10), Shard("b", 20), Shard("c", 30)]) == ""
    assert describe_change(saved, [Shard("b", 20), Shard("a", 10), Shard("c", 30)]).endswith("another order")
    with pytest.raises(ValueError, match="lists no shard"):
        parts_per_shard(0, 2)


def test_streams_outnumbering_shards_count_the_parts():
    assert [parts_per_shard(n, 8) for n in (1, 3, 8, 64)] == [8, 3, 1, 1]
    assert collections.Counter(parts_per_shard(5, s) for s in range(1, 6)) == {1: 5}


def test_a_position_in_another_shard_is_refused(corpus, uninterrupted):
    spec, full = uninterrupted
    state = _resume_state(full[:3])
    epoch, slot, shard, *rest = state["cursors"][0]
    state["cursors"][0] = [epoch, slot, shard + 1, *rest]  # as if the file list had changed under the run
    with pytest.raises(ValueError, match=rf"is in shard {shard + 1} .* now puts shard {shard} there"):
        _take(PackedStream(spec, rank=0, world_size=1, resume=state), 1)


def test_the_datamodule_logs_the_read_amplification_and_dedup_scope(corpus, caplog):
    from lmrecipes.data.clm import CodeDataModule

    data = CodeDataModule(
        tokenizer=corpus[1],
        source={"train_source": str(corpus[0] / "one.jsonl"), "val_source": str(corpus[0] / "part0.jsonl")},
        filters={"dedup": True},
        loader={"batch_size": BATCH, "num_workers": 2},
        progress=False,
    )
    with caplog.at_level(logging.INFO):
        data.train_dataloader()
    assert "1 shard(s) to 2 stream(s)" in caplog.text and "read amplification 2x" in caplog.text
    assert "global exact de-duplication" in caplog.text
