"""Tokenizer training and measurement on a small real corpus: stdlib code plus data-science snippets."""

import json
import keyword
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lmrecipes.bpe import (
    DEFAULT_KEYTOKENS,
    EOS_TOKEN,
    format_report,
    resolve_keytoken_ids,
    tokenizer_report,
    train_bpe_tokenizer,
)

STDLIB = Path(json.__file__).parent.parent
VOCAB = 2000
# Each key token appears bare ("plt.", ".fit(", "(sk") and after a space ("as plt", "def fit").
DS_SNIPPET = """import matplotlib.pyplot as plt
import pandas as pd
import sklearn as sk
df = pd.read_csv("data.csv")
pd.concat([df, df])
model = sk.linear_model.LinearRegression()
model.fit(X, y)
preds = model.predict(X)
plt.plot(preds)
print(sk, pd, plt)
def fit(self, X, y):
    return self
def predict(self, X):
    return X
"""


def _stdlib_files() -> list[Path]:
    """About 100 real Python files from three stdlib packages."""
    files = [f for pkg in ("json", "email", "unittest") for f in sorted((STDLIB / pkg).rglob("*.py"))]
    return files[:100]


@pytest.fixture(scope="module")
def code_texts() -> list[str]:
    return [f.read_text(encoding="utf-8") for f in _stdlib_files()]


@pytest.fixture(scope="module")
def ds_texts(code_texts: list[str]) -> list[str]:
    return code_texts + [DS_SNIPPET] * 50


@pytest.fixture(scope="module")
def code_tok(code_texts: list[str]):
    return train_bpe_tokenizer(code_texts, vocab_size=VOCAB, progress=False)


@pytest.fixture(scope="module")
def ds_tok(ds_texts: list[str]):
    return train_bpe_tokenizer(ds_texts, vocab_size=VOCAB, progress=False)


def test_vocab_size_and_special_tokens(ds_tok) -> None:
    assert len(ds_tok) == VOCAB
    eos = ds_tok.convert_tokens_to_ids(EOS_TOKEN)
    assert ds_tok.eos_token_id == ds_tok.bos_token_id == ds_tok.unk_token_id == eos
    assert ds_tok.pad_token is None
    assert ds_tok.model_max_length == 1024
    assert ds_tok.encode(f"x{EOS_TOKEN}", add_special_tokens=False)[-1] == eos


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\treturn x  # tab-indented\n",
        "s = 'héllo wörld ✓ 😀 漢字'\r\n",
        "    \n\n  trailing   ",
        "",
    ],
)
def test_encode_decode_roundtrip_is_byte_exact(ds_tok, text: str) -> None:
    ids = ds_tok.encode(text, add_special_tokens=False)
    assert ds_tok.unk_token_id not in ids  # byte level: nothing is unknown
    assert ds_tok.decode(ids) == text


def test_lone_surrogate_does_not_crash_training_or_report(code_texts: list[str]) -> None:
    texts = [*code_texts[:5], "x = '\ud800'\n"]
    tok = train_bpe_tokenizer(texts, vocab_size=400, progress=False)
    assert len(tok) == 400
    # Each lone surrogate becomes one U+FFFD; a valid surrogate pair is re-joined into one character.
    report = tokenizer_report(tok, ["y = '\udcff'", "\ud83d\ude00"])
    assert report["num_chars"] == len("y = '\ufffd'") + 1
    assert report["num_tokens"] == sum(
        len(tok.encode(t, add_special_tokens=False)) for t in ("y = '\ufffd'", "\U0001f600")
    )


def test_save_and_reload_gives_identical_ids(ds_tok, code_texts: list[str], tmp_path: Path) -> None:
    ds_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = code_texts[0][:2000] + DS_SNIPPET
    assert loaded.encode(sample) == ds_tok.encode(sample)
    assert loaded.eos_token_id == loaded.bos_token_id == ds_tok.eos_token_id
    assert len(loaded) == VOCAB


def test_resolve_keytoken_ids_returns_single_tokens_in_order(ds_tok) -> None:
    ids = resolve_keytoken_ids(ds_tok)
    expected = [*DEFAULT_KEYTOKENS, *(f" {k}" for k in DEFAULT_KEYTOKENS)]
    assert [ds_tok.decode([i]) for i in ids] == expected
    assert resolve_keytoken_ids(ds_tok, ("fit", "fit")) == ids[3:4] + ids[8:9]  # deduplicated


def test_resolve_keytoken_ids_names_split_keywords(code_tok) -> None:
    with pytest.raises(ValueError, match="single tokens") as err:
        resolve_keytoken_ids(code_tok)
    assert "'plt'" in str(err.value) and "' plt'" in str(err.value)
    assert "'def'" not in str(err.value)
    with pytest.raises(ValueError, match="'zzqx'"):
        resolve_keytoken_ids(code_tok, ("def", "zzqx"))


def test_report_fields_are_consistent(code_tok, code_texts: list[str]) -> None:
    held = code_texts[:5]
    report = tokenizer_report(code_tok, held, top=7)
    json.dumps(report)  # plain JSON-able types only
    assert report["vocab_size"] == VOCAB
    assert report["num_texts"] == 5
    assert report["num_chars"] == sum(len(t) for t in held)
    assert report["num_tokens"] == sum(len(code_tok.encode(t, add_special_tokens=False)) for t in held)
    assert report["chars_per_token"] == report["num_chars"] / report["num_tokens"]
    assert report["chars_per_token"] > 2.0  # code BPE compresses; bytes alone would give 1.0
    not_single = report["python_keywords_not_single"]
    assert report["python_keywords_single_token"] == 1 - len(not_single) / len(keyword.kwlist)
    assert 0.0 <= report["python_keywords_single_token"] <= 1.0
    assert "def" not in not_single and "return" not in not_single
    assert len(report["longest_tokens"]) == len(report["rarest_tokens"]) == 7
    assert report["rarest_tokens"][0] == code_tok.decode([VOCAB - 1])
    assert EOS_TOKEN not in report["longest_tokens"] + report["rarest_tokens"]
    assert report["keytokens"] == {t: False for k in DEFAULT_KEYTOKENS for t in (k, f" {k}")}
    assert "base_chars_per_token" not in report
    text = format_report(report)
    assert "characters per token" in text and "'plt'=NO" in text


def test_retrain_from_base_folder(ds_tok, code_texts: list[str], tmp_path: Path) -> None:
    ds_tok.save_pretrained(tmp_path / "base")
    new = train_bpe_tokenizer(code_texts, vocab_size=1000, base=str(tmp_path / "base"), progress=False)
    assert len(new) == 1000
    assert new.eos_token == EOS_TOKEN
    held = code_texts[-3:]
    report = tokenizer_report(new, held, base=ds_tok)
    base_tokens = sum(len(ds_tok.encode(t, add_special_tokens=False)) for t in held)
    assert report["base_chars_per_token"] == report["num_chars"] / base_tokens
    assert report["relative_length"] == report["num_tokens"] / base_tokens
    assert report["relative_length"] > 1.0  # half the vocabulary gives longer sequences
    assert "tokens vs base" in format_report(report)


@pytest.mark.parametrize("vocab_size", [0, 257])
def test_vocab_size_too_small_raises(vocab_size: int) -> None:
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size}"):
        train_bpe_tokenizer(["x = 1"], vocab_size=vocab_size, progress=False)


def test_tokenizer_command_writes_folder_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lmrecipes.bpe import tokenizer_command

    src = tmp_path / "src"
    src.mkdir()
    files = [f for f in _stdlib_files() if f.read_text(encoding="utf-8").strip()][
        :30
    ]  # empty files are dropped
    for f in files:
        shutil.copy(f, src / f"{f.parent.name}_{f.name}")
    for name in ("zz_ds1.py", "zz_ds2.py"):
        (src / name).write_text(DS_SNIPPET * 20, encoding="utf-8")
    out = tmp_path / "tok"
    report = tokenizer_command(source=str(src), out=str(out), vocab_size=600, report_docs=3, progress=False)
    assert json.loads((out / "tokenizer_report.json").read_text(encoding="utf-8")) == report
    assert report["num_texts"] == 3 and report["train_docs"] == 32 - 3
    assert report["vocab_size"] == len(AutoTokenizer.from_pretrained(out)) == 600
    assert "characters per token" in capsys.readouterr().out

    kw = tokenizer_command(
        source=str(src),
        out=str(tmp_path / "kw"),
        vocab_size=600,
        keywords=["matplotlib"],
        report_docs=1,
        progress=False,
    )
    assert kw["train_docs"] == 1 and kw["num_texts"] == 1
    assert "kept 2 of 32" in capsys.readouterr().out
    capped = tokenizer_command(
        source=str(src), out=str(tmp_path / "cap"), vocab_size=600, max_docs=5, report_docs=2, progress=False
    )
    assert capped["train_docs"] + capped["num_texts"] == 5
    with pytest.raises(ValueError, match="only 32 documents of .* --report_docs 32 holds them all out"):
        tokenizer_command(
            source=str(src), out=str(tmp_path / "x"), vocab_size=600, report_docs=32, progress=False
        )
