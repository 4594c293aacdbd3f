"""The Hugging Face Hub: which config values are Hub ids, whether this run can reach them, and pushing while
training (the course pushes at every save, the book at every checkpoint to a branch per run)."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, wait
from pathlib import Path

import lightning.pytorch as pl
from huggingface_hub import create_branch, create_repo, upload_folder
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

# Config keys that may hold a Hub id, and the kind of repo each names.
HUB_KEYS = {
    "model.init_args.pretrained": "model",
    "data.init_args.tokenizer": "model",
    "data.init_args.source.train_source": "dataset",
    "data.init_args.source.val_source": "dataset",
    "data.init_args.source.test_source": "dataset",
    "data.init_args.source.predict_source": "dataset",
    "data.init_args.packing.prepared": "dataset",
    "source": "dataset",  # lmrecipes tokenizer --source / --base
    "base": "model",
}
_LOCAL_PREFIXES = ("/", ".", "~", "package://", "python-", "docstrings:", "function-pairs:")


def is_hub_id(value) -> bool:
    """Whether a config value names a Hub repo rather than a local path or a built-in source."""
    if not isinstance(value, str) or not value or os.path.exists(value) or value.startswith(_LOCAL_PREFIXES):
        return False
    # Several segments are a local folder still to be written (a tokenizer trained at first use, say);
    # suffixes and commas are local files and globs.
    return value.count("/") <= 1 and "," not in value and not any(c in value for c in "*?[")


def check_hub_id(repo_id: str, *, key: str) -> None:
    """The validation ``huggingface_hub`` applies, plus the namespace ``datasets`` 5 requires (datasets#8612)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{key}={repo_id!r} is not a valid Hub id: {err}") from None
    if "/" not in repo_id:
        raise ValueError(
            f"{key}={repo_id!r} is neither a local path nor a Hub id with a namespace; expected "
            "'namespace/name' (e.g. 'openai-community/gpt2', 'stanfordnlp/imdb')"
        )


def is_cached(repo_id: str, kind: str) -> bool:
    """Whether a copy of the repo is in the Hub cache (or, for datasets, the datasets cache)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=kind)).is_dir():
        return True
    if kind == "dataset":
        import datasets.config

        return (Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).is_dir()
    return False


def hub_ids(values: dict[str, object]) -> dict[str, tuple[str, str]]:
    """``{key: (repo_id, kind)}`` for every value of ``values`` (keyed as in HUB_KEYS) that is a Hub id."""
    return {key: (v, HUB_KEYS.get(key, "model")) for key, v in values.items() if is_hub_id(v)}


def require_hub(values: dict[str, object]) -> None:
    """Check every Hub id among ``values``; offline, name the ids that are not cached before anything runs."""
    from huggingface_hub import constants

    ids = hub_ids(values)
    for key, (repo_id, _) in ids.items():
        check_hub_id(repo_id, key=key)
    missing = [f"{key}={repo_id!r} ({kind})" for key, (repo_id, kind) in ids.items()
               if not is_cached(repo_id, kind)]  # fmt: skip
    if missing and constants.is_offline_mode():
        raise ValueError(
            "this run needs the Hugging Face Hub, which HF_HUB_OFFLINE=1 rules out, and has no cached copy of "
            f"{', '.join(missing)}; run it where the Hub is reachable, or point these keys at local files "
            "(the offline defaults: configs/*/offline.yaml)"
        )


class PushToHub(pl.Callback):
    """Export the model and upload it to ``hub_model_id`` every N optimizer steps and at the end of fit.

    Off when ``hub_model_id`` is None. Uploads run in the background (``upload_folder(run_as_future=True)``) on
    rank 0 only, so no rank waits for the network; each step is staged in its own folder, removed once uploaded.
    A missing token is an error in ``setup``, before the first step.
    """

    def __init__(
        self,
        *,
        hub_model_id: str | None = None,
        every_n_train_steps: int = 5000,
        revision: str | None = None,
        staging_dir: str | None = None,
        private: bool = True,
    ):
        """
        Args:
            hub_model_id: Hub model repo (``namespace/name``), created if missing; None turns pushing off.
            every_n_train_steps: optimizer steps between uploads (match ModelCheckpoint's).
            revision: branch to push to, created from main if missing (the book: one branch per run).
            staging_dir: local folder the exports are written to before upload (default: ``hub-staging`` in
                the run folder, the first logger's ``save_dir``).
            private: create the repo as private.
        """
        if hub_model_id is not None:
            check_hub_id(hub_model_id, key="hub_model_id")
        if every_n_train_steps < 1:
            raise ValueError(f"PushToHub every_n_train_steps={every_n_train_steps}; expected >= 1")
        self.hub_model_id, self.every, self.revision = hub_model_id, every_n_train_steps, revision
        self.staging_dir, self.private = staging_dir, private
        self.pending: list[Future] = []
        self._last_pushed = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        from huggingface_hub import constants, get_token

        if self.hub_model_id is None or stage != "fit":
            return
        # Checked on every rank, so that all of them stop (none waits in a collective for a rank that failed).
        if constants.is_offline_mode():
            raise ValueError(f"PushToHub hub_model_id={self.hub_model_id!r} needs the Hugging Face Hub, which "
                             "HF_HUB_OFFLINE=1 rules out; unset it, or set hub_model_id: null")  # fmt: skip
        if get_token() is None:
            raise ValueError(
                f"PushToHub hub_model_id={self.hub_model_id!r} needs a Hugging Face token: run `hf auth login` "
                "or set HF_TOKEN (or set hub_model_id: null to train without pushing)"
            )
        if not trainer.is_global_zero:
            return
        if self.staging_dir is None:
            run_dir = trainer.loggers[0].save_dir if trainer.loggers else trainer.default_root_dir
            self.staging_dir = str(Path(run_dir or ".") / "hub-staging")
        create_repo(self.hub_model_id, private=self.private, exist_ok=True)
        if self.revision:
            create_branch(self.hub_model_id, branch=self.revision, exist_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step and step % self.every == 0:
            self.push(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.push(trainer, pl_module)
        wait(self.pending)  # the last uploads finish (failures are warned about) before the process exits
        self.pending.clear()

    def push(self, trainer, pl_module) -> None:
        """Stage an export of the current weights and start its upload (rank 0; once per optimizer step)."""
        step = trainer.global_step
        if self.hub_model_id is None or step == self._last_pushed:
            return  # micro-batches of one accumulation window share a step
        self._last_pushed = step  # on every rank: they all take part in the gather below
        from lmrecipes.sharding import unsharded_module

        # FSDP2: every rank gathers the shards, rank 0 gets the model: on the CPU, as export needs it, since a
        # whole copy on a GPU that holds only its shards (and their optimizer states) may not fit
        pl_module = unsharded_module(pl_module, device="cpu")
        if not trainer.is_global_zero:
            return
        from lmrecipes.export import model_card, record_class, save_hf_folder

        checkpoint = {"global_step": step, "epoch": trainer.current_epoch,
                      "hyper_parameters": dict(pl_module.hparams)}  # fmt: skip
        record_class(pl_module, checkpoint, trainer)
        folder = Path(self.staging_dir) / f"step{step}"
        folder.mkdir(parents=True, exist_ok=True)
        save_hf_folder(pl_module, folder, card=model_card(checkpoint))
        future = upload_folder(
            repo_id=self.hub_model_id, folder_path=str(folder), revision=self.revision,
            commit_message=f"Training in progress, step {step}", run_as_future=True,
        )  # fmt: skip
        future.add_done_callback(lambda f, folder=folder: self._done(f, folder, step))
        self.pending.append(future)

    def _done(self, future: Future, folder: Path, step: int) -> None:
        if future.exception() is not None:
            rank_zero_warn(f"PushToHub: the upload of step {step} failed: {future.exception()}")
            return
        shutil.rmtree(folder, ignore_errors=True)
        rank_zero_info(f"PushToHub: step {step} uploaded to {self.hub_model_id}")
