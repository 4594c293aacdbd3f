"""Train a byte-level BPE tokenizer for code (course ch.7 §6, book ch.10) and measure how well it fits.

Run it as ``lmrecipes tokenizer --source python-install --out tok/`` or call the functions directly.
"""

from __future__ import annotations

import collections
import json
import keyword
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmrecipes.data.sources import sanitize_text

EOS_TOKEN = "<|endoftext|>"
DEFAULT_KEYTOKENS = ("plt", "pd", "sk", "fit", "predict")
_MIN_VOCAB = 256 + 1 + 1  # every byte, EOS, and at least one merge


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 32768,
    base: str | None = None,
    min_frequency: int = 2,
    model_max_length: int = 1024,
    length: int | None = None,
    progress: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer from scratch, or retrain `base`'s pipeline on `texts`."""
    if vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need >= {_MIN_VOCAB} (256 bytes, {EOS_TOKEN}, 1 merge)"
        )
    clean = (sanitize_text(text) for text in texts)
    if base is not None:
        old = AutoTokenizer.from_pretrained(base)
        return old.train_new_from_iterator(
            clean, vocab_size=vocab_size, length=length, min_frequency=min_frequency, show_progress=progress
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(clean, trainer=trainer, length=length)
    # GPT-2 convention: one <|endoftext|> serves as bos, eos and unk; no pad token.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return tokenizer.encode(text, add_special_tokens=False)


def resolve_keytoken_ids(
    tokenizer: PreTrainedTokenizerBase, keytokens: Sequence[str] = DEFAULT_KEYTOKENS
) -> list[int]:
    """Ids of each key token, bare then space-prefixed; every one must be a single token."""
    variants = [*keytokens, *(f" {k}" for k in keytokens)]
    ids, bad = [], []
    for text in variants:
        encoded = _encode(tokenizer, text)
        if len(encoded) == 1:
            ids.append(encoded[0])
        else:
            bad.append(f"{text!r} -> {[tokenizer.decode([i]) for i in encoded]}")
    if bad:
        raise ValueError(
            "key tokens must be single tokens, but these split: "
            + "; ".join(bad)
            + ". Train the tokenizer on a corpus that contains them, or choose other key tokens."
        )
    return list(dict.fromkeys(ids))


def _count_tokens(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> int:
    """Total tokens over `texts`; verbose=False because long files trip the model_max_length warning."""
    if not texts:
        return 0
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return sum(len(row) for row in ids)


def _readable(tokenizer: PreTrainedTokenizerBase, tokens: Iterable[str]) -> list[str]:
    """Vocabulary entries as text (byte-level entries such as 'Ġdef' become ' def')."""
    return [tokenizer.convert_tokens_to_string([tok]) for tok in tokens]


def tokenizer_report(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    base: PreTrainedTokenizerBase | None = None,
    keytokens: Sequence[str] = DEFAULT_KEYTOKENS,
    top: int = 10,
) -> dict[str, Any]:
    """Measure `tokenizer` on held-out `texts` (and against `base`) as a JSON-able dict."""
    texts = [sanitize_text(text) for text in texts]
    num_chars = sum(len(text) for text in texts)
    num_tokens = _count_tokens(tokenizer, texts)
    report: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "num_texts": len(texts),
        "num_chars": num_chars,
        "num_tokens": num_tokens,
        "chars_per_token": num_chars / num_tokens if num_tokens else None,
    }
    if base is not None:
        base_tokens = _count_tokens(base, texts)
        report["base_chars_per_token"] = num_chars / base_tokens if base_tokens else None
        report["relative_length"] = num_tokens / base_tokens if base_tokens else None
    # The book checks keywords in the vocabulary; in code they follow a space, so test " def" etc.
    not_single = [kw for kw in keyword.kwlist if len(_encode(tokenizer, f" {kw}")) != 1]
    report["python_keywords_single_token"] = 1 - len(not_single) / len(keyword.kwlist)
    report["python_keywords_not_single"] = not_single
    special = set(tokenizer.all_special_tokens)
    vocab = sorted((i, tok) for tok, i in tokenizer.get_vocab().items() if tok not in special)
    # Byte-level entries hold one character per byte, so raw length is byte length.
    longest = sorted(vocab, key=lambda item: (-len(item[1]), item[0]))[:top]
    report["longest_tokens"] = _readable(tokenizer, (tok for _, tok in longest))
    report["rarest_tokens"] = _readable(tokenizer, (tok for _, tok in reversed(vocab[-top:])))
    report["keytokens"] = {
        text: len(_encode(tokenizer, text)) == 1 for k in keytokens for text in (k, f" {k}")
    }
    return report


def _fmt(value: Any) -> str:
    """A number or list as a short string."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return ", ".join(repr(v) for v in value) or "-"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """Human-readable, multi-line text of a `tokenizer_report` dict."""
    labels = {
        "vocab_size": "vocabulary size",
        "train_docs": "documents trained on",
        "train_chars": "characters trained on",
        "num_texts": "held-out documents",
        "num_chars": "held-out characters",
        "num_tokens": "held-out tokens",
        "chars_per_token": "characters per token",
        "base_chars_per_token": "base characters per token",
        "relative_length": "tokens vs base",
        "python_keywords_single_token": "python keywords single-token",
        "python_keywords_not_single": "python keywords split",
        "longest_tokens": "longest tokens",
        "rarest_tokens": "last-learned tokens",
    }
    lines = [f"{label:>30}: {_fmt(report[key])}" for key, label in labels.items() if key in report]
    keys = report.get("keytokens", {})
    lines.append(
        f"{'key tokens single':>30}: " + ", ".join(f"{k!r}={'yes' if v else 'NO'}" for k, v in keys.items())
    )
    return "\n".join(lines)


def _delayed(
    docs: Iterator[str], held: collections.deque[str], counts: collections.Counter[str]
) -> Iterator[str]:
    """Yield `docs` except the last `held.maxlen`, which stay in `held` as the report's held-out set."""
    for doc in docs:
        if len(held) == held.maxlen:
            out = held.popleft()
            counts["train_docs"] += 1
            counts["train_chars"] += len(out)
            yield out
        held.append(doc)


class TooFewDocuments(ValueError):
    """Every document the filters kept went to the held-out report set; ``kept`` says how many there were."""

    def __init__(self, message: str, *, kept: int):
        super().__init__(message)
        self.kept = kept


def tokenizer_command(
    *,
    source: str,
    out: str,
    vocab_size: int = 32768,
    base: str | None = None,
    keywords: list[str] | None = None,
    max_docs: int | None = 200_000,
    max_chars: int | None = None,
    report_docs: int = 200,
    min_frequency: int = 2,
    text_column: str = "content",
    pattern: str = "*.py",
    on_error: str = "error",
    progress: bool = True,
) -> dict[str, Any]:
    """Train a byte-level BPE tokenizer on a source, save it as a Hugging Face folder, and report on held-out files.

    Args:
        source: ``python-install``, a directory, local files (jsonl/json/csv/parquet/txt, globs) or a Hub dataset id.
        out: folder to write (tokenizer files and ``tokenizer_report.json``).
        vocab_size: vocabulary size (book ch.10: 32,768).
        base: retrain this tokenizer's pipeline with ``train_new_from_iterator`` and compare to it (book ch.10:
            ``openai-community/gpt2``, needs the Hub); None trains the same GPT-2 byte-level BPE pipeline (256-byte
            base alphabet, GPT-2's pre-tokenizer) from scratch, offline.
        keywords: keep only documents containing one of these strings (the course's filter).
        max_docs: stop after this many kept documents (book ch.10: length = 200,000).
        max_chars: stop after this many characters of kept text (None: no limit).
        report_docs: last kept documents held out from training to measure the report on.
        min_frequency: minimum pair frequency for a merge.
        text_column: column holding the text.
        pattern: file glob for directory sources.
        on_error: ``error`` or ``skip`` unreadable/non-UTF-8 files and bad records.
        progress: progress bars.
    """
    from lmrecipes.data.filters import FilterPipeline  # the data stack is heavy; load on use
    from lmrecipes.data.sources import open_source
    from lmrecipes.hub import require_hub

    require_hub({"source": source, "base": base})

    if report_docs < 1:
        raise ValueError(
            f"report_docs={report_docs} must be at least 1 (the report needs held-out documents)"
        )
    docs = open_source(source, text_column=text_column, pattern=pattern, on_error=on_error, progress=progress)
    keep = FilterPipeline(keywords=keywords)  # also drops empty files, which would waste held-out slots

    def kept() -> Iterator[str]:
        n_docs = n_chars = 0
        for _, doc in docs.iter_raw():
            if (max_docs is not None and n_docs >= max_docs) or (
                max_chars is not None and n_chars >= max_chars
            ):
                return
            if keep(doc):
                n_docs += 1
                n_chars += len(doc["content"])
                yield doc["content"]

    held: collections.deque[str] = collections.deque(maxlen=report_docs)
    counts: collections.Counter[str] = collections.Counter()
    tokenizer = train_bpe_tokenizer(
        _delayed(kept(), held, counts),
        vocab_size=vocab_size,
        base=base,
        min_frequency=min_frequency,
        progress=progress,
    )
    if keep.counts["kept"] == 0:
        raise ValueError(
            f"the filters kept no documents of {source!r} to train a tokenizer on: {keep.summary()}"
        )
    if counts["train_docs"] == 0:
        raise TooFewDocuments(
            f"only {len(held)} documents of {source!r} passed the filters and --report_docs {report_docs} holds "
            "them all out to report on, leaving none to train the tokenizer on: add documents, loosen --keywords, "
            "or lower --report_docs",
            kept=len(held),
        )
    print(keep.summary())
    tokenizer.save_pretrained(out)
    base_tokenizer = AutoTokenizer.from_pretrained(base) if base is not None else None
    report = {**counts, **tokenizer_report(tokenizer, list(held), base=base_tokenizer)}
    Path(out, "tokenizer_report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(format_report(report))
    return report
