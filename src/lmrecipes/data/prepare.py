"""``lmrecipes prepare``: filters + global exact dedup + tokenization into a sharded, pre-tokenized folder.

    lmrecipes prepare -c configs/clm/offline.yaml --output prepared/ --num_proc 2

Stage 1 (one process, source order): read the training documents, apply the keyword/quality filters, and drop
exact duplicates by an 8-byte digest of the whitespace-free content, keeping the first occurrence in source order
(one numpy array of digests and a stable argsort: ~30 bytes per document at its peak, against ~100 for a Python set
of digests; see ``scripts/bench_prepare.py``). The kept documents go to an Arrow dataset in ``DIR/work/docs``.
Stage 2 (``num_proc`` processes): the documents are cut into shards of about ``shard_chars`` characters, a plan
that depends on the documents only, so the tokens are the same whatever ``num_proc`` is; each shard is tokenized
into ``shard-NNNNN.bin`` (uint16/uint32, documents joined with EOS in ``concat`` mode) plus its document lengths,
and marked done by a record holding its checksum. A rerun after a kill keeps every shard whose record and checksum
hold and redoes the rest. ``manifest.json`` (counts, fingerprints, per-file sizes and checksums) is written last:
its presence marks a finished folder (read by ``lmrecipes.data.prepared``).

Engine: ``datasets`` (already a dependency): Arrow for the documents and ``Dataset.map(num_proc=N)`` as the
process pool over shard ids, so the pool, its start-up and its error reporting are the library's. litdata
(``optimize`` + ``StreamingDataset``) was not adopted: ``pip install --dry-run litdata`` next to torch 2.13 (CPU)
resolves to torch 2.14.1 with the CUDA 13 wheels and torchvision (it depends on torchvision, which pins torch), a
multi-GB change of the training stack for one optional feature; its own resume has known bugs (litData #316, #775);
and its reader keeps its own position, not the batches-consumed position every recipe here saves, so its chunk
files would still need our exactly-once permutation and resume on top. Measured (``python
scripts/bench_prepare.py --max-chars 20000000``, idle 2-core machine): 1 process 1.05 M tokens/s (the tokenizer's
own threads on both cores), 2 processes 1.26 M; one tokenizer thread per process 0.59 M vs 1.14 M (1.92x); dedup
25.0 bytes per document for 1 M digests (a Python set: 76.1).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from lmrecipes.data.filters import FilterPipeline, content_digest
from lmrecipes.data.pretokenize import cache_key, encode_batch, tokenizer_fingerprint

FORMAT = "lmrecipes-prepared/1"
MANIFEST = "manifest.json"
TOKENIZE_GROUP = 64  # documents per encode_batch call


@dataclass
class PrepareSpec:
    """What decides a prepared folder's content; plain values and a picklable source factory."""

    make_source: Callable  # () -> DocumentSource
    source_fingerprint: str
    tokenizer_path: str
    mode: str = "concat"
    keywords: list[str] | None = None
    quality: bool = False
    dedup: bool = True
    heldout_fraction: float = 0.0
    shard_chars: int = 32_000_000
    extra: dict = field(default_factory=dict)  # more key parts (e.g. the held-out split's meaning)

    def key(self, tokenizer) -> dict:
        return {
            "source": self.source_fingerprint,
            "filters": [self.keywords, self.quality, self.dedup],
            "heldout": self.heldout_fraction,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "packing": self.mode,
            "shard_chars": self.shard_chars,
            **self.extra,
        }


def digest64(content: str) -> int:
    """The filters' :func:`~lmrecipes.data.filters.content_digest` as a signed integer (Arrow's int64)."""
    digest = content_digest(content)
    return digest - (1 << 64) if digest >= 1 << 63 else digest


def first_occurrences(digests: np.ndarray) -> np.ndarray:
    """Sorted indices of the first occurrence of each distinct digest (source order, any number of processes)."""
    order = np.argsort(digests, kind="stable")  # (docs,) int64; stable: equal digests keep source order
    ordered = digests[order]
    new = np.empty(len(digests), dtype=bool)  # (docs,) True where a digest first appears in sorted order
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    del ordered  # peak ~25 bytes per document (digests, order, ordered, new), not np.unique's ~33
    first = order[new]
    first.sort()
    return first


def shard_bounds(chars: np.ndarray, shard_chars: int) -> np.ndarray:
    """Document boundaries ``[0, b1, ..., n]``: a shard closes once it holds ``shard_chars`` characters."""
    bounds, total = [0], 0
    for i, c in enumerate(chars.tolist()):
        total += c
        if total >= shard_chars:
            bounds.append(i + 1)
            total = 0
    if bounds[-1] != len(chars):
        bounds.append(len(chars))
    return np.asarray(bounds, dtype=np.int64)


def file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, value: dict) -> None:
    """Atomically: a kill leaves the old file or none, never half a file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _kept_documents(spec: PrepareSpec, counts: dict):
    """Stage 1's generator: ``{"content", "digest", "chars"}`` of the kept training documents, in source order."""
    from lmrecipes.data.stream import is_heldout

    filters = FilterPipeline(keywords=spec.keywords, quality=spec.quality, dedup=False)
    for _, doc in spec.make_source().iter_raw():
        if is_heldout(doc, spec.heldout_fraction) or not filters(doc):
            continue
        yield {"content": doc["content"], "digest": digest64(doc["content"]), "chars": len(doc["content"])}
    if filters.counts["kept"] == 0:  # raised here: datasets' own error for an empty generator names nothing
        raise ValueError(
            f"no training document passed the filters ({filters.summary()}): check data.source.train_source, "
            "data.source.heldout_fraction and data.filters"
        )
    counts.update(filters.counts)


def build_documents(spec: PrepareSpec, work: Path) -> dict:
    """Stage 1 into ``work/docs`` (skipped when a previous run finished it); returns its counts."""
    done = work / "docs.json"
    if done.exists():
        return json.loads(done.read_text())
    import datasets

    shutil.rmtree(work / "docs", ignore_errors=True)
    counts: dict = {}
    features = datasets.Features(
        {
            "content": datasets.Value("string"),
            "digest": datasets.Value("int64"),
            "chars": datasets.Value("int64"),
        }
    )
    shutil.rmtree(work / "hf", ignore_errors=True)  # so the generator runs here (its counts are ours)
    try:
        docs = datasets.Dataset.from_generator(
            _kept_documents,
            gen_kwargs={"spec": spec, "counts": counts},
            features=features,
            cache_dir=str(work / "hf"),
        )
    except datasets.exceptions.DatasetGenerationError as err:  # the source's own message names file and line
        raise (err.__cause__ if isinstance(err.__cause__, ValueError) else err) from None
    digests = np.asarray(docs.data.column("digest").to_numpy(), dtype=np.int64)  # (docs,) 8 bytes each
    keep = first_occurrences(digests) if spec.dedup else np.arange(len(digests))
    del digests
    docs.select(keep).save_to_disk(str(work / "docs"))
    stats = {"seen": counts["seen"], "kept_by_filters": counts["kept"], "documents": int(len(keep))}
    stats["duplicates"] = stats["kept_by_filters"] - stats["documents"]
    write_json(done, stats)
    shutil.rmtree(work / "hf", ignore_errors=True)
    return stats


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def finished_shard(folder: Path, index: int) -> dict | None:
    """The record of shard ``index`` when its files are complete and match their checksums, else None."""
    try:
        record = json.loads((folder / f"{shard_name(index)}.json").read_text())
    except (OSError, ValueError):
        return None  # never finished (or the record itself was cut short): build it again
    for name, size, checksum in (
        (record["file"], record["bytes"], record["checksum"]),
        (record["lengths_file"], record["lengths_bytes"], record["lengths_checksum"]),
    ):
        path = folder / name
        if not path.exists() or path.stat().st_size != size or file_checksum(path) != checksum:
            return None
    return record


def _write_shard(folder: Path, index: int, texts: list[str], tokenizer, *, mode: str, dtype: str) -> dict:
    """Tokenize one shard's documents into ``shard-NNNNN.bin`` + ``.lengths.npy``; the record is written last."""
    name, lengths = shard_name(index), []
    tmp = folder / f"{name}.bin.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        for a in range(0, len(texts), TOKENIZE_GROUP):
            for ids in encode_batch(tokenizer, texts[a : a + TOKENIZE_GROUP]):
                lengths.append(len(ids))
                if mode == "concat":
                    ids = [*ids, tokenizer.eos_token_id]
                np.asarray(ids, dtype=dtype).tofile(out)
    os.replace(tmp, folder / f"{name}.bin")
    with open(tmp, "wb") as out:
        np.save(out, np.asarray(lengths, dtype=np.int64))
    os.replace(tmp, folder / f"{name}.lengths.npy")
    record = {"index": index, "file": f"{name}.bin", "lengths_file": f"{name}.lengths.npy"}
    record |= {"documents": len(lengths), "tokens": int(sum(lengths))}
    for key, path in (("", folder / record["file"]), ("lengths_", folder / record["lengths_file"])):
        record[f"{key}bytes"], record[f"{key}checksum"] = path.stat().st_size, file_checksum(path)
    write_json(folder / f"{name}.json", record)
    return record


def _tokenize_shards(
    batch: dict, *, folder: str, bounds: list[int], tokenizer_path: str, mode: str, dtype: str, pool: bool
):
    """``Dataset.map`` function run in the worker processes: build the listed shards that are not finished."""
    import datasets

    from lmrecipes.data.stream import load_tokenizer

    if pool:
        # One core per process: the Rust tokenizer would otherwise start a thread per core in every process (4
        # threads on 2 cores measured 652k tokens/s against 1.14M single-threaded, scripts/bench_prepare.py).
        # Read by the tokenizer at every batch call; set in this worker process only.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    out, docs, tokenizer = Path(folder), None, None
    for index in batch["shard"]:
        if finished_shard(out, index) is not None:
            continue  # kept from an earlier, interrupted build
        docs = docs or datasets.load_from_disk(str(out / "work" / "docs"))
        tokenizer = tokenizer or load_tokenizer(tokenizer_path)
        texts = docs[bounds[index] : bounds[index + 1]]["content"]
        _write_shard(out, index, list(texts), tokenizer, mode=mode, dtype=dtype)
    return batch


def _folder_fingerprint(output: Path) -> str | None:
    """The fingerprint of the dataset a folder holds or is building; None for an empty or new folder."""
    for path in (output / MANIFEST, output / "work" / "key.json"):
        if path.exists():
            try:
                return json.loads(path.read_text())["fingerprint"]
            except (ValueError, KeyError):
                raise ValueError(
                    f"{path} is truncated or not a prepared dataset's; delete the folder"
                ) from None
    if output.exists() and any(output.iterdir()):
        raise ValueError(
            f"--output {output} holds other files and no {MANIFEST}; expected a new or empty folder"
        )
    return None


def check_num_proc(num_proc) -> None:
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"--num_proc={num_proc!r}: expected a positive number of processes")


def prepare(spec: PrepareSpec, output: str | Path, *, num_proc: int = 1) -> Path:
    """Build (or finish building) the prepared folder ``output`` for ``spec`` with ``num_proc`` processes."""
    from lmrecipes.data.stream import load_tokenizer

    check_num_proc(num_proc)
    output, tokenizer = Path(output), load_tokenizer(spec.tokenizer_path)
    key = spec.key(tokenizer)
    fingerprint = cache_key(key)
    if (output / MANIFEST).exists() and _folder_fingerprint(output) == fingerprint:
        return output  # finished (its manifest is written last): no lock needed, the folder may be read-only
    output.parent.mkdir(parents=True, exist_ok=True)
    # Nodes that share a filesystem each run prepare_data: one builds, the others then find the manifest. The
    # folder is judged under the lock too: another node's build in progress looks like a folder of other files.
    with FileLock(f"{output}.lock"):
        found = _folder_fingerprint(output)
        if found not in (None, fingerprint):
            raise ValueError(
                f"--output {output} holds another prepared dataset (fingerprint {found}; this config's is "
                f"{fingerprint}); choose another folder or delete it"
            )
        if not (output / MANIFEST).exists():
            _build(spec, output, tokenizer, key, fingerprint, num_proc)
    return output


def _build(spec: PrepareSpec, output: Path, tokenizer, key: dict, fingerprint: str, num_proc: int) -> None:
    import datasets

    work = output / "work"
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "key.json", {"fingerprint": fingerprint, "key": key})
    stats = build_documents(spec, work)
    docs = datasets.load_from_disk(str(work / "docs"))
    bounds = shard_bounds(docs.data.column("chars").to_numpy(), spec.shard_chars)
    dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max else "uint32"
    shards = len(bounds) - 1
    workers = min(num_proc, shards)
    build = functools.partial(_tokenize_shards, folder=str(output), bounds=bounds.tolist(), pool=workers > 1,
                              tokenizer_path=spec.tokenizer_path, mode=spec.mode, dtype=dtype)  # fmt: skip
    ids = datasets.Dataset.from_dict({"shard": list(range(shards))})
    ids.map(build, batched=True, batch_size=1, num_proc=workers if workers > 1 else None,
            load_from_cache_file=False, keep_in_memory=True, desc="tokenizing shards")  # fmt: skip
    records = [finished_shard(output, i) for i in range(shards)]
    assert all(records), "a shard worker returned without finishing its shard"
    manifest = {
        "format": FORMAT, "fingerprint": fingerprint, "key": key, "dtype": dtype, "mode": spec.mode,
        "tokenizer": key["tokenizer"], "eos_token_id": tokenizer.eos_token_id, "counts": stats,
        "tokens": sum(r["tokens"] for r in records), "shards": [
            {k: r[k] for k in r if k != "index"} for r in records],
    }  # fmt: skip
    write_json(output / MANIFEST, manifest)  # last: a folder with a manifest is complete
    for i in range(shards):
        (output / f"{shard_name(i)}.json").unlink()
    for stale in output.glob("*.tmp*"):  # half-written files of a killed build
        stale.unlink()
    shutil.rmtree(work)


def ensure_prepared(root: str | Path, spec: PrepareSpec, tokenizer) -> Path:
    """``packing.pretokenize: true``: the prepared folder under ``root`` named by the spec's fingerprint, built
    (or finished) first when it has no manifest."""
    folder = Path(root) / cache_key(spec.key(tokenizer))
    if not (folder / MANIFEST).exists():
        prepare(spec, folder, num_proc=1)
    return folder
