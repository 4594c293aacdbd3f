"""Masking: rates on a large batch of real tokens, exact semantics, seeding, the fixed eval mask, HF cross-check."""

import argparse
import collections
import csv
import difflib
import email.message
import functools
import inspect
import itertools
import json
import logging
import pathlib
import re
import shutil
import statistics
import string
import subprocess
import tarfile
import textwrap
import threading
import typing
import unittest
import urllib.parse
import zipfile

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from lmrecipes.data.masking import (
    IGNORE_INDEX,
    batch_generator,
    mask_eval_set,
    mask_tokens,
    special_tokens_mask,
    splitmix64,
    stable_seed,
    whole_word_mask,
)

ROWS, T = 256, 128
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MODULES = [argparse, collections, csv, difflib, email.message, functools, inspect, itertools, json, logging]
MODULES += [pathlib, re, shutil, statistics, string, subprocess, tarfile, textwrap, threading, typing]
MODULES += [unittest, urllib.parse, zipfile]


def _docstrings() -> list[str]:
    """Docstrings of the public functions, classes and methods of some stdlib modules (real English text)."""
    docs = {}
    for module in MODULES:
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            members = [obj] + [m for _, m in sorted(vars(obj).items())] if inspect.isclass(obj) else [obj]
            for member in members:
                if inspect.isfunction(member) or inspect.isclass(member):
                    doc = inspect.getdoc(member)
                    if doc and len(doc) > 40:
                        docs[doc] = None
    return list(docs)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return _docstrings()


@pytest.fixture(scope="module")
def tokenizer(docs) -> PreTrainedTokenizerFast:
    """A real WordPiece tokenizer (BERT's normaliser, pre-tokeniser and template), trained on the docstrings."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    # a small vocabulary, so many words are split into several pieces (whole-word masking has work to do)
    tok.train_from_iterator(docs, trainers.WordPieceTrainer(vocab_size=800, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{f"{k}_token": f"[{k.upper()}]" for k in ("pad", "unk", "cls", "sep", "mask")},
    )


@pytest.fixture(scope="module")
def batch(tokenizer, docs) -> dict[str, torch.Tensor]:
    """(256, 128) rows packed from whole documents ([CLS] doc [SEP] [CLS] doc [SEP] ... [PAD]), word ids offset
    per document (-1 at special tokens and padding), character offsets for the HF collator."""
    enc = tokenizer(docs, truncation=True, max_length=T, return_offsets_mapping=True)
    rows, row, next_word = [], [], 0
    for i, ids in enumerate(enc["input_ids"]):
        if len(row) + len(ids) > T:
            rows.append(row + [(tokenizer.pad_token_id, -1, (0, 0))] * (T - len(row)))
            row = []
            if len(rows) == ROWS:
                break
        words = [-1 if w is None else w + next_word for w in enc.word_ids(i)]
        next_word = max(words) + 1
        row += list(zip(ids, words, enc["offset_mapping"][i]))
    assert len(rows) == ROWS, "not enough docstrings for the fixture batch"
    return {
        "input_ids": torch.tensor([[t[0] for t in r] for r in rows]),  # (B, T)
        "word_ids": torch.tensor([[t[1] for t in r] for r in rows]),  # (B, T)
        "offsets": torch.tensor([[t[2] for t in r] for r in rows]),  # (B, T, 2)
    }


def _kwargs(tokenizer) -> dict:
    return {"mask_token_id": tokenizer.mask_token_id, "vocab_size": len(tokenizer)}


def _replacement_shares(original, masked, labels, mask_token_id) -> tuple[float, float, float]:
    """Shares of masked positions that became [MASK], another id, or stayed unchanged."""
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    to_mask = (chosen & (masked == mask_token_id)).sum().item()
    unchanged = (chosen & (masked == original) & (original != mask_token_id)).sum().item()
    return to_mask / n, (n - to_mask - unchanged) / n, unchanged / n


def _check_labels(original, masked, labels) -> None:
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(masked[~chosen], original[~chosen])


def _assert_words_whole(word_ids, labels) -> float:
    """Every (row, word) is labelled entirely or not at all; returns the fraction of words chosen."""
    valid = word_ids >= 0
    rows = torch.arange(word_ids.shape[0]).view(-1, 1).expand_as(word_ids)
    keys = torch.stack([rows[valid], word_ids[valid]], dim=1)  # (N, 2)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    size = torch.bincount(group)
    labelled = torch.bincount(group, weights=(labels[valid] != IGNORE_INDEX).double()).long()
    assert torch.all((labelled == 0) | (labelled == size))
    return (labelled > 0).double().mean().item()


def test_fixture_batch_is_real(batch, tokenizer):
    special = special_tokens_mask(batch["input_ids"], tokenizer)
    assert torch.equal(special, batch["word_ids"] < 0)  # no [UNK] in the training text itself
    assert (batch["input_ids"] == tokenizer.pad_token_id).any()
    assert (~special).sum() > 25_000
    # words split into several pieces are common, so whole-word masking differs from token masking
    assert (batch["word_ids"][:, 1:] == batch["word_ids"][:, :-1])[~special[:, 1:]].double().mean() > 0.15


def test_special_tokens_mask_exact(tokenizer):
    ids = tokenizer(["the value", "a"], padding=True, return_tensors="pt")["input_ids"]
    assert ids.shape == (2, 4)
    assert special_tokens_mask(ids, tokenizer).tolist() == [
        [True, False, False, True],
        [True, False, True, True],
    ]


def test_mask_tokens_rates_and_semantics(batch, tokenizer):
    ids = batch["input_ids"]
    before = ids.clone()
    special = special_tokens_mask(ids, tokenizer)
    masked, labels = mask_tokens(
        ids, special_mask=special, **_kwargs(tokenizer), generator=batch_generator(0, 0)
    )
    assert torch.equal(ids, before)
    assert masked.dtype == labels.dtype == torch.long
    chosen = labels != IGNORE_INDEX
    assert not chosen[special].any()
    _check_labels(ids, masked, labels)
    assert chosen[~special].double().mean().item() == pytest.approx(0.15, abs=0.01)
    for share, want in zip(
        _replacement_shares(ids, masked, labels, tokenizer.mask_token_id), (0.8, 0.1, 0.1)
    ):
        assert share == pytest.approx(want, abs=0.03)


def test_mask_tokens_extremes_exact(batch, tokenizer):
    ids = batch["input_ids"]
    special = special_tokens_mask(ids, tokenizer)
    kw = {"special_mask": special, **_kwargs(tokenizer)}
    masked, labels = mask_tokens(ids, probability=1.0, mask_replace_prob=1.0, random_replace_prob=0.0, **kw)
    assert torch.equal(masked, torch.where(special, ids, tokenizer.mask_token_id))
    assert torch.equal(labels, torch.where(special, IGNORE_INDEX, ids))
    masked, labels = mask_tokens(ids, probability=0.0, **kw)
    assert torch.equal(masked, ids) and bool((labels == IGNORE_INDEX).all())
    masked, labels = mask_tokens(ids, probability=1.0, mask_replace_prob=0.0, random_replace_prob=0.0, **kw)
    assert torch.equal(masked, ids) and torch.equal(labels, torch.where(special, IGNORE_INDEX, ids))


def test_whole_word_course_scheme(batch, tokenizer):
    ids, words = batch["input_ids"], batch["word_ids"]
    before = (ids.clone(), words.clone())
    masked, labels = whole_word_mask(ids, words, **_kwargs(tokenizer), generator=batch_generator(0, 1))
    assert torch.equal(ids, before[0]) and torch.equal(words, before[1])
    chosen = labels != IGNORE_INDEX
    assert not chosen[words < 0].any()
    _check_labels(ids, masked, labels)
    assert bool((masked[chosen] == tokenizer.mask_token_id).all())  # defaults: every chosen token -> [MASK]
    assert _assert_words_whole(words, labels) == pytest.approx(0.2, abs=0.02)
    assert chosen[words >= 0].double().mean().item() == pytest.approx(0.2, abs=0.03)


def test_whole_word_bert_replacement_per_token(batch, tokenizer):
    ids, words = batch["input_ids"], batch["word_ids"]
    masked, labels = whole_word_mask(
        ids,
        words,
        **_kwargs(tokenizer),
        mask_replace_prob=0.8,
        random_replace_prob=0.1,
        generator=batch_generator(2),
    )
    _check_labels(ids, masked, labels)
    assert _assert_words_whole(words, labels) == pytest.approx(0.2, abs=0.02)
    for share, want in zip(
        _replacement_shares(ids, masked, labels, tokenizer.mask_token_id), (0.8, 0.1, 0.1)
    ):
        assert share == pytest.approx(want, abs=0.03)


def test_whole_word_ids_are_per_row_and_any_values(batch, tokenizer):
    ids, words = batch["input_ids"], batch["word_ids"]
    out = whole_word_mask(ids, words, **_kwargs(tokenizer), generator=batch_generator(3))
    # an order-preserving relabelling (large, sparse ids) numbers the words the same: identical masks
    relabelled = torch.where(words >= 0, words * 1_000 + 10**15, -1)
    again = whole_word_mask(ids, relabelled, **_kwargs(tokenizer), generator=batch_generator(3))
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])
    # the same ids in different rows are different words, chosen independently
    same = words[:1].expand(ROWS, T)
    _, labels = whole_word_mask(
        ids[:1].expand(ROWS, T), same, **_kwargs(tokenizer), generator=batch_generator(3)
    )
    assert len({tuple(r) for r in (labels != IGNORE_INDEX).tolist()}) > ROWS // 2
    assert _assert_words_whole(same, labels) == pytest.approx(0.2, abs=0.03)


@pytest.mark.parametrize("whole_word", [False, True])
def test_same_seed_same_masks_other_seed_other_masks(batch, tokenizer, whole_word):
    ids, words = batch["input_ids"], batch["word_ids"]

    def run(*counters):
        g = batch_generator(*counters)
        if whole_word:
            kw = {"mask_replace_prob": 0.8, "random_replace_prob": 0.1}
            return whole_word_mask(ids, words, **_kwargs(tokenizer), **kw, generator=g)
        return mask_tokens(ids, special_mask=words < 0, **_kwargs(tokenizer), generator=g)

    first, again = run(7, 0, 5), run(7, 0, 5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in (run(8, 0, 5), run(7, 1, 5), run(7, 0, 6)):
        assert not torch.equal(first[1], other[1])


def test_batch_generator_is_a_stable_hash():
    # pinned: changing the derivation would silently change every resumed run's masks
    assert stable_seed(0, 1, 2) == 2907050525928808288  # sha256(b"0,1,2")[:8], little-endian, >> 1
    assert stable_seed(0, 1, 2) != stable_seed(0, 2, 1) != stable_seed(0, 12)
    assert torch.equal(
        torch.rand(4, generator=batch_generator(0, 1, 2)), torch.rand(4, generator=batch_generator(0, 1, 2))
    )
    with pytest.raises(ValueError, match="ints"):
        batch_generator(0, 1.5)


def _splitmix64_reference(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_matches_the_uint64_reference():
    values = [0, 1, 2**63 - 1, 12345678901234567, -1, -(2**63), -987654321]
    got = splitmix64(torch.tensor(values)).tolist()
    assert got[0] == 0xE220A8397B1DCDAF - 2**64  # splitmix64's first output for state 0
    assert [g % 2**64 for g in got] == [_splitmix64_reference(v % 2**64) for v in values]


@pytest.mark.parametrize("whole_word", [False, True])
def test_mask_eval_set_depends_only_on_seed_row_and_content(batch, tokenizer, whole_word):
    ids, words = batch["input_ids"], batch["word_ids"]
    kw = {"seed": 42, "whole_word": whole_word, **_kwargs(tokenizer)}
    full = mask_eval_set(ids, words, **kw)
    half = ROWS // 2
    halves = [
        mask_eval_set(ids[s], words[s], row_ids=torch.arange(ROWS)[s], **kw)
        for s in (slice(None, half), slice(half, None))
    ]
    perm = torch.randperm(ROWS, generator=torch.Generator().manual_seed(0))
    shuffled = mask_eval_set(ids[perm], words[perm], row_ids=perm, **kw)
    chunked = mask_eval_set(ids, words, chunk_rows=7, **kw)
    for i in range(2):
        assert torch.equal(torch.cat([h[i] for h in halves]), full[i])
        assert torch.equal(shuffled[i], full[i][perm])
        assert torch.equal(chunked[i], full[i])
    other = mask_eval_set(ids, words, **{**kw, "seed": 43})
    assert not torch.equal(other[1], full[1])
    _check_labels(ids, *full)
    chosen = full[1] != IGNORE_INDEX
    assert not chosen[words < 0].any()
    if whole_word:
        assert _assert_words_whole(words, full[1]) == pytest.approx(0.2, abs=0.02)
        assert bool((full[0][chosen] == tokenizer.mask_token_id).all())
    else:
        assert chosen[words >= 0].double().mean().item() == pytest.approx(0.15, abs=0.01)
        for share, want in zip(_replacement_shares(ids, *full, tokenizer.mask_token_id), (0.8, 0.1, 0.1)):
            assert share == pytest.approx(want, abs=0.03)


def test_rates_match_the_hf_collator(batch, tokenizer):
    """Same rates as transformers' DataCollatorForLanguageModeling (statistically; the draws differ)."""
    ids, words = batch["input_ids"], batch["word_ids"]
    special = special_tokens_mask(ids, tokenizer)
    features = [
        {"input_ids": i, "special_tokens_mask": s, "offset_mapping": o}
        for i, s, o in zip(ids.tolist(), special.long().tolist(), batch["offsets"].tolist())
    ]
    hf = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)(features)
    ours = mask_tokens(ids, special_mask=special, **_kwargs(tokenizer), generator=batch_generator(0))
    for (masked, labels), name in ((ours, "ours"), ((hf["input_ids"], hf["labels"]), "hf")):
        _check_labels(ids, masked, labels)
        rate = (labels != IGNORE_INDEX)[~special].double().mean().item()
        assert rate == pytest.approx(0.15, abs=0.01), name
        shares = _replacement_shares(ids, masked, labels, tokenizer.mask_token_id)
        assert shares == pytest.approx((0.8, 0.1, 0.1), abs=0.03), name

    # whole words: HF groups tokens by touching character offsets ("value," is one word for it, two for the
    # pre-tokeniser), but with every word chosen at 0.2 the expected share of masked tokens is 0.2 for both
    hf_wwm = DataCollatorForLanguageModeling(
        tokenizer,
        whole_word_mask=True,
        mlm_probability=0.2,
        mask_replace_prob=1.0,
        random_replace_prob=0.0,
        seed=0,
    )(features)
    _, labels = whole_word_mask(ids, words, **_kwargs(tokenizer), generator=batch_generator(0))
    for labels_, name in ((labels, "ours"), (hf_wwm["labels"], "hf")):
        assert (labels_ != IGNORE_INDEX)[~special].double().mean().item() == pytest.approx(0.2, abs=0.02), (
            name
        )
    _assert_words_whole(words, hf_wwm["labels"])  # HF's words are unions of ours: it never splits ours either


def test_bad_arguments_raise(batch, tokenizer):
    ids, words = batch["input_ids"], batch["word_ids"]
    with pytest.raises(ValueError, match="probability=1.5"):
        mask_tokens(ids, special_mask=words < 0, probability=1.5, **_kwargs(tokenizer))
    with pytest.raises(ValueError, match="> 1"):
        whole_word_mask(ids, words, mask_replace_prob=0.9, random_replace_prob=0.2, **_kwargs(tokenizer))
    with pytest.raises(ValueError, match="word_ids"):
        whole_word_mask(ids, words[:, :-1], **_kwargs(tokenizer))
    with pytest.raises(ValueError, match="needs word_ids"):
        mask_eval_set(ids, seed=0, whole_word=True, **_kwargs(tokenizer))
    with pytest.raises(ValueError, match="row_ids"):
        mask_eval_set(ids, words, seed=0, row_ids=torch.arange(3), **_kwargs(tokenizer))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masks_and_device_independent_eval_set(batch, tokenizer):
    ids, words = batch["input_ids"], batch["word_ids"]
    cuda = {"device": "cuda"}
    g = batch_generator(0, **cuda)
    masked, labels = whole_word_mask(ids.cuda(), words.cuda(), **_kwargs(tokenizer), generator=g)
    assert masked.is_cuda and _assert_words_whole(words, labels.cpu()) == pytest.approx(0.2, abs=0.02)
    _, labels = mask_tokens(ids.cuda(), special_mask=(words < 0).cuda(), **_kwargs(tokenizer), generator=g)
    assert (labels.cpu() != IGNORE_INDEX)[words >= 0].double().mean().item() == pytest.approx(0.15, abs=0.01)
    # the hashed eval mask has no generator: bit-identical on CPU and CUDA
    for whole_word in (False, True):
        on_cpu = mask_eval_set(ids, words, seed=1, whole_word=whole_word, **_kwargs(tokenizer))
        on_gpu = mask_eval_set(ids.cuda(), words.cuda(), seed=1, whole_word=whole_word, **_kwargs(tokenizer))
        assert torch.equal(on_cpu[0], on_gpu[0].cpu()) and torch.equal(on_cpu[1], on_gpu[1].cpu())
