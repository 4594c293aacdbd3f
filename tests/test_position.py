"""A data position converted between world sizes (data/position.py) with exact values, and through the real
sampler and DataLoaders: saved by 2 processes and resumed on 1 (and 1 -> 2), every row is trained once an epoch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_samplers import Rows, kept, roundtrip
from torch.utils.data import DataLoader

from lmrecipes.data.position import (
    EpochPosition,
    batches_left,
    lightning_batches,
    next_pass,
    resize,
    samples_done,
)
from lmrecipes.data.samplers import TrainPosition


def test_samples_done_and_batches_left_count_global_batches_from_the_offset():
    # 37 rows, batches of 4 on 2 processes: 8 samples a global batch, 5 of them an epoch (the last padded)
    at = EpochPosition(epoch=0, offset=0, batches=3)
    assert samples_done(at, rows=37, world_size=2, batch_size=4) == 24
    assert batches_left(at, rows=37, world_size=2, batch_size=4) == 2
    later = EpochPosition(epoch=0, offset=12, batches=2)  # 12 done at another world size, then 2 of 8
    assert samples_done(later, rows=37, world_size=2, batch_size=4) == 28
    assert batches_left(later, rows=37, world_size=2, batch_size=4) == 2
    padded = EpochPosition(epoch=0, offset=0, batches=5)  # the padded last batch ends the epoch: 37, not 40
    assert samples_done(padded, rows=37, world_size=2, batch_size=4) == 37
    assert next_pass(padded, rows=37, world_size=2, batch_size=4) == EpochPosition(1, 0, 0)
    assert next_pass(at, rows=37, world_size=2, batch_size=4) == at


def test_resize_keeps_the_global_sample_count_and_lightning_counts_the_whole_epoch():
    two_to_one = resize(EpochPosition(0, 0, 3), rows=37, batch_size=4, old_world=2, new_world=1)
    assert two_to_one == EpochPosition(0, 24, 0)
    assert (
        batches_left(two_to_one, rows=37, world_size=1, batch_size=4) == 4
    )  # 13 rows left: 3 full + 1 padded
    assert lightning_batches(two_to_one, rows=37, world_size=1, batch_size=4) == 10 - 4
    one_to_two = resize(EpochPosition(0, 0, 3), rows=37, batch_size=4, old_world=1, new_world=2)
    assert one_to_two == EpochPosition(0, 12, 0)
    assert batches_left(one_to_two, rows=37, world_size=2, batch_size=4) == 4  # 25 rows left over 8 a batch
    assert lightning_batches(one_to_two, rows=37, world_size=2, batch_size=4) == 5 - 4
    finished = resize(EpochPosition(2, 12, 4), rows=37, batch_size=4, old_world=2, new_world=3)
    assert finished == EpochPosition(3, 0, 0)
    with pytest.raises(ValueError, match="world_size=0 and batch_size=4 must be at least 1"):
        resize(EpochPosition(0, 0, 1), rows=37, batch_size=4, old_world=2, new_world=0)


def run(
    position: TrainPosition, *, world: int, batches: int | None, size: int = 37, batch: int = 4
) -> list[int]:
    """Every rank's pass from ``position`` (``batches`` of them, None: to the epoch's end); the kept rows."""
    state = roundtrip(position.state_dict()) if position.signature else None
    rows, positions = [], []
    for rank in range(world):
        mine = TrainPosition()
        if state is not None:
            mine.load_state_dict(state)
        trainer = SimpleNamespace(global_rank=rank, world_size=world)
        sampler = mine.sampler(Rows(size), trainer=trainer, batch_size=batch, seed=7, signature={})
        for k, b in enumerate(DataLoader(Rows(size), batch_size=batch, sampler=sampler)):
            if batches is not None and k == batches:
                break
            mine.count()
            rows += kept([b])
        positions.append(mine)
    assert all(p.state_dict() == positions[0].state_dict() for p in positions)  # every rank alike
    position.__dict__.update(positions[0].__dict__)
    return rows


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3)])
def test_a_position_saved_by_one_world_size_resumes_on_another_with_every_row_once(before, after):
    position = TrainPosition()
    first = run(position, world=before, batches=3)
    rest = run(position, world=after, batches=None)
    assert sorted(first + rest) == list(range(37))  # none twice, none skipped
    assert position.state_dict()["epoch"] == 0
    assert run(position, world=after, batches=1) != []  # the next pass starts epoch 1 at its beginning
    assert (position.epoch, position.offset, position.batches) == (1, 0, 1)
