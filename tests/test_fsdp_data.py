"""FSDP2 (``ModelParallelStrategy``) restores a checkpoint after the strategy's setup, when ``max_epochs`` has
already built the training loader (``estimated_stepping_batches``): the CLM data position must still reach it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faults import read_log
from test_cli import fit_args
from test_resilience import assert_same_batches_and_losses, callbacks_config, run_cli, signal_at

ONE_CPU_FSDP2 = ["--trainer.strategy", "fsdp2", "--trainer.devices", "1", "--trainer.accelerator", "cpu"]


def small_tree(root: Path) -> Path:
    """32 short stdlib excerpts (enough to train the tokenizer), so one epoch is a few dozen batches."""
    stdlib = Path(json.__file__).parent.parent
    files = [f for pkg in ("email", "json", "http") for f in sorted((stdlib / pkg).glob("*.py"))][:32]
    root.mkdir()
    for i, src in enumerate(files):
        text = "import pandas as pd\n" + src.read_text(encoding="utf-8")[:1500]
        (root / f"m{i:02d}.py").write_text(text, encoding="utf-8")
    return root


@pytest.mark.slow
def test_fsdp2_resume_with_max_epochs_continues_the_pretokenized_windows(tmp_path):
    tree, tok = small_tree(tmp_path / "tree"), tmp_path / "tok"
    runs = {name: tmp_path / name for name in ("straight", "chain")}

    def args(run: Path, config: str, *extra: str) -> list[str]:
        return fit_args(tree, run, "--data.init_args.tokenizer", str(tok), "--config", config,
                        "--trainer.max_steps", "-1", "--trainer.max_epochs", "1",
                        "--data.init_args.packing.pretokenize", "true", "--trainer.limit_val_batches", "0",
                        *ONE_CPU_FSDP2, *extra)  # fmt: skip

    for run in runs.values():
        run.mkdir()
    straight = runs["straight"]
    done = run_cli(args(straight, callbacks_config(straight / "cb.yaml", straight / "log")), straight)
    assert done.returncode == 0, done.stderr[-3000:]
    batches = len(read_log(straight / "log")[0])
    assert batches > 10  # an epoch long enough to stop in the middle of
    chain = runs["chain"]
    log = chain / "log"
    term = callbacks_config(chain / "term.yaml", log, signal_at("SIGTERM", batch=5))
    first = run_cli(args(chain, term), chain)
    assert first.returncode == 143, first.stderr[-3000:]
    second = run_cli(args(chain, callbacks_config(chain / "resume.yaml", log), "--ckpt_path", "last"), chain)
    assert second.returncode == 0, second.stderr[-3000:]
    # without the restored position the resumed run starts the windows over: other batches, other losses
    assert_same_batches_and_losses(read_log(straight / "log"), read_log(log))
