"""Docstring/function pairs: the offline sentence-pair task of the classification recipe (issue 4).

Does this docstring describe this function? Positives pair a function's docstring with its own code (docstring
cut out); negatives pair it with the code of another function of the same split, drawn from a seeded RNG.
Files are split by a hash of their path, so every function of one file (and of its installed or vendored
copies) lands in one split:

    source = FunctionPairSource(roots=python_install_roots(), split="validation")
    for raw_index, record in source.iter_raw():  # {"content", "code", "label", "path", "code_path", "size", "idx"}
        ...
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from lmrecipes.data.docstrings import _parse, extract_functions
from lmrecipes.data.sources import DocumentSource, SourceTree
from lmrecipes.data.splits import hash64, stable_hash

SPLITS = ("train", "validation", "test")
_VERSION = "function-pairs-v1"  # bump when the records for the same files and settings change
_INSTALL_DIRS = ("site-packages", "dist-packages", "_vendor")  # a split key starts below the last one
_DRAWS_PER_NEGATIVE = 8  # random draws before falling back to a scan of the whole block


def _check_fractions(validation: float, test: float) -> None:
    if not (0 <= validation <= 1 and 0 <= test <= 1 and validation + test <= 1):
        raise ValueError(
            f"validation={validation!r}, test={test!r}: expected fractions in [0, 1] that sum to at most 1"
        )


def split_of_path(path: str, *, validation: float = 0.1, test: float = 0.1) -> str:
    """'train', 'validation' or 'test' for a file, from a blake2b hash of its path (the same on every run)."""
    _check_fractions(validation, test)
    position = hash64(path) / 2**64  # uniform in [0, 1)
    if position < validation:
        return "validation"
    if position < validation + test:
        return "test"
    return "train"


class _Function(NamedTuple):
    path: str  # "<file>::<qualified name>"
    file: str
    docstring: str
    code: str


class FunctionPairSource(DocumentSource):
    """Docstring/function pairs from Python files: does this docstring describe this function?

    Records: ``content`` (the docstring, text a), ``code`` (a function's source without its docstring, text
    b), ``label`` (1: its own function, 0: another one), ``path`` (``<file>::<qualified name>`` of the
    docstring's function), ``code_path`` (the same for the code), ``size`` (characters of ``content``) and
    ``idx`` (the raw index). Files of the split are read in the tree's order, in blocks of ``block_files``;
    negatives come from the same block, from another file where the block has one, and never share the
    docstring or the code of the positive. Each positive is followed by its negatives. A (docstring, code)
    pair seen before in the split (vendored copies of a module) is skipped, as is a function for which no
    negative can be found (``skipped["no_negative"]``), so the labels keep their exact ratio.
    """

    def __init__(
        self,
        *,
        roots: list[str | Path],
        split: str = "train",
        validation: float = 0.1,
        test: float = 0.1,
        negatives_per_positive: int = 1,
        seed: int = 0,
        min_doc_chars: int = 20,
        max_code_chars: int = 1500,
        max_files: int | None = None,
        block_files: int = 200,
        on_error: str = "skip",
        progress: bool = True,
    ) -> None:
        """Nothing is read until the first iteration.

        ``roots``: directories searched for ``*.py``; ``split``: one of SPLITS; ``validation``/``test``:
        fractions of files in those splits; ``negatives_per_positive``: negatives after each positive;
        ``seed``: picks the negatives; ``min_doc_chars``/``max_code_chars``: skip short docstrings and long
        functions; ``max_files``: stop after reading this many files of the split; ``block_files``: files whose
        functions are held in memory together (and mixed into negatives); ``on_error``: skip or raise on
        unreadable and unparsable files; ``progress``: show progress bars.
        """
        super().__init__(on_error=on_error)
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not supported; expected one of {SPLITS}")
        _check_fractions(validation, test)
        if negatives_per_positive < 1:
            raise ValueError(f"negatives_per_positive={negatives_per_positive!r}; expected an integer >= 1")
        if max_files is not None and max_files < 1:
            raise ValueError(f"max_files={max_files!r}; expected None or an integer >= 1")
        if block_files < 1:
            raise ValueError(f"block_files={block_files!r}; expected an integer >= 1")
        self.tree = SourceTree(roots=roots, pattern="*.py", on_error=on_error, progress=progress)
        self.skipped = self.tree.skipped  # one set of counts for unreadable files and everything after
        self.split = split
        self.validation = validation
        self.test = test
        self.negatives_per_positive = negatives_per_positive
        self.seed = seed
        self.min_doc_chars = min_doc_chars
        self.max_code_chars = max_code_chars
        self.max_files = max_files
        self.block_files = block_files
        self.progress = progress
        self.files_read = 0  # files of the split read by the latest pass

    def fingerprint(self) -> str:
        """Hash of the tree's files (paths, sizes, mtimes) and every setting that changes the records."""
        settings = [
            _VERSION,
            self.tree.fingerprint(),
            self.split,
            self.validation,
            self.test,
            self.negatives_per_positive,
            self.seed,
            self.min_doc_chars,
            self.max_code_chars,
            self.max_files,
            self.block_files,
        ]
        return stable_hash(settings)

    def split_key(self, path: str) -> str:
        """What the split of the file at ``path`` is decided on: its path below the last install directory
        (``site-packages``, ``dist-packages``, ``_vendor``) or else below its root, in POSIX form.

        The same module installed twice (a venv over a base interpreter whose site-packages lies inside its
        stdlib root) or vendored by two packages then lands in one split instead of leaking across splits.
        """
        parts = Path(path).parts
        marks = [i for i, part in enumerate(parts) if part in _INSTALL_DIRS]
        if marks:
            return "/".join(parts[marks[-1] + 1 :])
        for root in self.tree.roots:
            if path.startswith(root.rstrip(os.sep) + os.sep):
                return Path(os.path.relpath(path, root)).as_posix()
        return Path(path).as_posix()

    def in_split(self, path: str) -> bool:
        """Whether the file at ``path`` belongs to this source's split (decided before reading it)."""
        return split_of_path(self.split_key(path), validation=self.validation, test=self.test) == self.split

    def iter_raw(self, start: int = 0) -> Iterator[tuple[int, dict]]:
        """Yield ``(raw_index, record)`` from ``start``; earlier records are recomputed, not yielded."""
        self.skipped.clear()  # counts describe the latest pass, not the sum of all passes
        index = 0
        for block_number, block in enumerate(self._blocks()):
            for record in self._block_records(block, block_number):
                if index >= start:
                    yield index, {**record, "idx": index}
                index += 1

    def _blocks(self) -> Iterator[list[_Function]]:
        """Documented functions of the split's files, in file order, grouped ``block_files`` files at a time."""
        seen: set[bytes] = set()  # 16-byte digests: bounded memory even over the whole installation
        block: list[_Function] = []
        files_in_block = 0
        self.files_read = 0
        bar = tqdm(desc=f"function pairs ({self.split})", unit=" files", disable=not self.progress)
        with bar:
            for _, doc in self.tree.iter_raw(select_path=self.in_split):
                self.files_read += 1
                bar.update(1)
                block.extend(self._functions(doc, seen))
                files_in_block += 1
                if files_in_block == self.block_files:
                    yield block
                    block, files_in_block = [], 0
                if self.max_files is not None and self.files_read >= self.max_files:
                    break
        if block:
            yield block

    def _functions(self, doc: dict, seen: set[bytes]) -> list[_Function]:
        file = doc["path"]
        found = extract_functions(
            doc["content"], min_doc_chars=self.min_doc_chars, max_code_chars=self.max_code_chars
        )
        if not found:
            # Only files without pairs are parsed a second time, to tell a syntax error from no functions.
            if _parse(doc["content"]) is None:
                self._bad_record(f"{file}: not valid Python; expected a parsable file", reason="syntax_error")
            else:
                self._skip("no_functions")
            return []
        functions = []
        for item in found:
            key = hashlib.blake2b(f"{item['docstring']}\0{item['code']}".encode(), digest_size=16).digest()
            if key in seen:
                self._skip("duplicate")
                continue
            seen.add(key)
            functions.append(_Function(f"{file}::{item['name']}", file, item["docstring"], item["code"]))
        return functions

    def _block_records(self, block: list[_Function], block_number: int) -> Iterator[dict]:
        rng = random.Random(f"{_VERSION}:{self.seed}:{block_number}")  # str seeds ignore PYTHONHASHSEED
        for i, function in enumerate(block):
            negatives = self._negatives(block, i, rng)
            if len(negatives) < self.negatives_per_positive:
                self._skip("no_negative")  # dropping the positive keeps the label ratio exact
                continue
            yield _record(function, function, label=1)
            for j in negatives:
                yield _record(function, block[j], label=0)

    def _negatives(self, block: list[_Function], i: int, rng: random.Random) -> list[int]:
        """Indices of other functions whose code goes with ``block[i]``'s docstring as a negative."""
        me, wanted = block[i], self.negatives_per_positive

        def fits(j: int) -> bool:  # same docstring or same code would make a true pair
            return block[j].docstring != me.docstring and block[j].code != me.code

        chosen: list[int] = []
        for _ in range(_DRAWS_PER_NEGATIVE * wanted):  # the usual case: O(1) per negative
            j = rng.randrange(len(block))
            if block[j].file != me.file and j not in chosen and fits(j):
                chosen.append(j)
                if len(chosen) == wanted:
                    return chosen
        # Tiny blocks or one-file blocks: scan, preferring other files, then other functions of the same file.
        rest = [j for j in range(len(block)) if j not in chosen and fits(j)]
        for pool in (
            [j for j in rest if block[j].file != me.file],
            [j for j in rest if block[j].file == me.file],
        ):
            need = wanted - len(chosen)
            chosen.extend(rng.sample(pool, min(need, len(pool))))
        return chosen


def _record(doc_of: _Function, code_of: _Function, *, label: int) -> dict:
    return {
        "content": doc_of.docstring,
        "code": code_of.code,
        "label": label,
        "path": doc_of.path,
        "code_path": code_of.path,
        "size": len(doc_of.docstring),
    }


def pair_stats(source: FunctionPairSource) -> dict:
    """Counts over one full pass: records, positives, negatives, files with records, files read, skipped."""
    stats = {"records": 0, "positives": 0, "negatives": 0}
    files: set[str] = set()
    for _, record in source.iter_raw():
        stats["records"] += 1
        stats["positives" if record["label"] == 1 else "negatives"] += 1
        files.add(record["path"].rsplit("::", 1)[0])
    return {**stats, "files": len(files), "files_read": source.files_read, "skipped": dict(source.skipped)}
