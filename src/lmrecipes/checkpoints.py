"""Checkpoints that survive crashes: atomic writes, corruption checks, the ``--ckpt_path last`` fallback.

Lightning's own "atomic" save buffers the whole checkpoint in memory, writes it to a file in the *system* temp
folder and moves it into place; when that folder is on another filesystem (local /tmp, checkpoints on NFS or
Lustre, the usual cluster layout) the move is a copy, and a kill during the copy leaves a truncated ``last.ckpt``.
``AtomicCheckpointIO`` writes next to the target, fsyncs, and renames, so the previous file survives any crash.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

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
        problem, damaged = inspect_checkpoint(path, training=training)
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
        path, skipped = newest_valid(folder, quarantine=quarantine, training=training)
        if skipped:
            rank_zero_warn(
                "skipped unusable checkpoints:\n  " + "\n  ".join(skipped)
                + (f"\nresuming from {path}" if path else "\nno valid checkpoint left: starting from scratch")
            )  # fmt: skip
        return None if path is None else str(path)
    problem = checkpoint_problem(ckpt_path, training=training)
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
