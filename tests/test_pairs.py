"""Docstring/function pairs, on a small tree written here plus the real stdlib ``json`` package."""

import json
import shutil
from pathlib import Path

import pytest

from lmrecipes.data.pairs import SPLITS, FunctionPairSource, pair_stats, split_of_path
from lmrecipes.data.sources import SourceError

ALPHA = '''\
"""Module docstring: not a function, never a pair."""


def add(a, b):
    """Add two numbers and return their sum."""
    return a + b


def undocumented(x):
    return x


class Stack:
    """A last-in first-out stack (a class docstring)."""

    def push(self, item):
        """Push one item on top of the stack.

        The stack grows by one.
        """
        self.items.append(item)

    def short(self):
        """Tiny."""
        return 1
'''

BETA = '''\
async def fetch(url):
    """Fetch the url and return the body."""
    return await get(url)


def only_doc():
    """A body that holds only its docstring."""
'''

GAMMA = '''\
def outer():
    def inner():
        """Inner helper that returns three."""
        return 3

    return inner
'''

# Expected positives of the tree: path relative to the root -> (docstring, code without it).
EXPECTED = {
    "alpha.py::add": ("Add two numbers and return their sum.", "def add(a, b):\n    return a + b"),
    "alpha.py::Stack.push": (
        "Push one item on top of the stack.\n\nThe stack grows by one.",
        "def push(self, item):\n    self.items.append(item)",
    ),
    "beta.py::fetch": (
        "Fetch the url and return the body.",
        "async def fetch(url):\n    return await get(url)",
    ),
    "beta.py::only_doc": ("A body that holds only its docstring.", "def only_doc():\n    pass"),
    "sub/gamma.py::outer.inner": ("Inner helper that returns three.", "def inner():\n    return 3"),
}
for _i in range(6):  # more modules, so that every split of a three-way split holds a few functions
    EXPECTED[f"gen/mod{_i}.py::first{_i}"] = (
        f"First generated function number {_i}.",
        f"def first{_i}():\n    return {_i}",
    )
    EXPECTED[f"gen/mod{_i}.py::second{_i}"] = (
        f"Second generated function number {_i}.",
        f"def second{_i}(x):\n    return x * {_i}",
    )


def _write_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "gen").mkdir()
    (root / "alpha.py").write_text(ALPHA, encoding="utf-8")
    (root / "beta.py").write_text(BETA, encoding="utf-8")
    (root / "sub" / "gamma.py").write_text(GAMMA, encoding="utf-8")
    (root / "sub" / "nothing.py").write_text("x = 1\n", encoding="utf-8")
    (root / "broken.py").write_text(
        'def broken(:\n    """A docstring long enough here."""\n', encoding="utf-8"
    )
    (root / "latin1.py").write_bytes('def f():\n    """Café au lait, in Latin-1."""\n'.encode("latin-1"))
    for i in range(6):
        (root / "gen" / f"mod{i}.py").write_text(
            f'def first{i}():\n    """First generated function number {i}."""\n    return {i}\n\n\n'
            f'def second{i}(x):\n    """Second generated function number {i}."""\n    return x * {i}\n',
            encoding="utf-8",
        )
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return _write_tree(tmp_path / "tree")


def _records(source: FunctionPairSource, start: int = 0) -> list[dict]:
    return [record for _, record in source.iter_raw(start)]


def _all_train(root: Path, **kwargs) -> FunctionPairSource:
    return FunctionPairSource(roots=[root], validation=0.0, test=0.0, progress=False, **kwargs)


def _relative(root: Path, path: str) -> str:
    file, name = path.rsplit("::", 1)
    return f"{Path(file).relative_to(root).as_posix()}::{name}"


def test_positives_are_exact_docstring_code_pairs(tree):
    source = _all_train(tree)
    records = _records(source)
    positives = {_relative(tree, r["path"]): (r["content"], r["code"]) for r in records if r["label"] == 1}
    assert positives == EXPECTED
    for raw_index, record in source.iter_raw():
        assert record["idx"] == raw_index
        assert record["size"] == len(record["content"])
        if record["label"] == 1:
            assert record["code_path"] == record["path"]
    assert [r["idx"] for r in records] == list(range(len(records)))
    assert source.skipped == {"no_functions": 1, "syntax_error": 1, "not_utf8": 1}


def test_negatives_pair_a_docstring_with_another_files_code_and_balance_the_labels(tree):
    records = _records(_all_train(tree))
    assert [r["label"] for r in records] == [1, 0] * len(EXPECTED)  # each positive, then its negative
    code_of = {r["path"]: r["code"] for r in records if r["label"] == 1}
    for positive, negative in zip(records[::2], records[1::2]):
        assert negative["content"] == positive["content"] and negative["path"] == positive["path"]
        assert negative["code_path"] != negative["path"]
        assert negative["code"] == code_of[negative["code_path"]] != positive["code"]
        assert negative["code_path"].rsplit("::", 1)[0] != negative["path"].rsplit("::", 1)[0]


def test_deterministic_and_the_seed_changes_only_the_negatives(tree):
    first, again = _records(_all_train(tree)), _records(_all_train(tree))
    assert first == again
    other = _records(_all_train(tree, seed=1))
    assert [r for r in other if r["label"] == 1] == [r for r in first if r["label"] == 1]
    assert [r["code_path"] for r in other if r["label"] == 0] != [
        r["code_path"] for r in first if r["label"] == 0
    ]


def test_several_negatives_per_positive_are_distinct(tree):
    records = _records(_all_train(tree, negatives_per_positive=3))
    assert [r["label"] for r in records] == [1, 0, 0, 0] * len(EXPECTED)
    for i in range(0, len(records), 4):
        assert len({r["code_path"] for r in records[i : i + 4]}) == 4


def test_one_file_blocks_fall_back_to_the_same_file_or_drop_the_positive(tree):
    source = _all_train(tree, block_files=1)
    records = _records(source)
    negatives = [r for r in records if r["label"] == 0]
    assert all(r["code_path"].rsplit("::", 1)[0] == r["path"].rsplit("::", 1)[0] for r in negatives)
    # gamma.py has one function: no negative exists for it in its block, so its positive goes too.
    kept = {_relative(tree, r["path"]) for r in records}
    assert kept == set(EXPECTED) - {"sub/gamma.py::outer.inner"}
    assert len(negatives) == len(records) // 2
    assert source.skipped["no_negative"] == 1


def test_installed_and_vendored_copies_share_a_split_and_duplicates_are_kept_once(tree):
    shutil.copytree(tree / "gen", tree / "third" / "_vendor" / "gen")
    source = _all_train(tree)
    assert source.split_key(str(tree / "third" / "_vendor" / "gen" / "mod0.py")) == "gen/mod0.py"
    assert source.split_key(str(tree / "gen" / "mod0.py")) == "gen/mod0.py"
    assert source.split_key("/base/lib/python3.11/site-packages/pkg/m.py") == "pkg/m.py"
    assert source.split_key("/venv/lib/python3.11/site-packages/pip/_vendor/rich/box.py") == "rich/box.py"
    positives = [_relative(tree, r["path"]) for r in _records(source) if r["label"] == 1]
    assert len(positives) == len(EXPECTED)
    assert {p.replace("third/_vendor/", "") for p in positives} == set(EXPECTED)
    assert source.skipped["duplicate"] == 12


def test_split_of_path_partitions_files_and_functions(tree):
    source = _all_train(tree)
    relative = [source.split_key(f) for f in source.tree.files]
    assert all(split_of_path(p, validation=0.3, test=0.3) in SPLITS for p in relative)
    by_split = {}
    for split in SPLITS:
        source = FunctionPairSource(roots=[tree], split=split, validation=0.3, test=0.3, progress=False)
        records = _records(source)
        by_split[split] = {_relative(tree, r["path"]) for r in records if r["label"] == 1}
        codes = {_relative(tree, r["code_path"]) for r in records}
        assert codes <= by_split[split]  # negatives come from the same split
        files = {p.split("::")[0] for p in by_split[split]}
        assert all(split_of_path(f, validation=0.3, test=0.3) == split for f in files)
        assert by_split[split], f"{split} is empty; the test tree needs other file names"
    train, validation, test = (by_split[s] for s in SPLITS)
    assert not (train & validation or train & test or validation & test)
    assert train | validation | test == set(EXPECTED)


def test_split_of_path_fractions_and_bad_values():
    paths = [f"pkg{i // 10}/module{i}.py" for i in range(10_000)]
    counts = {s: sum(split_of_path(p) == s for p in paths) for s in SPLITS}
    assert abs(counts["validation"] - 1000) < 100 and abs(counts["test"] - 1000) < 100
    assert [split_of_path(p) for p in paths[:50]] == [split_of_path(p) for p in paths[:50]]
    assert {split_of_path(p, validation=1.0, test=0.0) for p in paths[:100]} == {"validation"}
    assert {split_of_path(p, validation=0.0, test=0.0) for p in paths[:100]} == {"train"}
    with pytest.raises(ValueError, match="sum to at most 1"):
        split_of_path("a.py", validation=0.6, test=0.5)
    with pytest.raises(ValueError, match="validation=-0.1"):
        split_of_path("a.py", validation=-0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "dev"}, "split='dev'"),
        ({"negatives_per_positive": 0}, "negatives_per_positive=0"),
        ({"max_files": 0}, "max_files=0"),
        ({"block_files": 0}, "block_files=0"),
        ({"on_error": "ignore"}, "on_error='ignore'"),
        ({"test": 1.5}, "test=1.5"),
    ],
)
def test_bad_arguments_raise(tree, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FunctionPairSource(roots=[tree], **kwargs)


def test_on_error_raise_names_the_bad_file(tree):
    with pytest.raises(SourceError, match=r"(broken|latin1)\.py"):
        _records(_all_train(tree, on_error="error"))


def test_iter_raw_from_start_is_the_tail(tree):
    source = _all_train(tree)
    full = list(source.iter_raw())
    assert len(full) > 8  # an empty source would pass every comparison below
    for start in (0, 1, 7, len(full) - 1, len(full), len(full) + 3):
        assert list(source.iter_raw(start)) == full[start:]


def test_max_files_caps_the_files_read(tree):
    source = _all_train(tree, max_files=3)
    records = _records(source)
    assert source.files_read == 3
    readable = [f for f in source.tree.files if not f.endswith("latin1.py")]  # in the tree's order
    assert {r["path"].rsplit("::", 1)[0] for r in records} <= set(readable[:3])
    assert records and records != _records(_all_train(tree))


def test_fingerprint_follows_files_and_settings(tree):
    base = _all_train(tree).fingerprint()
    assert _all_train(tree).fingerprint() == base
    changed = [
        _all_train(tree, seed=1),
        _all_train(tree, negatives_per_positive=2),
        _all_train(tree, max_code_chars=100),
        _all_train(tree, min_doc_chars=5),
        _all_train(tree, max_files=2),
        _all_train(tree, block_files=2),
        FunctionPairSource(roots=[tree], validation=0.0, test=0.0, split="test", progress=False),
        FunctionPairSource(roots=[tree], progress=False),
    ]
    prints = {source.fingerprint() for source in changed}
    assert len(prints) == len(changed) and base not in prints
    (tree / "beta.py").write_text(BETA + "\n# edited\n", encoding="utf-8")
    assert _all_train(tree).fingerprint() != base


def test_pair_stats_counts(tree):
    stats = pair_stats(_all_train(tree))
    n = len(EXPECTED)
    assert stats == {
        "records": 2 * n,
        "positives": n,
        "negatives": n,
        "files": 9,  # alpha, beta, gamma, six generated modules
        "files_read": 11,  # plus nothing.py and broken.py; latin1.py is not UTF-8, so never counts as read
        "skipped": {"no_functions": 1, "syntax_error": 1, "not_utf8": 1},
    }


def test_stdlib_json_package_holds_dumps_as_a_positive():
    root = Path(json.__file__).parent
    source = FunctionPairSource(roots=[root], validation=0.0, test=0.0, progress=False)
    records = _records(source)
    dumps = [r for r in records if r["label"] == 1 and r["path"] == f"{root / '__init__.py'}::dumps"]
    assert len(dumps) == 1
    assert dumps[0]["content"].startswith("Serialize ``obj`` to a JSON formatted ``str``.")
    assert dumps[0]["code"].startswith("def dumps(obj, *, skipkeys=False,")
    assert "Serialize" not in dumps[0]["code"]
    labels = [r["label"] for r in records]
    assert labels.count(1) == labels.count(0) > 5
    assert source.files_read == len(list(root.glob("*.py")))
