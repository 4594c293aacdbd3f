"""A data position that survives a change of world size: how far training got in an epoch's order, counted in
samples of that order, so a run saved by W processes resumes on W' without training a sample twice or skipping one.

Contract (what a DataModule that shuffles one global order per epoch and deals it out in global batches of
``world_size * batch_size`` can rely on):

- an :class:`EpochPosition` ``(epoch, offset, batches)`` means: of epoch ``epoch``'s order, the first ``offset``
  samples were trained (at an earlier world size), then ``batches`` global batches of the current world size from
  sample ``offset`` on; :func:`samples_done` is the one global count, capped at the epoch's rows (the last global
  batch is padded);
- :func:`resize` turns a position saved at one world size into one for another: the same samples done, no batches
  yet (a finished epoch becomes the start of the next one); the new world deals out ``order[offset:]``;
- :func:`lightning_batches` is the batch count of the epoch Lightning must hold after a resize: Lightning counts an
  epoch as ``len(loader)`` batches of the current world, so done + left must add up to that.

Pure functions of plain integers; the map-style recipes use them through ``data/samplers.py``'s ``TrainPosition``.
The pre-tokenized CLM windows (``data/prepared.py``'s ``WindowStream``) run one endless global sample sequence
across epochs instead; :func:`windows_done` is their one count (see there).
"""

from __future__ import annotations

import math
from typing import NamedTuple


class EpochPosition(NamedTuple):
    """Where training is in the data: ``offset`` samples of epoch ``epoch``'s order, then ``batches`` global batches."""

    epoch: int
    offset: int
    batches: int


def _global_batch(world_size: int, batch_size: int) -> int:
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size={world_size} and batch_size={batch_size} must be at least 1")
    return world_size * batch_size


def samples_done(position: EpochPosition, *, rows: int, world_size: int, batch_size: int) -> int:
    """Samples of the epoch's order trained on, over all ranks (the padding of the last batch not counted)."""
    done = position.offset + position.batches * _global_batch(world_size, batch_size)
    return min(rows, done)


def batches_left(position: EpochPosition, *, rows: int, world_size: int, batch_size: int) -> int:
    """Global batches (one per rank) still to run in the epoch."""
    left = rows - samples_done(position, rows=rows, world_size=world_size, batch_size=batch_size)
    return math.ceil(left / _global_batch(world_size, batch_size))


def next_pass(position: EpochPosition, *, rows: int, world_size: int, batch_size: int) -> EpochPosition:
    """Where a new pass over the data starts: here, or at the start of the next epoch once this one is done."""
    if batches_left(position, rows=rows, world_size=world_size, batch_size=batch_size) == 0:
        return EpochPosition(position.epoch + 1, 0, 0)
    return position


def resize(
    position: EpochPosition, *, rows: int, batch_size: int, old_world: int, new_world: int
) -> EpochPosition:
    """``position`` saved by ``old_world`` processes, as a position for ``new_world`` processes."""
    done = samples_done(position, rows=rows, world_size=old_world, batch_size=batch_size)
    _global_batch(new_world, batch_size)
    if done >= rows:
        return EpochPosition(position.epoch + 1, 0, 0)
    return EpochPosition(position.epoch, done, 0)


def lightning_batches(position: EpochPosition, *, rows: int, world_size: int, batch_size: int) -> int:
    """The batches of the epoch Lightning must count as done so that done + left = ``ceil(rows / global batch)``."""
    whole = math.ceil(rows / _global_batch(world_size, batch_size))
    return whole - batches_left(position, rows=rows, world_size=world_size, batch_size=batch_size)


def windows_done(*, base: int, consumed: int, world_size: int, batch_size: int) -> int:
    """Global samples of a ``WindowStream`` trained on: ``base`` (done at earlier world sizes) plus ``consumed``
    batches of ``world_size * batch_size`` samples (every rank runs the same number of batches). A resize keeps
    this count and restarts the batch count at 0, so the new world deals out the same sample sequence from there."""
    return base + consumed * _global_batch(world_size, batch_size)


def check_same_data(saved: dict, now: dict, *, allowed: tuple[str, ...] = (), more: str = "") -> None:
    """Raise the one ``ValueError`` naming every setting of ``now`` that differs from the ``saved`` signature
    (except ``allowed`` ones, which the caller converts); ``more`` adds to the list (e.g. which shards changed)."""
    changed = {k: (saved.get(k), v) for k, v in now.items() if k not in allowed and saved.get(k) != v}
    if not changed and not more:
        return
    detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    detail = "; ".join(part for part in (detail, more) if part)
    raise ValueError(
        f"cannot resume the data position: the checkpoint was written with different data settings ({detail}). "
        "Resume with the original settings, or start a new run from the weights (model.pretrained)."
    )


class StreamPosition:
    """One rank's place in the causal-LM training data, kept from the batches actually trained on.

    Streamed data: per logical stream (rank x DataLoader worker), the place after its last trained batch
    (``data/stream.py``), the stream's statistics, and the de-duplication digests of the blocks it moved past (one
    seen-set per epoch). Pre-tokenized windows: ``consumed`` batches after ``base`` samples done at earlier world
    sizes. Every rank's copy goes into the checkpoint (``mine``), not only rank 0's.
    """

    def __init__(self) -> None:
        self.consumed, self.base = 0, 0
        self.cursors: dict[int, list[int]] = {}
        self.stats: dict[int, list[int]] = {}
        self.seen: dict[int, list] = {}  # logical stream -> int64 tensors of digests (8 bytes a document)

    def count(self, position, stats=None, seen=None) -> None:
        """One batch trained on: its ``position`` tensor ``[logical, *place]``, stream stats and new digests."""
        logical, *cursor = position.tolist()
        if self.cursors.get(logical, [None])[0] != cursor[0]:  # a new epoch: its own seen-set
            self.seen[logical] = []
        self.cursors[logical] = cursor
        self.consumed += 1
        if stats is not None:
            self.stats[logical] = stats.tolist()
        if seen is not None and len(seen):  # most batches move past no block: nothing to keep
            self.seen.setdefault(logical, []).append(seen.cpu())

    def mine(self) -> dict:
        """This rank's position as plain values and tensors (loads with ``weights_only=True``)."""
        import torch

        return {
            "consumed": self.consumed,
            "base": self.base,
            "cursors": [[k, *v] for k, v in sorted(self.cursors.items())],
            "seen": [[k, torch.cat(v)] for k, v in sorted(self.seen.items()) if v],  # none without dedup
        }

    def restore(self, saved: dict) -> dict:
        """Take over a rank's saved position; returns what its stream resumes from."""
        self.base, self.consumed = saved.get("base", 0), saved["consumed"]
        self.cursors = {c[0]: c[1:] for c in saved["cursors"]}
        self.seen = {k: [digests] for k, digests in saved.get("seen", [])}
        seen = {k: digests.numpy() for k, digests in saved.get("seen", [])}
        return {"consumed": self.consumed, "cursors": dict(self.cursors), "seen": seen, "base": self.base}

    def resized(self, saved: dict, *, old_world: int, batch_size: int) -> dict:
        """Pre-tokenized windows saved by ``old_world`` processes: the same global sample count, no batches yet."""
        self.base = windows_done(base=saved.get("base", 0), consumed=saved["consumed"], world_size=old_world,
                                 batch_size=batch_size)  # fmt: skip
        self.consumed = 0
        return {"consumed": 0, "cursors": {}, "base": self.base}

    def data_stats(self) -> dict[str, float]:
        """Documents seen/kept and tokens packed by this rank's streams since this process started."""
        if not self.stats:
            return {}
        seen, kept, tokens_in, tokens_out = (sum(col) for col in zip(*self.stats.values()))
        return {
            "data/docs_seen": seen,
            "data/docs_kept": kept,
            "data/tokens_tokenized": tokens_in,
            "data/packed_fraction": tokens_out / max(1, tokens_in),
        }
