"""What every document source shares: the document shape, errors that name the file, the one ``on_error`` check.

A document is a dict with at least ``content: str``, ``path: str`` and ``size: int`` (the codeparrot columns).
Every source yields ``(raw_index, document)`` in a fixed order and can start at any raw index; it also lists its
natural shards and opens one at a row (see ``data/shards.py``), so a stream reads only its own shards.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmrecipes.data.shards import Shard
from lmrecipes.data.splits import stable_hash

ON_ERROR_POLICIES = ("error", "skip")


class SourceError(ValueError):
    """A source cannot be read as asked; the message names the file (and line) or value."""


def sanitize_text(text: str) -> str:
    """Replace each lone surrogate with U+FFFD so Rust tokenizers, which reject them, never crash."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        # A UTF-16 round trip (not UTF-8) re-joins valid surrogate pairs and gives one U+FFFD per lone one.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def python_install_roots() -> list[Path]:
    """The interpreter's stdlib and site-packages directories: existing, deduplicated, sorted."""
    paths = sysconfig.get_paths()
    roots = {Path(paths[key]).resolve() for key in ("stdlib", "purelib", "platlib") if key in paths}
    return sorted(root for root in roots if root.is_dir())


def short_hash(obj: Any) -> str:
    return stable_hash(obj)


def file_sizes(paths: list[str]) -> list[int]:
    return [os.stat(path).st_size if os.path.exists(path) else -1 for path in paths]


def file_stats(paths: list[str]) -> list[tuple[str, int, int]]:
    stats = [(path, os.stat(path)) for path in paths]
    return sorted((path, st.st_size, st.st_mtime_ns) for path, st in stats)


def expand(patterns: list[str]) -> list[str]:
    """Absolute, sorted, deduplicated files matching each pattern; a pattern matching nothing is an error."""
    files: set[str] = set()
    for pattern in patterns:
        matches = [m for m in glob.glob(os.path.abspath(pattern), recursive=True) if os.path.isfile(m)]
        if not matches:
            raise SourceError(
                f"{pattern!r} matches no file; expected an existing file or a glob that matches one"
            )
        files.update(matches)
    return sorted(files)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"on_error={on_error!r} is not supported; expected one of {ON_ERROR_POLICIES}")


class DocumentSource:
    """Base class: a fixed, resumable order of documents plus counts of skipped records."""

    def __init__(self, *, on_error: str = "error", text_column: str = "content") -> None:
        check_on_error(on_error)
        self.on_error = on_error
        self.text_column = text_column
        self.skipped: dict[str, int] = {}

    def fingerprint(self) -> str:
        """Stable short hex hash of what the source holds."""
        raise NotImplementedError

    def iter_raw(self, start: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield ``(raw_index, document)`` in a fixed order, beginning at raw index ``start``."""
        raise NotImplementedError

    def shards(self) -> list[Shard]:
        """The source's natural shards, in a stable order. This base lists the whole source as one shard (several
        streams then split it by rows, each reading all of it)."""
        return [Shard(f"{type(self).__name__}:all")]

    def iter_shard(
        self, index: int, *, row: int = 0, byte: int = 0, part: int = 0, parts: int = 1
    ) -> Iterator[tuple[int, int, dict | None]]:
        """Yield ``(row, byte, doc)`` for the rows of shard ``index`` from ``row`` on whose ``row % parts`` is
        ``part``; ``byte`` is where ``row`` starts in the shard's file (0 where the source cannot seek), and
        ``doc`` is None for a record skipped as bad. This base skips rows from the start of the source."""
        if index != 0:
            raise IndexError(f"{type(self).__name__} has one shard; asked for shard {index}")
        for raw_index, doc in self.iter_raw(start=row):
            if raw_index % parts == part:
                yield raw_index, 0, doc

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _bad_record(self, message: str, *, reason: str) -> None:
        if self.on_error == "error":
            raise SourceError(message)
        self._skip(reason)

    def _record_doc(self, record: dict, *, location: str, where: str | None = None) -> dict | None:
        """Codeparrot columns on top of the record's own; ``location`` stands in for a missing path (so every
        reader of the source must give a row the same one), ``where`` (default ``location``) names it in errors."""
        where = where or location
        if self.text_column not in record:
            # A missing column is a config mistake, never a bad record: always fail.
            raise SourceError(f"{where}: no column {self.text_column!r}; the keys are {sorted(record)}")
        content = record[self.text_column]
        if not isinstance(content, str):
            got = type(content).__name__
            return self._bad_record(
                f"{where}: {self.text_column!r} is {got}; expected a string", reason="not_text"
            )
        doc = {key: value for key, value in record.items() if key != self.text_column}  # no second copy
        doc["content"] = sanitize_text(content)
        doc["path"] = str(record.get("path", location))
        doc["size"] = int(record["size"]) if "size" in record else len(doc["content"].encode())
        return doc
