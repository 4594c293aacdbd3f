"""Checkpoints that travel: what export, generation and evaluation need is stored inside the checkpoint (the
Hugging Face model's class and config, the tokenizer's files, as plain types under ``checkpoint["lmrecipes"]``),
and loading uses only that, never a path recorded where training ran.

    model, tokenizer, checkpoint = hf_from_checkpoint("last.ckpt")   # from any folder, on any machine
"""

from __future__ import annotations

import functools
import json
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from lmrecipes.models.speed import export_vocab_size

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; Lightning checkpoints are always one


class DamagedCheckpoint(ValueError):
    """A checkpoint whose zip archive is truncated or corrupt (as opposed to a file that is no checkpoint)."""


def not_ours(path, why: str) -> ValueError:
    return ValueError(f"{path} is not a checkpoint written by lmrecipes fit ({why})")


def load_checkpoint(path: str | Path, *, require: tuple[str, ...] = ("state_dict", "lmrecipes")) -> dict:
    """The checkpoint at ``path``, loaded on CPU with ``weights_only=True``; a ``ValueError`` that names the path
    when it is missing, not a checkpoint at all, damaged (``DamagedCheckpoint``), or lacks a ``require`` entry."""
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint (FSDP2): its shards assembled into one state dict
        from lmrecipes.checkpoints_sharded import load_sharded

        return _require(path, load_sharded(path), require)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file (looked in {path.resolve()})")
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        raise not_ours(path, f"not a zip archive as torch.save writes; it starts with {head!r}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise not_ours(path, "it holds Python objects besides tensors and plain values") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError) as err:
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise DamagedCheckpoint(f"{path} is truncated or corrupt ({type(err).__name__}: {first})") from None
    return _require(path, checkpoint, require)


def _require(path: Path, checkpoint, require: tuple[str, ...]) -> dict:
    missing = [k for k in require if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise not_ours(path, f"no {' or '.join(repr(k) for k in missing)} entry")
    return checkpoint


def check_ckpt_path(path: str | None) -> None:
    """``--ckpt_path``: a local file that is no checkpoint at all is named before Lightning tries to load it;
    ``last``, remote paths and damaged checkpoints are left to ``checkpoints.resolve_ckpt_path``."""
    if path is None or path in ("last", "best", "hpc", "registry") or "://" in str(path):
        return
    if not Path(path).is_file():
        return  # resolve_ckpt_path names a missing file with the newest valid alternative
    try:
        load_checkpoint(path, require=("state_dict",))
    except DamagedCheckpoint:
        return


def hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model a recipe module wraps (``compile`` keeps it unwrapped: ``nn.Module.compile``)."""
    return module.model


def portable_contents(module) -> dict:
    """What :func:`hf_from_checkpoint` needs, as plain types: the model's class name and config, and the files
    of the tokenizer at ``hparams.tokenizer_path`` (read now, while the path is valid)."""
    from lmrecipes.sharding import unsharded_class

    model = hf_model(module)
    contents = {
        "model_class": unsharded_class(model).__name__,
        "model_config": json.loads(model.config.to_json_string(use_diff=False)),  # plain types only
    }
    tokenizer_path = module.hparams.get("tokenizer_path")
    if tokenizer_path:
        try:
            contents["tokenizer_files"] = tokenizer_files(str(tokenizer_path))
        except (OSError, ValueError) as err:  # never lose a checkpoint over what only export needs
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(f"the checkpoint holds no tokenizer: {tokenizer_path} did not load ({err})")
    return contents


def tokenizer_files(path: str) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for the tokenizer at ``path`` (a few hundred KB to a few MB), by name;
    cached while the folder is unchanged, since every checkpoint save asks again."""
    folder = Path(path)
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())) if folder.is_dir() else ()
    return dict(_tokenizer_files(path, stamp))


@functools.lru_cache(maxsize=4)
def _tokenizer_files(path: str, stamp: tuple) -> tuple[tuple[str, bytes], ...]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return tuple((p.name, p.read_bytes()) for p in sorted(Path(tmp).iterdir()) if p.is_file())


def tokenizer_from_files(files: dict[str, bytes]):
    """A tokenizer rebuilt from :func:`tokenizer_files` (written to a temporary folder, loaded, folder removed)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(data)  # names only: nothing lands outside tmp
        return AutoTokenizer.from_pretrained(tmp)


def hf_from_checkpoint(path: str | Path):
    """(Hugging Face model in eval mode, tokenizer or None, checkpoint) from a checkpoint written by
    ``lmrecipes fit``: the model is built from the stored config and given the stored weights."""
    import transformers

    checkpoint = load_checkpoint(path)
    meta = checkpoint["lmrecipes"]
    if "model_config" not in meta:
        raise ValueError(
            f"{path} was written by an lmrecipes version that did not store the model's config in checkpoints; "
            "export it with that version, from the folder where it was trained"
        )
    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise ValueError(
            f"{path} holds a {meta['model_class']}, which this transformers version does not have"
        )
    config = dict(meta["model_config"])
    model = cls(transformers.AutoConfig.for_model(config.pop("model_type"), **config))
    prefix = (  # checkpoints written when compile wrapped the model in torch.compile's module
        "model._orig_mod."
        if any(k.startswith("model._orig_mod.") for k in checkpoint["state_dict"])
        else "model."
    )
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)  # strict: a missing or unexpected weight is an error, not a random layer
    # a padded embedding's extra rows cut off, as export does: generation must not sample an id the tokenizer lacks
    vocab_size = export_vocab_size(checkpoint.get("hyper_parameters", {}))
    if vocab_size is not None and model.get_input_embeddings().num_embeddings != vocab_size:
        model.resize_token_embeddings(vocab_size)  # in place: this model is ours, no copy needed
    files = meta.get("tokenizer_files")
    return model.eval(), tokenizer_from_files(files) if files else None, checkpoint


def check_model_source(model: str, *, key: str = "model") -> None:
    """A checkpoint file or folder that exists, or a Hub id this run can reach: otherwise a ``ValueError`` naming
    where it looked (instead of the Hub's "check your internet connection")."""
    if Path(model).exists():
        return
    from lmrecipes.hub import is_hub_id, require_hub

    looked = f"{key}={model!r}: no such file or folder ({Path(model).resolve()})"
    if not is_hub_id(model):
        raise ValueError(
            f"{looked}; expected a checkpoint written by lmrecipes fit, a folder written by lmrecipes export, "
            "or a Hub id 'namespace/name'"
        )
    try:
        require_hub({key: model})
    except ValueError as err:
        raise ValueError(f"{looked}; as a Hub id: {err}") from None


def is_checkpoint(model: str | Path) -> bool:
    """Whether ``model`` names an ``lmrecipes fit`` checkpoint: a file, or a sharded (FSDP2) checkpoint's folder."""
    return Path(model).is_file() or (Path(model) / "meta.pt").is_file()


def load_pipeline(task: str, model: str, **kwargs):
    """A ``transformers`` pipeline from an exported folder, a Hub id or a checkpoint written by ``lmrecipes fit``."""
    from transformers import pipeline

    check_model_source(model)
    device = "cpu" if not torch.cuda.is_available() else 0
    if is_checkpoint(model):
        lm, tokenizer, _ = hf_from_checkpoint(model)
        return pipeline(task, model=lm, tokenizer=tokenizer, device=device, **kwargs)
    return pipeline(task, model=model, device=device, **kwargs)
