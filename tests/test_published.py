"""The course's and the book's published settings as the toolkit runs them: the course's chunk down-sampling,
GLUE's unlabelled test split, one epoch counted from the data, the book's generation and tokenizer settings."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml

from lmrecipes.cli import main
from lmrecipes.data.groups import grouped

REPO = Path(__file__).resolve().parents[1]


def test_course_chunk_downsampling_is_datasets_train_test_split(tiny_bert):
    """heldout: chunks picks the chunks ``Dataset.train_test_split(train_size, test_size, seed=42)`` picks."""
    import datasets

    from lmrecipes.data.mlm import MaskedTextDataModule

    model_dir, corpus = tiny_bert
    dm = MaskedTextDataModule(**grouped(MaskedTextDataModule, tokenizer=str(model_dir), train_source=str(corpus), heldout="chunks", chunk_size=32,
                              train_size=40, eval_size=12, downsample_seed=42, progress=False))  # fmt: skip
    val_ids, _ = dm._chunks("val", 12)
    train_ids, _ = dm._chunks("train", 40)
    pool = torch.from_numpy(dm._pool[0])  # every chunk of every document, in order
    rows = datasets.Dataset.from_dict({"row": list(range(len(pool)))})
    split = rows.train_test_split(train_size=40, test_size=12, seed=42)
    assert torch.equal(val_ids, pool[split["test"]["row"]])
    assert torch.equal(train_ids, pool[split["train"]["row"]])
    with pytest.raises(ValueError, match="needs chunking.train_size and chunking.eval_size"):
        MaskedTextDataModule(
            **grouped(
                MaskedTextDataModule, tokenizer=str(model_dir), train_source=str(corpus), heldout="chunks"
            )
        )
    with pytest.raises(ValueError, match=r"data.chunking.heldout='reviews' is not one of"):
        MaskedTextDataModule(
            **grouped(
                MaskedTextDataModule, tokenizer=str(model_dir), train_source=str(corpus), heldout="reviews"
            )
        )


def test_glue_style_unlabelled_test_split_is_refused_and_predict_reads_validation(tiny_bert, tmp_path):
    from lmrecipes.data.classification import ClassificationDataModule

    model_dir, _ = tiny_bert
    rows = [{"content": f"sentence {i}", "pair": f"other {i}", "label": i % 2, "idx": i} for i in range(8)]
    for name, labelled in (("train", True), ("validation", True), ("test", False)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({**r, "label": r["label"] if labelled else -1}) + "\n" for r in rows)
        )
    data = ClassificationDataModule(**grouped(ClassificationDataModule,
        tokenizer=str(model_dir), train_source=str(tmp_path / "train.jsonl"),
        val_source=str(tmp_path / "validation.jsonl"), test_source=str(tmp_path / "test.jsonl"),
        text_column="content", text_pair_column="pair", label_names=["no", "yes"], progress=False,
    ))  # fmt: skip
    with pytest.raises(ValueError, match=r"the test split .* has no labels .*GLUE's test splits.*private"):
        data.setup("test")
    data.setup("predict")  # predicting an unlabelled split is what it is for
    # The course predicts MRPC's validation split: the config names it, and the Hub source reads that split.
    mrpc = yaml.safe_load((REPO / "configs/classification/bert-mrpc.yaml").read_text())["data"]["init_args"]
    glue = ClassificationDataModule(**{**mrpc, "tokenizer": str(model_dir)})  # the Hub is read only in setup
    assert glue._source_args("predict") == ("nyu-mll/glue", "validation")
    assert glue._source_args("test") == ("nyu-mll/glue", "test")


def inspect_defaults(function) -> dict:
    params = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@pytest.mark.slow
def test_one_epoch_is_counted_from_the_pretokenized_data(code_tree, tmp_path, monkeypatch):
    """max_epochs: 1 with max_steps: -1 (the course's num_train_epochs=1): the steps and the cosine schedule
    come from the token file, and the run stops after one pass over the windows."""
    import sys

    from lmrecipes.data.prepared import PreparedData

    sys.path.insert(0, str(Path(__file__).parent))
    from test_cli import fit_args

    monkeypatch.chdir(tmp_path)
    main(fit_args(code_tree, tmp_path, "--trainer.max_steps", "-1", "--trainer.max_epochs", "1",
                  "--trainer.accumulate_grad_batches", "4", "--data.init_args.packing.pretokenize", "true",
                  "--data.init_args.packing.mode", "overflow", "--data.init_args.packing.seq_len", "64",
                  "--data.init_args.loader.batch_size", "16", "--trainer.limit_val_batches", "0",
                  "--data.init_args.train_tokenizer.vocab_size", "300"))  # fmt: skip
    (folder,) = (tmp_path / ".cache/lmrecipes").glob("*/")
    windows = len(PreparedData(folder).windows(64)[1])
    expected = windows // 16 // 4  # one pass over the windows, 16 per batch, 4 batches per optimizer step
    with open(next(tmp_path.glob("runs/clm-offline/csv/*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    by_step = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")}
    lrs = [by_step[s] for s in sorted(by_step)]
    assert len(lrs) == expected > 3
    assert max(int(r["step"]) for r in rows if r.get("train/loss")) == expected - 1
    assert lrs[-1] < 0.02 * max(lrs)  # the cosine schedule ends with the epoch, not at an unknown step


def test_book_generation_preset(tiny_lm, capsys):
    from lmrecipes.export import GENERATE_PRESETS

    # book ch.10, complete_code(): gen_kwargs and its defaults
    assert GENERATE_PRESETS["book"] == {"max_length": 64, "temperature": 0.4, "top_k": 0, "top_p": 0.95,
                                        "num_return_sequences": 4, "seed": 1, "first_block": True}  # fmt: skip
    prompt = "def area(radius):\n"
    first = main(["generate", str(tiny_lm), "--prompt", prompt, "--preset", "book"])
    again = main(["generate", str(tiny_lm), "--prompt", prompt, "--preset", "book"])
    assert first is None and again is None  # the console entry point returns nothing (exit 0)
    out = capsys.readouterr().out
    runs = out.split(prompt)[1:]
    assert len(runs) == 8 and runs[:4] == runs[4:]  # 4 completions, seeded (set_seed(1)) so repeatable
    from lmrecipes.export import generate_command

    capsys.readouterr()
    results = generate_command(str(tiny_lm), prompt=[prompt, "x = "], preset="book", num_return_sequences=2)
    assert [len(r) for r in results] == [2, 2]  # an explicit option wins over the preset
    assert all("\ndef " not in c and "\nclass " not in c for r in results for c in r)  # first_block
    with pytest.raises(ValueError, match=r"preset='paper' is not one of \['book', 'default'\]"):
        generate_command(str(tiny_lm), prompt="x", preset="paper")


def test_tokenizer_defaults_are_the_books():
    from lmrecipes.bpe import tokenizer_command

    defaults = inspect_defaults(tokenizer_command)
    # book ch.10: length = 200000 documents, vocab_size=32768 (retraining GPT-2's byte-level BPE)
    assert (defaults["max_docs"], defaults["vocab_size"], defaults["max_chars"]) == (200_000, 32_768, None)
