"""Checkpoints that survive crashes: atomic writes, corruption checks, the ``--ckpt_path last`` fallback.

Lightning's own "atomic" save buffers the whole checkpoint in memory, writes it to a file in the *system* temp
folder and moves it into place; when that folder is on another filesystem (local /tmp, checkpoints on NFS or
Lustre, the usual cluster layout) the move is a copy, and a kill during the copy leaves a truncated ``last.ckpt``.
``AtomicCheckpointIO`` writes next to the target, fsyncs, and renames, so the previous file survives any crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lmrecipes.checkpoints_sharded import restore_interrupted

REQUIRED_KEYS = ("state_dict", "global_step", "loops")
TMP_SUFFIX = ".tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a hidden temporary file in the target folder, fsync, then ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        target = Path(path)
        if "://" in str(path):  # remote filesystems: Lightning's fsspec transaction is the right tool there
            return super().save_checkpoint(checkpoint, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power loss right after could otherwise undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


ZIP_MAGIC = b"PK\x03\x04"  # every torch.save file since torch 1.6 is a zip archive that starts with it


def inspect_checkpoint(path: str | Path, *, training: bool = True) -> tuple[str | None, bool]:
    """(why ``path`` cannot be used, or None; whether it is damaged for good, as opposed to unreadable right now
    or merely of another kind). ``training``: a fit resumes from it, so it needs the optimizer states too.

    Only what the zip container proves damaged (a broken structure, a failed CRC: ``torch.load`` reads a
    bit-flipped tensor without complaint) counts as damaged; any other load error is reported, not condemned.
    """
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint (FSDP2): its completion marker and files decide
        from lmrecipes.checkpoints_sharded import inspect_sharded

        return inspect_sharded(path, training=training)
    try:
        damage, is_zip = _zip_damage(path)
        if damage is not None:
            return damage, True
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except FileNotFoundError:
        return "file not found", False
    except pickle.UnpicklingError as err:
        return f"not loadable with weights_only=True ({str(err).splitlines()[0][:160]})", False
    except (RuntimeError, EOFError, ValueError) as err:  # e.g. another torch's format: not proof of damage
        return f"not loadable ({type(err).__name__}: {str(err).splitlines()[0][:160]})", False
    except OSError as err:  # permissions, a flaky network filesystem: not a reason to set the file aside
        return f"unreadable ({err})", False
    required = (*REQUIRED_KEYS, "optimizer_states") if training else REQUIRED_KEYS
    missing = [k for k in required if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        return (
            f"not a Lightning {'training ' if training else ''}checkpoint (missing {', '.join(missing)})",
            False,
        )
    return None, False


def _zip_damage(path: Path) -> tuple[str | None, bool]:
    """(what the zip structure or CRCs prove damaged, or None; whether the file is a zip archive at all).
    An empty file is damaged too (a write that never got under way); a file of another format is not."""
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:
        return "truncated or corrupt (empty file)", False
    if head != ZIP_MAGIC:
        return None, False  # the legacy torch.save format, or not a checkpoint: torch.load decides
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as err:  # starts as a zip, but its directory is cut off or garbled
        return f"truncated or corrupt ({type(err).__name__}: {str(err).splitlines()[0][:160]})", True
    if bad is not None:
        return f"CRC check failed for {bad} (corrupt data)", True
    return None, True


VERDICT_WAIT_S = (
    900.0  # the longest a rank waits for its node's check of one file (an 18 GB CRC takes minutes)
)


def local_rank() -> int:
    """This process's rank on its node, from the launchers Lightning supports (its own, torchrun, SLURM)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def verdicts_folder() -> Path:
    """Where a node keeps its checks: the node's own temporary folder (shared by its ranks, not by other nodes)."""
    return Path(tempfile.gettempdir()) / "lmrecipes-checks"


def verdict_file(path: Path, *, training: bool) -> Path:
    """Where local rank 0 leaves its check of ``path``, keyed by the file's path, size and modification time: a
    file that changed (a new save) gets a new check, an unchanged one keeps its verdict."""
    stat = path.stat()
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    kind = "train" if training else "eval"
    return verdicts_folder() / f"{key}-{stat.st_size}-{stat.st_mtime_ns}-{kind}.json"


def inspect_once_per_node(
    path: str | Path, *, training: bool = True, wait_s: float = VERDICT_WAIT_S
) -> tuple[str | None, bool]:
    """:func:`inspect_checkpoint`, read once per node: local rank 0 reads the file (the whole of it, for the zip
    CRCs) and leaves its verdict in the node's temporary folder; the node's other ranks wait for that verdict instead of each reading
    the file again (16 ranks resuming from an 18 GB checkpoint would read 288 GB). Every process resolves
    ``--ckpt_path`` before the process group exists, so the verdict travels through the node's temporary folder; a
    rank that sees no verdict within ``wait_s`` checks for itself."""
    path = Path(path)
    if path.is_dir():  # a sharded folder: its check reads only the marker, sizes and meta.pt
        return inspect_checkpoint(path, training=training)
    try:
        verdict = verdict_file(path, training=training)
    except FileNotFoundError:
        return "file not found", False
    if local_rank() != 0:
        found = _wait_for_verdict(verdict, wait_s)
        if found is not None:
            return found
    problem, damaged = inspect_checkpoint(path, training=training)
    _write_verdict(verdict, problem, damaged)
    return problem, damaged


def _write_verdict(verdict: Path, problem: str | None, damaged: bool) -> None:
    """Replace the file's earlier verdicts (older saves under the same path) with this one, written whole."""
    key = verdict.name.split("-", 1)[0]
    tmp = verdict.with_name(f".{verdict.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        verdict.parent.mkdir(parents=True, exist_ok=True)
        for old in verdict.parent.glob(f"{key}-*.json"):
            if old != verdict:
                old.unlink(missing_ok=True)
        tmp.write_text(json.dumps({"problem": problem, "damaged": damaged}))
        os.replace(tmp, verdict)  # whole or absent: a waiting rank never reads half a verdict
    except OSError:  # no writable temporary folder: the node's other ranks check for themselves
        tmp.unlink(missing_ok=True)


def _wait_for_verdict(verdict: Path, wait_s: float) -> tuple[str | None, bool] | None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            found = json.loads(verdict.read_text())
            return found["problem"], found["damaged"]
        except (FileNotFoundError, ValueError, KeyError):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)


def checkpoint_problem(path: str | Path, *, training: bool = True) -> str | None:
    """Why ``path`` is not a usable checkpoint (truncated, corrupt, not a Lightning checkpoint), or None if it is."""
    return inspect_checkpoint(path, training=training)[0]


def candidates(folder: str | Path) -> list[Path]:
    """Checkpoints in ``folder``, newest first (unfinished temporary files are never candidates)."""
    stamped = []
    for path in Path(folder).glob("*.ckpt"):
        try:  # another rank may be renaming a corrupt one right now
            stamped.append((path.stat().st_mtime_ns, path))
        except FileNotFoundError:
            continue
    return [path for _, path in sorted(stamped, reverse=True)]


def newest_valid(
    folder: str | Path, *, quarantine: bool = False, training: bool = True
) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``folder`` that passes ``checkpoint_problem``, and what was wrong with newer ones.

    ``quarantine`` renames each damaged one to ``<name>.corrupt``: kept for inspection, but no longer in the way
    of the next ``last.ckpt`` (ModelCheckpoint would otherwise write ``last-v1.ckpt`` beside it).
    """
    skipped = []
    for path in candidates(folder):
        problem, damaged = inspect_once_per_node(path, training=training)
        if problem is None:
            return path, skipped
        if quarantine and damaged:
            try:
                path.replace(path.with_name(path.name + ".corrupt"))
                problem += f" (renamed to {path.name}.corrupt)"
            except OSError:  # gone already, or a folder whose .corrupt name is taken: skipping it is enough
                pass
        skipped.append(f"{path}: {problem}")
    return None, skipped


def resolve_ckpt_path(
    ckpt_path: str | None, folder: str | None, *, quarantine: bool = False, training: bool = True
) -> str | None:
    """The checkpoint a run should resume from, checked before training starts.

    ``last``: the newest valid checkpoint in the ModelCheckpoint folder (unusable ones are named, skipped and, with
    ``quarantine``, damaged ones renamed), or None (start from scratch) when there is none yet. An explicit path
    must be valid: a corrupt one is an error that names the newest valid alternative. Remote folders and paths
    are left to Lightning's own lookup.
    """
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry") or "://" in str(ckpt_path):
        return ckpt_path
    if ckpt_path == "last":
        if folder is not None and "://" in str(folder):
            return ckpt_path
        if folder is None or not Path(folder).is_dir():
            return None
        for line in restore_interrupted(folder):
            rank_zero_warn(line)
        path, skipped = newest_valid(folder, quarantine=quarantine, training=training)
        if skipped:
            rank_zero_warn(
                "skipped unusable checkpoints:\n  " + "\n  ".join(skipped)
                + (f"\nresuming from {path}" if path else "\nno valid checkpoint left: starting from scratch")
            )  # fmt: skip
        return None if path is None else str(path)
    problem, _ = inspect_once_per_node(ckpt_path, training=training)
    if problem is not None:
        alternative, _ = newest_valid(Path(ckpt_path).parent, training=training)
        hint = f"; the newest valid checkpoint there is {alternative}" if alternative else ""
        raise ValueError(f"--ckpt_path {ckpt_path} cannot be used: {problem}{hint}")
    return ckpt_path


def remove_partial_saves(folder: str | Path) -> list[Path]:
    """Delete temporary files left by saves that were killed mid-write (each can be as large as a checkpoint)."""
    removed = []
    for tmp in Path(folder).glob(f".*.ckpt.*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
