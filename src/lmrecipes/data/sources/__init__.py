"""Documents from anywhere: source trees, JSONL, Parquet/CSV/text files, Hugging Face datasets, Python text.

``open_source`` names a source with one string and looks its kind up in ``KINDS``.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from lmrecipes.data.sources.base import (
    ON_ERROR_POLICIES,
    DocumentSource,
    SourceError,
    check_on_error,
    python_install_roots,
    sanitize_text,
)
from lmrecipes.data.sources.files import JsonlFiles, SourceTree, path_order_key
from lmrecipes.data.sources.hub import LOCAL_BUILDERS, ROWS_PER_SHARD, HFDataset

__all__ = [
    "KINDS",
    "ON_ERROR_POLICIES",
    "ROWS_PER_SHARD",
    "DocumentSource",
    "HFDataset",
    "JsonlFiles",
    "SourceError",
    "SourceTree",
    "open_source",
    "path_order_key",
    "python_install_roots",
    "sanitize_text",
]

_JSONL_SUFFIXES = (".jsonl", ".json")
# Hub ids are "name" or "owner/name"; leading alnum keeps "./x" and "../x" from looking like one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _kind_of(part: str) -> str:
    if os.path.isdir(part):
        return "tree"
    suffix = os.path.splitext(part.removesuffix(".gz"))[1].lower()
    if suffix in _JSONL_SUFFIXES:  # also gzip-compressed: .jsonl.gz, .json.gz
        return "jsonl"
    if suffix in LOCAL_BUILDERS:
        return LOCAL_BUILDERS[suffix]
    if not os.path.exists(part) and _HUB_ID.fullmatch(part):
        return "hub"
    matches = sorted(glob.glob(part, recursive=True)) if any(c in part for c in "*?[") else []
    if matches and not os.path.isdir(matches[0]):
        return _kind_of(matches[0])  # a glob like data/*.gz: the kind of the files it matches
    raise SourceError(
        f"source {part!r} is not understood; expected 'python-install', a directory, a .jsonl/.json (also "
        ".gz)/.csv/.parquet/.txt path or glob, or a Hub id ('owner/name')"
    )


@dataclass(frozen=True)
class Request:
    """What ``open_source`` was asked for, as every kind's builder receives it."""

    parts: list[str]
    text_column: str
    split: str
    streaming: bool
    pattern: str
    config_name: str | None
    on_error: str
    progress: bool


def _roots(request: Request) -> list:
    return request.parts or python_install_roots()  # the named kinds without folders read this interpreter's


def _tree(r: Request) -> DocumentSource:
    return SourceTree(roots=_roots(r), pattern=r.pattern, on_error=r.on_error, progress=r.progress)


def _docstrings(r: Request) -> DocumentSource:
    from lmrecipes.data.docstrings import DocstringSource  # it builds on this package

    return DocstringSource(roots=_roots(r), on_error=r.on_error, progress=r.progress)


def _function_pairs(r: Request) -> DocumentSource:
    from lmrecipes.data.pairs import FunctionPairSource  # it builds on this package

    return FunctionPairSource(roots=_roots(r), split=r.split, on_error=r.on_error, progress=r.progress)


def _jsonl(r: Request) -> DocumentSource:
    return JsonlFiles(paths=r.parts, text_column=r.text_column, on_error=r.on_error)


def _hub(r: Request) -> DocumentSource:
    if len(r.parts) != 1:
        raise SourceError(f"source {','.join(r.parts)!r} names several Hub ids; expected one")
    return _dataset(r, name=r.parts[0], data_files=None)


def _dataset(r: Request, *, name: str, data_files: list[str] | None) -> DocumentSource:
    # The text builder always names its column "text", whatever the caller's default.
    column = "text" if name == "text" else r.text_column
    return HFDataset(name=name, data_files=data_files, config_name=r.config_name, split=r.split,
                     streaming=r.streaming, text_column=column, on_error=r.on_error)  # fmt: skip


# kind -> builder; 'python-install', 'python-docstrings' and 'python-function-pairs' name a kind on their own,
# 'docstrings:<dir>[,<dir>]' and 'function-pairs:<dir>[,<dir>]' a kind and its folders
KINDS: dict[str, Callable[[Request], DocumentSource]] = {
    "tree": _tree,
    "docstrings": _docstrings,
    "function-pairs": _function_pairs,
    "jsonl": _jsonl,
    "hub": _hub,
    **{
        b: functools.partial(lambda r, b: _dataset(r, name=b, data_files=r.parts), b=b)
        for b in LOCAL_BUILDERS.values()
    },
}
_NAMED = {
    "python-install": "tree",
    "python-docstrings": "docstrings",
    "python-function-pairs": "function-pairs",
}


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
    check_on_error(on_error)
    prefix = spec.split(":", 1)[0]
    if spec in _NAMED:
        kind, parts = _NAMED[spec], []
    elif prefix in ("docstrings", "function-pairs") and ":" in spec:
        kind, parts = prefix, spec.split(":", 1)[1].split(",")
    else:
        parts = [part.strip() for part in spec.split(",") if part.strip()]
        kinds = {_kind_of(part) for part in parts}
        if len(kinds) != 1:
            raise SourceError(
                f"source {spec!r} mixes kinds {sorted(kinds)}; expected comma-separated parts of one kind"
            )
        kind = kinds.pop()
    request = Request(parts, text_column, split, streaming, pattern, config_name, on_error, progress)
    return KINDS[kind](request)
