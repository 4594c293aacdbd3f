"""Stable hashes and hash-based splits: the same answer on every rank, machine and run."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(obj: Any, *, digest_size: int = 8) -> str:
    """Short hex hash of a JSON-able value (keys sorted, so dict order does not matter)."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=digest_size).hexdigest()


def hash64(data: str | bytes) -> int:
    """An unsigned 64-bit hash of text or bytes (lone surrogates hash too instead of raising)."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def path_is_heldout(key: str, fraction: float) -> bool:
    """True for about ``fraction`` of keys (a root-relative path or any stable name), decided by their hash."""
    if fraction <= 0:
        return False
    return hash64(key) % 1_000_000 < fraction * 1_000_000


def is_heldout(doc: dict, fraction: float) -> bool:
    """Stable train/validation split by the document's ``split_key`` (a tree file's root-relative path) or, for
    sources without one, its ``path``: the same on every rank and wherever the files live."""
    return path_is_heldout(str(doc.get("split_key", doc["path"])), fraction)
