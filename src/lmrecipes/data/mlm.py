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
from lmrecipes.data.groups import ChunkingConfig, LoaderConfig, MaskingConfig, TextSource, plain
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

# default groups (frozen, so one instance serves every call)
SOURCE, CHUNKING, MASKING = TextSource(), ChunkingConfig(), MaskingConfig()
LOADER = LoaderConfig(batch_size=64)


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
        source: TextSource = SOURCE,
        chunking: ChunkingConfig = CHUNKING,
        masking: MaskingConfig = MASKING,
        loader: LoaderConfig = LOADER,
        progress: bool = True,
    ):
        """
        Args:
            tokenizer: fast tokenizer folder, Hub id or ``package://module/folder`` (usually the model's).
            source: the texts, and which documents are held out for evaluation.
            chunking: chunk size and the training / evaluation chunks (held-out documents or the course's split).
            masking: token or whole-word masking, rates and seeds.
            loader: batch sizes, DataLoader workers and the training order's seed.
            progress: progress bars.
        """
        super().__init__()
        self.source, self.chunking = TextSource.of(source), ChunkingConfig.of(chunking)
        self.masking, self.loader = MaskingConfig.of(masking), LoaderConfig.of(loader)
        # checkpoints' hyper-parameters hold plain types only (weights_only loading): the groups as dicts
        source, chunking, masking, loader = map(
            plain, (self.source, self.chunking, self.masking, self.loader)
        )
        self.save_hyperparameters()
        c, m = self.chunking, self.masking
        if c.heldout not in ("documents", "chunks"):
            raise ValueError(f"data.chunking.heldout={c.heldout!r} is not one of ('documents', 'chunks')")
        if c.heldout == "chunks" and (c.train_size is None or c.eval_size is None or self.source.val_source):
            raise ValueError(
                "data.chunking.heldout='chunks' splits one pool of chunks: it needs chunking.train_size and "
                f"chunking.eval_size (the course: 10000 and 1000) and no source.val_source; got "
                f"train_size={c.train_size}, eval_size={c.eval_size}, val_source={self.source.val_source!r}"
            )
        if self.source.on_error not in ("error", "skip"):
            raise ValueError(f"data.source.on_error={self.source.on_error!r} is not one of ('error', 'skip')")
        if not 0 < (m.wwm_probability if m.whole_word_mask else m.mlm_probability) < 1:
            raise ValueError("data.masking.mlm_probability / data.masking.wwm_probability must be in (0, 1)")
        self.tokenizer = load_fast_tokenizer(tokenizer)
        limit = self.tokenizer.model_max_length
        if c.chunk_size > limit:
            raise ValueError(
                f"data.chunking.chunk_size={c.chunk_size} exceeds the tokenizer's model_max_length={limit}"
            )
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
        return self.chunking.chunk_size

    @property
    def tokenizer_path(self) -> str:
        return resolve_pretrained(self.hparams.tokenizer)

    def _documents(self, split: str) -> list[str]:
        h, progress = self.source, self.hparams.progress
        use_val = split == "val" and h.val_source is not None
        source = open_source(h.val_source if use_val else h.train_source, text_column=h.text_column,
                             split=h.val_split if use_val else h.train_split, streaming=h.streaming,
                             on_error=h.on_error, progress=progress)  # fmt: skip
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
        for _, doc in tqdm(raw, desc=f"{split} documents", disable=not progress):
            if (not heldout or is_heldout(doc, heldout) == want_heldout) and filters(doc):
                texts.append(doc["content"])
                if h.max_docs is not None and len(texts) >= h.max_docs:
                    break
        if not texts:
            raise ValueError(f"no {split} documents left from {source!r} ({filters.summary()})")
        return texts

    def _chunks(self, split: str, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.chunking
        if c.heldout == "chunks":
            return self._course_chunks(split)
        texts = self._documents(split)
        backend = whole_document_backend(self.tokenizer)
        encodings = backend.encode_batch([sanitize_text(t) for t in texts])  # with [CLS]/[SEP], as the course
        ids, words = chunk_with_word_ids((e.ids for e in encodings), (e.word_ids for e in encodings),
                                         c.chunk_size)  # fmt: skip
        if len(ids) == 0:
            raise ValueError(f"the {split} texts hold fewer than chunking.chunk_size={c.chunk_size} tokens")
        if size is not None and size < len(ids):
            keep = np.random.default_rng(c.downsample_seed).permutation(len(ids))[:size]
            ids, words = ids[np.sort(keep)], words[np.sort(keep)]
        rank_zero_info(f"{split}: {len(texts):,} documents -> {len(ids):,} chunks of {c.chunk_size} tokens")
        return torch.from_numpy(ids), torch.from_numpy(words)

    def _course_chunks(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The course's ``train_test_split(train_size, test_size, seed)`` over all chunks of the training
        documents: eval = permutation[:eval_size], train = the next train_size, with datasets' arithmetic."""
        h = self.chunking
        if self._pool is None:
            texts = self._documents("all")
            encodings = whole_document_backend(self.tokenizer).encode_batch([sanitize_text(t) for t in texts])
            self._pool = chunk_with_word_ids((e.ids for e in encodings), (e.word_ids for e in encodings),
                                             h.chunk_size)  # fmt: skip
        ids, words = self._pool
        if h.train_size + h.eval_size > len(ids):
            raise ValueError(f"data.chunking.heldout='chunks' needs train_size + eval_size = "
                             f"{h.train_size + h.eval_size} "
                             f"chunks; the training documents give {len(ids)}")  # fmt: skip
        order = np.random.default_rng(h.downsample_seed).permutation(len(ids))
        keep = order[: h.eval_size] if split == "val" else order[h.eval_size : h.eval_size + h.train_size]
        rank_zero_info(f"{split}: {len(keep):,} of {len(ids):,} chunks (the course's down-sampling)")
        return torch.from_numpy(ids[keep]), torch.from_numpy(words[keep])

    def setup(self, stage: str) -> None:
        if self._val_batches is None:
            self._val_batches = self._build_val_batches()
        if stage == "fit" and self._train is None:
            self._train = ChunkDataset(*self._chunks("train", self.chunking.train_size))

    def _masking_args(self) -> dict:
        h = self.masking
        if h.whole_word_mask:
            return {"probability": h.wwm_probability}
        return {"probability": h.mlm_probability, "mask_replace_prob": 0.8, "random_replace_prob": 0.1}

    def _build_val_batches(self) -> list[dict]:
        """Mask the whole evaluation set once (the course's insert_random_mask), then give rank r chunks r::world."""
        h = self.masking
        ids, words = self._chunks("val", self.chunking.eval_size)
        masked, labels = mask_eval_set(
            ids, words if h.whole_word_mask else None, seed=h.eval_mask_seed, whole_word=h.whole_word_mask,
            mask_token_id=self.tokenizer.mask_token_id, vocab_size=self.vocab_size,
            special_mask=special_tokens_mask(ids, self.tokenizer), **self._masking_args(),
        )  # fmt: skip
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        masked, labels = masked[rank::world], labels[rank::world]
        size = self.loader.val_batch_size or self.loader.batch_size
        return [
            {"input_ids": masked[i : i + size], "labels": labels[i : i + size]}
            for i in range(0, len(masked), size)
        ]

    def train_dataloader(self) -> DataLoader:
        """Every training chunk once per epoch over all ranks, equal batch counts per rank, resumable mid-epoch."""
        h = self.loader
        signature = {
            "mask_seed": self.masking.mask_seed,
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
        h = self.masking
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
