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
