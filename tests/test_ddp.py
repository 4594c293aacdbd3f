"""Real 2-process DDP (gloo, CPU) through the CLI: per-rank data positions are saved and resumed exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_cli import fit_args, read_metric

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def run_cli(args: list[str], cwd) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lmrecipes", *args, "--quiet"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks_read_different_shards_and_resume_exactly(code_tree, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [
        *DDP,
        "--data.init_args.tokenizer",
        str(tmp_path / "tok"),
        "--data.init_args.num_workers",
        "1",
        "--trainer.val_check_interval",
        "100",
        "--trainer.limit_val_batches",
        "0",
    ]
    for run in (straight, resumed):
        run.mkdir()
    run_cli(fit_args(code_tree, straight, *common), straight)
    ckpt = torch.load(straight / "runs/clm-offline/checkpoints/last.ckpt", weights_only=True)
    ranks = ckpt["CodeDataModule"]["ranks"]
    assert [r["consumed"] for r in ranks] == [6, 6]  # both ranks' positions, not only rank 0's
    assert ranks[0]["cursors"] != ranks[1]["cursors"]  # different shards

    run_cli(fit_args(code_tree, resumed, *common, "--trainer.max_steps", "3"), resumed)
    run_cli(fit_args(code_tree, resumed, *common, "--ckpt_path", "last"), resumed)
    a, b = dict(read_metric(straight, "train/loss")), dict(read_metric(resumed, "train/loss"))
    assert sorted(a) == sorted(b) == list(range(6))
    for step in range(6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
