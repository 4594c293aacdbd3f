"""Natural-language text about code: docstrings and comments parsed out of Python source files.

The offline MLM corpus (issue 3) is the docstrings and comment blocks of the interpreter's own installation;
the pair-classification task (issue 4) pairs each function's docstring with its code. Both come from here:

    source = DocstringSource(roots=python_install_roots())  # one document per .py file
    pairs = extract_functions(Path("module.py").read_text())  # [{"name", "docstring", "code", "lineno"}]

Comments are found by a regex scanner over strings and comments rather than ``tokenize``: on a file that
``ast.parse`` accepts, a ``#`` outside a string always starts a comment, and the scanner reads the whole
installation several times faster than ``tokenize`` (which alone took twice as long as ``ast.parse``).
"""

from __future__ import annotations

import ast
import re
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from lmrecipes.data.sources import DocumentSource, SourceTree
from lmrecipes.data.splits import stable_hash

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
_BODY_FIELDS = ("body", "handlers", "orelse", "finalbody", "cases")  # statement lists, in source order

# Comments and string literals, in file order (unrolled loops: no per-character alternation).
_SCAN = re.compile(
    r"""
    (?P<comment>\#[^\r\n]*)
    | \"\"\"[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*\"\"\"
    | '''[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''
    | "[^"\\\r\n]*(?:\\(?:\r\n|.)[^"\\\r\n]*)*"
    | '[^'\\\r\n]*(?:\\(?:\r\n|.)[^'\\\r\n]*)*'
    """,
    re.VERBOSE | re.DOTALL,
)
_ONE_LINE_BREAK = re.compile(r"[ \t\f]*(?:\r\n|\r|\n)[ \t\f]*")
# Tool directives and file headers: never prose.
_DIRECTIVE = re.compile(
    r"(?:noqa|type:|pragma|pylint:|fmt:|isort:|mypy:|flake8|ruff:|pyright:|nosec|-\*-|vim?:|coding[:=])",
    re.IGNORECASE,
)
# A comment line can only be code if it has one of these; the rest is prose without trying to parse it.
_CODE_HINT = re.compile(
    r"[=()\[\]{}:]|^(?:import|from|return|raise|del|pass|break|continue|yield|assert|global|nonlocal)\b"
)
_NEEDS_IF = ("else", "elif")
_NEEDS_TRY = ("except", "finally")


def _parse(source: str) -> ast.Module | None:
    """The module's AST, or None when it is not Python this interpreter reads (syntax, null bytes, depth)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarnings (invalid escapes, ...) from third-party code
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError, RecursionError):
            return None


def _definitions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """Every class and function as ``(dotted name, node)`` in file order; nested ones are ``outer.inner``."""
    # Only statement lists are walked (a def is always a statement), not the far larger expression trees.
    for field in _BODY_FIELDS:
        for child in getattr(node, field, ()):
            if isinstance(child, _DEFS):
                name = prefix + child.name
                yield name, child
                yield from _definitions(child, name + ".")
            else:
                yield from _definitions(child, prefix)


def _looks_like_code(text: str) -> bool:
    """Commented-out code: the line parses as Python and is not a bare word or a ``Label: prose`` line.

    Lines ending in ':' are tried as block headers (``if x:``, ``else:``). Multi-line code fragments whose
    lines do not parse alone (``foo(a,``) stay as prose: a cheap heuristic, not a classifier.
    """
    if not _CODE_HINT.search(text):
        return False
    if text.endswith(":"):
        first = text.split(maxsplit=1)[0].rstrip(":")
        prefix = "if 1: pass\n" if first in _NEEDS_IF else "try: pass\n" if first in _NEEDS_TRY else ""
        text = f"{prefix}{text} pass"
    tree = _parse(text)
    if tree is None or not tree.body:
        return False
    last = tree.body[-1]
    if isinstance(last, ast.AnnAssign) and last.value is None:
        return False  # "Note: this is slow" parses as an annotation
    return not (isinstance(last, ast.Expr) and isinstance(last.value, (ast.Name, ast.Constant)))


def _comment_line(text: str, lineno: int) -> str | None:
    """The prose of one full-line comment, or None where it ends a block (directive, code, rule, blank)."""
    if lineno == 1 and text.startswith("#!"):
        return None
    body = text.lstrip("#").strip()
    if not any(ch.isalnum() for ch in body) or _DIRECTIVE.match(body) or _looks_like_code(body):
        return None
    return body


def _full_line_comments(source: str) -> Iterator[tuple[int, int, int, str]]:
    """``(line number, start of its line, end, text)`` of each comment that is alone on its line."""
    lineno, pos, has_cr = 1, 0, "\r" in source
    for match in _SCAN.finditer(source):
        if match.lastgroup != "comment":
            continue  # a string literal: a '#' inside it is no comment
        begin = match.start()
        lineno += source.count("\n", pos, begin)
        pos = begin
        line_start = source.rfind("\n", 0, begin) + 1
        if has_cr:  # bounded search: an unbounded rfind of a missing "\r" rescans the file per comment
            line_start = source.rfind("\r", line_start, begin) + 1 or line_start
        if not source[line_start:begin].strip(" \t\f"):  # else a trailing comment after code
            yield lineno, line_start, match.end(), match.group()


def _comment_blocks(source: str) -> list[tuple[int, str]]:
    """``(first line, paragraph)`` of each run of consecutive full-line comments, '#' and spaces stripped."""
    blocks: list[tuple[int, str]] = []
    current: list[str] = []
    first_line, prev_end = 0, 0
    for lineno, line_start, end, text in _full_line_comments(source):
        body = _comment_line(text, lineno)
        adjacent = _ONE_LINE_BREAK.fullmatch(source, prev_end, line_start) is not None
        if current and (body is None or not adjacent):
            blocks.append((first_line, " ".join(current)))
            current = []
        if body is not None:
            first_line = first_line if current else lineno
            current.append(body)
        prev_end = end
    if current:
        blocks.append((first_line, " ".join(current)))
    return blocks


def _texts(tree: ast.Module, source: str, *, min_chars: int, comments: bool) -> list[str]:
    found: list[tuple[int, str]] = []
    for node in (tree, *(node for _, node in _definitions(tree))):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            found.append((node.body[0].lineno, doc))
    if comments:
        found.extend(_comment_blocks(source))
    found.sort(key=lambda item: item[0])  # stable: docstrings and comments never share a line
    return [text for _, text in found if len(text) >= min_chars]


def extract_texts(source: str, *, min_chars: int = 20, comments: bool = True) -> list[str]:
    """Docstrings (module, class, function; cleaned) and full-line comment blocks of one file, in file order.

    A comment block is a run of consecutive full-line comments joined into one paragraph; a blank line, a
    directive (shebang, encoding, noqa, type:, pragma, pylint, fmt, ...), a line of commented-out code (see
    ``_looks_like_code``) or a comment with no letters or digits ends a block and is dropped. Texts shorter
    than ``min_chars`` are dropped. A file that does not parse gives ``[]``.
    """
    tree = _parse(source)
    return [] if tree is None else _texts(tree, source, min_chars=min_chars, comments=comments)


def _lines(data: bytes) -> list[bytes]:
    """Lines with their ends, split where ``ast`` counts lines (\\r\\n, \\r, \\n; not \\f or \\v)."""
    return re.split(rb"(?<=\n)|(?<=\r)(?!\n)", data)


def _span(lines: list[bytes], start: tuple[int, int], end: tuple[int, int]) -> str:
    """Text between two ``(lineno, byte column)`` positions of ``ast`` (1-based lines, UTF-8 columns)."""
    (l0, c0), (l1, c1) = start, end
    if l0 == l1:
        return lines[l0 - 1][c0:c1].decode("utf-8", "surrogatepass")
    middle = b"".join(lines[l0 : l1 - 1])
    return (lines[l0 - 1][c0:] + middle + lines[l1 - 1][:c1]).decode("utf-8", "surrogatepass")


def _code_without_docstring(lines: list[bytes], node: ast.AST) -> str:
    """The def from its ``def`` line (decorators left out) to its end, with the docstring statement cut out."""
    doc = node.body[0]
    head = _span(lines, (node.lineno, node.col_offset), (doc.lineno, doc.col_offset))
    if len(node.body) == 1:
        code = head + "pass"
    else:
        after_doc = lines[doc.end_lineno - 1][doc.end_col_offset :]
        skip = re.match(rb"[ \t]*;?[ \t]*", after_doc).end()  # '"""doc"""; rest' keeps 'rest'
        tail = _span(
            lines, (doc.end_lineno, doc.end_col_offset + skip), (node.end_lineno, node.end_col_offset)
        )
        cut = head.rfind("\n") + 1
        first_tail_line, _, rest = tail.partition("\n")
        if not head[cut:].strip() and (not first_tail_line.strip() or first_tail_line.lstrip()[:1] == "#"):
            head, tail = head[:cut], rest  # the docstring had its own line(s): drop them, leave no blank line
        code = head + tail
    # Re-indent the first line as in the file, then dedent the whole; a string with lines further left than
    # the def keeps dedent from working, and the unindented-first-line form still parses.
    indent = lines[node.lineno - 1][: node.col_offset].decode("utf-8", "surrogatepass")
    dedented = textwrap.dedent((indent if not indent.strip() else "") + code)
    return code if dedented[:1] in (" ", "\t") else dedented


def extract_functions(source: str, *, min_doc_chars: int = 20, max_code_chars: int = 4000) -> list[dict]:
    """Every def/async def (methods and nested functions too) with a docstring, as a (docstring, code) pair.

    Each item is ``{"name": "Class.method", "docstring": cleaned docstring, "code": the function's source
    without its docstring statement (decorators left out; a body that was only the docstring becomes
    ``pass``), "lineno": line of the def}``. Functions with a docstring shorter than ``min_doc_chars`` or code
    longer than ``max_code_chars`` are skipped. A file that does not parse gives ``[]``.
    """
    tree = _parse(source)
    if tree is None:
        return []
    lines: list[bytes] | None = None
    pairs = []
    for name, node in _definitions(tree):
        if not isinstance(node, _FUNCS):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc is None or len(doc) < min_doc_chars:
            continue
        lines = lines if lines is not None else _lines(source.encode("utf-8", "surrogatepass"))
        code = _code_without_docstring(lines, node).replace("\r\n", "\n").replace("\r", "\n")
        if len(code) <= max_code_chars:
            pairs.append({"name": name, "docstring": doc, "code": code, "lineno": node.lineno})
    return pairs


class DocstringSource(DocumentSource):
    """One document per Python file under ``roots``: its docstrings and comment blocks joined by blank lines.

    Columns: ``content``, ``path`` (the .py file, so a split by path keeps a file's texts on one side),
    ``size`` (bytes of content) and ``n_texts``. Raw indices are those of the underlying ``SourceTree``; files
    that do not parse (``skipped["syntax_error"]``) or hold no text (``skipped["no_text"]``) keep their index.
    """

    def __init__(
        self,
        *,
        roots: list[str | Path],
        on_error: str = "skip",
        comments: bool = True,
        min_chars: int = 20,
        progress: bool = True,
    ) -> None:
        """``comments``: also keep comment blocks; ``min_chars``: drop shorter texts; ``on_error``: skip/error."""
        super().__init__(on_error=on_error)
        self.tree = SourceTree(roots=roots, pattern="*.py", on_error=on_error, progress=progress)
        self.skipped = self.tree.skipped  # one set of counts: unreadable files and unparsable ones together
        self.comments = comments
        self.min_chars = min_chars

    def fingerprint(self) -> str:
        """Hash of the tree's files (paths, sizes, mtimes) and the extraction settings."""
        settings = ["docstrings-v1", self.tree.fingerprint(), self.comments, self.min_chars]
        return stable_hash(settings)

    def iter_raw(
        self, start: int = 0, *, select_path: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[int, dict]]:
        """Yield ``(raw_index, document)`` from raw index ``start``; ``select_path`` filters before reading."""
        for index, file in self.tree.iter_raw(start, select_path=select_path):
            tree = _parse(file["content"])
            if tree is None:
                self._bad_record(
                    f"{file['path']}: not valid Python; expected a parsable file", reason="syntax_error"
                )
                continue
            texts = _texts(tree, file["content"], min_chars=self.min_chars, comments=self.comments)
            if not texts:
                self._skip("no_text")
                continue
            content = "\n\n".join(texts)
            doc = {
                "content": content,
                "path": file["path"],
                "split_key": file["split_key"],
                "size": len(content.encode()),
                "n_texts": len(texts),
            }
            yield index, doc


def docstring_corpus_stats(source: DocstringSource, limit: int | None = None) -> dict:
    """Counts over the first ``limit`` documents (all by default): files, texts, chars, words, skipped."""
    stats = {"files": 0, "texts": 0, "chars": 0, "words": 0}
    for _, doc in source.iter_raw():
        stats["files"] += 1
        stats["texts"] += doc["n_texts"]
        stats["chars"] += len(doc["content"])
        stats["words"] += len(doc["content"].split())
        if limit is not None and stats["files"] >= limit:
            break
    return {**stats, "skipped": dict(source.skipped)}
