"""Exactly-once, resumable training order for the map-style recipes (masked LM, classification).

Left to itself, Lightning wraps a plain loader under DDP in a sampler that repeats samples to even out the ranks,
and on ``--ckpt_path`` restarts a plain loader's epoch from the start. A ``DistributedSampler`` subclass it leaves
alone, so the order is owned here instead:

- one permutation per epoch from (seed, epoch) (optionally grouped by length), never the global RNG;
- cut into ``ceil(N / (world * batch))`` global batches; the last is filled up with padding draws (a real index with
  ``keep=False``) so every rank runs the same number of full batches and no sample is dropped or repeated;
- rank r takes every world-th draw of each global batch, so the padding spreads over the ranks;
- which epoch, and how much of it is done, follows the batches actually trained on (:class:`TrainPosition`, saved in
  the DataModule's state), not Lightning's epoch counter: after resuming from a checkpoint written at the end of a
  fit (``max_steps``), Lightning counts the interrupted epoch as finished yet still runs only the batches it had left.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import Dataset, DistributedSampler

from lmrecipes.data.masking import batch_generator
from lmrecipes.data.position import EpochPosition, check_same_data, lightning_batches, next_pass, resize

if TYPE_CHECKING:
    import lightning.pytorch as pl

# Length grouping sorts windows of up to this many global batches, and of at most a quarter of the data so a small
# set stays shuffled (transformers' LengthGroupedSampler: the same rule over per-device batches).
GROUP_BATCHES = 50


class Draw(NamedTuple):
    """One sampled row: its dataset index and whether it counts (False for the padding of the last global batch)."""

    index: int
    keep: bool


def epoch_order(
    size: int, *, seed: int, epoch: int, lengths: list[int] | None = None, group: int = 1
) -> list[int]:
    """A permutation of ``range(size)`` drawn from (seed, epoch); with ``lengths``, each window of ``group`` draws is
    then sorted by length, longest first (similar lengths batched together, the windows still shuffled)."""
    order = torch.randperm(size, generator=batch_generator(seed, epoch)).tolist()
    if lengths is None:
        return order
    if len(lengths) != size:
        raise ValueError(f"{len(lengths)} lengths for a dataset of {size} rows")
    windows = (order[i : i + group] for i in range(0, size, group))
    return [i for window in windows for i in sorted(window, key=lambda j: -lengths[j])]


def rank_draws(order: list[int], *, batch_size: int, rank: int, world_size: int) -> list[Draw]:
    """Rank ``rank``'s draws for an epoch: ``steps * batch_size`` of them, every row of ``order`` once over all ranks."""
    per_step = world_size * batch_size
    steps = math.ceil(len(order) / per_step)
    draws = [Draw(i, True) for i in order]
    draws += [Draw(order[k % len(order)], False) for k in range(steps * per_step - len(order))]
    return [d for s in range(steps) for d in draws[s * per_step + rank : (s + 1) * per_step : world_size]]


class TrainPosition:
    """How far training got in the epoch order: the data epoch, the samples of it done at an earlier world size
    (``offset``) and the global batches done since (all ranks alike; ``data/position.py`` holds the arithmetic).

    The DataModule counts a batch in ``on_after_batch_transfer`` during training (Lightning transfers a batch right
    before its step, never ahead) and saves this with a signature of what the order depends on. A checkpoint saved
    by another number of processes resumes through the global sample count: no sample twice, none skipped."""

    def __init__(self) -> None:
        self.epoch, self.offset, self.batches = 0, 0, 0
        self.signature: dict = {}
        self._saved: dict | None = None
        self._trainer: pl.Trainer | None = None
        self._lightning_batches: int | None = (
            None  # after a resize: the epoch's batch count Lightning must hold
        )

    def count(self) -> None:
        """One more batch trained on."""
        self.batches += 1

    def begin(self, *, rows: int, world_size: int, batch_size: int) -> EpochPosition:
        """Where a new pass over the data starts: here, or the next epoch once this one's rows are all done."""
        if self._saved is not None:
            # Loaded after the sampler was built (FSDP2 restores a checkpoint once the model is sharded, after
            # configure_optimizers already built the training loader): take it over now, before the first batch.
            self.resume(self.signature)
        here = EpochPosition(self.epoch, self.offset, self.batches)
        self.epoch, self.offset, self.batches = next_pass(
            here, rows=rows, world_size=world_size, batch_size=batch_size
        )
        if self._lightning_batches is not None:
            align_lightning(self._trainer, self._lightning_batches)
            self._lightning_batches = None
        return EpochPosition(self.epoch, self.offset, self.batches)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "batches": self.batches,
            "signature": self.signature,
        }

    def load_state_dict(self, state: dict) -> None:
        self._saved = state  # checked against the run's settings once the training set is known

    def resume(self, signature: dict) -> None:
        """Take over a loaded position if the run reads the same data the same way (on any number of processes);
        else raise ``ValueError``."""
        self.signature = signature
        if self._saved is None:
            return
        saved, self._saved = self._saved, None
        before = saved["signature"]
        check_same_data(before, signature, allowed=("world_size",))  # another world size converts, below
        here = EpochPosition(saved["epoch"], saved.get("offset", 0), saved["batches"])
        old, new = before["world_size"], signature["world_size"]
        if old != new:
            rows, batch_size = signature["rows"], signature["batch_size"]
            here = resize(here, rows=rows, batch_size=batch_size, old_world=old, new_world=new)
            self._lightning_batches = lightning_batches(
                here, rows=rows, world_size=new, batch_size=batch_size
            )
            rank_zero_info(
                f"lmrecipes: resuming a data position saved by {old} processes on {new}: epoch {here.epoch}, "
                f"{here.offset} of its {rows} samples done; the rest is dealt out to {new} processes"
            )
        self.epoch, self.offset, self.batches = here

    def sampler(self, dataset: Dataset, *, trainer: pl.Trainer | None, batch_size: int, seed: int | None, signature: dict,
                lengths: list[int] | None = None) -> ExactlyOnceSampler:  # fmt: skip
        """This rank's training sampler, driven by this position (a resumed run goes on where it stopped).

        Args:
            dataset: the map-style training set.
            trainer: the Lightning trainer (rank and world size); None: one process.
            batch_size: rows per batch per rank.
            seed: shuffle seed; None: the run's ``seed_everything`` value (Lightning's ``PL_GLOBAL_SEED``, else 0).
            signature: what else the order or the batches depend on (a data fingerprint, a mask seed...).
            lengths: row lengths to group batches by (None: plain shuffle).
        """
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if seed is None and self._saved is not None:
            # The run's seed may differ on resume (LightningCLI's `seed_everything: true` draws one per launch):
            # the order keeps the seed it started with, and the RNG states come from the checkpoint.
            seed = self._saved["signature"]["shuffle_seed"]
        seed = seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self._trainer = trainer
        self.resume({"batch_size": batch_size, "world_size": world, "shuffle_seed": seed, "rows": len(dataset),
                     "group_by_length": lengths is not None, **signature})  # fmt: skip
        return ExactlyOnceSampler(dataset, batch_size=batch_size, rank=rank, world_size=world, seed=seed,
                                  lengths=lengths, position=self)  # fmt: skip


def align_lightning(trainer: pl.Trainer | None, batches: int) -> None:
    """Make Lightning count ``batches`` of the epoch as done: after a resize its restored count is in batches of the
    old world size, and it ends the epoch when its count reaches ``len(loader)`` (this world's whole epoch)."""
    loop = getattr(trainer, "fit_loop", None)
    if loop is None:
        return
    # Private: no public setter for a resumed epoch's progress. Called from the sampler's first pass, i.e. while
    # Lightning fetches the resumed epoch's first batch: its fetcher has counted the restored batches as fetched
    # (and ends the epoch on that count), so both move. tests/test_reshard.py fails if Lightning renames them.
    current = loop.epoch_loop.batch_progress.current
    current.ready = current.started = current.processed = current.completed = batches
    fetcher = getattr(loop, "_data_fetcher", None)
    if fetcher is not None:
        fetcher.fetched = batches


class ExactlyOnceSampler(DistributedSampler):
    """Yields :class:`Draw` tuples (the dataset's ``__getitem__`` takes them): ``steps`` full batches per rank.

    ``len()`` is always the whole epoch, which is how Lightning counts a resumed one (batches done + batches left).
    Not Lightning's UnrepeatedDistributedSampler (2.6.6): its ranks may run one batch fewer (a DDP hang in training,
    as its docstring warns), its shuffle is seeded by the epoch alone, and it cannot start mid-epoch."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        lengths: list[int] | None = None,
        position: TrainPosition | None = None,
    ):
        """
        Args:
            dataset: the map-style training set.
            batch_size: rows per batch per rank.
            rank: this process's rank.
            world_size: number of processes.
            seed: shuffle seed; epoch e's order depends on (seed, e) only.
            lengths: row lengths to group batches by (None: plain shuffle).
            position: the trained-batch count that picks the epoch and skips its done batches at each pass; None:
                the epoch comes from ``set_epoch`` and each pass yields all of it.
        """
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.batch_size, self.lengths, self.position = batch_size, lengths, position
        # the last global batch is padded, not dropped
        self.steps = math.ceil(len(dataset) / (world_size * batch_size))

    def draws(self, epoch: int, offset: int = 0) -> list[Draw]:
        """This rank's draws for the epoch's order from sample ``offset`` on (done at another world size)."""
        per_step = self.num_replicas * self.batch_size
        group = per_step * max(1, min(len(self.dataset) // (4 * per_step), GROUP_BATCHES))
        order = epoch_order(len(self.dataset), seed=self.seed, epoch=epoch, lengths=self.lengths, group=group)
        return rank_draws(
            order[offset:], batch_size=self.batch_size, rank=self.rank, world_size=self.num_replicas
        )

    def __iter__(self):
        # The pass's epoch comes from the trained-batch count, not set_epoch: Lightning's epoch runs one ahead after
        # resuming from a checkpoint written at the end of a fit, and with workers a resumed run's first pass is
        # drawn when Lightning builds the loader's iterator, before it calls set_epoch.
        offset, done = 0, 0
        if self.position is not None:
            self.epoch, offset, done = self.position.begin(
                rows=len(self.dataset), world_size=self.num_replicas, batch_size=self.batch_size
            )
        return iter(self.draws(self.epoch, offset)[done * self.batch_size :])

    def __len__(self) -> int:
        return self.steps * self.batch_size


class ShardSampler(UnrepeatedDistributedSampler):
    """Evaluation rows ``rank::world`` in order, each once (no padding duplicates, so metrics and predictions count
    every row once): Lightning's UnrepeatedDistributedSampler, which Lightning itself applies only to predict."""

    def __init__(self, dataset: Dataset, *, rank: int, world_size: int):
        if 0 < len(dataset) < world_size:  # Lightning's own check is a bare assert
            raise ValueError(
                f"{len(dataset)} evaluation rows for {world_size} processes: every process needs at least one row "
                "(one without would leave the others waiting); evaluate on more rows or fewer processes"
            )
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)


def fingerprint(*arrays: torch.Tensor | np.ndarray) -> str:
    """A short hash of the training rows' tokens, so a resume notices that the data itself changed."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]
