"""Infinite packed-token streams that own their position.

Each (rank, DataLoader worker) pair reads one *shard* of the documents. Documents go to shards by a hash of their
content, so identical documents always meet in the same shard and per-shard de-duplication is global. A stream
yields whole batches, each tagged with ``position``: the cursor after that batch for the *logical* stream that
produced it. The DataModule keeps the position of the last batch actually trained on, which is exact even though
Lightning prefetches batches (a loader's own state would count the prefetched one, which was never trained on).

DataLoader workers hand out batches round-robin, worker 0 first. On resume, after ``consumed`` batches, physical
worker ``w`` plays logical stream ``(w + consumed) % W``, so batches keep their uninterrupted order.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lmrecipes.data.filters import FilterPipeline, shard_of
from lmrecipes.data.packing import Cursor, Packer
from lmrecipes.data.pretokenize import encode_batch
from lmrecipes.data.sources import DocumentSource


def loader_options(num_workers: int, *, persistent: bool = True) -> dict:
    """The DataLoader settings every recipe shares: its own generator, and workers that leave job signals to the
    main process (torch's workers die on a SIGTERM that does not come from their parent; SLURM signals every
    process of a job step, and the main process must live on to save a checkpoint, see ``Preemption``)."""
    workers = {"worker_init_fn": _ignore_job_signals, "persistent_workers": persistent} if num_workers else {}
    # pinned batches let Lightning's copy to the GPU (non_blocking=True for CUDA) overlap the previous step
    pinned = {"pin_memory": torch.cuda.is_available()}
    return {"num_workers": num_workers, "generator": own_generator(), **pinned, **workers}


def _ignore_job_signals(worker_id: int) -> None:
    # The parent still stops its workers through their queues (and their watchdog ends them if it dies).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def own_generator() -> torch.Generator:
    """A DataLoader's own generator: ``iter(loader)`` otherwise draws its worker seed from the global torch RNG, so
    a validation pass would shift the dropout draws of the steps after it, and a resumed run (which restores the
    RNG states saved in the checkpoint) would no longer match the uninterrupted one."""
    return torch.Generator().manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)))  # seed_everything's value


def is_heldout(doc: dict, fraction: float) -> bool:
    """Stable train/validation split by a hash of the document's root-relative path (``split_key``) or, for
    sources without one, its ``path`` — the same on every rank and wherever the files live."""
    return path_is_heldout(str(doc.get("split_key", doc["path"])), fraction)


def path_is_heldout(path: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(path.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1_000_000 < fraction * 1_000_000


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild its stream; plain values so it pickles into workers."""

    make_source: Callable[[], DocumentSource]
    make_filters: Callable[[], FilterPipeline]
    tokenizer_path: str
    seq_len: int
    batch_size: int
    mode: str = "concat"
    heldout_fraction: float = 0.0  # documents in the held-out split are skipped by the training stream
    tokenize_batch: int = 64


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class PackedStream(IterableDataset):
    """Endless batches ``{"input_ids": (B, T), "position": (4,), "stats": (4,)}`` for one rank.

    ``position`` is ``[logical stream, epoch, raw_index, offset]`` after the batch; ``stats`` the stream's
    documents seen and kept, and tokens tokenized and packed, since this process started.
    """

    def __init__(self, spec: StreamSpec, *, rank: int, world_size: int, resume: dict | None = None):
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.resume = resume or {"consumed": 0, "cursors": {}}

    def _logical_stream(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return (worker + self.resume["consumed"]) % workers, workers

    def __iter__(self) -> Iterator[dict]:
        logical, workers = self._logical_stream()
        shard, num_shards = self.rank * workers + logical, self.world_size * workers
        start = Cursor(*self.resume["cursors"].get(logical, [0, 0, 0]))
        tokenizer = load_tokenizer(self.spec.tokenizer_path)
        packer = Packer(seq_len=self.spec.seq_len, eos_id=tokenizer.eos_token_id, mode=self.spec.mode)
        filters = self.spec.make_filters()
        for batch in self._batches(packer, tokenizer, filters, shard, num_shards, start):
            position = torch.tensor([logical, *packer.cursor().as_list()])
            counts = [filters.counts["seen"], filters.counts["kept"], packer.tokens_in, packer.tokens_out]
            yield {"input_ids": torch.from_numpy(batch), "position": position, "stats": torch.tensor(counts)}

    def _batches(self, packer, tokenizer, filters, shard, num_shards, start) -> Iterator[np.ndarray]:
        b = self.spec.batch_size
        for epoch, group in self._doc_groups(filters, shard, num_shards, start):
            ids = encode_batch(tokenizer, [doc["content"] for _, doc in group])
            for (raw_index, _), doc_ids in zip(group, ids):
                skip = start.offset if (epoch, raw_index) == (start.epoch, start.raw_index) else 0
                packer.add(raw_index, doc_ids, skip=skip, epoch=epoch)
            while packer.buffered >= b * self.spec.seq_len:
                yield packer.windows(limit=b)  # (B, T)

    def _doc_groups(self, filters, shard, num_shards, start) -> Iterator[tuple[int, list]]:
        """Groups of kept ``(raw_index, doc)`` for this shard, epoch after epoch, from ``start`` on."""
        epoch, first = start.epoch, start.raw_index
        while True:
            source = self.spec.make_source()
            if first and filters.dedup:
                self._replay(source, filters, shard, num_shards, stop=first)
            group, kept = [], 0
            for raw_index, doc in source.iter_raw(start=first):
                if self._keep(doc, filters, shard, num_shards):
                    group.append((raw_index, doc))
                    kept += 1
                if len(group) == self.spec.tokenize_batch:
                    yield epoch, group
                    group = []
            if group:
                yield epoch, group
            if kept == 0 and first == 0:
                raise ValueError(
                    f"shard {shard} of {num_shards} received no training documents in a whole pass over the "
                    f"source ({filters.summary()}); use fewer DataLoader workers/processes or a larger corpus"
                )
            epoch, first = epoch + 1, 0
            filters.reset_dedup()

    def _keep(self, doc, filters, shard, num_shards) -> bool:
        if shard_of(doc, num_shards) != shard or is_heldout(doc, self.spec.heldout_fraction):
            return False
        return filters(doc)

    def _replay(self, source, filters, shard, num_shards, *, stop: int) -> None:
        """Rebuild the de-duplication set for documents before ``stop`` (resume without a stored set)."""
        for raw_index, doc in source.iter_raw(start=0):
            if raw_index >= stop:
                break
            self._keep(doc, filters, shard, num_shards)
