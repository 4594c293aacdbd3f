#!/usr/bin/env bash
# One GPU, one command, about 4 minutes: GPT-2 124M (context 1024, bf16) trained by lmrecipes and by the Hugging
# Face Trainer on the same GPU, batch and data, without and with torch.compile (tokens/s, MFU against the
# project's dense bf16 peak table, peak memory), then the 1.5B model under FSDP2 through the CLI
# (scripts/bench_gpu_fsdp.yaml). Prints one table. Without a CUDA GPU it says so and exits 0.
#   bash scripts/bench_gpu.sh            # BATCH=16 STEPS=20 by default
set -uo pipefail
cd "$(dirname "$0")/.."
cuda=$(python -c "import torch; print(torch.cuda.is_available())") || {
  echo "bench_gpu: python cannot import torch: install the project first (README, Development)" >&2
  exit 1
}
if [ "$cuda" != "True" ]; then
  echo "bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False): nothing to measure"
  exit 0
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=$(mktemp -d)
start=$SECONDS
args=(--device cuda --precision bf16-mixed --gpt2-124m --batch "${BATCH:-16}" --steps "${STEPS:-20}" --skip 5
      --repeats 1 --no-agree --threads 8)
python scripts/bench_train.py "${args[@]}" > "$out/eager.jsonl" 2> "$out/eager.log" || echo "eager run failed: $out/eager.log"
python scripts/bench_train.py "${args[@]}" --compile > "$out/compile.jsonl" 2> "$out/compile.log" \
  || echo "compile run failed: $out/compile.log"
# FSDP2 row: the 1.5B model through the CLI; a failed run is reported as FAILED with its last log line, never as a number
find runs/bench-fsdp -name metrics.csv -delete 2>/dev/null  # no stale figures; the tokenizer is kept
if lmrecipes fit --config scripts/bench_gpu_fsdp.yaml > "$out/fsdp.log" 2>&1; then fsdp=ok; else fsdp=failed; fi
python - "$out" "$fsdp" <<'PY'
import csv, glob, json, sys
from pathlib import Path

out, fsdp = Path(sys.argv[1]), sys.argv[2]
rows = []
for name in ("eager", "compile"):
    for line in (out / f"{name}.jsonl").read_text().splitlines() if (out / f"{name}.jsonl").exists() else []:
        r = json.loads(line)
        if r.get("bench") == "train":
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
            rows.append((f"124M {r['impl']}", name, f"{r['tokens_per_s']:,.0f}", mfu, f"{r['peak_mem_gib']} GiB"))
metrics = {}
for path in sorted(glob.glob("runs/bench-fsdp/**/metrics.csv", recursive=True)):
    for row in csv.DictReader(open(path)):
        metrics |= {k: v for k, v in row.items() if v and k.startswith("train/")}
if fsdp == "ok" and "train/tokens_per_sec" in metrics:
    mfu = f"{100 * float(metrics['train/mfu']):.1f} %" if "train/mfu" in metrics else "n/a"
    mem = f"{float(metrics.get('train/peak_memory_gib', 'nan')):.1f} GiB"
    rows.append(("1.5B lmrecipes FSDP2", "eager", f"{float(metrics['train/tokens_per_sec']):,.0f}", mfu, mem))
else:
    tail = (out / "fsdp.log").read_text().strip().splitlines()[-1:] or ["no output"]
    rows.append(("1.5B lmrecipes FSDP2", "-", f"FAILED: {tail[0][:70]}", "-", "-"))
head = ("model / loop", "compile", "tokens/s", "MFU", "peak memory")
widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
for r in [head, ["-" * w for w in widths], *rows]:
    print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
PY
echo "bench_gpu: $((SECONDS - start)) s; logs in $out"
