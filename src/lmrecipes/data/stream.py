"""Infinite packed-token streams that own their position.

Each (rank, DataLoader worker) pair is one of ``S`` streams and reads its own shards of the source, reshuffled
every epoch (see ``data/shards.py``): each document is read by one process per epoch. A stream yields whole
batches, each tagged with ``position``: the place after that batch for the *logical* stream that produced it
(epoch, shard slot and the shard it holds, row and byte of the shuffle block's start, index in the block,
token offset), so a resume
opens one shard at one block instead of replaying the source. The DataModule keeps the position of the last batch
actually trained on, which is exact even though Lightning prefetches batches (a loader's own state would count
the prefetched one, which was never trained on). With de-duplication on, a batch also carries the digests of the
blocks its position has moved past, so the saved position holds the stream's seen-set and a resume does not
replay the source to rebuild it.

DataLoader workers hand out batches round-robin, worker 0 first. On resume, after ``consumed`` batches, physical
worker ``w`` plays logical stream ``(w + consumed) % W``, so batches keep their uninterrupted order.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lmrecipes.data.filters import FilterPipeline
from lmrecipes.data.packing import Packer
from lmrecipes.data.pretokenize import encode_batch
from lmrecipes.data.shards import Place, ShardReader
from lmrecipes.data.sources import DocumentSource
from lmrecipes.data.splits import is_heldout, path_is_heldout

__all__ = ["PackedStream", "StreamSpec", "is_heldout", "loader_options", "path_is_heldout"]
TOKENIZE_DOCS = 64  # documents tokenized in one call at most (one file per block in a source tree) ...
TOKENIZE_CHARS = 1 << 17  # ... or about this many characters (code: ~50k tokens)


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
    shuffle_buffer: int = 1000  # rows per shuffle block (0: source order)
    seed: int = 0  # shard order and block shuffles depend on (seed, epoch) only


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class PackedStream(IterableDataset):
    """Endless batches ``{"input_ids": (B, T), "position": (8,), "stats": (4,), "seen": (n,)}`` for one rank.

    ``position`` is ``[logical stream, epoch, slot, shard, row, byte, index, offset]`` after the batch; ``stats`` the
    stream's documents seen and kept, and tokens tokenized and packed, since this process started; ``seen`` the
    de-duplication digests (uint64 as int64) of the blocks the position moved past since the previous batch.
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
        *start, offset = self.resume["cursors"].get(logical, [0, 0, -1, 0, 0, 0, 0])
        filters = self.spec.make_filters()
        seen = self.resume.get("seen", {}).get(logical)
        if seen is not None:
            filters.load_seen(np.asarray(seen).astype(np.uint64))
        keep = functools.partial(_keep, filters=filters, heldout=self.spec.heldout_fraction)
        reader = ShardReader(self.spec.make_source(), filters, keep, stream=self.rank * workers + logical,
                             streams=self.world_size * workers, seed=self.spec.seed,
                             block_rows=self.spec.shuffle_buffer)  # fmt: skip
        tokenizer = load_tokenizer(self.spec.tokenizer_path)
        packer = Packer(seq_len=self.spec.seq_len, eos_id=tokenizer.eos_token_id, mode=self.spec.mode)
        places: dict[int, Place] = {}  # packer's document number -> its place
        for batch in self._batches(reader.groups(Place.from_list(start)), packer, tokenizer, places, offset):
            cursor = packer.cursor()
            place = places.get(cursor.raw_index)
            if place is None:  # nothing buffered: the place right after the last document added
                place = replace(places[cursor.raw_index - 1], index=places[cursor.raw_index - 1].index + 1)
            for number in [n for n in places if n < cursor.raw_index - 1]:
                del places[number]
            digests = reader.digests_before(place)
            counts = [filters.counts["seen"], filters.counts["kept"], packer.tokens_in, packer.tokens_out]
            yield {
                "input_ids": torch.from_numpy(batch),
                "position": torch.tensor([logical, *place.as_list(), cursor.offset]),
                "stats": torch.tensor(counts),
                "seen": torch.from_numpy(digests.view(np.int64)),
            }

    def _batches(self, groups, packer, tokenizer, places, offset) -> Iterator[np.ndarray]:
        """Full (B, T) batches. Documents are tokenized in chunks of ``TOKENIZE_DOCS`` documents or
        ``TOKENIZE_CHARS`` characters, whichever comes first: big enough for batched tokenization, small enough
        that a first batch (fresh or resumed) never waits for a whole shuffle block to be tokenized."""
        b, number, chunk, chars = self.spec.batch_size, 0, [], 0
        for item in itertools.chain.from_iterable(groups):
            chunk.append(item)
            chars += len(item[1]["content"])
            if len(chunk) < TOKENIZE_DOCS and chars < TOKENIZE_CHARS:
                continue
            ids = encode_batch(tokenizer, [doc["content"] for _, doc in chunk])
            for (place, _), doc_ids in zip(chunk, ids):
                packer.add(number, doc_ids, skip=offset if number == 0 else 0, epoch=place.epoch)
                places[number] = place
                number += 1
                while packer.buffered >= b * self.spec.seq_len:
                    yield packer.windows(limit=b)  # (B, T)
            chunk, chars = [], 0


def _keep(doc: dict, *, filters: FilterPipeline, heldout: float) -> bool:
    return not is_heldout(doc, heldout) and filters(doc)
