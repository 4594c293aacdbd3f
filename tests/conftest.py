import inspect
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

# Tests never reach the Hugging Face Hub: fail at once instead of retrying for ~20 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def code_tree(tmp_path_factory) -> Path:
    """~80 real stdlib modules, some prefixed with a data-science import so the course's filter keeps them."""
    root = tmp_path_factory.mktemp("code")
    stdlib = Path(json.__file__).parent.parent
    files = [
        f
        for pkg in ("json", "email", "unittest", "logging", "http")
        for f in sorted((stdlib / pkg).glob("*.py"))
    ]
    for i, src in enumerate(files):
        text = src.read_text(encoding="utf-8")
        prefix = "import pandas as pd\nimport matplotlib.pyplot as plt\n" if i % 4 else ""
        (root / f"m{i:03d}_{src.name}").write_text(prefix + text, encoding="utf-8")
    return root


def stdlib_docstrings() -> list[dict]:
    """One record per stdlib module: its docstrings joined (real English text about code)."""
    import collections
    import email.message
    import json as json_module
    import logging
    import pathlib
    import unittest

    records = []
    for module in (
        collections,
        email.message,
        json_module,
        logging,
        pathlib,
        unittest,
        inspect,
        os,
        subprocess,
    ):
        members = [getattr(module, n) for n in dir(module) if not n.startswith("_")]
        docs = [inspect.getdoc(m) for m in members if callable(m) and inspect.getdoc(m)]
        for k in range(0, len(docs), 6):  # several documents per module
            records.append({"content": "\n\n".join(docs[k : k + 6]), "path": f"{module.__name__}#{k}"})
    return records


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, corpus jsonl): a 2-layer BERT with a WordPiece vocabulary trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    records = stdlib_docstrings()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        (r["content"] for r in records), trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=64)
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(model_dir)
    return model_dir, corpus


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """An exported-style causal-LM folder: a 2-layer GPT-2 (random weights, seed 0) and a byte-level BPE
    tokenizer trained on the stdlib's json package."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmrecipes.bpe import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny_lm")
    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600, progress=False)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
