"""A run's folder comes from ``trainer.default_root_dir``; its standard callbacks and loggers are code defaults, so
every variant config keeps its base's unless it says otherwise."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lmrecipes.callbacks import PredictionWriter, RecipeReport
from lmrecipes.cli import RecipeCLI, expand_configs, main
from lmrecipes.defaults import run_callbacks, run_loggers

REPO = Path(__file__).resolve().parents[1]
VARIANTS = sorted(
    p for p in (REPO / "configs").glob("*/*.yaml") if "extends" in yaml.safe_load(p.read_text())
)
FOLDERS = ("dirpath", "save_dir", "output", "export_dir")  # the attributes that name a folder


def load(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def resolved(path: Path, capsys) -> dict:
    """The config after its ``extends`` chain, as ``lmrecipes fit -c PATH --print_config`` prints it."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(path), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def run_summary(path: Path, capsys) -> tuple[dict, list, list]:
    """(resolved config, callbacks, loggers) of the run ``path`` configures: class names with every folder relative to the run's
    own folder, built by the same code defaults as the CLI (nothing heavy is instantiated)."""
    config = resolved(path, capsys)
    root = config["trainer"]["default_root_dir"]
    given = [load(c["class_path"])(**c.get("init_args", {})) for c in config["trainer"]["callbacks"] or []]
    counts_data = hasattr(load(config["data"]["class_path"]), "data_stats")
    callbacks = run_callbacks(given, root=root, checkpoint=config["checkpoint"], counts_data=counts_data)
    loggers = run_loggers(config["trainer"]["logger"], root=root)

    def describe(obj) -> tuple:
        run = os.path.realpath(root)
        folders = {k: getattr(obj, k, None) for k in FOLDERS if getattr(obj, k, None) is not None}
        folders = {k: os.path.relpath(os.path.realpath(v), run) for k, v in folders.items()}
        assert not any(v.startswith("..") for v in folders.values()), f"{obj} writes outside {run}: {folders}"
        return type(obj).__name__, tuple(sorted(folders.items()))

    return config, [describe(c) for c in callbacks], [describe(lg) for lg in loggers]


DEFAULTS = ("ModelCheckpoint", "LearningRateMonitor", "TokenThroughput", "DataStats", "Preemption", "NonFiniteLoss",
            "EpochsFromData", "Curves", "ExactResume")  # fmt: skip


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_variant_has_its_bases_callbacks_and_loggers_unless_it_says_otherwise(path, capsys):
    own = yaml.safe_load(path.read_text())
    base = path.parent / own["extends"]
    config, callbacks, loggers = run_summary(path, capsys)
    base_config, base_callbacks, base_loggers = run_summary(base, capsys)
    root, base_root = config["trainer"]["default_root_dir"], base_config["trainer"]["default_root_dir"]
    assert root != base_root  # a folder of its own
    if "callbacks" not in own["trainer"]:
        assert callbacks == base_callbacks  # folders included, relative to each run's own folder
    else:  # its list replaces its base's list; the code defaults stay
        stated = [load(c["class_path"]).__name__ for c in own["trainer"]["callbacks"]]
        assert [c[0] for c in callbacks[: len(stated)]] == stated
        defaults = [c for c in base_callbacks if c[0] in DEFAULTS and c[0] not in stated]
        assert callbacks[len(stated) :] == defaults
    if "checkpoint" not in own:
        assert config["checkpoint"] == base_config["checkpoint"]
    if "logger" not in own["trainer"]:
        assert loggers == base_loggers
    # Every run has the standard ones, in its own folder.
    assert ("ModelCheckpoint", (("dirpath", "checkpoints"),)) in callbacks
    assert ("LearningRateMonitor", ()) in callbacks
    assert loggers == [("TensorBoardLogger", (("save_dir", "."),)), ("CSVLogger", (("save_dir", "."),))]


def test_an_explicit_callback_of_a_default_class_replaces_the_default(tmp_path):
    mine = ModelCheckpoint(every_n_train_steps=7)  # no dirpath: it still saves into the run's folder
    monitor = LearningRateMonitor(logging_interval="epoch")
    callbacks = run_callbacks(
        [mine, monitor], root=str(tmp_path), checkpoint={"every_n_train_steps": 80}, counts_data=True
    )
    assert [c for c in callbacks if isinstance(c, ModelCheckpoint)] == [mine]
    assert [c for c in callbacks if isinstance(c, LearningRateMonitor)] == [monitor]
    assert mine.dirpath == str(tmp_path / "checkpoints") and mine.save_last is None  # its own arguments only
    csv = CSVLogger(save_dir=str(tmp_path / "elsewhere"))
    loggers = run_loggers([csv], root=str(tmp_path))
    assert [type(lg) for lg in loggers] == [TensorBoardLogger, CSVLogger] and loggers[1] is csv
    assert run_loggers(False, root=str(tmp_path)) is False
    off = run_callbacks([], root=str(tmp_path), checkpoint=None, counts_data=False, checkpointing=False)
    assert not any(isinstance(c, ModelCheckpoint) for c in off)


def test_report_and_predictions_default_to_the_run_folder(tmp_path):
    trainer = SimpleNamespace(default_root_dir=str(tmp_path / "runs" / "x"))
    report, writer = RecipeReport(), PredictionWriter()
    report.setup(trainer, None, "fit")
    writer.setup(trainer, SimpleNamespace(predict_step=lambda batch, batch_idx: None), "predict")
    assert report.export_dir == str(tmp_path / "runs" / "x" / "export")
    assert writer.output == tmp_path / "runs" / "x" / "predictions.jsonl"
    assert RecipeReport(export_dir="elsewhere").export_dir == "elsewhere"


OWN_CHECKPOINT = "[{class_path: ModelCheckpoint, init_args: {every_n_train_steps: 7}}]"


@pytest.mark.parametrize("callbacks", [None, OWN_CHECKPOINT], ids=["defaults", "own ModelCheckpoint"])
def test_the_cli_builds_the_run_folder_from_one_name(callbacks, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir, corpus = tiny_bert
    args = ["--config", str(REPO / "configs/classification/offline.yaml"), "--trainer.default_root_dir", "runs/mine",
            "--model.init_args.pretrained", str(model_dir), "--data.init_args.tokenizer", str(model_dir),
            "--data.init_args.source.train_source", str(corpus), "--data.init_args.progress", "false"]  # fmt: skip
    args += ["--trainer.callbacks", callbacks] if callbacks else []
    cli = RecipeCLI(model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, args=expand_configs(args))  # fmt: skip
    run = (tmp_path / "runs" / "mine").resolve()
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 1 and checkpoints[0].dirpath == str(run / "checkpoints")
    assert checkpoints[0].save_last is (None if callbacks else True)
    assert checkpoints[0]._every_n_train_steps == (7 if callbacks else 0)
    assert sum(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks) == 1
    assert [(type(lg), Path(lg.log_dir).parent.resolve()) for lg in cli.trainer.loggers] == [
        (TensorBoardLogger, run / "tensorboard"),
        (CSVLogger, run / "csv"),
    ]
    assert any(isinstance(c, PredictionWriter) for c in cli.trainer.callbacks) is not bool(callbacks)
