"""Hub ids in every config, the offline "needs the Hub" stop, and PushToHub with the network calls recorded."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lmrecipes import hub
from lmrecipes.cli import main
from lmrecipes.hub import HUB_KEYS, PushToHub, check_hub_id, is_hub_id

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*/*.yaml"))


def config_values(path: Path) -> dict[str, object]:
    """The HUB_KEYS values a config states itself, null included (a variant's null overrides its base)."""
    raw = yaml.safe_load(path.read_text())
    values = {}
    for key in HUB_KEYS:
        section, _, name = key.partition(".init_args.")
        args = (raw.get(section) or {}).get("init_args") or {}
        *groups, name = name.split(".")  # data.init_args.source.train_source: a key of the source group
        for group in groups:
            args = args.get(group) or {}
        if name and name in args:
            values[key] = args[name]
    return values


def resolved_values(path: Path) -> dict[str, object]:
    """The HUB_KEYS values of a config after its ``extends`` chain (the variant's own values win)."""
    chain, current = [], path
    while current is not None:
        chain.append(current)
        base = yaml.safe_load(current.read_text()).get("extends")
        current = current.parent / base if base else None
    merged = {}
    for p in reversed(chain):
        merged.update(config_values(p))
    return merged


def hub_configs() -> list[Path]:
    """Configs whose resolved values name a Hub repo."""
    return [path for path in CONFIGS if any(is_hub_id(v) for v in resolved_values(path).values())]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_hub_id_passes_the_hub_validation_and_has_a_namespace(path):
    for key, value in config_values(path).items():
        if is_hub_id(value):
            check_hub_id(value, key=key)


@pytest.mark.parametrize("value", ["imdb", "glue", "gpt2", "bert-base-uncased", "a--b/c", "x/y/z.git"])
def test_ids_that_datasets_5_or_huggingface_hub_reject_are_refused(value):
    with pytest.raises(ValueError, match="namespace|not a valid Hub id"):
        check_hub_id(value, key="data.init_args.source.train_source")


def test_the_hub_configs_are_the_ones_expected():
    names = {f"{p.parent.name}/{p.name}" for p in hub_configs()}
    assert names == {f"{p.parent.name}/{p.name}" for p in CONFIGS if "offline" not in p.name}


@pytest.mark.parametrize("path", hub_configs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_an_offline_run_of_a_hub_config_stops_before_training_naming_the_ids(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "is_cached", lambda repo_id, kind: False)  # a machine that never had the Hub
    with pytest.raises(ValueError, match="needs the Hugging Face Hub") as err:
        main(["fit", "-c", str(path)])
    ids = [v for v in resolved_values(path).values() if is_hub_id(v)]
    assert ids and all(repr(v) in str(err.value) for v in ids), err.value
    assert not (tmp_path / "runs").exists()  # nothing was built or written


class Recorder:
    """Stands in for the three huggingface_hub calls that need the network; keeps what each upload held."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        future = concurrent.futures.Future()
        future.set_result(None)
        return future


def tiny_fit(callback: PushToHub, tmp_path: Path, steps: int = 5) -> pl.Trainer:
    from lmrecipes.models.clm import CausalLM
    from lmrecipes.optim import OptimizerConfig

    pl.seed_everything(0)
    model = CausalLM(config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}, vocab_size=32,
                     bos_token_id=0, eos_token_id=0, seq_len=16,
                     optimizer=OptimizerConfig(lr=5e-4, weight_decay=0.1, lr_schedule="cosine"))  # fmt: skip
    batch = {"input_ids": torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))}
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    return trainer


def test_push_to_hub_uploads_in_the_background_to_the_run_branch(tmp_path, monkeypatch):
    recorder = Recorder()
    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(hub, name, getattr(recorder, name))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: False)  # the recorder is the Hub
    callback = PushToHub(hub_model_id="me/codeparrot-small", every_n_train_steps=2, revision="run-1",
                         staging_dir=str(tmp_path / "staging"))  # fmt: skip
    tiny_fit(callback, tmp_path, steps=5)
    kinds = [kind for kind, _ in recorder.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder", "upload_folder", "upload_folder"]
    assert recorder.calls[1][1]["branch"] == "run-1"
    uploads = [args for kind, args in recorder.calls if kind == "upload_folder"]
    assert [u["commit_message"] for u in uploads] == [f"Training in progress, step {s}" for s in (2, 4, 5)]
    assert all(u["run_as_future"] and u["revision"] == "run-1" for u in uploads)
    assert all({"model.safetensors", "config.json", "README.md"} <= set(u["files"]) for u in uploads)
    assert not any((tmp_path / "staging").iterdir())  # each staged export is removed once uploaded


def test_push_to_hub_without_a_token_stops_before_the_first_step(tmp_path, monkeypatch):
    from huggingface_hub import constants

    recorder = Recorder()
    monkeypatch.setattr(hub, "upload_folder", recorder.upload_folder)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    callback = PushToHub(hub_model_id="me/x", every_n_train_steps=1)
    with pytest.raises(
        ValueError, match=r"hub_model_id='me/x' needs the Hugging Face Hub, which HF_HUB_OFFLINE"
    ):
        tiny_fit(callback, tmp_path)  # the tests run offline
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    with pytest.raises(ValueError, match=r"hub_model_id='me/x' needs a Hugging Face token"):
        tiny_fit(callback, tmp_path)
    assert recorder.calls == []


def test_push_to_hub_is_off_without_an_id_and_refuses_a_bad_one(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    trainer = tiny_fit(PushToHub(), tmp_path, steps=2)  # no token needed, nothing uploaded
    assert trainer.global_step == 2
    with pytest.raises(ValueError, match="namespace"):
        PushToHub(hub_model_id="codeparrot")


def test_hub_configs_turn_pushing_on_from_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(REPO / "configs/clm/codeparrot-small.yaml"),
              "--trainer.callbacks.init_args.hub_model_id", "me/codeparrot-small", "--print_config"])  # fmt: skip
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    push = [c for c in callbacks if c["class_path"] == "lmrecipes.hub.PushToHub"]
    assert push[0]["init_args"]["hub_model_id"] == "me/codeparrot-small"
    assert push[0]["init_args"]["revision"] == "codeparrot-small-run"


@pytest.mark.parametrize("path", hub_configs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_hub_config_ends_with_push_to_hub_turned_off(path):
    raw = yaml.safe_load(path.read_text())
    while "callbacks" not in raw.get("trainer", {}):  # a variant without a list of its own keeps its base's
        path = path.parent / raw["extends"]
        raw = yaml.safe_load(path.read_text())
    callbacks = raw["trainer"]["callbacks"]
    last = callbacks[-1]  # last: --trainer.callbacks.init_args.hub_model_id edits the last callback
    assert last["class_path"] == "lmrecipes.hub.PushToHub" and last["init_args"]["hub_model_id"] is None
