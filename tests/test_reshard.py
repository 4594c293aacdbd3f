"""Resuming FSDP2 on another number of processes (2 -> 1 and 1 -> 2, gloo on CPU, the real CLI): the weights and
AdamW states re-sharded by PyTorch distributed checkpointing load bit-equal, and the classification recipe's data
position, converted through the global sample count, trains every row of the epoch exactly once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_classification import RUN, pair_rows, stdlib_functions, write_config, write_jsonl
from test_resilience import run_cli

from lmrecipes.checkpoints_sharded import full_state

ROWS, BATCH = (
    37,
    4,
)  # 3 steps before the resize; 4 after it finish the epoch on 1 process (13 rows) and on 2 (25)


def rows_trained(log: Path) -> list[str]:
    return [json.loads(line)["row"] for f in sorted(log.parent.glob(log.name + ".rank*"))
            for line in f.read_text().splitlines()]  # fmt: skip


def config_with(run: Path, model_dir: Path, train: str, *callbacks: dict) -> str:
    config = Path(write_config(run, model_dir, optimizer={"lr_schedule": "constant"}, limit_val_batches=0,
                               data={"train_source": train, "val_source": train, "batch_size": BATCH}))  # fmt: skip
    spec = yaml.safe_load(config.read_text())
    spec["trainer"]["callbacks"] += list(callbacks)
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(config)


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_fsdp2_resumes_on_another_world_size_bit_equal_and_every_row_once(tiny_bert, tmp_path, before, after):
    model_dir = tiny_bert[0]
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(stdlib_functions(), 0, ROWS))
    run, log, dump = tmp_path / "run", tmp_path / "rows", tmp_path / "restored.pt"
    run.mkdir()
    rows = {"class_path": "probes.RowLog", "init_args": {"path": str(log)}}
    state = {"class_path": "probes.FullStateDump", "init_args": {"path": str(dump)}}
    config = config_with(run, model_dir, train, rows, state)
    launch = ["--trainer.strategy", "fsdp2", "--trainer.accelerator", "cpu"]
    first = run_cli(["fit", "--config", config, *launch, "--trainer.devices", str(before),
                     "--trainer.max_steps", "3"], run)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    saved = run / RUN / "checkpoints" / "last.ckpt"
    weights, moments = full_state(saved), full_state(saved, "optimizer_0.state.")
    second = run_cli(["fit", "--config", config, *launch, "--trainer.devices", str(after),
                      "--trainer.max_steps", "7", "--ckpt_path", "last"], run)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    done = 3 * before * BATCH  # 3 global batches of the first world size
    assert (
        f"resuming a data position saved by {before} processes on {after}: epoch 0, {done} of its 37"
        in second.stderr
    )
    assert f"the checkpoint holds RNG states for {before} ranks, this run has {after}" in second.stderr
    restored = torch.load(dump, weights_only=True)
    assert restored["model"].keys() == weights.keys() and len(weights) > 20
    for key, value in weights.items():
        assert torch.equal(restored["model"][key], value), key
    assert restored["optimizer"].keys() == moments.keys() and any(k.endswith("exp_avg_sq") for k in moments)
    for key, value in moments.items():
        assert torch.equal(restored["optimizer"][key], value), key
    trained = rows_trained(log)
    assert len(trained) == ROWS and len(set(trained)) == ROWS  # the whole epoch, each row once
    ckpt = json.loads((saved / "COMPLETE.json").read_text())
    assert ckpt["world_size"] == after and ckpt["global_step"] == 7
    # Lightning counted the resized epoch in this world's batches: done + left = the whole epoch, which ended
    progress = torch.load(saved / "meta.pt", weights_only=True)["loops"]["fit_loop"][
        "epoch_loop.batch_progress"
    ]
    assert progress["current"]["completed"] == math.ceil(ROWS / (after * BATCH))
