"""Checkpoint writes: Lightning's default TorchCheckpointIO vs lmrecipes' AtomicCheckpointIO, side by side.

    python scripts/bench_checkpoint.py                    # GPT-2 124M + AdamW states (~1.5 GB per checkpoint)
    python scripts/bench_checkpoint.py --n_layer 2        # quick

Each save runs in a fresh subprocess (so peak memory is that save's own) and prints one JSON line: method, seconds,
checkpoint size, resident memory before the save and its peak during it. Lightning buffers the whole
checkpoint in memory before writing it; AtomicCheckpointIO streams it to a temporary file next to the target.
Also checks that the files load with ``weights_only=True`` and hold the same tensors.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_checkpoint(n_layer: int, n_embd: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, 50257, (1, 16)), labels=torch.randint(0, 50257, (1, 16))).loss.backward()
    optimizer.step()  # real AdamW moments: the checkpoint is ~3x the weights
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1,
            "loops": {}}  # fmt: skip


def vm_kb(field: str) -> int:
    """A memory figure of this process from /proc (Linux), in kB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def save_once(method: str, n_layer: int, n_embd: int, target: str) -> None:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lmrecipes.checkpoints import AtomicCheckpointIO

    checkpoint = build_checkpoint(n_layer, n_embd)
    io = {"lightning": TorchCheckpointIO, "lmrecipes": AtomicCheckpointIO}[method]()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    before = vm_kb("VmRSS") / 1024
    start = time.perf_counter()
    io.save_checkpoint(checkpoint, target)
    seconds = time.perf_counter() - start
    peak = vm_kb("VmHWM") / 1024
    size = Path(target).stat().st_size / 2**20
    print(json.dumps({"method": method, "n_layer": n_layer, "seconds": round(seconds, 2),
                      "checkpoint_mb": round(size, 1), "rss_before_mb": round(before),
                      "peak_rss_during_save_mb": round(peak), "extra_memory_mb": round(peak - before)}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["lightning", "lmrecipes"])
    parser.add_argument("--target")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one run: checks that the script works (tests/test_benchmarks.py); measures nothing",
    )
    args = parser.parse_args()
    if args.smoke:
        args.n_layer, args.n_embd, args.repeats = 1, 64, 1
    if args.child:
        return save_once(args.child, args.n_layer, args.n_embd, args.target)
    import torch

    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for _ in range(args.repeats):
            for method in ("lightning", "lmrecipes"):
                paths[method] = f"{folder}/{method}.ckpt"
                cmd = [sys.executable, __file__, "--child", method, "--n_layer", str(args.n_layer),
                       "--n_embd", str(args.n_embd), "--target", paths[method]]  # fmt: skip
                subprocess.run(cmd, check=True)
        a, b = (torch.load(paths[m], weights_only=True) for m in ("lightning", "lmrecipes"))
        same = all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
        print(json.dumps({"check": "same tensors, weights_only loads", "ok": same}))


if __name__ == "__main__":
    main()
