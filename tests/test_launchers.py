"""One config, three launchers: Lightning's own, ``torchrun`` and SLURM (the example sbatch script)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from test_cli import REPO, fit_args, read_metric

from lmrecipes.cli import main

TESTS = Path(__file__).resolve().parent
SBATCH = REPO / "scripts" / "slurm.sbatch"


class LauncherProbe(Callback):
    """Writes, per rank, which cluster environment Lightning detected and who started the process."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        env = trainer.strategy.cluster_environment
        record = {
            "world_size": trainer.world_size,
            "environment": type(env).__name__,
            "creates_processes_externally": env.creates_processes_externally,
            "pid": os.getpid(),
            "ppid": os.getppid(),
        }
        Path(f"launcher-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run(command: list[str], cwd: Path) -> None:
    # The probe callback is imported from this file by the child processes.
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def probes(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"launcher-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_lightning_launcher_and_torchrun_train_identically(code_tree, tmp_path):
    by_torchrun, by_lightning = tmp_path / "torchrun", tmp_path / "lightning"
    common = [
        "--trainer.strategy", "ddp",
        "--trainer.devices", "2",  # must equal torchrun's --nproc-per-node (else: N independent 1-process runs)
        "--trainer.accelerator", "cpu",
        "--data.init_args.tokenizer", str(tmp_path / "tok"),  # trained by the first run only
        "--data.init_args.loader.num_workers", "1",
        "--trainer.val_check_interval", "100",
        "--trainer.limit_val_batches", "0",
        "--trainer.callbacks+=test_launchers.LauncherProbe",
        "--quiet",
    ]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for run_dir in (by_torchrun, by_lightning):
        run_dir.mkdir()
    # torchrun first: both ranks reach the missing tokenizer at once and must train it once between them.
    run([*torchrun, "-m", "lmrecipes", *fit_args(code_tree, by_torchrun, *common)], by_torchrun)
    run([sys.executable, "-m", "lmrecipes", *fit_args(code_tree, by_lightning, *common)], by_lightning)

    elastic = probes(by_torchrun)  # torchrun started both ranks; Lightning started none
    assert {p["environment"] for p in elastic} == {"TorchElasticEnvironment"}
    assert all(p["creates_processes_externally"] and p["world_size"] == 2 for p in elastic)
    assert elastic[0]["ppid"] == elastic[1]["ppid"] not in (elastic[0]["pid"], elastic[1]["pid"])
    own = probes(by_lightning)  # Lightning's launcher: rank 0 re-runs the command for rank 1
    assert {p["environment"] for p in own} == {"LightningEnvironment"}
    assert own[1]["ppid"] == own[0]["pid"]

    a, b = dict(read_metric(by_torchrun, "train/loss")), dict(read_metric(by_lightning, "train/loss"))
    assert sorted(a) == sorted(b) == list(range(6))
    for step in range(6):
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    positions = []
    for run_dir in (by_torchrun, by_lightning):
        ckpt = torch.load(run_dir / "runs/clm-offline/checkpoints/last.ckpt", weights_only=True)
        ranks = ckpt["CodeDataModule"]["ranks"]
        assert [r["consumed"] for r in ranks] == [6, 6]  # both ranks' positions, not only rank 0's
        assert ranks[0]["cursors"] != ranks[1]["cursors"]
        positions.append(ranks)
    assert positions[0] == positions[1]


def sbatch_directives() -> dict[str, str]:
    lines = SBATCH.read_text().splitlines()
    return dict(m.groups() for m in (re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line) for line in lines) if m)


def test_slurm_script_asks_for_one_task_per_gpu_and_a_signal_to_every_task():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    sbatch = sbatch_directives()
    assert sbatch["gres"] == f"gpu:{sbatch['ntasks-per-node']}"
    assert sbatch["signal"].startswith("USR1@")  # "B:USR1" would signal only the batch shell, not the ranks
    assert "requeue" in sbatch and sbatch["open-mode"] == "append"


def test_slurm_script_command_is_accepted_by_the_cli(tmp_path, monkeypatch, capsys):
    """Runs the script with a stand-in ``srun`` that records its arguments, then parses them (no Hub needed)."""
    (tmp_path / "srun").write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n')
    (tmp_path / "srun").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "1234", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"}
    env = {**os.environ, **slurm, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    env["SRUN_ARGS"] = str(tmp_path / "args")
    subprocess.run(["bash", str(SBATCH), "--trainer.max_steps", "10"], cwd=REPO, env=env, check=True)
    program, *args = (tmp_path / "args").read_text().split("\0")[:-1]
    assert program == "lmrecipes" and args[:3] == ["fit", "--config", "configs/clm/codeparrot-small.yaml"]

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (None, 0)
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["trainer"]["num_nodes"], int(config["trainer"]["devices"])) == (2, 8)
    assert (config["trainer"]["strategy"], config["trainer"]["max_steps"]) == ("ddp", 10)
    assert config["ckpt_path"] == "last"
    # where --ckpt_path last looks after a requeue: the default ModelCheckpoint saves last.ckpt in <run>/checkpoints
    assert config["checkpoint"]["save_last"] and config["checkpoint"]["dirpath"] is None
    assert config["trainer"]["default_root_dir"] == "runs/codeparrot-small"


def test_torchrun_with_a_device_count_that_does_not_match_is_refused(monkeypatch):
    from lmrecipes.cli import check_launcher_devices

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_launcher_devices(2, "cpu")
    check_launcher_devices("2", "cpu")
    with pytest.raises(
        ValueError, match="torchrun started 2 processes per node but trainer.devices is 'auto'"
    ):
        check_launcher_devices("auto", "cpu")  # Lightning would run two independent 1-process trainings
    with pytest.raises(ValueError, match="pass --trainer.devices 2"):
        check_launcher_devices(1, "cpu")
