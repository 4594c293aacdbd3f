"""Local files: a source tree (one document per file) and JSON-lines files (also gzip-compressed)."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from lmrecipes.data.shards import Shard
from lmrecipes.data.sources.base import (
    DocumentSource,
    SourceError,
    expand,
    file_sizes,
    file_stats,
    sanitize_text,
    short_hash,
)


def record_location(file: str, record: int) -> str:
    """The name of a JSON-lines record without a ``path`` (held-out splits hash it), the same from
    ``iter_raw`` and ``iter_shard``: its file and its number there, blank lines not counted (0-based)."""
    return f"{file} (record {record})"


def path_order_key(relative_path: str) -> bytes:
    """Sort key of a file in a source tree: a hash of its path relative to the root (stable across machines)."""
    return hashlib.blake2b(Path(relative_path).as_posix().encode(), digest_size=8).digest()


class SourceTree(DocumentSource):
    """One document per file under some directories, codeparrot style."""

    one_row_shards = (
        True  # a shard (file) is one row: streams share files out, never rows of one (data/shards.py)
    )

    def __init__(
        self,
        *,
        roots: list[str | Path],
        pattern: str = "*.py",
        max_file_bytes: int = 1_000_000,
        on_error: str = "error",
        progress: bool = True,
    ) -> None:
        """Roots are searched recursively for file names matching ``pattern``; listing happens lazily."""
        super().__init__(on_error=on_error)
        self.roots = [os.path.abspath(root) for root in roots]
        missing = [root for root in self.roots if not os.path.isdir(root)]
        if missing:
            raise SourceError(f"source root(s) {missing} do not exist; expected existing directories")
        self.pattern = pattern
        self.max_file_bytes = max_file_bytes
        self.progress = progress
        self._files: list[str] | None = None
        self._relative: dict[str, str] = {}

    def split_key(self, path: str) -> str:
        """The file's path relative to its root: what order and held-out splits hash, so they do not depend on
        where the tree (or the virtual environment) lives."""
        if not self._relative:
            _ = self.files
        return Path(self._relative.get(path, path)).as_posix()

    @property
    def files(self) -> list[str]:
        """Absolute paths of every matching file in a fixed (path-hash) order, listed once."""
        if self._files is None:
            self._files = self._list_files()
        return self._files

    def _list_files(self) -> list[str]:
        # path -> path relative to its root; a dict because nested roots (stdlib holding site-packages) overlap
        found: dict[str, str] = {}
        with tqdm(desc="listing source files", unit=" files", disable=not self.progress) as bar:
            for root in self.roots:
                # followlinks=False: symlinked directories can form loops and duplicate real trees.
                for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
                    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
                    for name in fnmatch.filter(filenames, self.pattern):
                        path = os.path.join(dirpath, name)
                        found.setdefault(path, os.path.relpath(path, root))
                        bar.update(1)
        if not found:
            raise SourceError(f"no file matches {self.pattern!r} under {self.roots}")
        # Ordered by a hash of the path, not alphabetically: a stream read front to back then mixes packages
        # instead of training on one library at a time, and the order is still the same on every run.
        self._relative = found
        return sorted(found, key=lambda p: path_order_key(found[p]))

    def fingerprint(self) -> str:
        """Hash of the sorted (path, size, mtime_ns) of every file."""
        return short_hash(file_stats(self.files))

    def shards(self) -> list[Shard]:
        """One shard per file, named by its root-relative path, sized in bytes."""
        return [Shard(self.split_key(path), size) for path, size in zip(self.files, file_sizes(self.files))]

    def iter_shard(
        self, index: int, *, row: int = 0, byte: int = 0, part: int = 0, parts: int = 1
    ) -> Iterator[tuple[int, int, dict | None]]:
        """The file's one document (row 0), or nothing when ``row`` is past it or ``part`` is not 0."""
        if row == 0 and part == 0:
            yield 0, 0, self._read(self.files[index])

    def iter_raw(self, start: int = 0, *, select_path=None) -> Iterator[tuple[int, dict]]:
        """Yield one document per file; skipped files still consume their index.

        ``select_path(split_key) -> bool`` skips files before reading them (a held-out split decided by the
        root-relative path, see :meth:`split_key`).
        """
        files = self.files
        for index in range(start, len(files)):
            if select_path is not None and not select_path(self.split_key(files[index])):
                continue
            doc = self._read(files[index])
            if doc is not None:
                yield index, doc

    def _read(self, path: str) -> dict | None:
        try:
            if os.path.getsize(path) > self.max_file_bytes:
                self._skip("too_large")
                return None
            content = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            self._bad_record(
                f"{path}: {err.reason} at byte {err.start}; expected UTF-8 text", reason="not_utf8"
            )
            return None
        except OSError as err:
            self._bad_record(
                f"{path}: cannot be read ({err.strerror}); expected UTF-8 text", reason="unreadable"
            )
            return None
        content = sanitize_text(content)
        return {
            "content": content,
            "path": path,
            "size": len(content.encode()),
            "split_key": self.split_key(path),
        }


class JsonlFiles(DocumentSource):
    """Documents from JSON-lines files: one JSON object per non-blank line."""

    def __init__(self, *, paths: list[str], text_column: str = "content", on_error: str = "error") -> None:
        """``paths`` may hold globs; they are expanded and sorted now, so a typo fails early."""
        super().__init__(on_error=on_error, text_column=text_column)
        self.files = expand(paths)

    def fingerprint(self) -> str:
        """Hash of the sorted (path, size, mtime_ns) of every file."""
        return short_hash(file_stats(self.files))

    def iter_raw(self, start: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield one document per non-blank line; lines before ``start`` are counted but not parsed. A ``.gz``
        file is read through gzip (the book's ``*.json.gz``); one that is cut short or corrupt ends there."""
        index = 0
        for file in self.files:
            lineno, record = 0, 0  # record: the row number iter_shard gives it (blank lines have none)
            with (gzip.open if file.endswith(".gz") else open)(file, "rb") as handle:
                try:
                    for lineno, raw in enumerate(handle, start=1):
                        if not raw.strip():
                            continue  # blank lines are formatting, not records: no index
                        if index >= start:
                            doc = self._parse(
                                raw, location=record_location(file, record), where=f"{file}:{lineno}"
                            )
                            if doc is not None:
                                yield index, doc
                        index, record = index + 1, record + 1
                except (EOFError, gzip.BadGzipFile, zlib.error) as err:
                    self._bad_record(f"{file}:{lineno + 1}: {err}; expected a complete gzip file of JSON "
                                     "lines (truncated download?)", reason="bad_gzip")  # fmt: skip

    def shards(self) -> list[Shard]:
        """One shard per file, sized in bytes."""
        return [Shard(path, size) for path, size in zip(self.files, file_sizes(self.files))]

    def iter_shard(
        self, index: int, *, row: int = 0, byte: int = 0, part: int = 0, parts: int = 1
    ) -> Iterator[tuple[int, int, dict | None]]:
        """Rows of one file from ``row``, which starts at ``byte``: the file is opened there, never replayed from
        its start (a ``.gz`` file seeks by decompressing up to it, a cost bounded by the file)."""
        file = self.files[index]
        with (gzip.open if file.endswith(".gz") else open)(file, "rb") as handle:
            handle.seek(byte)
            position, index_of_row = byte, row
            try:
                while raw := handle.readline():
                    start, position = position, position + len(raw)
                    if not raw.strip():
                        continue  # blank lines are formatting, not records: no row
                    current, index_of_row = index_of_row, index_of_row + 1
                    if current % parts == part:
                        yield (
                            current,
                            start,
                            self._parse(
                                raw,
                                location=record_location(file, current),
                                where=f"{file} (record {current}, byte {start})",
                            ),
                        )
            except (EOFError, gzip.BadGzipFile, zlib.error) as err:
                self._bad_record(f"{file} (after byte {position}): {err}; expected a complete gzip file of JSON "
                                 "lines (truncated download?)", reason="bad_gzip")  # fmt: skip

    def _parse(self, raw: bytes, *, location: str, where: str) -> dict | None:
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return self._bad_record(f"{where}: {err}; expected one JSON object per line", reason="bad_json")
        if not isinstance(record, dict):
            got = type(record).__name__
            return self._bad_record(
                f"{where}: a JSON {got}; expected one JSON object per line", reason="bad_json"
            )
        return self._record_doc(record, location=location, where=where)
