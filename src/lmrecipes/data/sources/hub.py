"""Documents read through ``datasets.load_dataset``: local Parquet/CSV/text/JSON files or a Hub dataset."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from lmrecipes.data.shards import Shard
from lmrecipes.data.sources.base import (
    DocumentSource,
    SourceError,
    expand,
    file_sizes,
    file_stats,
    short_hash,
)

LOCAL_BUILDERS = {".csv": "csv", ".parquet": "parquet", ".txt": "text"}  # suffix -> datasets builder
ROWS_PER_SHARD = 10_000  # shard size of a loaded (map-style) dataset
STREAM_BATCH = 256  # rows a stream reads at a time


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
        is_local_builder = name in (*LOCAL_BUILDERS.values(), "json")
        self.data_files = expand(data_files) if data_files and is_local_builder else data_files
        self.config_name = config_name
        self.split = split
        self.streaming = streaming
        self._dataset: Any = None

    def fingerprint(self) -> str:
        """Hash of builder or id, data files, split and config name (plus file stats for local files)."""
        files = self.data_files or []
        local = [f for f in files if os.path.isfile(f)]
        return short_hash([self.name, self.config_name, self.split, files, file_stats(local)])

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
            return [Shard(f, size) for f, size in zip(files, file_sizes(files))]
        return [Shard(f"{self.name}[{self.split}] shard {i} of {n}") for i in range(n)]

    def iter_shard(
        self, index: int, *, row: int = 0, byte: int = 0, part: int = 0, parts: int = 1
    ) -> Iterator[tuple[int, int, dict | None]]:
        """Rows of one shard from ``row``: a stream skips rows of that shard only (cost bounded by the shard,
        never by the run's progress); a loaded dataset indexes them."""
        for r, record in self._shard_records(index, row):
            if r % parts == part:
                yield r, 0, self._record_doc(record, location=self._location(index, r))

    def iter_raw(self, start: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield the dataset's rows in order (shard after shard, as :meth:`iter_shard` names them), beginning at
        row ``start``."""
        ds, index = self._rows(), 0
        shards = ds.num_shards if self.streaming else -(-len(ds) // ROWS_PER_SHARD)
        for shard in range(shards):
            skip = 0
            if not self.streaming:  # a loaded shard's size is known: jump over its rows before ``start``
                skip = min(ROWS_PER_SHARD, len(ds) - shard * ROWS_PER_SHARD, max(0, start - index))
                index += skip
            for r, record in self._shard_records(shard, skip):
                if index >= start:
                    doc = self._record_doc(record, location=self._location(shard, r))
                    if doc is not None:
                        yield index, doc
                index += 1

    def _location(self, shard: int, row: int) -> str:
        # The one name of a row without a ``path`` (held-out splits hash it): the same from both readers.
        return f"{self.name}[{self.split}] shard {shard} row {row}"

    def _shard_records(self, index: int, row: int) -> Iterator[tuple[int, dict]]:
        """``(row, record)`` of shard ``index`` from ``row`` on."""
        ds = self._rows()
        if not self.streaming:
            first = index * ROWS_PER_SHARD
            yield from ((r, ds[first + r]) for r in range(row, min(ROWS_PER_SHARD, len(ds) - first)))
            return
        shard = ds.shard(num_shards=ds.num_shards, index=index, contiguous=True)
        # .iter(batch_size=...), not iter(shard): inside a DataLoader worker ``datasets`` would split the shard
        # again by worker id, and every worker but the first would read nothing of it.
        r = row
        for batch in (shard.skip(row) if row else shard).iter(batch_size=STREAM_BATCH):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                yield r, dict(zip(columns, values))
                r += 1
