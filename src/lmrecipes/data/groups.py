"""Argument groups of the three DataModules: typed frozen dataclasses that jsonargparse shows as nested options
(``--data.init_args.loader.batch_size``), so ``--help`` and a config's ``data:`` section read as a few sections.

A DataModule keeps each group as a typed attribute and saves it in its hyper-parameters as a plain dict
(checkpoints load with ``weights_only``); ``Group.of`` turns either form back into the dataclass.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Group:
    """Base of the argument groups; a dataclass itself, since jsonargparse shows a class as nested options only
    when every class it derives from is one (else it asks for ``class_path``/``init_args``)."""

    @classmethod
    def of(cls, value):
        """The group itself, or one from the plain dict a checkpoint's hyper-parameters hold."""
        return value if isinstance(value, cls) else cls(**value)


def plain(group: Group) -> dict:
    """A group as the plain dict ``save_hyperparameters`` stores."""
    return dataclasses.asdict(group)


def grouped(datamodule_class: type, **flat) -> dict:
    """Flat keyword arguments (``batch_size=4, seq_len=32``) sorted into ``datamodule_class``'s groups by field
    name, each group a plain dict over the class's default group; a name that is no group's field stays at the top
    level. The result suits the constructor and a config's ``init_args`` alike (tests, scripts)."""
    hints = typing.get_type_hints(datamodule_class.__init__)
    params = inspect.signature(datamodule_class.__init__).parameters
    out: dict = {}
    for name, hint in hints.items():
        if dataclasses.is_dataclass(hint):
            fields = {f.name for f in dataclasses.fields(hint)}
            mine = {k: flat.pop(k) for k in list(flat) if k in fields}
            if mine:
                default = params[name].default
                out[name] = {**(plain(default) if dataclasses.is_dataclass(default) else {}), **mine}
    return {**flat, **out}


GROUP_KEY = re.compile(r"--((?:data|model)\.init_args\.\w+\.\w+)$")


def nulls_as_configs(args: list[str]) -> list[str]:
    """Each ``--data.init_args.<group>.<field> null`` (or ``=null``) given as an inline ``--config`` instead.

    jsonargparse (4.53) reads a command-line null for a field of a dataclass inside a subclass's arguments as the
    string ``'None'`` (``str | None``) or refuses it (``int | None``); the same null in a config is read right."""
    import yaml

    out, i = [], 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        match = GROUP_KEY.match(key)
        if match and not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if match and value.strip() in ("null", "~", "Null", "NULL"):
            section, _, rest = match.group(1).partition(".init_args.")
            group, field = rest.split(".")
            out += ["--config", yaml.safe_dump({section: {"init_args": {group: {field: None}}}})]
            i += 1 if eq else 2
        else:
            out.append(args[i])
            i += 1
    return out


@dataclass(frozen=True)
class LoaderConfig(Group):
    """Batches and DataLoader workers (every recipe).

    Args:
        batch_size: examples (sequences, chunks, rows) per training batch per device.
        val_batch_size: evaluation batch size; None: ``batch_size``.
        num_workers: DataLoader worker processes.
        shuffle_seed: seed of the training order (epoch e's order depends on it and e only); None: the run's
            ``seed_everything`` value.
        shuffle_buffer: streamed causal-LM data: documents read and emitted in a seeded random order at a time
            (the book's 1,000); 0 keeps each shard's order. Shards are reordered every epoch either way.
    """

    batch_size: int = 32
    val_batch_size: int | None = None
    num_workers: int = 0
    shuffle_seed: int | None = None
    shuffle_buffer: int = 1000


# -- causal LM (data/clm.py) --


@dataclass(frozen=True)
class CodeSource(Group):
    """Where the causal-LM documents come from, and which are held out for validation.

    Args:
        train_source: ``python-install`` (this interpreter's stdlib + site-packages), a directory of source
            files, local files (jsonl/json/csv/parquet/txt, globs, comma-separated) or a Hub dataset id.
        val_source: validation source; None holds out ``heldout_fraction`` of ``train_source`` by path hash.
        text_column: column that holds the document text.
        train_split: split of ``train_source`` (datasets sources).
        val_split: split of ``val_source``.
        streaming: stream datasets sources instead of downloading/materialising them.
        pattern: file glob for directory sources.
        on_error: ``error`` stops at a bad record (naming file and line); ``skip`` drops and counts it.
        heldout_fraction: share of documents held out for validation when ``val_source`` is None.
        val_max_docs: validation documents read at most (per run, before packing); None reads them all.
    """

    train_source: str = "python-install"
    val_source: str | None = None
    text_column: str = "content"
    train_split: str = "train"
    val_split: str = "train"
    streaming: bool = True
    pattern: str = "*.py"
    on_error: Literal["error", "skip"] = "error"
    heldout_fraction: float = 0.02
    val_max_docs: int | None = 1000


@dataclass(frozen=True)
class CodeFilters(Group):
    """Streaming document filters (applied before tokenizer training, packing and validation).

    Args:
        keywords: keep only documents containing one of these strings (the course's filter); None keeps all.
        quality_filter: apply the book's line-length / alphanumeric / auto-generated heuristics.
        dedup: drop exact duplicates (whitespace-insensitive) among the documents one stream (rank x worker)
            reads; global exact de-duplication is ``lmrecipes prepare``'s.
    """

    keywords: list[str] | None = None
    quality_filter: bool = False
    dedup: bool = False


@dataclass(frozen=True)
class PackingConfig(Group):
    """How tokens become fixed-length training sequences.

    Args:
        seq_len: tokens per training sequence (linked into the model).
        mode: ``concat`` (EOS-joined stream cut in windows) or ``overflow`` (full chunks per document).
        pretokenize: tokenize once into a prepared folder under ``cache_dir`` (named by a fingerprint of the
            source, filters, tokenizer and mode) instead of streaming.
        cache_dir: where pre-tokenized caches live (shared by later runs with the same inputs).
        prepared: train from a folder built by ``lmrecipes prepare`` (local path, or a Hub dataset id read shard by
            shard) instead of the source; its tokenizer and mode must be the run's. None: use the source.
    """

    seq_len: int = 128
    mode: Literal["concat", "overflow"] = "concat"
    pretokenize: bool = False
    cache_dir: str = ".cache/lmrecipes"
    prepared: str | None = None


@dataclass(frozen=True)
class TokenizerTraining(Group):
    """A tokenizer trained at first use, when ``tokenizer`` names a folder that does not exist yet.

    Args:
        vocab_size: vocabulary size of the trained tokenizer; None: never train (``tokenizer`` must exist).
        max_chars: characters of (filtered) training text read for tokenizer training.
    """

    vocab_size: int | None = None
    max_chars: int = 20_000_000


# -- masked LM (data/mlm.py) --


@dataclass(frozen=True)
class TextSource(Group):
    """Where the masked-LM texts come from, and which documents are held out for evaluation.

    Args:
        train_source: ``python-docstrings`` (docstrings and comments of this interpreter's Python files),
            ``docstrings:<dir>``, a directory, local files, or a Hub dataset id (``stanfordnlp/imdb`` in the course).
        val_source: evaluation source; None holds out ``heldout_fraction`` of the training documents by path.
        text_column: column holding the text (``text`` for imdb).
        train_split: split of ``train_source``.
        val_split: split of ``val_source``.
        streaming: stream Hub datasets.
        on_error: ``error`` or ``skip`` unreadable files / bad records.
        heldout_fraction: share of documents (by path hash) held out for evaluation (``chunking.heldout:
            documents``).
        max_docs: read at most this many documents per split.
    """

    train_source: str = "python-docstrings"
    val_source: str | None = None
    text_column: str = "content"
    train_split: str = "train"
    val_split: str = "train"
    streaming: bool = False
    on_error: Literal["error", "skip"] = "skip"
    heldout_fraction: float = 0.1
    max_docs: int | None = None


@dataclass(frozen=True)
class ChunkingConfig(Group):
    """Chunks of tokens (with word ids) and the evaluation set they are split into.

    Args:
        chunk_size: tokens per chunk (the course: 128; linked into the model as ``seq_len``); at most the
            tokenizer's maximum length.
        heldout: ``documents`` holds whole documents out (``source.heldout_fraction``: no text is in both sets);
            ``chunks`` is the course's down-sampling: the training documents' chunks split into ``train_size`` /
            ``eval_size`` by ``Dataset.train_test_split(seed=downsample_seed)``'s permutation, so a review can be
            in both (compare with the course's numbers like for like).
        train_size: down-sample the training chunks to this many (the course: 10,000); None keeps all.
        eval_size: down-sample the evaluation chunks (the course: 1,000).
        downsample_seed: seed of the down-sampling.
    """

    chunk_size: int = 128
    heldout: Literal["documents", "chunks"] = "documents"
    train_size: int | None = None
    eval_size: int | None = None
    downsample_seed: int = 42


@dataclass(frozen=True)
class MaskingConfig(Group):
    """Masking of the training batches (on the device, per batch) and of the evaluation set (once).

    Args:
        whole_word_mask: mask whole words (``wwm_probability``) instead of tokens (``mlm_probability``).
        mlm_probability: token masking rate, BERT's 80/10/10 replacement.
        wwm_probability: whole-word masking rate (the course: 0.2).
        mask_seed: seed of the training masks (each batch's mask depends on it, the rank and the batch count).
        eval_mask_seed: seed of the evaluation masks, drawn once per chunk so perplexity is reproducible.
    """

    whole_word_mask: bool = False
    mlm_probability: float = 0.15
    wwm_probability: float = 0.2
    mask_seed: int = 0
    eval_mask_seed: int = 1234


# -- classification (data/classification.py) --


@dataclass(frozen=True)
class LabelledSource(Group):
    """Where each split's labelled rows come from.

    Args:
        train_source: Hub dataset id (``nyu-mll/glue`` with ``dataset_config: mrpc``), local files, or
            ``python-function-pairs`` (docstring/function pairs from this interpreter's Python files).
        val_source: validation source (default: ``train_source`` with ``val_split``).
        test_source: test source (default: ``train_source`` with ``test_split``).
        predict_source: rows to predict (default: the test source).
        dataset_config: Hub dataset configuration (``mrpc``).
        train_split: training split name.
        val_split: validation split name.
        test_split: test split name.
        predict_split: predict split name.
        streaming: stream Hub datasets.
        on_error: ``error`` or ``skip`` bad records.
        max_examples: read at most this many rows per split.
    """

    train_source: str
    val_source: str | None = None
    test_source: str | None = None
    predict_source: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str = "test"
    predict_split: str = "test"
    streaming: bool = False
    on_error: Literal["error", "skip"] = "error"
    max_examples: int | None = None


@dataclass(frozen=True)
class Columns(Group):
    """Which columns hold the texts, the label and the row id.

    Args:
        text_column: first text column.
        text_pair_column: second text column for pair tasks; None for single sentences.
        label_column: integer or string labels.
        id_column: column copied into predictions as ``id`` (default: the row number).
    """

    text_column: str = "sentence1"
    text_pair_column: str | None = "sentence2"
    label_column: str = "label"
    id_column: str | None = None


@dataclass(frozen=True)
class PaddingConfig(Group):
    """Truncation, padding and length grouping of the tokenized examples.

    Args:
        max_length: truncate (pairs: longest first) to this many tokens.
        pad_to_max_length: pad every batch to ``max_length`` (static shapes for TPUs / compilation).
        pad_to_multiple_of: pad dynamic batches to a multiple of this; None: 8 under 16-bit mixed precision
            (tensor cores), else no rounding; 1 turns rounding off.
        group_by_length: batch examples of similar length together (less padding, faster; still shuffled).
    """

    max_length: int = 128
    pad_to_max_length: bool = False
    pad_to_multiple_of: int | None = None
    group_by_length: bool = False
