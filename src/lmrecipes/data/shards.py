"""Which shards a (rank, worker) stream reads in an epoch, and how a shuffle block is ordered.

A source lists its natural shards (files, an HF stream's ``n_shards``, row ranges). With ``S`` streams (ranks x
DataLoader workers) and ``n`` shards, epoch ``e`` permutes the shards with a generator seeded by (seed, e) and
stream ``g`` reads every ``S``-th one of that order from ``g`` on: each document is read by one process per epoch.
With fewer shards than streams each shard is split into ``K = ceil(S / n)`` row-interleaved parts (row ``r``
belongs to part ``r % K``); every part then reads the whole shard and keeps ``1 / K`` of its rows, a read
amplification of ``K`` that :func:`parts_per_shard` callers log.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shard:
    """A shard's stable name and size (bytes or rows; -1 when unknown), to tell when a source changed."""

    name: str
    size: int = -1


def parts_per_shard(num_shards: int, streams: int) -> int:
    """K: how many row-interleaved parts each shard is split into so every stream gets at least one."""
    if num_shards < 1:
        raise ValueError("the source lists no shard; expected at least one readable file or shard")
    return max(1, math.ceil(streams / num_shards))


def stream_slots(
    num_shards: int, streams: int, stream: int, *, seed: int, epoch: int, parts: int | None = None
) -> list[tuple[int, int]]:
    """(shard, part) pairs stream ``stream`` of ``streams`` reads in ``epoch``, in reading order; ``parts`` per
    shard defaults to :func:`parts_per_shard`."""
    parts = parts_per_shard(num_shards, streams) if parts is None else parts
    order = np.random.default_rng([seed, epoch]).permutation(num_shards * parts)
    return [divmod(int(v), parts) for v in order[stream::streams]]


def block_order(size: int, *, seed: int, epoch: int, stream: int, row: int, enabled: bool) -> np.ndarray:
    """Order in which a block of ``size`` documents starting at shard row ``row`` is emitted.

    A *block* shuffle (read a block, emit it permuted) rather than the book's replacement buffer: a replacement
    buffer's content depends on everything read before, so resuming it exactly would need the whole buffer saved
    or the stream replayed (``datasets``' own resume through its shuffle buffer drops and duplicates examples).
    A block is re-read from its first row, so a resume costs at most one block.
    """
    if not enabled or size < 2:
        return np.arange(size)
    return np.random.default_rng([seed, epoch, stream, row]).permutation(size)


def describe_change(saved: list[list], now: list[Shard]) -> str:
    """What differs between a saved shard list ``[[name, size], ...]`` and the current one ('' when equal)."""
    before = {name: size for name, size in saved}
    after = {s.name: s.size for s in now}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    resized = sorted(n for n in set(before) & set(after) if before[n] != after[n])
    if [n for n, _ in saved] != [s.name for s in now] and not (added or removed):
        return "the shards are listed in another order"
    parts = [f"{label} {names[:5]}{' ...' if len(names) > 5 else ''} ({len(names)})"
             for label, names in (("added", added), ("removed", removed), ("resized", resized)) if names]  # fmt: skip
    return "; ".join(parts)


@dataclass(frozen=True)
class Place:
    """Where a document sits in its stream: ``epoch``, ``slot`` (index into the stream's shard list of that
    epoch), ``row``/``byte`` where its block starts in the shard, ``index`` in the block's emitted order.
    ``shard`` names the (shard x part) the slot held, so a resume can check the shard order is still the same;
    ``block`` numbers the blocks this process read (it tells which blocks' dedup digests a saved position needs).
    """

    epoch: int
    slot: int
    row: int
    byte: int
    index: int
    shard: int = -1
    block: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.slot, self.shard, self.row, self.byte, self.index]

    @classmethod
    def from_list(cls, values: list[int]) -> Place:
        epoch, slot, shard, row, byte, index = values
        return cls(epoch, slot, row, byte, index, shard)


class ShardReader:
    """Kept documents of one stream, block after block, epoch after epoch, from a saved place on.

    ``source`` is a DocumentSource, ``keep(doc) -> bool`` the held-out split and filters (its de-duplication
    already holding the digests saved with ``start``), ``filters`` the FilterPipeline whose seen digests are
    collected per block, ``block_rows`` the shuffle block (0: no shuffle, blocks of 64 rows).
    """

    def __init__(self, source, filters, keep, *, stream: int, streams: int, seed: int, block_rows: int):
        self.source, self.filters, self.keep = source, filters, keep
        self.stream, self.streams, self.seed = stream, streams, seed
        self.shuffle, self.block_rows = block_rows > 0, block_rows or 64
        self.shards = source.shards()
        self.parts = parts_per_shard(len(self.shards), streams)
        if getattr(source, "one_row_shards", False):  # a source tree: each file is one document
            if (
                len(self.shards) < streams
            ):  # row-interleaved parts of a one-row shard: all but part 0 are empty
                raise ValueError(
                    f"the source has {len(self.shards)} file(s), one document each, for {streams} streams "
                    "(processes x DataLoader workers): every stream needs a file of its own; use at most "
                    f"{len(self.shards)} streams (fewer data.loader.num_workers or processes) or more files"
                )
            self.parts = 1
        self.digests: dict[int, tuple[int, np.ndarray]] = {}  # block number -> (epoch, digests it added)
        self._blocks = 0

    def groups(self, start: Place) -> Iterator[list[tuple[Place, dict]]]:
        """Per block, the ``(place, doc)`` pairs still to emit (the first block's from ``start.index`` on)."""
        epoch, resume = start.epoch, start
        whole = (start.slot, start.row, start.index) == (0, 0, 0)  # this epoch is read from its start
        while True:
            slots = stream_slots(len(self.shards), self.streams, self.stream, seed=self.seed, epoch=epoch,
                                 parts=self.parts)  # fmt: skip
            kept = 0
            for slot in range(resume.slot if resume else 0, len(slots)):
                at = (resume.row, resume.byte) if resume else (0, 0)
                shard = slots[slot][0] * self.parts + slots[slot][1]
                if resume and resume.shard not in (-1, shard):
                    raise ValueError(
                        f"the saved position of stream {self.stream} of {self.streams} is in shard {resume.shard} "
                        f"(x {self.parts} parts) but epoch {epoch}'s shard order now puts shard {shard} there: the "
                        f"source's {len(self.shards)} shards or the seed changed since the checkpoint"
                    )
                for number, row, byte, docs in self._blocks_of(epoch, *slots[slot], *at):
                    order = block_order(len(docs), seed=self.seed, epoch=epoch, stream=self.stream, row=row,
                                        enabled=self.shuffle)  # fmt: skip
                    skip, resume = (resume.index if resume else 0), None
                    kept += len(docs)
                    yield [
                        (Place(epoch, slot, row, byte, i, shard, number), docs[order[i]])
                        for i in range(skip, len(docs))
                    ]
                resume = None
            if kept == 0 and whole:
                raise ValueError(
                    f"stream {self.stream} of {self.streams} (ranks x DataLoader workers) received no training "
                    f"documents in a whole pass over its {len(slots)} shard(s) ({self.filters.summary()}); use "
                    "fewer DataLoader workers/processes or a larger corpus"
                )
            epoch, whole = epoch + 1, True
            self.filters.reset_dedup()

    def _blocks_of(self, epoch: int, shard: int, part: int, row: int, byte: int) -> Iterator[tuple]:
        """(block number, row, byte, kept docs) of each block of ``block_rows`` rows of a shard's part, from
        ``row`` on; the digests each block added to the de-duplication go to ``self.digests``."""
        block, head, rows, seen_before = [], None, 0, self.filters.seen_count
        for r, b, doc in self.source.iter_shard(shard, row=row, byte=byte, part=part, parts=self.parts):
            head = head or (r, b)
            rows += 1
            if doc is not None and self.keep(doc):
                block.append(doc)
            if rows % self.block_rows == 0:
                yield self._close(epoch, seen_before), *head, block
                block, head, seen_before = [], None, self.filters.seen_count
        if head is not None:
            yield self._close(epoch, seen_before), *head, block
        if rows == 0 and row == 0 and part == 0:
            name = self.shards[shard].name
            raise ValueError(
                f"shard {name!r} of the source is empty; expected at least one record in every shard"
            )

    def _close(self, epoch: int, seen_before: int) -> int:
        self._blocks += 1
        self.digests[self._blocks] = (epoch, self.filters.seen_since(seen_before))
        return self._blocks

    def digests_before(self, place: Place) -> np.ndarray:
        """Digests of the blocks of ``place``'s epoch read before its block that were not handed out yet; they
        are handed out once (the DataModule keeps them with the position)."""
        done = sorted(n for n in self.digests if n < place.block)
        arrays = [self.digests.pop(n) for n in done]
        return np.concatenate([d for e, d in arrays if e == place.epoch] or [np.zeros(0, np.uint64)])
