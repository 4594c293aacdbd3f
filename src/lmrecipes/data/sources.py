"""Documents from anywhere (source trees, JSONL, Hugging Face datasets) and streaming filters.

A document is a dict with at least ``content: str``, ``path: str`` and ``size: int`` (the codeparrot
columns). Every source yields ``(raw_index, document)`` in a fixed order and can start at any raw index,
so a resumed stream continues mid-source.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmrecipes.data.shards import Shard
from lmrecipes.data.splits import stable_hash

ON_ERROR_POLICIES = ("error", "skip")
_HF_BUILDERS = {".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_JSONL_SUFFIXES = (".jsonl", ".json")
ROWS_PER_SHARD = 10_000  # shard size of a loaded (map-style) dataset
# Hub ids are "name" or "owner/name"; leading alnum keeps "./x" and "../x" from looking like one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


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


def _short_hash(obj: Any) -> str:
    return stable_hash(obj)


def _sizes(paths: list[str]) -> list[int]:
    return [os.stat(path).st_size if os.path.exists(path) else -1 for path in paths]


def _file_stats(paths: list[str]) -> list[tuple[str, int, int]]:
    stats = [(path, os.stat(path)) for path in paths]
    return sorted((path, st.st_size, st.st_mtime_ns) for path, st in stats)


def _expand(patterns: list[str]) -> list[str]:
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


def _check_policy(on_error: str) -> None:
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"on_error={on_error!r} is not supported; expected one of {ON_ERROR_POLICIES}")


class DocumentSource:
    """Base class: a fixed, resumable order of documents plus counts of skipped records."""

    def __init__(self, *, on_error: str = "error", text_column: str = "content") -> None:
        _check_policy(on_error)
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

    def _record_doc(self, record: dict, *, location: str) -> dict | None:
        """Codeparrot columns on top of the record's own; ``location`` stands in for a missing path."""
        if self.text_column not in record:
            # A missing column is a config mistake, never a bad record: always fail.
            raise SourceError(f"{location}: no column {self.text_column!r}; the keys are {sorted(record)}")
        content = record[self.text_column]
        if not isinstance(content, str):
            got = type(content).__name__
            return self._bad_record(
                f"{location}: {self.text_column!r} is {got}; expected a string", reason="not_text"
            )
        doc = {key: value for key, value in record.items() if key != self.text_column}  # no second copy
        doc["content"] = sanitize_text(content)
        doc["path"] = str(record.get("path", location))
        doc["size"] = int(record["size"]) if "size" in record else len(doc["content"].encode())
        return doc


def path_order_key(relative_path: str) -> bytes:
    """Sort key of a file in a source tree: a hash of its path relative to the root (stable across machines)."""
    return hashlib.blake2b(Path(relative_path).as_posix().encode(), digest_size=8).digest()


class SourceTree(DocumentSource):
    """One document per file under some directories, codeparrot style."""

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
        return _short_hash(_file_stats(self.files))

    def shards(self) -> list[Shard]:
        """One shard per file, named by its root-relative path, sized in bytes."""
        return [Shard(self.split_key(path), size) for path, size in zip(self.files, _sizes(self.files))]

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
        self.files = _expand(paths)

    def fingerprint(self) -> str:
        """Hash of the sorted (path, size, mtime_ns) of every file."""
        return _short_hash(_file_stats(self.files))

    def iter_raw(self, start: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield one document per non-blank line; lines before ``start`` are counted but not parsed. A ``.gz``
        file is read through gzip (the book's ``*.json.gz``); one that is cut short or corrupt ends there."""
        index = 0
        for file in self.files:
            lineno = 0
            with (gzip.open if file.endswith(".gz") else open)(file, "rb") as handle:
                try:
                    for lineno, raw in enumerate(handle, start=1):
                        if not raw.strip():
                            continue  # blank lines are formatting, not records: no index
                        if index >= start:
                            doc = self._parse(raw, location=f"{file}:{lineno}")
                            if doc is not None:
                                yield index, doc
                        index += 1
                except (EOFError, gzip.BadGzipFile, zlib.error) as err:
                    self._bad_record(f"{file}:{lineno + 1}: {err}; expected a complete gzip file of JSON "
                                     "lines (truncated download?)", reason="bad_gzip")  # fmt: skip

    def shards(self) -> list[Shard]:
        """One shard per file, sized in bytes."""
        return [Shard(path, size) for path, size in zip(self.files, _sizes(self.files))]

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
                            self._parse(raw, location=f"{file} (record {current}, byte {start})"),
                        )
            except (EOFError, gzip.BadGzipFile, zlib.error) as err:
                self._bad_record(f"{file} (after byte {position}): {err}; expected a complete gzip file of JSON "
                                 "lines (truncated download?)", reason="bad_gzip")  # fmt: skip

    def _parse(self, raw: bytes, *, location: str) -> dict | None:
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return self._bad_record(
                f"{location}: {err}; expected one JSON object per line", reason="bad_json"
            )
        if not isinstance(record, dict):
            got = type(record).__name__
            return self._bad_record(
                f"{location}: a JSON {got}; expected one JSON object per line", reason="bad_json"
            )
        return self._record_doc(record, location=location)


class HFDataset(DocumentSource):
    """Documents from ``datasets.load_dataset``: a builder (csv, parquet, json, text) over local files, or a Hub id."""

    def __init__(
        self,
        *,
        name: str,
        data_files: list[str] | None = None,
        config_name: str | None = None,
        split: str = "train",
        streaming: bool = True,
        text_column: str = "content",
        on_error: str = "error",
    ) -> None:
        """Nothing is loaded until the first iteration; local builder files are expanded now."""
        super().__init__(on_error=on_error, text_column=text_column)
        self.name = name
        is_local_builder = name in (*_HF_BUILDERS.values(), "json")
        self.data_files = _expand(data_files) if data_files and is_local_builder else data_files
        self.config_name = config_name
        self.split = split
        self.streaming = streaming
        self._dataset: Any = None

    def fingerprint(self) -> str:
        """Hash of builder or id, data files, split and config name (plus file stats for local files)."""
        files = self.data_files or []
        local = [f for f in files if os.path.isfile(f)]
        return _short_hash([self.name, self.config_name, self.split, files, _file_stats(local)])

    def _load(self) -> Any:
        import datasets  # heavy import, only needed when this source is read

        # sample_by="document": one document per text file, like SourceTree, not one per line.
        extra = {"sample_by": "document"} if self.name == "text" else {}
        try:
            ds = datasets.load_dataset(
                self.name,
                self.config_name,
                data_files=self.data_files,
                split=self.split,
                streaming=self.streaming,
                **extra,
            )
        except (OSError, ValueError) as err:
            raise SourceError(f"cannot load dataset {self.name!r} (split {self.split!r}): {err}") from err
        columns = ds.column_names  # None for streams whose features are only known once read
        if columns is not None and self.text_column not in columns:
            raise SourceError(
                f"dataset {self.name!r} has no column {self.text_column!r}; expected one of {sorted(columns)}"
            )
        return ds

    def _rows(self) -> Any:
        if self._dataset is None:
            self._dataset = self._load()
        return self._dataset

    def shards(self) -> list[Shard]:
        """A stream's own shards (its files: local ones named and sized); a loaded dataset's ranges of
        ``ROWS_PER_SHARD`` rows."""
        ds = self._rows()
        if not self.streaming:
            starts = range(0, len(ds), ROWS_PER_SHARD)
            return [Shard(f"rows {a}-{min(a + ROWS_PER_SHARD, len(ds))}", min(ROWS_PER_SHARD, len(ds) - a))
                    for a in starts]  # fmt: skip
        n, files = ds.num_shards, self.data_files or []
        if len(files) == n and all(os.path.isfile(f) for f in files):
            return [Shard(f, size) for f, size in zip(files, _sizes(files))]
        return [Shard(f"{self.name}[{self.split}] shard {i} of {n}") for i in range(n)]

    def iter_shard(
        self, index: int, *, row: int = 0, byte: int = 0, part: int = 0, parts: int = 1
    ) -> Iterator[tuple[int, int, dict | None]]:
        """Rows of one shard from ``row``: a stream skips rows of that shard only (cost bounded by the shard,
        never by the run's progress); a loaded dataset indexes them."""
        ds = self._rows()
        if self.streaming:
            shard = ds.shard(num_shards=ds.num_shards, index=index, contiguous=True)
            rows = enumerate(shard.skip(row) if row else shard, start=row)
        else:
            first = index * ROWS_PER_SHARD
            rows = ((r, ds[first + r]) for r in range(row, min(ROWS_PER_SHARD, len(ds) - first)))
        for r, record in rows:
            if r % parts == part:
                yield (
                    r,
                    0,
                    self._record_doc(record, location=f"{self.name}[{self.split}] shard {index} row {r}"),
                )

    def iter_raw(self, start: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield the dataset's rows in order, beginning at row ``start``."""
        if self._dataset is None:
            self._dataset = self._load()
        ds = self._dataset
        if self.streaming:
            rows = ds.skip(start) if start else ds
        else:
            rows = (ds[i] for i in range(start, len(ds)))
        for index, record in enumerate(rows, start=start):
            doc = self._record_doc(record, location=f"{self.name}[{self.split}]:{index}")
            if doc is not None:
                yield index, doc


def _kind_of(part: str) -> str:
    if os.path.isdir(part):
        return "tree"
    suffix = os.path.splitext(part.removesuffix(".gz"))[1].lower()
    if suffix in _JSONL_SUFFIXES:  # also gzip-compressed: .jsonl.gz, .json.gz
        return "jsonl"
    if suffix in _HF_BUILDERS:
        return _HF_BUILDERS[suffix]
    if not os.path.exists(part) and _HUB_ID.fullmatch(part):
        return "hub"
    matches = sorted(glob.glob(part, recursive=True)) if any(c in part for c in "*?[") else []
    if matches and not os.path.isdir(matches[0]):
        return _kind_of(matches[0])  # a glob like data/*.gz: the kind of the files it matches
    raise SourceError(
        f"source {part!r} is not understood; expected 'python-install', a directory, a .jsonl/.json (also "
        ".gz)/.csv/.parquet/.txt path or glob, or a Hub id ('owner/name')"
    )


def open_source(
    spec: str,
    *,
    text_column: str = "content",
    split: str = "train",
    streaming: bool = True,
    pattern: str = "*.py",
    config_name: str | None = None,
    on_error: str = "error",
    progress: bool = True,
) -> DocumentSource:
    """Build the source that ``spec`` names: 'python-install', 'python-docstrings', 'docstrings:<dir>[,<dir>]',
    'python-function-pairs', 'function-pairs:<dir>[,<dir>]' (split = train/validation/test), directories,
    file paths/globs or a Hub id."""
    _check_policy(on_error)
    if spec == "python-install":
        return SourceTree(roots=python_install_roots(), pattern=pattern, on_error=on_error, progress=progress)
    if spec == "python-docstrings" or spec.startswith("docstrings:"):
        from lmrecipes.data.docstrings import DocstringSource  # it builds on this module

        roots = python_install_roots() if spec == "python-docstrings" else spec.split(":", 1)[1].split(",")
        return DocstringSource(roots=roots, on_error=on_error, progress=progress)
    if spec == "python-function-pairs" or spec.startswith("function-pairs:"):
        from lmrecipes.data.pairs import FunctionPairSource  # it builds on this module

        roots = (
            python_install_roots() if spec == "python-function-pairs" else spec.split(":", 1)[1].split(",")
        )
        return FunctionPairSource(roots=roots, split=split, on_error=on_error, progress=progress)
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    kinds = {_kind_of(part) for part in parts}
    if len(kinds) != 1:
        raise SourceError(
            f"source {spec!r} mixes kinds {sorted(kinds)}; expected comma-separated parts of one kind"
        )
    kind = kinds.pop()
    if kind == "tree":
        return SourceTree(roots=parts, pattern=pattern, on_error=on_error, progress=progress)
    if kind == "jsonl":
        return JsonlFiles(paths=parts, text_column=text_column, on_error=on_error)
    if kind == "hub":
        if len(parts) != 1:
            raise SourceError(f"source {spec!r} names several Hub ids; expected one")
        name, data_files = parts[0], None
    else:
        name, data_files = kind, parts
    # The text builder always names its column "text", whatever the caller's default.
    column = "text" if kind == "text" else text_column
    return HFDataset(
        name=name,
        data_files=data_files,
        config_name=config_name,
        split=split,
        streaming=streaming,
        text_column=column,
        on_error=on_error,
    )
