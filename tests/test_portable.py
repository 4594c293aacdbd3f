"""Checkpoints travel: a ``last.ckpt`` copied alone into an empty folder on another path, with the training folder
(its tokenizer and pretrained model included) deleted, still exports, generates, fills masks, classifies and
evaluates, for all three recipes. And files that are not checkpoints are named as such."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_classification import pair_rows, stdlib_functions, write_config, write_jsonl
from test_cli import fit_args
from test_mlm import mlm_args

from lmrecipes.cli import main
from lmrecipes.portable import load_pipeline

pytestmark = pytest.mark.slow


def travel(train_dir: Path, tmp_path: Path, monkeypatch) -> Path:
    """Copy the run's last.ckpt alone into an empty folder elsewhere, delete the training folder, and work from a
    third folder: nothing the checkpoint recorded about where it was trained exists any more."""
    ckpt = next(train_dir.glob("runs/*/checkpoints/last.ckpt"))
    away = tmp_path / "elsewhere" / "copied"
    away.mkdir(parents=True)
    shutil.copy(ckpt, away / "last.ckpt")
    shutil.rmtree(train_dir)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return away / "last.ckpt"


def assert_exported_weights(ckpt: Path, out: Path) -> None:
    """The exported safetensors hold the checkpoint's model weights exactly: an embedding padded for the tensor
    cores (model.vocab_multiple) loses only its padded rows, down to the tokenizer's vocab_size."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    state, vocab = checkpoint["state_dict"], checkpoint["hyper_parameters"].get("vocab_size")
    exported = load_file(out / "model.safetensors")
    for key, value in exported.items():
        saved = state[f"model.{key}"]
        if key.endswith("wte.weight") and saved.shape[0] != value.shape[0]:
            assert value.shape[0] == vocab and not checkpoint["hyper_parameters"].get("pretrained")
            saved = saved[:vocab]
        assert torch.equal(value, saved), key
    assert exported


def test_clm_checkpoint_travels(code_tree, tmp_path, monkeypatch, capsys):
    train = tmp_path / "train"
    train.mkdir()
    monkeypatch.chdir(train)
    main([*fit_args(code_tree, train, "--trainer.max_steps", "2"), "--data.init_args.tokenizer", "tok"])
    ckpt = travel(train, tmp_path, monkeypatch)
    main(["export", str(ckpt), "out"])
    assert_exported_weights(ckpt, Path("out"))
    capsys.readouterr()
    prompt = [
        "--prompt",
        "import pandas as pd\n",
        "--max_new_tokens",
        "4",
        "--greedy",
        "true",
        "--json_out",
        "true",
    ]
    main(["generate", "out", *prompt])
    from_export = json.loads(capsys.readouterr().out)
    main(["generate", str(ckpt), *prompt])  # the checkpoint itself, no export needed
    assert json.loads(capsys.readouterr().out) == from_export
    assert from_export[0]["completions"][0]
    main(["evaluate-code", str(ckpt), "--generate_only", "true", "--limit", "1", "--n", "1",
          "--max_new_tokens", "4", "--preset", "greedy", "--output_dir", "eval"])  # fmt: skip
    samples = [json.loads(line) for line in Path("eval/samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0"]


def test_mlm_checkpoint_travels(tiny_bert, tmp_path, monkeypatch, capsys):
    train = tmp_path / "train"
    shutil.copytree(tiny_bert[0], train / "bert")
    monkeypatch.chdir(train)
    main(["fit", *mlm_args(tiny_bert, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"),
          "--model.init_args.pretrained", "bert", "--data.init_args.tokenizer", "bert"])  # fmt: skip
    ckpt = travel(train, tmp_path, monkeypatch)
    main(["export", str(ckpt), "out"])
    assert_exported_weights(ckpt, Path("out"))
    capsys.readouterr()
    text = ["Return the [MASK] of the list.", "--top_k", "3", "--json_out", "true"]
    main(["fill-mask", "out", *text])
    from_export = json.loads(capsys.readouterr().out)
    main(["fill-mask", str(ckpt), *text])
    assert json.loads(capsys.readouterr().out) == from_export
    assert len(from_export[0]["predictions"]) == 3


def test_classification_checkpoint_travels(tiny_bert, tmp_path, monkeypatch):
    train = tmp_path / "train"
    shutil.copytree(tiny_bert[0], train / "bert")
    rows = pair_rows(stdlib_functions(), 0, 16)
    source = write_jsonl(train / "train.jsonl", rows)
    config = write_config(
        train,
        Path("bert"),
        data={"train_source": source, "val_source": source},
        max_steps=2,
        limit_val_batches=0,
    )
    monkeypatch.chdir(train)
    main(["fit", "--config", config])
    ckpt = travel(train, tmp_path, monkeypatch)
    main(["export", str(ckpt), "out"])
    assert_exported_weights(ckpt, Path("out"))
    pair = {"text": rows[0]["text_a"], "text_pair": rows[0]["text_b"]}
    from_export = load_pipeline("text-classification", "out", top_k=None)(pair)
    assert {p["label"] for p in from_export} == {"match", "mismatch"}  # the names, not LABEL_0
    from_ckpt = load_pipeline("text-classification", str(ckpt), top_k=None)(pair)
    scores = {p["label"]: p["score"] for p in from_export}
    assert {p["label"]: p["score"] for p in from_ckpt} == pytest.approx(scores, abs=1e-6)


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    objects = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "lmrecipes": Path("x")}, objects)
    for path, why in ((text, "not a zip archive"), (plain, "no 'state_dict' or 'lmrecipes'"),
                      (objects, "Python objects")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{path} is not a checkpoint written by lmrecipes fit.*{why}"):
            main(["export", str(path), str(tmp_path / "out")])
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "lmrecipes": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(ValueError, match="is truncated or corrupt"):
        main(["export", str(truncated), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_ckpt_path_that_is_not_a_checkpoint_fails_before_training(code_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=f"{text} is not a checkpoint written by lmrecipes fit"):
        main(fit_args(code_tree, tmp_path, "--ckpt_path", str(text)))
    assert not (tmp_path / "runs/clm-offline/checkpoints").exists()


@pytest.mark.parametrize("command", ["generate", "fill-mask", "evaluate-code"])
@pytest.mark.parametrize("model", ["no/such/folder", "exported/missing"])
def test_a_model_folder_that_does_not_exist_is_named(command, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = {
        "generate": ["--prompt", "x"],
        "fill-mask": ["a [MASK]"],
        "evaluate-code": ["--generate_only", "true"],
    }
    with pytest.raises(ValueError, match=f"model='{model}': no such file or folder \\({tmp_path / model}\\)"):
        main([command, model, *args[command]])


def test_what_a_checkpoint_carries_is_plain_and_a_missing_tokenizer_only_warns(tmp_path):
    from lmrecipes.models.clm import CausalLM
    from lmrecipes.portable import hf_from_checkpoint, portable_contents

    module = CausalLM(config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}, vocab_size=32,
                      bos_token_id=0, eos_token_id=0, seq_len=16, tokenizer_path=str(tmp_path / "gone"))  # fmt: skip
    with pytest.warns(UserWarning, match="the checkpoint holds no tokenizer"):
        contents = portable_contents(module)
    assert contents["model_class"] == "GPT2LMHeadModel" and "tokenizer_files" not in contents
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "lmrecipes": contents}, path)
    model, tokenizer, _ = hf_from_checkpoint(path)  # loads with weights_only=True: plain types only
    assert tokenizer is None and model.config.n_embd == 16
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save(
        {"state_dict": module.state_dict(), "lmrecipes": {"class_path": "x"}}, path
    )  # an older lmrecipes
    with pytest.raises(ValueError, match="did not store the model's config"):
        hf_from_checkpoint(path)
