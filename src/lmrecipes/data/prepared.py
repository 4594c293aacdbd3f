"""Training from a prepared folder (``lmrecipes prepare``): checked shards, windows, and their exact order.

A folder is read from a local or shared filesystem, or from a Hub dataset repository uploaded with

    huggingface-cli upload --repo-type dataset OWNER/NAME prepared/ .

(``huggingface_hub.upload_folder(repo_type="dataset")``), whose files are then downloaded one shard at a time, on
first use, into the Hub cache.
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lmrecipes.data.prepare import FORMAT, MANIFEST
from lmrecipes.data.pretokenize import window_starts

OPEN_SHARDS = 64  # shards memory-mapped at once per process (one file descriptor each) ...
FD_SHARE = 4  # ... and at most this fraction (1/4) of the process's file-descriptor limit


def open_shards_limit() -> int:
    """How many shards one process keeps memory-mapped: ``OPEN_SHARDS``, fewer under a low ``ulimit -n``."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return OPEN_SHARDS
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return OPEN_SHARDS if soft == resource.RLIM_INFINITY else max(1, min(OPEN_SHARDS, soft // FD_SHARE))


class PreparedData:
    """A finished prepared folder: its manifest, checked against the files, and memory-mapped shards."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self._local = Path(location).exists() or not _looks_like_hub_id(self.location)
        self.manifest = self._load_manifest()
        self._tokens: OrderedDict[int, np.ndarray] = OrderedDict()
        self._open_limit = open_shards_limit()

    def _path(self, name: str) -> Path:
        """A file of the folder; from the Hub, downloaded on first use (one file, not the whole repository)."""
        if self._local:
            return Path(self.location) / name
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.location, name, repo_type="dataset"))

    def _load_manifest(self) -> dict:
        if not self._local:
            from lmrecipes.hub import require_hub

            require_hub({"data.init_args.packing.prepared": self.location})
        path = self._path(MANIFEST)
        if not path.exists():
            raise ValueError(
                f"prepared folder {self.location} has no {MANIFEST}: its build did not finish (rerun lmrecipes "
                "prepare with the same --output to complete it)"
            )
        try:
            manifest = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"{path} is truncated or not JSON; rebuild it with lmrecipes prepare") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a prepared dataset's manifest (expected format {FORMAT!r})")
        return manifest

    def check_matches(self, *, tokenizer: str, mode: str) -> None:
        """Refuse data built with another tokenizer or packing mode than the run's, naming both."""
        m = self.manifest
        if m["tokenizer"] != tokenizer:
            raise ValueError(
                f"prepared dataset {self.location} was built with tokenizer fingerprint {m['tokenizer']}; this "
                f"run's tokenizer has fingerprint {tokenizer}: prepare it again with the run's tokenizer"
            )
        if m["mode"] != mode:
            raise ValueError(
                f"prepared dataset {self.location} was packed with mode {m['mode']!r}; this run has "
                f"data.packing.mode={mode!r}"
            )

    def tokens(self, index: int) -> np.ndarray:
        """Shard ``index``'s tokens, memory-mapped, after checking the file has the manifest's size. At most
        :func:`open_shards_limit` stay mapped (least recently used first out): each map holds a file descriptor, and a
        folder of thousands of shards would otherwise exceed the process's limit."""
        if index in self._tokens:
            self._tokens.move_to_end(index)
            return self._tokens[index]
        path = self._checked(index)
        if len(self._tokens) >= self._open_limit:
            self._tokens.popitem(last=False)
        self._tokens[index] = np.memmap(path, dtype=self.manifest["dtype"], mode="r")
        return self._tokens[index]

    def _checked(self, index: int) -> Path:
        """Shard ``index``'s file, after checking it has the manifest's size (``stat`` only, nothing opened)."""
        entry = self.manifest["shards"][index]
        path = self._path(entry["file"])
        size = path.stat().st_size if path.exists() else None
        if size != entry["bytes"]:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise ValueError(
                f"shard {path} {found}; the manifest of {self.location} says {entry['bytes']:,} bytes (a copy "
                "was cut short or the folder was changed): copy it again or rebuild it with lmrecipes prepare"
            )
        return path

    def lengths(self, index: int) -> np.ndarray:
        entry = self.manifest["shards"][index]
        path = self._path(entry["lengths_file"])
        if not path.exists() or path.stat().st_size != entry["lengths_bytes"]:
            raise ValueError(f"index file {path} is missing or truncated (manifest of {self.location})")
        return np.load(path)

    def check_files(self) -> None:
        """Every shard present with its manifest size (run before training, so a gap is named at once); from the
        Hub, each shard is checked when it is first downloaded instead."""
        if self._local:
            for i in range(len(self)):
                self._checked(i)

    def __len__(self) -> int:
        return len(self.manifest["shards"])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.tokens(index)  # WindowStream's view: shard index -> tokens, opened on first use

    def __getstate__(self) -> dict:
        # DataLoader workers reopen the shards they read: a pickled memmap would copy the whole file
        return {**self.__dict__, "_tokens": OrderedDict()}

    def windows(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``(shard of each window, start in that shard)``; windows never cross shards."""
        files, starts = [], []
        for i in range(len(self)):
            mine = window_starts(self.lengths(i), seq_len=seq_len, mode=self.manifest["mode"])
            files.append(np.full(len(mine), i, dtype=np.int32))
            starts.append(mine)
        return np.concatenate(files), np.concatenate(starts)


def _looks_like_hub_id(location: str) -> bool:
    parts = location.split("/")
    return len(parts) == 2 and all(parts) and not location.startswith((".", "~"))


class WindowStream(IterableDataset):
    """Endless batches of pre-tokenized windows (memory-mapped), reshuffled each epoch, exactly once per epoch.

    Sample ``g`` of the run is window ``permutation(seed, epoch=g // N)[g % N]``; rank ``r``'s batch ``s`` holds
    samples ``(s * world + r) * batch_size`` onwards, so across all ranks every window is used once per epoch
    (a global batch may straddle two epochs) and the position is one number, the batches this rank consumed:
    resuming at any step costs one permutation, not a replay. DataLoader worker ``w`` of ``W`` builds this rank's
    batches ``consumed + w``, ``consumed + w + W``, ..., the order in which the DataLoader hands them out.
    ``tokens`` is one token array, or one per shard (a list or a ``PreparedData``, which opens shards on first use);
    ``files`` then names each window's shard.
    """

    def __init__(
        self,
        tokens: np.ndarray | list[np.ndarray] | PreparedData,
        starts: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        files: np.ndarray | None = None,
        resume: dict | None = None,
    ):
        if len(starts) < batch_size * world_size:
            raise ValueError(
                f"{len(starts)} pre-tokenized windows cannot fill a batch of {batch_size} on each of {world_size} "
                "ranks; lower batch_size or seq_len, or add data"
            )
        self.tokens = [tokens] if isinstance(tokens, np.ndarray) else tokens
        self.starts = starts
        self.files = files if files is not None else np.zeros(len(starts), dtype=np.int32)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.resume = resume or {"consumed": 0, "cursors": {}}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        n, orders = len(self.starts), {}
        base = self.resume.get("base", 0)  # samples done at earlier world sizes (data/position.py)
        for s in itertools.count(self.resume["consumed"] + worker, workers):
            first = base + (s * self.world_size + self.rank) * self.batch_size
            epochs = range(first // n, (first + self.batch_size - 1) // n + 1)  # one, or two at a boundary
            orders = {e: orders[e] if e in orders else self._order(e) for e in epochs}
            picks = [orders[g // n][g % n] for g in range(first, first + self.batch_size)]
            rows = [self.tokens[self.files[p]][self.starts[p] : self.starts[p] + self.seq_len] for p in picks]
            batch = np.stack(rows).astype(np.int64)  # (B, T)
            position = torch.tensor([0, int(first // n), s + 1, 0])  # (logical, epoch, consumed, unused)
            yield {"input_ids": torch.from_numpy(batch), "position": position}
