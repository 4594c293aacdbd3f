"""Sharded saves that fail or are killed midway: every rank learns of a failure on rank 0, and a save killed
between its two renames leaves a checkpoint that resuming restores instead of starting from scratch."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from test_checkpoint_loading import as_sharded_folder, trained_checkpoint

from lmrecipes.checkpoints import resolve_ckpt_path
from lmrecipes.checkpoints_sharded import MARKER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_on_rank(rank: int, folder: str, port: int) -> None:
    """One of two gloo ranks of a real FSDP2Strategy saving a sharded checkpoint; writes what it raised."""
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.accelerators import CPUAccelerator

    from lmrecipes.sharding import FSDP2Strategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    strategy = FSDP2Strategy(process_group_backend="gloo")
    strategy._timeout = timedelta(
        seconds=30
    )  # a rank left waiting fails the test in seconds, not half an hour
    strategy.accelerator, strategy.cluster_environment = CPUAccelerator(), LightningEnvironment()
    strategy.parallel_devices = [torch.device("cpu")] * 2
    strategy._lightning_module = torch.nn.Module()  # only given the device mesh
    strategy.setup_environment()
    checkpoint = {
        "state_dict": {"w": torch.arange(4.0)},
        "optimizer_states": [],
        "global_step": 1,
        "loops": {},
    }
    try:
        strategy.save_checkpoint(checkpoint, Path(folder) / "last.ckpt")
        outcome = "saved"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    (Path(folder) / f"rank{rank}.txt").write_text(outcome)
    torch.distributed.destroy_process_group()


def test_a_save_failing_on_rank_0_raises_the_same_error_on_every_rank(tmp_path):
    (tmp_path / "last.ckpt").mkdir()  # the previous save
    # in the way of replace(): rmtree refuses a symlink, and a folder cannot be renamed over a non-folder
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".last.ckpt.sharded-old").symlink_to(tmp_path / "elsewhere")
    mp.spawn(_save_on_rank, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("RuntimeError: sharded save to") and "failed on rank 0" in outcomes[0]
    assert "NotADirectoryError" in outcomes[0]  # rank 0's own error, named on every rank


def test_a_save_killed_between_its_renames_is_restored_when_resuming(tiny_lm, tmp_path):
    _, path = trained_checkpoint(tmp_path, tiny_lm)
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    # killed after moving last.ckpt aside, before moving the new one in: both complete, no last.ckpt
    new = as_sharded_folder(path, ckpts / ".last.ckpt.sharded-tmp", keys=["state_dict", "optimizer_0"])
    old = as_sharded_folder(path, ckpts / ".last.ckpt.sharded-old", keys=["state_dict", "optimizer_0"])
    (new / "from").write_text("new")
    resolved = resolve_ckpt_path("last", str(ckpts))
    assert resolved == str(ckpts / "last.ckpt")
    assert (ckpts / "last.ckpt" / "from").read_text() == "new" and (ckpts / "last.ckpt" / MARKER).is_file()
    assert old.is_dir()  # left for the next save to delete

    # only the previous save complete (the new one died before its marker): the previous one comes back
    os.rename(ckpts / "last.ckpt", ckpts / "gone")
    (new.parent / "gone" / MARKER).unlink()
    os.rename(ckpts / "gone", new)
    assert resolve_ckpt_path("last", str(ckpts)) == str(ckpts / "last.ckpt")
    assert not (ckpts / "last.ckpt" / "from").exists() and new.is_dir()
