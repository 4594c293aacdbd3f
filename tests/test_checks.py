"""Checking a checkpoint before resuming reads it once per node: local rank 0 reads the file (zip CRCs) and leaves
its verdict in the node's temporary folder, keyed by the file's path, size and modification time; the node's other
ranks take that verdict."""

from __future__ import annotations

import os

import torch

from lmrecipes.checkpoints import (
    AtomicCheckpointIO,
    inspect_once_per_node,
    resolve_ckpt_path,
    verdict_file,
)

GOOD = {"state_dict": {"w": torch.arange(1000.0)}, "global_step": 4, "loops": {}, "optimizer_states": []}


def flip_a_byte_keeping_size_and_time(path) -> None:
    """Damage the tensor bytes so that only reading the whole file can tell (torch.load would not notice)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_other_local_ranks_take_the_verdict_of_local_rank_zero_instead_of_reading(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(GOOD, last)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert inspect_once_per_node(last) == (None, False)
    flip_a_byte_keeping_size_and_time(last)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert inspect_once_per_node(last) == (None, False)  # local rank 0's verdict: this rank read nothing
    assert resolve_ckpt_path("last", str(tmp_path)) == str(last)
    monkeypatch.setenv("LOCAL_RANK", "0")
    problem, damaged = inspect_once_per_node(last)  # local rank 0 always reads: the damage is found
    assert "CRC check failed" in problem and damaged
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert inspect_once_per_node(last) == (problem, True)  # and the node's other ranks follow its new verdict


def test_a_changed_file_gets_a_new_check_and_replaces_its_old_verdict(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(GOOD, last)
    monkeypatch.setenv("LOCAL_RANK", "0")
    inspect_once_per_node(last)
    old = verdict_file(last, training=True)
    assert old.is_file()
    last.write_bytes(last.read_bytes()[:100])  # truncated by a later crash: another size, another time
    os.utime(last, ns=(1, 3))
    monkeypatch.setenv(
        "LOCAL_RANK", "1"
    )  # no verdict for this file yet: after the wait this rank checks itself
    problem, damaged = inspect_once_per_node(last, wait_s=0.5)
    assert "truncated or corrupt" in problem and damaged
    assert not old.exists() and verdict_file(last, training=True).name.endswith("-100-3-train.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # nothing beside the checkpoint
