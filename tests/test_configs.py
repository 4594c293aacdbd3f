"""Every masked-LM and classification YAML parses and instantiates (Hub/package models swapped for a tiny local one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmrecipes.cli import RecipeCLI, expand_configs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("name", [c for c in CONFIGS if not c.startswith("clm/")])  # clm: see test_cli.py
def test_config_parses_and_instantiates(name, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir, corpus = tiny_bert
    local = ["--model.init_args.pretrained", str(model_dir), "--data.init_args.tokenizer", str(model_dir),
             "--data.init_args.train_source", str(corpus), "--data.init_args.progress", "false"]  # fmt: skip
    if name.startswith("mlm/"):
        local += ["--data.init_args.chunk_size", "32"]  # the tiny model's maximum is 64
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
