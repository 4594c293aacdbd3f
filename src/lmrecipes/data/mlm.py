"""The masked-LM DataModule: texts -> tokens with word ids -> chunks -> masked batches (eval set masked once)."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lmrecipes.data.clm import BatchList
from lmrecipes.data.docstrings import DocstringSource
from lmrecipes.data.filters import FilterPipeline
from lmrecipes.data.masking import (
    batch_generator,
    mask_eval_set,
    mask_tokens,
    special_tokens_mask,
    whole_word_mask,
)
from lmrecipes.data.packing import chunk_with_word_ids
from lmrecipes.data.pretokenize import whole_document_backend
from lmrecipes.data.samplers import Draw, TrainPosition, fingerprint
from lmrecipes.data.sources import SourceTree, open_source, sanitize_text
from lmrecipes.data.stream import is_heldout, loader_options, path_is_heldout
from lmrecipes.losses import IGNORE_INDEX
from lmrecipes.paths import resolve_pretrained


class ChunkDataset(torch.utils.data.Dataset):
    """Map-style chunks ``{"input_ids": (T,), "word_ids": (T,), "keep": ()}``; ``keep`` is False for the padding
    draws of the exactly-once sampler (see data/samplers.py), whose labels the masking then clears."""

    def __init__(self, input_ids: torch.Tensor, word_ids: torch.Tensor):
        self.input_ids, self.word_ids = input_ids, word_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, item: int | Draw) -> dict:
        i, keep = item if isinstance(item, tuple) else (item, True)
        return {"input_ids": self.input_ids[i], "word_ids": self.word_ids[i], "keep": torch.tensor(keep)}


def load_fast_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name))
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer {name!r} is not a fast tokenizer; word ids (whole-word masking) need one"
        )
    if tokenizer.mask_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no mask token; masked-LM training needs one")
    return tokenizer


class MaskedTextDataModule(pl.LightningDataModule):
    """Text for masked-LM domain adaptation (HF course ch.7 §3): chunked with word ids, masked on the fly."""

    def __init__(
        self,
        *,
        tokenizer: str,
        train_source: str = "python-docstrings",
        val_source: str | None = None,
        text_column: str = "content",
        train_split: str = "train",
        val_split: str = "train",
        streaming: bool = False,
        on_error: str = "skip",
        heldout_fraction: float = 0.1,
        heldout: str = "documents",
        max_docs: int | None = None,
        chunk_size: int = 128,
        train_size: int | None = None,
        eval_size: int | None = None,
        downsample_seed: int = 42,
        whole_word_mask: bool = False,
        mlm_probability: float = 0.15,
        wwm_probability: float = 0.2,
        mask_seed: int = 0,
        eval_mask_seed: int = 1234,
        shuffle_seed: int | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        progress: bool = True,
    ):
        """
        Args:
            tokenizer: fast tokenizer folder, Hub id or ``package://module/folder`` (usually the model's).
            train_source: ``python-docstrings`` (docstrings and comments of this interpreter's Python files),
                ``docstrings:<dir>``, a directory, local files, or a Hub dataset id (``stanfordnlp/imdb`` in the course).
            val_source: evaluation source; None holds out ``heldout_fraction`` of the training documents by path.
            text_column: column holding the text (``text`` for imdb).
            train_split: split of ``train_source``.
            val_split: split of ``val_source``.
            streaming: stream Hub datasets.
            on_error: ``error`` or ``skip`` unreadable files / bad records.
            heldout_fraction: share of documents (by path hash) held out for evaluation.
            heldout: ``documents`` holds whole documents out (``heldout_fraction``: no text is in both sets);
                ``chunks`` is the course's down-sampling: the training documents' chunks split into
                ``train_size`` / ``eval_size`` by ``Dataset.train_test_split(seed=downsample_seed)``'s permutation,
                so a review can be in both (compare with the course's numbers like for like).
            max_docs: read at most this many documents per split.
            chunk_size: tokens per chunk (the course: 128); at most the model's maximum length.
            train_size: down-sample the training chunks to this many (the course: 10,000); None keeps all.
            eval_size: down-sample the evaluation chunks (the course: 1,000).
            downsample_seed: seed of the down-sampling.
            whole_word_mask: mask whole words (``wwm_probability``) instead of tokens (``mlm_probability``).
            mlm_probability: token masking rate, BERT's 80/10/10 replacement.
            wwm_probability: whole-word masking rate (the course: 0.2).
            mask_seed: seed of the training masks (each batch's mask depends on it, the rank and the batch count).
            eval_mask_seed: seed of the evaluation masks, drawn once per chunk so perplexity is reproducible.
            shuffle_seed: seed of the training order (epoch e's order depends on it and e only); None: the run's
                ``seed_everything`` value.
            batch_size: chunks per batch per device.
            val_batch_size: evaluation batch size (default ``batch_size``).
            num_workers: DataLoader workers.
            progress: progress bars.
        """
        super().__init__()
        self.save_hyperparameters()
        if heldout not in ("documents", "chunks"):
            raise ValueError(f"data.heldout={heldout!r} is not one of ('documents', 'chunks')")
        if heldout == "chunks" and (train_size is None or eval_size is None or val_source is not None):
            raise ValueError(
                f"data.heldout='chunks' splits one pool of chunks: it needs train_size and eval_size (the course: "
                f"10000 and 1000) and no val_source; got {train_size=}, {eval_size=}, {val_source=}"
            )
        if on_error not in ("error", "skip"):
            raise ValueError(f"data.on_error={on_error!r} is not one of ('error', 'skip')")
        if not 0 < (wwm_probability if whole_word_mask else mlm_probability) < 1:
            raise ValueError("data.mlm_probability / data.wwm_probability must be in (0, 1)")
        self.tokenizer = load_fast_tokenizer(tokenizer)
        limit = self.tokenizer.model_max_length
        if chunk_size > limit:
            raise ValueError(f"data.chunk_size={chunk_size} exceeds the tokenizer's model_max_length={limit}")
        self._train: ChunkDataset | None = None
        self._val_batches: list[dict] | None = None
        self._pool: tuple[np.ndarray, np.ndarray] | None = None  # heldout='chunks': every chunk, split later
        self._train_batches = 0  # every rank's training batches so far: the mask generator's counter
        self._position = TrainPosition()

    # values linked into the model by the CLI
    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def seq_len(self) -> int:
        return self.hparams.chunk_size

    @property
    def tokenizer_path(self) -> str:
        return resolve_pretrained(self.hparams.tokenizer)

    def _documents(self, split: str) -> list[str]:
        h = self.hparams
        use_val = split == "val" and h.val_source is not None
        source = open_source(h.val_source if use_val else h.train_source, text_column=h.text_column,
                             split=h.val_split if use_val else h.train_split, streaming=h.streaming,
                             on_error=h.on_error, progress=h.progress)  # fmt: skip
        heldout = 0.0 if h.val_source is not None or split == "all" else h.heldout_fraction
        want_heldout = split == "val"
        if (
            isinstance(source, (SourceTree, DocstringSource)) and heldout
        ):  # decide by path before reading the file
            select = functools.partial(path_is_heldout, fraction=heldout)
            raw = source.iter_raw(select_path=select if want_heldout else lambda p: not select(p))
        else:
            raw = source.iter_raw()
        filters, texts = FilterPipeline(), []
        for _, doc in tqdm(raw, desc=f"{split} documents", disable=not h.progress):
            if (not heldout or is_heldout(doc, heldout) == want_heldout) and filters(doc):
                texts.append(doc["content"])
                if h.max_docs is not None and len(texts) >= h.max_docs:
                    break
        if not texts:
            raise ValueError(f"no {split} documents left from {source!r} ({filters.summary()})")
        return texts

    def _chunks(self, split: str, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hparams.heldout == "chunks":
            return self._course_chunks(split)
        texts = self._documents(split)
        backend = whole_document_backend(self.tokenizer)
        encodings = backend.encode_batch([sanitize_text(t) for t in texts])  # with [CLS]/[SEP], as the course
        ids, words = chunk_with_word_ids((e.ids for e in encodings), (e.word_ids for e in encodings),
                                         self.hparams.chunk_size)  # fmt: skip
        if len(ids) == 0:
            raise ValueError(f"the {split} texts hold fewer than chunk_size={self.hparams.chunk_size} tokens")
        if size is not None and size < len(ids):
            keep = np.random.default_rng(self.hparams.downsample_seed).permutation(len(ids))[:size]
            ids, words = ids[np.sort(keep)], words[np.sort(keep)]
        rank_zero_info(
            f"{split}: {len(texts):,} documents -> {len(ids):,} chunks of {self.hparams.chunk_size} tokens"
        )
        return torch.from_numpy(ids), torch.from_numpy(words)

    def _course_chunks(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The course's ``train_test_split(train_size, test_size, seed)`` over all chunks of the training
        documents: eval = permutation[:eval_size], train = the next train_size, with datasets' arithmetic."""
        h = self.hparams
        if self._pool is None:
            texts = self._documents("all")
            encodings = whole_document_backend(self.tokenizer).encode_batch([sanitize_text(t) for t in texts])
            self._pool = chunk_with_word_ids((e.ids for e in encodings), (e.word_ids for e in encodings),
                                             h.chunk_size)  # fmt: skip
        ids, words = self._pool
        if h.train_size + h.eval_size > len(ids):
            raise ValueError(f"data.heldout='chunks' needs train_size + eval_size = {h.train_size + h.eval_size} "
                             f"chunks; the training documents give {len(ids)}")  # fmt: skip
        order = np.random.default_rng(h.downsample_seed).permutation(len(ids))
        keep = order[: h.eval_size] if split == "val" else order[h.eval_size : h.eval_size + h.train_size]
        rank_zero_info(f"{split}: {len(keep):,} of {len(ids):,} chunks (the course's down-sampling)")
        return torch.from_numpy(ids[keep]), torch.from_numpy(words[keep])

    def setup(self, stage: str) -> None:
        h = self.hparams
        if self._val_batches is None:
            self._val_batches = self._build_val_batches()
        if stage == "fit" and self._train is None:
            self._train = ChunkDataset(*self._chunks("train", h.train_size))

    def _masking_args(self) -> dict:
        h = self.hparams
        if h.whole_word_mask:
            return {"probability": h.wwm_probability}
        return {"probability": h.mlm_probability, "mask_replace_prob": 0.8, "random_replace_prob": 0.1}

    def _build_val_batches(self) -> list[dict]:
        """Mask the whole evaluation set once (the course's insert_random_mask), then give rank r chunks r::world."""
        h = self.hparams
        ids, words = self._chunks("val", h.eval_size)
        masked, labels = mask_eval_set(
            ids, words if h.whole_word_mask else None, seed=h.eval_mask_seed, whole_word=h.whole_word_mask,
            mask_token_id=self.tokenizer.mask_token_id, vocab_size=self.vocab_size,
            special_mask=special_tokens_mask(ids, self.tokenizer), **self._masking_args(),
        )  # fmt: skip
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        masked, labels = masked[rank::world], labels[rank::world]
        size = h.val_batch_size or h.batch_size
        return [
            {"input_ids": masked[i : i + size], "labels": labels[i : i + size]}
            for i in range(0, len(masked), size)
        ]

    def train_dataloader(self) -> DataLoader:
        """Every training chunk once per epoch over all ranks, equal batch counts per rank, resumable mid-epoch."""
        h = self.hparams
        signature = {
            "mask_seed": h.mask_seed,
            "data": fingerprint(self._train.input_ids, self._train.word_ids),
        }
        sampler = self._position.sampler(self._train, trainer=self.trainer, batch_size=h.batch_size,
                                         seed=h.shuffle_seed, signature=signature)  # fmt: skip
        return DataLoader(
            self._train, batch_size=h.batch_size, sampler=sampler, **loader_options(h.num_workers)
        )

    def val_dataloader(self) -> DataLoader:
        if self._val_batches is None:
            self._val_batches = self._build_val_batches()
        return DataLoader(BatchList(self._val_batches), batch_size=None, **loader_options(0))

    test_dataloader = val_dataloader

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Mask training batches on the device, vectorised, from a generator seeded by (seed, rank, batch count).

        Lightning transfers a training batch right before its step, so this also counts the batches trained on."""
        if "labels" in batch or self.trainer is None or not self.trainer.training:
            return batch
        self._position.count()
        h = self.hparams
        ids = batch["input_ids"]  # (B, T)
        rank = self.trainer.global_rank
        generator = batch_generator(h.mask_seed, rank, self._train_batches, device=ids.device)
        self._train_batches += 1
        common = {
            "mask_token_id": self.tokenizer.mask_token_id,
            "vocab_size": self.vocab_size,
            "generator": generator,
        }
        if h.whole_word_mask:
            masked, labels = whole_word_mask(ids, batch["word_ids"], probability=h.wwm_probability, **common)
        else:
            special = special_tokens_mask(ids, self.tokenizer)
            masked, labels = mask_tokens(ids, special_mask=special, probability=h.mlm_probability, **common)
        # padding draws are masked like the others (same generator stream on every rank) but count for nothing
        labels = labels.masked_fill(~batch["keep"][:, None], IGNORE_INDEX)  # (B, T)
        return {"input_ids": masked, "labels": labels}

    def state_dict(self) -> dict:
        return {"train_batches": self._train_batches, "position": self._position.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._train_batches = state["train_batches"]
        if "position" in state:  # checkpoints from before the exactly-once sampler have none
            self._position.load_state_dict(state["position"])
