"""The exactly-once, resumable training order of the map-style recipes (data/samplers.py): every row once per epoch
over all ranks through real DataLoaders (with worker processes too), equal step counts per rank, padding rows that
count for nothing, a skip on resume that continues the uninterrupted order, and refusal of changed settings (a
changed world size is converted instead: tests/test_position.py)."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lmrecipes.data.groups import grouped
from lmrecipes.data.samplers import Draw, ExactlyOnceSampler, TrainPosition, epoch_order, rank_draws


class Rows(Dataset):
    """Row i is ``{"index": i, "keep": keep}``: what the sampler drew, as the DataLoader delivers it."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, draw: Draw) -> dict:
        return {"index": torch.tensor(draw.index), "keep": torch.tensor(draw.keep)}


def epoch_batches(
    size: int, *, world: int, batch: int, epoch: int, workers: int = 0, **kwargs
) -> list[list[dict]]:
    """Each rank's batches of one epoch, through a real DataLoader."""
    out = []
    for rank in range(world):
        sampler = ExactlyOnceSampler(
            Rows(size), batch_size=batch, rank=rank, world_size=world, seed=7, **kwargs
        )
        sampler.set_epoch(epoch)
        out.append(list(DataLoader(Rows(size), batch_size=batch, sampler=sampler, num_workers=workers)))
    return out


def kept(batches: list[dict]) -> list[int]:
    return [i for b in batches for i, k in zip(b["index"].tolist(), b["keep"].tolist()) if k]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_and_equal_steps_on_every_rank(world, workers):
    size, batch = 37, 4
    steps = math.ceil(size / (world * batch))
    orders = []
    for epoch in (0, 1):
        ranks = epoch_batches(size, world=world, batch=batch, epoch=epoch, workers=workers)
        assert [len(r) for r in ranks] == [steps] * world  # same step count everywhere: DDP cannot hang
        assert all(len(b["index"]) == batch for r in ranks for b in r)  # full batches, none dropped
        rows = [i for r in ranks for i in kept(r)]
        assert sorted(rows) == list(range(size))  # every row exactly once over all ranks
        padding = sum(batch - int(b["keep"].sum()) for r in ranks for b in r)
        assert padding == steps * world * batch - size
        assert all(b["keep"].all() for r in ranks for b in r[:-1])  # padding only in the last global batch
        orders.append([b["index"].tolist() for r in ranks for b in r])
    assert orders[0] != orders[1]  # reshuffled each epoch
    assert orders[0] == [b["index"].tolist() for r in epoch_batches(size, world=world, batch=batch, epoch=0)
                         for b in r]  # fmt: skip  # the same (seed, epoch), the same order, with or without workers


def test_rank_draws_exact_layout():
    """Rank r takes every world-th draw of each global batch; the last one is filled with keep=False repeats."""
    order = [4, 0, 3, 1, 2]
    assert rank_draws(order, batch_size=2, rank=0, world_size=2) == [
        (4, True),
        (3, True),
        (2, True),
        (0, False),
    ]
    assert rank_draws(order, batch_size=2, rank=1, world_size=2) == [
        (0, True),
        (1, True),
        (4, False),
        (3, False),
    ]
    assert sorted(epoch_order(5, seed=0, epoch=3)) == list(range(5))
    assert (
        epoch_order(5, seed=0, epoch=3) == epoch_order(5, seed=0, epoch=3) != epoch_order(5, seed=1, epoch=3)
    )


def test_padding_spreads_over_ranks_so_rank_zero_always_has_real_rows():
    """37 rows, 3 ranks of 4: the last global batch holds 1 real row and 11 padding rows."""
    last = [r[-1] for r in epoch_batches(37, world=3, batch=4, epoch=0)]
    assert [int(b["keep"].sum()) for b in last] == [1, 0, 0]
    last = [r[-1] for r in epoch_batches(38, world=2, batch=8, epoch=0)]
    assert [int(b["keep"].sum()) for b in last] == [3, 3]


def test_length_grouping_is_seeded_and_groups_similar_lengths():
    size, batch = 400, 4
    lengths = [(i * 37) % 101 for i in range(size)]
    ranks = epoch_batches(size, world=2, batch=batch, epoch=0, lengths=lengths)
    assert sorted(kept(ranks[0]) + kept(ranks[1])) == list(range(size))
    again = epoch_batches(size, world=2, batch=batch, epoch=0, lengths=lengths)
    assert [b["index"].tolist() for b in ranks[0]] == [b["index"].tolist() for b in again[0]]
    spread = [max(lengths[i] for i in b["index"].tolist()) - min(lengths[i] for i in b["index"].tolist())
              for b in ranks[0]]  # fmt: skip
    assert sum(spread) / len(spread) < 10  # a plain shuffle of lengths in [0, 100] spreads ~60 per batch of 4


def train(loader: DataLoader, position: TrainPosition, batches: int) -> list[list[int]]:
    """Pass after pass over ``loader`` as Lightning does (iter() once per epoch), counting each batch as trained."""
    out = []
    while len(out) < batches:
        for b in loader:
            position.count()
            out.append(b["index"].tolist())
            if len(out) == batches:
                break
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_resume_skips_the_trained_batches_and_continues_the_uninterrupted_order(world):
    """Train k batches, save the position (plain values), resume on every rank: the uninterrupted order goes on,
    whether k stops mid-epoch, exactly at the end of an epoch or in the next one."""
    size, batch, steps = 37, 4, math.ceil(37 / (world * 4))
    whole = [[b["index"].tolist() for e in (0, 1, 2) for b in epoch_batches(size, world=world, batch=batch, epoch=e)[r]]
             for r in range(world)]  # fmt: skip
    for done in (3, steps, steps + 1):
        position = TrainPosition()
        one = SimpleNamespace(global_rank=0, world_size=world)
        loader = DataLoader(Rows(size), batch_size=batch,
                            sampler=position.sampler(Rows(size), trainer=one, batch_size=batch, seed=7, signature={}))  # fmt: skip
        assert train(loader, position, done) == whole[0][:done]
        state = roundtrip(position.state_dict())
        for rank in range(world):
            resumed = TrainPosition()
            resumed.load_state_dict(state)
            trainer = SimpleNamespace(global_rank=rank, world_size=world)
            sampler = resumed.sampler(Rows(size), trainer=trainer, batch_size=batch, seed=7, signature={})
            assert len(sampler) == steps * batch  # Lightning counts the whole epoch: batches done + left
            sampler.set_epoch(5)  # ignored: Lightning's epoch can run ahead of the data's after a resume
            got = train(DataLoader(Rows(size), batch_size=batch, sampler=sampler), resumed, 3 * steps - done)
            assert got == whole[rank][done:]


def roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint loads."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_changed_settings_refuse_to_resume():
    trainer = SimpleNamespace(global_rank=0, world_size=1)
    position = TrainPosition()
    position.sampler(Rows(37), trainer=trainer, batch_size=4, seed=7, signature={"data": "abc"})
    position.count()
    for change, match in (({"batch_size": 8}, "batch_size: 4 -> 8"), ({"seed": 8}, "shuffle_seed: 7 -> 8"),
                          ({"signature": {"data": "abd"}}, "data: 'abc' -> 'abd'")):  # fmt: skip
        resumed = TrainPosition()
        resumed.load_state_dict(position.state_dict())
        kwargs = {"batch_size": 4, "seed": 7, "signature": {"data": "abc"}, **change}
        with pytest.raises(ValueError, match=match):
            resumed.sampler(Rows(37), trainer=trainer, **kwargs)
    # another world size is not refused: the position is converted (tests/test_position.py)


def test_default_seed_keeps_the_order_it_started_with_when_the_run_seed_changes(monkeypatch):
    """shuffle_seed None follows seed_everything, which LightningCLI may draw anew at each launch: a resume keeps
    the saved seed instead of refusing (or silently reshuffling)."""
    trainer = SimpleNamespace(global_rank=0, world_size=1)
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    position = TrainPosition()
    first = position.sampler(Rows(37), trainer=trainer, batch_size=4, seed=None, signature={})
    position.count()
    monkeypatch.setenv("PL_GLOBAL_SEED", "12")
    resumed = TrainPosition()
    resumed.load_state_dict(roundtrip(position.state_dict()))
    again = resumed.sampler(Rows(37), trainer=trainer, batch_size=4, seed=None, signature={})
    assert again.seed == first.seed == 11
    assert list(again) == list(first)  # the same epoch order, one batch in (both positions count one batch)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="batch_size=0"):
        ExactlyOnceSampler(Rows(5), batch_size=0, rank=0, world_size=1, seed=0)


def test_mlm_padding_rows_get_no_labels_and_the_position_is_counted(tiny_bert):
    from lmrecipes.data.mlm import MaskedTextDataModule

    model_dir, corpus = tiny_bert
    dm = MaskedTextDataModule(**grouped(MaskedTextDataModule, tokenizer=str(model_dir), train_source=str(corpus), chunk_size=32, heldout_fraction=0.3,
                              train_size=37, eval_size=8, batch_size=4, progress=False))  # fmt: skip
    dm.trainer = SimpleNamespace(training=True, global_rank=1, world_size=3, current_epoch=0)  # rank 1 of 3
    dm.setup("fit")
    masked = [(b["keep"], dm.on_after_batch_transfer(b, 0)["labels"]) for b in dm.train_dataloader()]
    assert [int(keep.sum()) for keep, _ in masked] == [
        4,
        4,
        4,
        0,
    ]  # the last global batch: 1 real row, on rank 0
    assert all((labels[~keep] == -100).all() for keep, labels in masked)
    assert all((labels[keep] != -100).any() for keep, labels in masked if keep.any())
    state = roundtrip(dm.state_dict())
    assert state["train_batches"] == 4 and (state["position"]["epoch"], state["position"]["batches"]) == (
        0,
        4,
    )
    assert state["position"]["signature"]["world_size"] == 3


def test_classification_padding_rows_are_ignored_even_in_a_batch_of_nothing_else(tiny_bert, tmp_path):
    import json

    from lmrecipes.data.classification import ClassificationDataModule
    from lmrecipes.models.classification import SequenceClassifier

    model_dir, _ = tiny_bert
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"text": f"row {i} " * (1 + i % 5), "label": i % 2}) + "\n" for i in range(37))
    )
    dm = ClassificationDataModule(**grouped(ClassificationDataModule, tokenizer=str(model_dir), train_source=str(rows), val_source=str(rows),
                                  text_column="text", text_pair_column=None, batch_size=4, progress=False))  # fmt: skip
    dm.trainer = SimpleNamespace(
        training=True, global_rank=2, world_size=3, current_epoch=0, precision="32-true"
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [int((b["labels"] != -100).sum()) for b in batches] == [4, 4, 4, 0]
    model = SequenceClassifier(pretrained=str(model_dir))
    loss = model.training_step(batches[-1], 0)
    loss.backward()
    assert float(loss) == 0.0 and all(
        float(p.grad.abs().sum()) == 0 for p in model.parameters() if p.grad is not None
    )
    assert torch.isfinite(model.training_step(batches[0], 0))


def test_shard_sampler_is_lightnings_unrepeated_sampler_and_names_a_rank_without_rows():
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    from lmrecipes.data.samplers import ShardSampler

    shards = [ShardSampler(list(range(7)), rank=r, world_size=3) for r in range(3)]
    assert all(isinstance(s, UnrepeatedDistributedSampler) for s in shards)
    assert [list(s) for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]  # in order, each row once, no padding
    assert [len(s) for s in shards] == [3, 2, 2]
    assert list(ShardSampler([], rank=1, world_size=2)) == []
    with pytest.raises(ValueError, match="2 evaluation rows for 3 processes"):
        ShardSampler([0, 1], rank=2, world_size=3)
