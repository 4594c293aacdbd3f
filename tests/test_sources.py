"""Document sources and streaming filters, on tiny files written per test (offline)."""

import json
import os
from pathlib import Path

import pytest

from lmrecipes.data.filters import DEFAULT_KEYWORDS, FilterPipeline, shard_of
from lmrecipes.data.sources import (
    HFDataset,
    JsonlFiles,
    SourceError,
    SourceTree,
    open_source,
    path_order_key,
    python_install_roots,
    sanitize_text,
)


def write_tree(root: Path) -> Path:
    """a/b.py, a/c.py, d.py, plus files that must not be listed."""
    (root / "a").mkdir(parents=True)
    (root / "a" / "b.py").write_text("print('b')\n")
    (root / "a" / "c.py").write_text("print('c')\n")
    (root / "d.py").write_text("x = 1\n")
    (root / "notes.txt").write_text("not python\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "e.py").write_text("cached\n")
    return root


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def contents(source, start: int = 0) -> list[tuple[int, str]]:
    return [(index, doc["content"]) for index, doc in source.iter_raw(start)]


# ---- SourceTree -------------------------------------------------------------------------------------


def test_source_tree_order_start_and_columns(tmp_path):
    root = write_tree(tmp_path / "src")
    tree = SourceTree(roots=[root], progress=False)
    # ordered by a hash of the relative path (mixes packages), the same on every machine
    assert [Path(f).relative_to(root).as_posix() for f in tree.files] == ["a/c.py", "d.py", "a/b.py"]
    assert contents(tree) == [(0, "print('c')\n"), (1, "x = 1\n"), (2, "print('b')\n")]
    assert contents(tree, start=2) == [(2, "print('b')\n")]
    first = next(tree.iter_raw())[1]
    assert first == {
        "content": "print('c')\n",
        "path": str(root / "a" / "c.py"),
        "size": 11,
        "split_key": "a/c.py",
    }
    held = tree.iter_raw(select_path=lambda p: p.endswith("b.py"))
    assert [(i, d["content"]) for i, d in held] == [(2, "print('b')\n")]


def test_source_tree_non_utf8_both_policies(tmp_path):
    root = write_tree(tmp_path / "src")
    (root / "a" / "bad.py").write_bytes(b"s = '\xff\xfe'\n")  # ordered last: c.py, d.py, b.py, bad.py
    with pytest.raises(SourceError, match=r"a/bad\.py: .*expected UTF-8 text"):
        list(SourceTree(roots=[root], progress=False).iter_raw())
    tree = SourceTree(roots=[root], on_error="skip", progress=False)
    assert [index for index, _ in tree.iter_raw(start=1)] == [1, 2]  # the skipped file keeps index 3
    assert tree.skipped == {"not_utf8": 1}
    assert [index for index, _ in tree.iter_raw(start=3)] == []
    assert tree.skipped == {"not_utf8": 2}  # counted again on the second pass


def test_source_tree_too_large_and_bad_roots(tmp_path):
    root = write_tree(tmp_path / "src")
    tree = SourceTree(roots=[root], max_file_bytes=6, progress=False)  # only d.py (6 bytes) fits
    assert contents(tree) == [(1, "x = 1\n")]
    assert tree.skipped == {"too_large": 2}
    with pytest.raises(SourceError, match="do not exist"):
        SourceTree(roots=[tmp_path / "missing"])
    with pytest.raises(SourceError, match=r"no file matches '\*\.rs'"):
        _ = SourceTree(roots=[root], pattern="*.rs", progress=False).files


def test_source_tree_fingerprint_follows_files(tmp_path):
    root = write_tree(tmp_path / "src")
    before = SourceTree(roots=[root], progress=False).fingerprint()
    assert SourceTree(roots=[root], progress=False).fingerprint() == before
    assert len(before) == 16 and int(before, 16) >= 0
    (root / "d.py").write_text("x = 22\n")
    assert SourceTree(roots=[root], progress=False).fingerprint() != before


def test_source_tree_over_stdlib_json_package():
    package = Path(json.__file__).parent
    tree = SourceTree(roots=[package], progress=False)
    expected = sorted((str(p) for p in package.glob("*.py")), key=lambda p: path_order_key(Path(p).name))
    assert tree.files == expected
    docs = dict(tree.iter_raw())
    init = docs[expected.index(str(package / "__init__.py"))]
    assert init["content"] == (package / "__init__.py").read_text(encoding="utf-8")
    assert init["size"] == len(init["content"].encode())


def test_python_install_roots_hold_the_stdlib():
    roots = python_install_roots()
    assert Path(os.__file__).parent.resolve() in roots
    assert roots == sorted(set(roots)) and all(root.is_dir() for root in roots)


# ---- JsonlFiles -------------------------------------------------------------------------------------


def test_jsonl_corrupt_line_names_file_and_line(tmp_path):
    good = json.dumps({"content": "a"})
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", "{not json", good])
    with pytest.raises(SourceError, match=rf"{path}:3: .*expected one JSON object per line"):
        list(JsonlFiles(paths=[str(path)]).iter_raw())
    source = JsonlFiles(paths=[str(path)], on_error="skip")
    assert contents(source) == [(0, "a"), (2, "a")]  # blank line: no index; bad line: index 1
    assert source.skipped == {"bad_json": 1}


def test_jsonl_missing_column_is_always_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": "a", "id": 1})])
    with pytest.raises(SourceError, match=r"d\.jsonl:1: no column 'content'; the keys are \['id', 'text'\]"):
        list(JsonlFiles(paths=[str(path)], on_error="skip").iter_raw())


def test_jsonl_non_string_text_and_columns(tmp_path):
    lines = [json.dumps({"text": 5}), json.dumps({"text": "hi", "path": "x.py", "size": 99, "repo": "r"})]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(SourceError, match=r"d\.jsonl:1: 'text' is int; expected a string"):
        list(JsonlFiles(paths=[str(path)], text_column="text").iter_raw())
    source = JsonlFiles(paths=[str(path)], text_column="text", on_error="skip")
    assert list(source.iter_raw()) == [(1, {"content": "hi", "path": "x.py", "size": 99, "repo": "r"})]
    assert source.skipped == {"not_text": 1}


def test_jsonl_globs_order_and_start(tmp_path):
    for part, words in [("part-1", ["c", "d"]), ("part-0", ["a", "b"])]:
        write_jsonl(tmp_path / f"{part}.jsonl", [json.dumps({"content": w}) for w in words])
    source = JsonlFiles(paths=[str(tmp_path / "part-*.jsonl")])
    assert contents(source) == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    assert contents(source, start=3) == [(3, "d")]
    assert next(source.iter_raw())[1]["path"] == f"{tmp_path / 'part-0.jsonl'} (record 0)"
    with pytest.raises(SourceError, match="matches no file"):
        JsonlFiles(paths=[str(tmp_path / "nothing-*.jsonl")])


# ---- HFDataset --------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_dataset_csv_with_start(tmp_path, streaming):
    path = tmp_path / "d.csv"
    path.write_text("content,path\nfirst,a.py\nsecond,b.py\nthird,c.py\n")
    source = HFDataset(name="csv", data_files=[str(path)], streaming=streaming)
    assert contents(source) == [(0, "first"), (1, "second"), (2, "third")]
    assert list(source.iter_raw(start=1))[0] == (1, {"content": "second", "path": "b.py", "size": 6})


def test_hf_dataset_parquet_and_missing_column(tmp_path):
    import datasets

    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"text": ["x", "yy", "zzz"], "n": [1, 2, 3]}).to_parquet(path)
    source = HFDataset(name="parquet", data_files=[path], text_column="text")
    assert list(source.iter_raw(start=2)) == [
        (2, {"n": 3, "content": "zzz", "path": "parquet[train] shard 0 row 2", "size": 3})
    ]
    with pytest.raises(SourceError, match=r"no column 'content'.*\['n', 'text'\]"):
        list(HFDataset(name="parquet", data_files=[path], streaming=False).iter_raw())
    with pytest.raises(SourceError, match="matches no file"):
        HFDataset(name="parquet", data_files=[str(tmp_path / "none-*.parquet")])


# ---- open_source ------------------------------------------------------------------------------------


def test_open_source_dispatch(tmp_path):
    root = write_tree(tmp_path / "src")
    write_jsonl(tmp_path / "d.jsonl", [json.dumps({"content": "a"})])
    (tmp_path / "d.csv").write_text("content\nrow\n")
    (tmp_path / "d.txt").write_text("one\ntwo\n")
    tree = open_source("python-install", progress=False)
    assert isinstance(tree, SourceTree) and tree.roots == [str(r) for r in python_install_roots()]
    assert isinstance(open_source(str(root)), SourceTree)
    assert isinstance(open_source(f"{root / 'a'},{root}"), SourceTree)
    assert contents(open_source(str(tmp_path / "*.jsonl"))) == [(0, "a")]
    csv = open_source(str(tmp_path / "d.csv"))
    assert isinstance(csv, HFDataset) and (csv.name, csv.data_files) == ("csv", [str(tmp_path / "d.csv")])
    assert contents(open_source(str(tmp_path / "d.txt"))) == [(0, "one\ntwo\n")]  # one doc per file
    hub = open_source("owner/name", split="validation")
    assert isinstance(hub, HFDataset) and (hub.name, hub.data_files, hub.split) == (
        "owner/name",
        None,
        "validation",
    )


def test_open_source_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError, match=r"on_error='ignore'.*\('error', 'skip'\)"):
        open_source("owner/name", on_error="ignore")
    with pytest.raises(SourceError, match="mixes kinds"):
        open_source(f"{tmp_path},{tmp_path / 'd.jsonl'}")
    with pytest.raises(SourceError, match="not understood"):
        open_source("./not/a/thing")


# ---- filters ----------------------------------------------------------------------------------------


def doc(content: str) -> dict:
    return {"content": content, "path": "p.py", "size": len(content)}


def test_filter_counts_every_reason():
    pipeline = FilterPipeline(keywords=list(DEFAULT_KEYWORDS), quality=True, dedup=True, max_line_length=200)
    docs = {
        "empty": "   \n",
        "keyword": "import numpy as np\n",
        "line_length": "import pandas\n" + "x" * 201,
        "mean_line_length": "import pandas; z = '" + "z" * 170 + "'",  # one 191-char line
        "alnum": "import pandas\n# " + "-" * 40,  # 12 alphanumerics of 56 characters
        "autogenerated": "# Generated by protoc\nimport pandas\n",
        "kept": "import pandas as pd\ndf = pd.DataFrame()\n",
        "duplicate": "import pandas  as pd\n  df = pd.DataFrame()",
    }
    assert {reason: pipeline(doc(content)) for reason, content in docs.items()} == {
        r: r == "kept" for r in docs
    }
    assert pipeline.counts == {"seen": 8, "kept": 1} | {f"dropped_{r}": 1 for r in docs if r != "kept"}
    assert pipeline.summary() == (
        "kept 1 of 8 documents (12.50 %); dropped: empty 1, keyword 1, line_length 1, mean_line_length 1, "
        "alnum 1, autogenerated 1, duplicate 1"
    )


def test_keyword_filter_is_a_plain_substring_match():
    pipeline = FilterPipeline(keywords=["pandas", "sklearn"])
    kept = [
        pipeline(doc(c)) for c in ["import pandas", "from sklearn import svm", "pandasql", "import numpy"]
    ]
    assert kept == [True, True, True, False]  # "pandasql" matches, as in the course
    pipeline(doc("import os"))
    pipeline(doc(" \n"))
    assert pipeline.summary() == "kept 3 of 6 documents (50.00 %); dropped: keyword 2, empty 1"
    assert FilterPipeline(keywords=None)(doc("anything")) is True
    assert FilterPipeline().summary() == "kept 0 of 0 documents (0.00 %); dropped: none"


def test_dedup_ignores_whitespace_and_resets():
    pipeline = FilterPipeline(dedup=True)
    assert [pipeline(doc(c)) for c in ["a = 1\nb = 2", "a=1 b=2\n\n", "a = 1\nb = 3"]] == [True, False, True]
    pipeline.reset_dedup()
    assert pipeline(doc("a=1\tb=2")) is True
    assert pipeline.counts["dropped_duplicate"] == 1


def test_shard_of_is_stable_and_content_based():
    shards = [shard_of(doc(f"x = {i}"), 4) for i in range(64)]
    assert all(0 <= shard < 4 for shard in shards) and len(set(shards)) == 4
    assert shard_of(doc("x = 7"), 4) == shards[7]
    assert shard_of(doc("a = 1\nb = 2"), 7) == shard_of(doc("a=1  b=2\n"), 7)
    with pytest.raises(ValueError, match="num_shards=0"):
        shard_of(doc("x"), 0)


def test_sanitize_text_makes_lone_surrogates_encodable():
    from tokenizers import decoders, pre_tokenizers

    with pytest.raises(UnicodeEncodeError):
        "a\ud800b".encode("utf-8")  # what a lone surrogate does to a byte-level tokenizer's input
    text = sanitize_text("a\ud800b\x00c")
    assert text == "a\ufffdb\x00c"
    assert sanitize_text("plain ü text") == "plain ü text"
    assert text.encode("utf-8") == b"a\xef\xbf\xbdb\x00c"
    pieces = [piece for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]
    assert decoders.ByteLevel().decode(pieces) == text  # every byte reaches the tokenizer and comes back


def write_gz(path: Path, records: list[dict]) -> Path:
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def test_gzip_jsonl_reads_like_plain_jsonl(tmp_path):
    """The book's local data: a folder of ``*.json.gz`` files, one document per line; globs of either suffix."""
    records = [{"content": f"x = {i}\n", "path": f"f{i}.py"} for i in range(6)]
    write_gz(tmp_path / "file-000.json.gz", records[:4])
    write_gz(tmp_path / "file-001.jsonl.gz", records[4:])
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for spec in (
        str(tmp_path / "*.json*.gz"),
        f"{tmp_path / 'file-000.json.gz'},{tmp_path / 'file-001.jsonl.gz'}",
    ):
        source = open_source(spec)
        assert isinstance(source, JsonlFiles)
        docs = list(source.iter_raw())
        assert [d["content"] for _, d in docs] == [r["content"] for r in records]
        assert [i for i, _ in docs] == list(range(6))
    assert [i for i, _ in open_source(str(tmp_path / "*.gz")).iter_raw(start=3)] == [3, 4, 5]
    plain = [d for _, d in open_source(str(tmp_path / "plain.jsonl")).iter_raw()]
    assert [d["content"] for d in plain] == [d["content"] for _, d in docs]


def test_truncated_gzip_is_named_with_file_and_line_or_skipped_and_counted(tmp_path):
    records = [{"content": "y" * 200 + str(i)} for i in range(50)]
    whole = write_gz(tmp_path / "a.json.gz", records).read_bytes()
    (tmp_path / "a.json.gz").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    write_gz(tmp_path / "b.json.gz", records[:2])
    with pytest.raises(SourceError, match=r"a\.json\.gz:\d+: .*expected a complete gzip file"):
        list(open_source(str(tmp_path / "*.json.gz")).iter_raw())
    source = open_source(str(tmp_path / "*.json.gz"), on_error="skip")
    docs = [d["content"] for _, d in source.iter_raw()]
    assert source.skipped == {"bad_gzip": 1}
    assert docs[-2:] == [r["content"] for r in records[:2]]  # the next file is still read
    assert 0 < len(docs) - 2 < 50 and docs[: len(docs) - 2] == [
        r["content"] for r in records[: len(docs) - 2]
    ]
