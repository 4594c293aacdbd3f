"""Sharded checkpoints (``--trainer.strategy fsdp2``) that keep the single-file ones' promises.

A sharded checkpoint is a folder: ``.metadata`` (the DCP index), one ``__<rank>_0.distcp`` per rank (weights and
optimizer states), ``meta.pt`` (everything else: loops, callbacks' and the DataModule's states, every rank's RNG
states and data positions, loadable with ``weights_only=True``). Lightning writes it in place, so a kill mid-save
leaves a folder that looks whole. Here every rank writes into a hidden temporary folder beside the target; once all
ranks are done (a barrier), rank 0 fsyncs, writes the completion marker ``COMPLETE.json`` last (the files and sizes
the save wrote) and moves the folder into place. A folder without the marker, or whose files differ from it, is
incomplete or damaged: ``--ckpt_path last`` skips it (``checkpoints.newest_valid``) and names it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch

MARKER = "COMPLETE.json"
META = (
    "meta.pt"  # Lightning's name for the non-tensor part (lightning.fabric.utilities.load._METADATA_FILENAME)
)
TMP_PREFIX, OLD_SUFFIX = ".", ".sharded-old"
RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")


def save_atomically(strategy, checkpoint: dict, path: Path, storage_options) -> None:
    """Write ``checkpoint`` as a sharded folder at ``path`` (same on every rank): temporary folder, every rank's
    files, barrier, marker, rename. The previous checkpoint at ``path`` stays whole until the rename."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.sharded-tmp")
    step, keys = checkpoint.get("global_step"), ["state_dict"]
    keys += [f"optimizer_{i}" for i in range(len(checkpoint.get("optimizer_states", [])))]
    if strategy.global_rank == 0:
        remove(tmp)  # left by a save that was killed
    strategy.barrier("lmrecipes-sharded-save-begin")
    strategy.write_shards(checkpoint, tmp, storage_options)
    strategy.barrier("lmrecipes-sharded-save-written")  # every rank's shard is on disk
    error = None
    if strategy.global_rank == 0:
        try:
            write_marker(tmp, world_size=strategy.world_size, step=step, keys=keys)
            replace(tmp, path)
        except Exception as err:  # any failure: the other ranks must learn of it, not wait for a timeout
            error = f"{type(err).__name__}: {err}"
    # the outcome instead of a bare barrier: every rank raises the same error, or all go on
    error = strategy.broadcast(error, src=0)
    if error is not None:
        raise RuntimeError(f"sharded save to {path} failed on rank 0: {error}")


def write_marker(folder: Path, *, world_size: int, step, keys: list[str]) -> None:
    """fsync every file of ``folder``, then write the marker listing them (itself written atomically)."""
    files = {}
    for file in sorted(folder.iterdir()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        files[file.name] = file.stat().st_size
    missing = [f"__{r}_0.distcp" for r in range(world_size) if f"__{r}_0.distcp" not in files]
    if missing or META not in files:  # a save that reported success must have written them all
        raise RuntimeError(f"sharded save into {folder} did not write {missing or META}")
    marker = {"world_size": world_size, "global_step": step, "keys": keys, "files": files}
    tmp = folder / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)
    _fsync_dir(folder)


def replace(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing what is there (a file or a folder)."""
    old = path.with_name(f"{TMP_PREFIX}{path.name}{OLD_SUFFIX}")
    remove(old)
    if path.exists():
        path.rename(old)  # a crash right here leaves no `path`: resuming falls back to the newest other one
    tmp.rename(path)
    _fsync_dir(path.parent)
    remove(old)


def restore_interrupted(folder: str | Path) -> list[str]:
    """Undo a ``replace`` killed between its two renames: for each ``X`` that is missing while a complete
    ``.X.sharded-tmp`` (the new save), else a complete ``.X.sharded-old`` (the previous one) lies beside it, rename
    that back to ``X``, before resuming looks for checkpoints and before the next save deletes both. Returns what
    it did, one line each, for the log."""
    restored = []
    for suffix in (".sharded-tmp", OLD_SUFFIX):  # the newer save first
        for hidden in sorted(Path(folder).glob(f"{TMP_PREFIX}*.ckpt{suffix}")):
            target = hidden.with_name(hidden.name.removeprefix(TMP_PREFIX).removesuffix(suffix))
            if target.exists() or not hidden.is_dir():
                continue
            try:
                if file_problems(hidden, read_marker(hidden)):
                    continue
                hidden.rename(target)
            except (ValueError, OSError):  # incomplete, or another rank of this node renamed it first
                continue
            restored.append(
                f"{target.name} was missing (a save killed mid-rename): restored from {hidden.name}"
            )
    return restored


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def read_marker(folder: Path) -> dict:
    """The marker of a finished save; ValueError naming what is wrong (no marker: the save did not finish)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        raise ValueError(f"incomplete sharded checkpoint (no {MARKER}: its save did not finish)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"damaged sharded checkpoint ({MARKER} unreadable: {err})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise ValueError(f"damaged sharded checkpoint ({MARKER} holds no file list)")
    return marker


def file_problems(folder: Path, marker: dict) -> list[str]:
    """Each file the marker lists that is missing (naming the rank whose shard it holds) or has another size."""
    problems = []
    for name, size in marker["files"].items():
        file = folder / name
        rank = RANK_FILE.fullmatch(name)
        whose = f" (rank {rank.group(1)}'s shard of {marker.get('world_size')})" if rank else ""
        if not file.is_file():
            problems.append(f"missing {name}{whose}")
        elif file.stat().st_size != size:
            problems.append(f"{name}{whose} has {file.stat().st_size} bytes, the save wrote {size}")
    return problems


def inspect_sharded(folder: str | Path, *, training: bool = True) -> tuple[str | None, bool]:
    """(why the sharded checkpoint ``folder`` cannot be used, or None; whether it is damaged for good): the
    counterpart of ``checkpoints.inspect_checkpoint`` for folders."""
    folder = Path(folder)
    try:
        marker = read_marker(folder)
    except ValueError as err:
        return str(err), True
    problems = file_problems(folder, marker)
    if problems:
        return f"damaged sharded checkpoint: {'; '.join(problems)}", True
    needed = ["state_dict", "optimizer_0"] if training else ["state_dict"]
    absent = [k for k in needed if k not in marker.get("keys", [])]
    if absent:
        return f"not a training checkpoint (no {', '.join(absent)})", False
    try:
        meta = torch.load(folder / META, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        return f"{META} not loadable with weights_only=True ({str(err).splitlines()[0][:160]})", False
    except (RuntimeError, EOFError, OSError) as err:
        return f"{META} not loadable ({type(err).__name__}: {str(err).splitlines()[0][:160]})", True
    missing = [k for k in ("global_step", "loops") if k not in meta]
    if missing:
        return f"not a Lightning checkpoint ({META} lacks {', '.join(missing)})", False
    return None, False


def sharded_identity(folder: str | Path) -> str:
    """Which save a sharded folder holds, comparable across nodes whatever their mount points."""
    try:
        marker = read_marker(Path(folder))
    except ValueError as err:
        return str(err)
    return f"step {marker.get('global_step')}, {sum(marker['files'].values())} bytes"


def load_sharded(folder: str | Path) -> dict:
    """A finished sharded checkpoint as one single-file-style dict on CPU, in one process: ``meta.pt`` (loaded
    with ``weights_only=True``) plus the full model weights under ``state_dict``, assembled from every rank's
    shard (no optimizer states: export and evaluation need none). ValueError naming what is wrong with it."""
    folder = Path(folder)
    problem, _ = inspect_sharded(folder, training=False)
    if problem is not None:
        raise ValueError(f"{folder}: {problem}")
    checkpoint = torch.load(folder / META, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = full_state(folder)
    return checkpoint


def full_state(folder: Path, prefix: str = "state_dict.") -> dict[str, torch.Tensor]:
    """The tensors of a DCP folder whose flat key starts with ``prefix``, unsharded, keyed by the rest of the key:
    empty tensors shaped from its index, filled by DCP. Lightning saves ``{"state_dict": ..., "optimizer_0":
    ...}`` and DCP joins nested keys with dots: ``state_dict.`` gives the model weights, ``optimizer_0.state.`` the
    first optimizer's per-parameter states (``<parameter>.exp_avg``...)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = FileSystemReader(folder).read_metadata().state_dict_metadata
    tensors = {
        key.removeprefix(prefix): torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in index.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    state = {prefix.rstrip("."): tensors}  # flattened by DCP to prefix + key again
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(state, checkpoint_id=folder, no_dist=True)  # one process reads every rank's file
    return tensors
