"""Real 2-process DDP (gloo, CPU) through the CLI: per-rank data positions are saved and resumed exactly, a signal
on one rank stops both after the same step, a NaN on one rank skips the step on both."""

from __future__ import annotations

import pytest
import torch
from test_cli import fit_args, read_metric
from test_resilience import callbacks_config, run_cli, stop_resume_chain

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_ddp_sigterm_on_one_rank_sigkill_and_corrupt_last_resume_exactly(code_tree, tmp_path, num_workers):
    workers = ["--data.init_args.loader.num_workers", str(num_workers)]
    straight = stop_resume_chain(code_tree, tmp_path, *DDP, *workers, sigterm_rank=1)
    saved = torch.load(straight / "runs/clm-offline/checkpoints/last.ckpt", weights_only=True)
    ranks = saved["CodeDataModule"]
    assert [r["consumed"] for r in ranks["ranks"]] == [16, 16]  # both ranks' positions, not only rank 0's
    assert ranks["ranks"][0]["cursors"] != ranks["ranks"][1]["cursors"]  # different shards


@pytest.mark.slow
def test_ddp_nan_on_one_rank_skips_the_step_on_both(code_tree, tmp_path):
    poison = {"class_path": "faults.PoisonOnce", "init_args": {"step": 2, "rank": 1}}
    config = callbacks_config(tmp_path / "cb.yaml", tmp_path / "log", poison)
    args = fit_args(code_tree, tmp_path, *DDP, "--config", config, "--trainer.limit_val_batches", "0")
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "non-finite loss at optimizer step 3 (epoch 0, batch 2) on rank(s) [1]: step skipped on every rank"
        in (proc.stderr)
    )
    ckpt = torch.load(tmp_path / "runs/clm-offline/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert int(ckpt["optimizer_states"][0]["state"][0]["step"]) == 5  # AdamW applied 5 of the 6 steps
    assert all(torch.isfinite(w).all() for w in ckpt["state_dict"].values())
    assert dict(read_metric(tmp_path, "train/skipped_steps"))[2] == 1.0
