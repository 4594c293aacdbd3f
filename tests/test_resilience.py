"""Surviving crashes: atomic checkpoint writes, corrupt-checkpoint fallback, SIGTERM / SIGKILL and exact resume,
non-finite losses. Runs the real CLI in subprocesses and kills it with real signals (see tests/faults.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from faults import read_log
from test_cli import fit_args

from lmrecipes.checkpoints import (
    AtomicCheckpointIO,
    checkpoint_problem,
    resolve_ckpt_path,
)
from lmrecipes.resume import rng_state, set_rng_state

TESTS = Path(__file__).resolve().parent
DROPOUT_MODEL = (
    "{n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64, resid_pdrop: 0.1, embd_pdrop: 0.1, attn_pdrop: 0.1}"
)
CKPTS = "runs/clm-offline/checkpoints"


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS), "PYTHONUNBUFFERED": "1"}
    # A session of its own: a signal to the run's process group must not reach pytest.
    return subprocess.run([sys.executable, "-m", "lmrecipes", *args, "--quiet"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, start_new_session=True)  # fmt: skip


def callbacks_config(path: Path, log: Path, *extra: dict, every: int = 2) -> str:
    """A config file whose callbacks save every ``every`` steps (keeping all), log every batch, and inject
    ``extra``."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": CKPTS, "filename": "step{step}", "auto_insert_metric_name": False,
                      "every_n_train_steps": every, "save_top_k": -1, "save_last": True},
    }  # fmt: skip
    log_cb = {"class_path": "faults.StepLog", "init_args": {"path": str(log)}}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [checkpoint, log_cb, *extra]}}))
    return str(path)


def signal_at(
    name: str,
    *,
    step: int | None = None,
    batch: int | None = None,
    rank: int | None = None,
    group: bool = False,
) -> dict:
    args = {"step": step, "batch": batch, "signal_name": name, "rank": rank, "group": group}
    return {"class_path": "faults.SignalAt", "init_args": args}


def chain_args(code_tree: Path, run: Path, tok: Path, config: str, *extra: str) -> list[str]:
    return fit_args(
        code_tree, run,
        "--data.init_args.tokenizer", str(tok),
        "--model.init_args.config", DROPOUT_MODEL,   # dropout on: resuming must restore the RNG states
        "--trainer.max_steps", "8",
        "--trainer.accumulate_grad_batches", "2",
        "--trainer.val_check_interval", "4",          # validation between steps must not shift the dropout draws
        "--trainer.limit_val_batches", "2",
        "--config", config,
        *extra,
    )  # fmt: skip


def assert_same_batches_and_losses(straight: dict, chained: dict) -> None:
    assert sorted(straight) == sorted(chained)
    for rank in straight:
        a, b = straight[rank], chained[rank]
        assert [(r["step"], r["batch_idx"]) for r in a] == [(r["step"], r["batch_idx"]) for r in b]
        for x, y in zip(a, b):
            where = f"rank {rank} step {x['step']} batch {x['batch_idx']}"
            assert x["hash"] == y["hash"], where
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-6), where


def stop_resume_chain(
    code_tree: Path, tmp_path: Path, *launch: str, sigterm_rank: int | None, group: bool = False
) -> Path:
    """Uninterrupted 8 steps (accumulating 2 batches per step, saving every 2 steps) vs a run that is stopped and
    resumed three times: SIGTERM on ``sigterm_rank`` in the middle of step 4's accumulation window (all ranks
    finish step 4, save last.ckpt, exit 143) -> resume, SIGKILL on every rank after step 6 (nothing saved since
    step 4) -> last.ckpt truncated as by a crash mid-write -> resume falls back to step2.ckpt and runs to step 8."""
    tok = tmp_path / "tok"
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    for run in (straight, chain):
        run.mkdir()
    plain = callbacks_config(straight / "cb.yaml", straight / "log")
    done = run_cli(chain_args(code_tree, straight, tok, plain, *launch), straight)
    assert done.returncode == 0, done.stderr[-3000:]

    log = chain / "log"
    term = callbacks_config(
        chain / "term.yaml", log, signal_at("SIGTERM", batch=6, rank=sigterm_rank, group=group)
    )
    first = run_cli(chain_args(code_tree, chain, tok, term, *launch), chain)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    last = chain / CKPTS / "last.ckpt"
    # Batch 6 is in the middle of step 4's window: step 4 is finished first, then saved.
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert "stopped by SIGTERM after step 4" in first.stderr + first.stdout

    kill = callbacks_config(chain / "kill.yaml", log, signal_at("SIGKILL", step=6))
    second = run_cli(chain_args(code_tree, chain, tok, kill, *launch, "--ckpt_path", "last"), chain)
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 4
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a crash mid-write, without atomic saves

    resumed = callbacks_config(chain / "resume.yaml", log)
    # A changed seed cannot change the continuation: the checkpoint's RNG states win (and the run says so).
    new_seed = ["--seed_everything", "7", "--ckpt_path", "last"]
    third = run_cli(chain_args(code_tree, chain, tok, resumed, *launch, *new_seed), chain)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "last.ckpt: truncated or corrupt" in third.stderr and "resuming from" in third.stderr
    assert f"resuming from {chain / CKPTS / 'step2.ckpt'}" in third.stderr  # no step4.ckpt: preempted at 4
    assert torch.load(last, weights_only=True)["global_step"] == 8
    assert (chain / CKPTS / "last.ckpt.corrupt").is_file()  # kept for inspection, out of the way
    assert "seed_everything changed from 42 to 7" in third.stderr
    assert_same_batches_and_losses(read_log(straight / "log"), read_log(log))
    return straight


@pytest.mark.slow
def test_sigterm_sigkill_and_corrupt_last_resume_exactly_one_process_two_workers(code_tree, tmp_path):
    # SIGTERM to the whole process group, DataLoader workers included (as SLURM does): the workers ignore it.
    stop_resume_chain(
        code_tree, tmp_path, "--data.init_args.loader.num_workers", "2", sigterm_rank=0, group=True
    )


@pytest.mark.slow
def test_preempted_twice_then_finished_leaves_one_last_ckpt_with_the_final_step(code_tree, tmp_path):
    """As a user would: checkpoints every 100 steps, so only the preemption saves write last.ckpt. Stop at step 3,
    resume, stop at step 6, resume to the end: one last.ckpt (never last-v1.ckpt) holding step 8, and the losses
    of an uninterrupted run."""
    tok, straight, chain = tmp_path / "tok", tmp_path / "straight", tmp_path / "chain"
    for run in (straight, chain):
        run.mkdir()
    plain = callbacks_config(straight / "cb.yaml", straight / "log", every=100)
    done = run_cli(chain_args(code_tree, straight, tok, plain), straight)
    assert done.returncode == 0, done.stderr[-3000:]

    log, last = chain / "log", chain / CKPTS / "last.ckpt"
    for i, (stop, resume) in enumerate(
        [(3, []), (6, ["--ckpt_path", "last"]), (None, ["--ckpt_path", "last"])]
    ):
        extra = [signal_at("SIGTERM", step=stop)] if stop else []
        config = callbacks_config(chain / f"cb{i}.yaml", log, *extra, every=100)
        proc = run_cli(chain_args(code_tree, chain, tok, config, *resume), chain)
        assert proc.returncode == (128 + signal.SIGTERM if stop else 0), proc.stderr[-3000:]
        assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
        assert torch.load(last, weights_only=True)["global_step"] == (stop or 8)
    assert_same_batches_and_losses(read_log(straight / "log"), read_log(log))


def test_nonfinite_loss_stop_policy_names_the_step_and_rank(code_tree, tmp_path):
    poison = {"class_path": "faults.PoisonOnce", "init_args": {"step": 2, "rank": 0}}
    stop = {"class_path": "lmrecipes.resilience.NonFiniteLoss", "init_args": {"policy": "stop"}}
    config = callbacks_config(tmp_path / "cb.yaml", tmp_path / "log", poison, stop)
    proc = run_cli(
        fit_args(code_tree, tmp_path, "--config", config, "--trainer.limit_val_batches", "0"), tmp_path
    )
    assert proc.returncode != 0
    assert (
        "FloatingPointError: non-finite loss at optimizer step 3 (epoch 0, batch 2) on rank(s) [0]"
        in proc.stderr
    )
    rows = read_log(tmp_path / "log")[0]
    assert [r["step"] for r in rows] == [1, 2]  # stopped before the poisoned step was applied


def test_atomic_save_failure_keeps_the_previous_checkpoint(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated in the middle of torch.save)")

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1, "loops": {}}, target)
    before = target.read_bytes()
    big = {"state_dict": {"w": torch.zeros(100_000)}, "global_step": 2, "loops": {}, "bad": Unpicklable()}
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint(big, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left behind
    assert checkpoint_problem(target, training=False) is None


def test_corrupt_checkpoints_are_detected_and_last_falls_back(tmp_path):
    io = AtomicCheckpointIO()
    good = {"state_dict": {"w": torch.arange(1000.0)}, "global_step": 4, "loops": {}, "optimizer_states": []}
    io.save_checkpoint(good, tmp_path / "step4.ckpt")
    io.save_checkpoint({**good, "global_step": 6}, tmp_path / "step6.ckpt")
    io.save_checkpoint({**good, "global_step": 6}, tmp_path / "last.ckpt")
    data = (tmp_path / "step6.ckpt").read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the tensor bytes: torch.load would not notice
    (tmp_path / "step6.ckpt").write_bytes(bytes(flipped))
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 3])
    os.utime(tmp_path / "step4.ckpt", (1, 1))  # oldest

    assert "truncated or corrupt" in checkpoint_problem(tmp_path / "last.ckpt")
    assert "CRC check failed" in checkpoint_problem(tmp_path / "step6.ckpt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    assert "missing state_dict" in checkpoint_problem(tmp_path / "plain.pt")
    with pytest.warns(UserWarning, match="last.ckpt: truncated or corrupt"):
        assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "step4.ckpt")
    with pytest.warns(
        UserWarning, match=r"step6.ckpt: CRC check failed .* \(renamed to step6.ckpt.corrupt\)"
    ):
        assert resolve_ckpt_path("last", tmp_path, quarantine=True) == str(tmp_path / "step4.ckpt")
    assert sorted(p.name for p in tmp_path.glob("*.corrupt")) == ["last.ckpt.corrupt", "step6.ckpt.corrupt"]
    with pytest.raises(ValueError, match=r"step6.ckpt.corrupt cannot be used: CRC.*newest valid.*step4"):
        resolve_ckpt_path(str(tmp_path / "step6.ckpt.corrupt"), None)
    assert resolve_ckpt_path("last", tmp_path / "missing") is None  # first launch of a requeued job
    assert resolve_ckpt_path("last", "s3://bucket/run/checkpoints") == "last"  # Lightning's fsspec lookup

    # Of another kind, not damaged: named and skipped, never renamed.
    weights_only = {k: v for k, v in good.items() if k != "optimizer_states"}
    io.save_checkpoint(weights_only, tmp_path / "weights.ckpt")
    io.save_checkpoint({**good, "hyper_parameters": {"path": Path("x")}}, tmp_path / "pathlib.ckpt")
    assert "missing optimizer_states" in checkpoint_problem(tmp_path / "weights.ckpt")
    assert checkpoint_problem(tmp_path / "weights.ckpt", training=False) is None  # fine for validate/test
    assert "not loadable with weights_only=True" in checkpoint_problem(tmp_path / "pathlib.ckpt")
    with pytest.warns(UserWarning, match="pathlib.ckpt: not loadable with weights_only=True"):
        assert resolve_ckpt_path("last", tmp_path, quarantine=True) == str(tmp_path / "step4.ckpt")
    assert (tmp_path / "weights.ckpt").is_file() and (tmp_path / "pathlib.ckpt").is_file()
    assert resolve_ckpt_path(str(tmp_path / "step4.ckpt"), None) == str(tmp_path / "step4.ckpt")


def test_only_what_the_zip_proves_damaged_is_set_aside(tmp_path):
    """A load error is not proof of damage: an intact zip torch cannot read is named and left in place, a
    checkpoint in torch's legacy (non-zip) format is usable; an empty file is set aside like a truncated one."""
    import zipfile

    good = {"state_dict": {"w": torch.ones(3)}, "global_step": 2, "loops": {}, "optimizer_states": []}
    torch.save(good, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "other.ckpt", "w") as archive:  # intact CRCs, no data.pkl inside
        archive.writestr("notes.txt", "not a checkpoint")
    for age, name in enumerate(["legacy.ckpt", "empty.ckpt", "other.ckpt"]):
        os.utime(tmp_path / name, (age + 1, age + 1))  # other.ckpt newest

    assert checkpoint_problem(tmp_path / "legacy.ckpt") is None
    assert "truncated or corrupt (empty file)" in checkpoint_problem(tmp_path / "empty.ckpt")
    assert checkpoint_problem(tmp_path / "other.ckpt").startswith("not loadable (RuntimeError: ")
    with pytest.warns(UserWarning, match=r"other.ckpt: not loadable \(RuntimeError") as caught:
        chosen = resolve_ckpt_path("last", tmp_path, quarantine=True)
    assert chosen == str(tmp_path / "legacy.ckpt")
    assert "empty.ckpt: truncated or corrupt (empty file) (renamed to empty.ckpt.corrupt)" in str(
        caught[0].message
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.ckpt.corrupt", "legacy.ckpt", "other.ckpt"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "rng.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def _resume_choice(rank: int, port: int, chosen: list, errors) -> None:
    from lmrecipes.resume import check_same_resume

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        check_same_resume(chosen[rank])
    except ValueError as err:
        errors.put((rank, str(err)))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_that_chose_different_checkpoints_stop_together(tmp_path):
    """Two real gloo processes: one found step4.ckpt, the other nothing (a node that does not see the folder).
    Ranks that agree pass through the same check in every DDP resume test."""
    import socket

    import torch.multiprocessing as mp

    AtomicCheckpointIO().save_checkpoint({"global_step": 4}, tmp_path / "step4.ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = mp.get_context("spawn").Queue()
    chosen = [str(tmp_path / "step4.ckpt"), None]
    mp.start_processes(_resume_choice, args=(port, chosen, errors), nprocs=2, start_method="spawn")
    found = sorted(errors.get(timeout=30) for _ in range(2))
    assert [rank for rank, _ in found] == [0, 1]  # every rank raises, none waits in a collective
    for _, message in found:
        assert "rank 0: step4.ckpt (" in message and "rank 1: none" in message
