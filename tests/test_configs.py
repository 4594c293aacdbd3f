"""Every masked-LM and classification YAML parses and instantiates (Hub/package models swapped for a tiny local one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmrecipes.cli import RecipeCLI, expand_configs, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("name", [c for c in CONFIGS if not c.startswith("clm/")])  # clm: see test_cli.py
def test_config_parses_and_instantiates(name, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir, corpus = tiny_bert
    local = ["--model.init_args.pretrained", str(model_dir), "--data.init_args.tokenizer", str(model_dir),
             "--data.init_args.source.train_source", str(corpus), "--data.init_args.progress", "false"]  # fmt: skip
    if name.startswith("mlm/"):
        local += ["--data.init_args.chunking.chunk_size", "32"]  # the tiny model's maximum is 64
    cli = RecipeCLI(model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, args=expand_configs(["--config", str(REPO / "configs" / name), *local]))  # fmt: skip
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    while "extends" in raw:  # the class comes from the base config
        base = yaml.safe_load(((REPO / "configs" / name).parent / raw.pop("extends")).read_text())
        raw = {**base, **{k: v for k, v in raw.items() if k not in ("model", "data")}}
    assert type(cli.model).__module__ + "." + type(cli.model).__name__ == raw["model"]["class_path"]
    assert type(cli.datamodule).__name__ == raw["data"]["class_path"].rsplit(".", 1)[1]
    if name.startswith("classification/"):
        assert cli.model.hparams.num_labels == 2
        assert cli.model.model.config.id2label == dict(enumerate(cli.datamodule.label_names))
    else:
        assert cli.model.hparams.seq_len == 32


def print_config(args: list[str], capsys) -> dict:
    """The fully resolved config ``lmrecipes fit <args> --print_config`` prints (parsing only, nothing runs)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


OFFLINE_CLM = str(REPO / "configs" / "clm" / "offline.yaml")


@pytest.mark.parametrize(
    "form", [["-c", OFFLINE_CLM], ["--config", OFFLINE_CLM], [f"--config={OFFLINE_CLM}"], [f"-c={OFFLINE_CLM}"],
             [f"-c{OFFLINE_CLM}"]], ids=["-c X", "--config X", "--config=X", "-c=X", "-cX"],
)  # fmt: skip
def test_every_config_form_expands_extends(form, capsys):
    resolved = print_config(form, capsys)
    assert resolved == print_config(["--config", OFFLINE_CLM], capsys)
    assert resolved["trainer"]["max_steps"] == 240  # the variant's own value
    optimizer = resolved["model"]["init_args"]["optimizer"]
    assert optimizer["weight_decay"] == 0.1  # from its base, codeparrot-ds.yaml


def test_several_configs_and_a_variant_of_a_variant(tmp_path, capsys):
    extra = tmp_path / "shorter.yaml"  # a variant of the offline variant, given as a second config
    extra.write_text(f"extends: {OFFLINE_CLM}\ntrainer:\n  max_steps: 12\n")
    resolved = print_config(["-c", OFFLINE_CLM, "--config", str(extra)], capsys)
    assert resolved["trainer"]["max_steps"] == 12
    assert resolved["data"]["init_args"]["source"]["train_source"] == "python-install"  # offline.yaml
    assert resolved["model"]["init_args"]["optimizer"]["lr_schedule"] == "cosine"  # codeparrot-ds.yaml
    big = print_config(["-c", str(REPO / "configs" / "clm" / "codeparrot.yaml")], capsys)
    assert big["model"]["init_args"]["config"]["n_layer"] == 48  # codeparrot.yaml
    assert big["data"]["init_args"]["packing"]["seq_len"] == 1024  # codeparrot-small.yaml
    assert big["data"]["init_args"]["source"]["val_split"] == "validation"  # codeparrot-small.yaml
    # a variant's group keeps the keys it does not state: batch sizes from codeparrot.yaml, workers from -ds
    assert big["data"]["init_args"]["loader"] == {"batch_size": 2, "val_batch_size": 2, "num_workers": 4,
                                                  "shuffle_seed": 0, "shuffle_buffer": 1000}  # fmt: skip
    assert big["trainer"]["precision"] == "bf16-mixed"  # codeparrot-small.yaml over codeparrot-ds.yaml


def test_data_groups_are_nested_options_and_take_null_on_the_command_line(capsys):
    """``--data.init_args.<group>.<field>``: the other fields of the group keep the config's values, and a null
    reaches the DataModule as None (jsonargparse alone reads it as the string 'None' or refuses it)."""
    ds = str(REPO / "configs" / "clm" / "codeparrot-ds.yaml")
    data = print_config(["-c", ds, "--data.init_args.source.val_source", "null",
                         "--data.init_args.loader.val_batch_size=null", "--data.init_args.loader.batch_size", "4",
                         "--data.init_args.source.val_max_docs", "~"], capsys)["data"]["init_args"]  # fmt: skip
    assert data["source"]["val_source"] is None and data["source"]["val_split"] == "validation"
    loader = {
        "batch_size": 4,
        "val_batch_size": None,
        "num_workers": 4,
        "shuffle_seed": 0,
        "shuffle_buffer": 1000,
    }
    assert data["loader"] == loader
    assert data["source"]["val_max_docs"] is None and data["packing"]["mode"] == "overflow"


def test_a_config_that_extends_itself_is_named(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ValueError, match="extends itself"):
        expand_configs(["-c", str(loop)])


def test_the_readme_wandb_logger_snippet_instantiates(tiny_bert, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason='wandb is an optional extra (pip install -e ".[wandb]")')
    from lightning.pytorch.loggers import WandbLogger

    readme = (REPO / "README.md").read_text()
    snippet = "# Weights & Biases" + readme.split("```yaml\n# Weights & Biases", 1)[1].split("```", 1)[0]
    (tmp_path / "wandb.yaml").write_text(snippet)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    model_dir, corpus = tiny_bert
    cli = RecipeCLI(model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, args=expand_configs([
                        "-c", str(REPO / "configs/classification/offline.yaml"), "-c", str(tmp_path / "wandb.yaml"),
                        "--model.init_args.pretrained", str(model_dir), "--data.init_args.tokenizer", str(model_dir),
                        "--data.init_args.source.train_source", str(corpus), "--data.init_args.progress", "false"]))  # fmt: skip
    assert any(isinstance(lg, WandbLogger) for lg in cli.trainer.loggers)
