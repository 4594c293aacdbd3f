"""Docstring and comment extraction, on small sources written here plus the real stdlib ``json`` package."""

import ast
import io
import json
import textwrap
import tokenize
from pathlib import Path

import pytest

from lmrecipes.data.docstrings import (
    DocstringSource,
    _full_line_comments,
    docstring_corpus_stats,
    extract_functions,
    extract_texts,
)
from lmrecipes.data.sources import SourceError, SourceTree

MODULE = '''\
#!/usr/bin/env python
# -*- coding: utf-8 -*-
"""Module docstring that is long enough."""

import os  # a trailing comment is not a block

# First line of a comment block
# continues on a second line.
#
# A second paragraph after an empty comment line.

# noqa: E501
# type: ignore
# pylint: disable=invalid-name
# fmt: off
# x = compute(1, 2)
# if x:
# ----------

# short


class Greeter:
    """Greets people by name, politely.

        Indented details are cleaned.
    """

    def greet(self, name):
        """Return a greeting for the given name."""
        # Build the message from its parts here.
        def inner():
            """Nested helper docstring, indented."""
            return name

        text = "# not a comment, a string"
        return "hi " + inner() + text
'''

FUNCTIONS = '''\
import functools


def plain(a, b):
    """Add two numbers and return the sum."""
    total = a + b
    return total


class Box:
    """A box holding one thing."""

    @functools.cache
    def method(self):
        """Return the content of this box, cached.

        More details here.
        """  # a comment after the docstring goes with it
        return self.content

    async def fetch(self, url):
        """Fetch the url asynchronously, with retries."""
        return await self.client.get(url)

    def only_doc(self):
        """This body holds only its docstring."""

    def short(self):
        """Tiny."""
        return 1

    def undocumented(self):
        return 2


def outer():
    def inner():
        """Inner function documented at length."""
        return 3

    return inner


def one_liner(x): """Docstring on the def line, alone."""


def semicolon(x): """Docstring then more on the same line."""; return x
'''


def test_extract_texts_docstrings_and_comment_blocks_in_file_order():
    assert extract_texts(MODULE) == [
        "Module docstring that is long enough.",
        "First line of a comment block continues on a second line.",
        "A second paragraph after an empty comment line.",
        "Greets people by name, politely.\n\nIndented details are cleaned.",
        "Return a greeting for the given name.",
        "Build the message from its parts here.",
        "Nested helper docstring, indented.",
    ]


def test_extract_texts_min_chars_and_comments_off():
    texts = extract_texts(MODULE, min_chars=1)
    assert texts[3] == "short"  # kept once short texts are allowed; directives and code still dropped
    assert len(texts) == 8
    assert extract_texts(MODULE, comments=False) == [
        "Module docstring that is long enough.",
        "Greets people by name, politely.\n\nIndented details are cleaned.",
        "Return a greeting for the given name.",
        "Nested helper docstring, indented.",
    ]
    assert extract_texts(MODULE, min_chars=48) == [
        "First line of a comment block continues on a second line.",
        "Greets people by name, politely.\n\nIndented details are cleaned.",
    ]


@pytest.mark.parametrize(
    "line, is_code",
    [
        ("x = compute(1, 2)", True),
        ("if x:", True),
        ("else:", True),
        ("except ValueError:", True),
        ("return x", True),
        ("import os", True),
        ("print(value)", True),
        ("self.cache[key] = value", True),
        ("Note: this is slow", False),
        ("TODO", False),
        ("See https://example.com for details", False),
        ("Returns the value (or None).", False),
        ("Example:", False),
    ],
)
def test_commented_out_code_is_dropped_and_prose_kept(line, is_code):
    assert extract_texts(f"# {line}\nx = 1\n", min_chars=1) == ([] if is_code else [line])


def test_code_between_comments_splits_the_block():
    source = "# Prose before the code line.\n# value = 2\n# Prose after the code line.\n"
    assert extract_texts(source) == ["Prose before the code line.", "Prose after the code line."]


def test_unparsable_sources_give_nothing():
    assert extract_texts('"""A docstring long enough."""\ndef broken(:\n') == []
    assert extract_texts('"""A docstring long enough."""\nx = 1\0\n') == []
    assert extract_functions("def f(:\n") == []
    assert extract_functions('def f():\n    """Docstring long enough."""\n\0') == []


def test_crlf_gives_the_same_texts_and_plain_newline_code():
    crlf = FUNCTIONS.replace("\n", "\r\n")
    assert extract_texts(MODULE.replace("\n", "\r\n")) == extract_texts(MODULE)
    assert extract_functions(crlf) == extract_functions(FUNCTIONS)


def test_full_line_comments_match_tokenize():
    tricky = textwrap.dedent('''\
        # one
        s = """
        # inside a triple-quoted string
        \\""" # still inside
        """
        t = '# in a string' + "# too \\" # escaped quote"  # trailing
        u = rb'\\' # raw' ; v = f"{s!r}#"
        w = ("a"
             # inside brackets
             "b")  \\
            # after a continuation
        ''')
    real = [Path(json.__file__), Path(tokenize.__file__), Path(textwrap.__file__)]
    for source in [tricky, *(path.read_text(encoding="utf-8") for path in real)]:
        expected = [
            (tok.start[0], tok.string)
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT and not tok.line[: tok.start[1]].strip()
        ]
        assert [(lineno, text) for lineno, _, _, text in _full_line_comments(source)] == expected
    assert [text for *_, text in _full_line_comments(tricky)] == [
        "# one",
        "# inside brackets",
        "# after a continuation",
    ]


def test_extract_functions_names_docstrings_and_code():
    pairs = extract_functions(FUNCTIONS)
    assert [(p["name"], p["lineno"]) for p in pairs] == [
        ("plain", 4),
        ("Box.method", 14),
        ("Box.fetch", 21),
        ("Box.only_doc", 25),
        ("outer.inner", 37),
        ("one_liner", 44),
        ("semicolon", 47),
    ]
    code = {p["name"]: p["code"] for p in pairs}
    assert code == {
        "plain": "def plain(a, b):\n    total = a + b\n    return total",
        "Box.method": "def method(self):\n    return self.content",
        "Box.fetch": "async def fetch(self, url):\n    return await self.client.get(url)",
        "Box.only_doc": "def only_doc(self):\n    pass",
        "outer.inner": "def inner():\n    return 3",
        "one_liner": "def one_liner(x): pass",
        "semicolon": "def semicolon(x): return x",
    }
    assert pairs[1]["docstring"] == "Return the content of this box, cached.\n\nMore details here."
    assert pairs[2]["docstring"] == "Fetch the url asynchronously, with retries."
    for pair in pairs:
        ast.parse(textwrap.dedent(pair["code"]))
        assert '"""' not in pair["code"]


def test_extract_functions_limits():
    names = [p["name"] for p in extract_functions(FUNCTIONS, max_code_chars=28)]
    assert names == ["Box.only_doc", "outer.inner", "one_liner", "semicolon"]
    names = [p["name"] for p in extract_functions(FUNCTIONS, min_doc_chars=5)]
    assert "Box.short" in names and "Box.undocumented" not in names


def test_extract_functions_code_keeps_strings_left_of_the_def_and_byte_columns():
    source = textwrap.dedent('''\
        class K:
            def m(self):
                """Docstring long enough for the test."""
                s = """
        left
        """
                return s
        def café(x): """Ünïcode docstring, long enough."""; return x
        ''')
    pairs = extract_functions(source)
    # The string's column-0 line stops a dedent: the first line is unindented, the body keeps its columns.
    assert pairs[0]["code"] == 'def m(self):\n        s = """\nleft\n"""\n        return s'
    assert pairs[1]["code"] == "def café(x): return x"
    for pair in pairs:
        ast.parse(pair["code"])


def write_tree(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text('"""Module a has a docstring."""\n\n# And a comment block of prose.\nx = 1\n')
    (root / "broken.py").write_text('"""Never read: syntax error."""\ndef f(:\n')
    (root / "empty.py").write_text("x = 1  # trailing only\n")
    (root / "latin1.py").write_bytes(b"# caf\xe9\n")
    (root / "pkg" / "d.py").write_text('def f():\n    """Function f in the package."""\n')
    (root / "notes.txt").write_text("# not python, never listed\n")
    return root


def test_docstring_source_documents_skips_and_indices(tmp_path):
    root = write_tree(tmp_path)
    source = DocstringSource(roots=[root], progress=False)
    files = SourceTree(roots=[root], progress=False).files
    docs = list(source.iter_raw())
    assert [(index, Path(doc["path"]).name) for index, doc in docs] == sorted(
        (files.index(str(root / name)), Path(name).name) for name in ("a.py", "pkg/d.py")
    )
    by_name = {Path(doc["path"]).name: doc for _, doc in docs}
    assert by_name["a.py"] == {
        "content": "Module a has a docstring.\n\nAnd a comment block of prose.",
        "path": str(root / "a.py"),
        "split_key": "a.py",
        "size": 56,
        "n_texts": 2,
    }
    assert by_name["d.py"]["content"] == "Function f in the package."
    assert source.skipped == {"syntax_error": 1, "no_text": 1, "not_utf8": 1}

    later = [index for index, _ in docs][-1]
    assert [index for index, _ in source.iter_raw(later)] == [later]
    selected = list(source.iter_raw(select_path=lambda path: path.endswith("d.py")))
    assert [doc["path"] for _, doc in selected] == [str(root / "pkg" / "d.py")]


def test_docstring_source_fingerprint_and_settings(tmp_path):
    root = write_tree(tmp_path)
    base = DocstringSource(roots=[root], progress=False)
    assert base.fingerprint() == DocstringSource(roots=[root], progress=False).fingerprint()
    no_comments = DocstringSource(roots=[root], comments=False, progress=False)
    assert no_comments.fingerprint() != base.fingerprint()
    assert DocstringSource(roots=[root], min_chars=5, progress=False).fingerprint() != base.fingerprint()
    assert [doc["content"] for _, doc in no_comments.iter_raw(select_path=lambda p: p.endswith("a.py"))] == [
        "Module a has a docstring."
    ]


def test_docstring_source_on_error_raises(tmp_path):
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(SourceError, match="broken.py"):
        list(DocstringSource(roots=[tmp_path], on_error="error", progress=False).iter_raw())


def test_corpus_stats(tmp_path):
    source = DocstringSource(roots=[write_tree(tmp_path)], progress=False)
    stats = docstring_corpus_stats(source)
    assert stats == {
        "files": 2,
        "texts": 3,
        "chars": 56 + 26,
        "words": 11 + 5,
        "skipped": {"syntax_error": 1, "no_text": 1, "not_utf8": 1},
    }
    assert docstring_corpus_stats(DocstringSource(roots=[tmp_path], progress=False), limit=1)["files"] == 1


def test_real_stdlib_json_package():
    package = Path(json.__file__).parent
    source = DocstringSource(roots=[package], progress=False)
    docs = {Path(doc["path"]).name: doc for _, doc in source.iter_raw()}
    # scanner.py's only text, its docstring "JSON token scanner", is under 20 characters.
    assert set(docs) == {"__init__.py", "decoder.py", "encoder.py", "tool.py"}
    init = docs["__init__.py"]["content"]
    assert init.startswith("JSON (JavaScript Object Notation) <https://json.org> is a subset of\n")
    assert "Serialize ``obj`` to a JSON formatted ``str``." in init
    assert source.skipped == {"no_text": 1}
    pairs = extract_functions((package / "__init__.py").read_text(encoding="utf-8"))
    assert [p["name"] for p in pairs] == ["dump", "dumps", "load", "loads"]
    for pair in pairs:
        ast.parse(pair["code"])


def test_definitions_inside_blocks_are_found():
    source = textwrap.dedent('''\
        if True:
            def in_if():
                """Defined inside an if statement."""
        else:
            def in_else():
                """Defined inside an else branch."""
        try:
            pass
        except ImportError:
            def in_except():
                """Defined inside an except handler."""
        finally:
            def in_finally():
                """Defined inside a finally block."""
        match command:
            case "go":
                def in_case():
                    """Defined inside a match case."""
        with open(path) as handle:
            class InWith:
                """Defined inside a with statement."""
        ''')
    names = ["in_if", "in_else", "in_except", "in_finally", "in_case"]
    assert [p["name"] for p in extract_functions(source)] == names
    assert extract_texts(source)[-1] == "Defined inside a with statement."
    assert len(extract_texts(source)) == 6
