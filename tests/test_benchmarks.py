"""Every benchmark in scripts/ runs from a fresh ``.[test,bench]`` install, as the README's Development section says
(in ``--smoke`` mode: tiny sizes, one run; the measurements themselves are not tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "scripts").glob("bench_*.py"))


def test_the_readme_lists_every_benchmark():
    readme = (REPO / "README.md").read_text()
    assert SCRIPTS and all(f"python scripts/{name}" in readme for name in SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_in_smoke_mode(name, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, proc.stdout[-2000:]


def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: scripts/bench_gpu.sh would measure (a benchmark, not a test)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "bench_gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU" in proc.stdout and "tokens/s" not in proc.stdout
