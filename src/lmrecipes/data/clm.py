"""The causal-LM DataModule: documents -> filters -> tokenizer -> packed windows, streaming or pre-tokenized."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from lmrecipes.data.filters import FilterPipeline
from lmrecipes.data.packing import check_mode, iter_windows
from lmrecipes.data.pretokenize import (
    ensure_token_file,
    load_token_file,
    tokenize_groups,
    tokenizer_fingerprint,
    window_starts,
)
from lmrecipes.data.sources import SourceTree, open_source
from lmrecipes.data.stream import (
    PackedStream,
    StreamSpec,
    WindowStream,
    is_heldout,
    load_tokenizer,
    loader_options,
    path_is_heldout,
)
from lmrecipes.ranks import gather_from_ranks

REPORT_DOCS = 20  # documents held out to measure the tokenizer trained at first use (tokenizer_report.json)


class BatchList(IterableDataset):
    """A fixed list of batches (validation); an IterableDataset so Lightning adds no padding sampler."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class CodeDataModule(pl.LightningDataModule):
    """Code corpus for causal-LM training: any source, streaming filters, packed fixed-length sequences."""

    def __init__(
        self,
        *,
        tokenizer: str,
        train_source: str = "python-install",
        val_source: str | None = None,
        text_column: str = "content",
        train_split: str = "train",
        val_split: str = "train",
        streaming: bool = True,
        pattern: str = "*.py",
        keywords: list[str] | None = None,
        quality_filter: bool = False,
        dedup: bool = False,
        on_error: str = "error",
        seq_len: int = 128,
        packing: str = "concat",
        pretokenize: bool = False,
        cache_dir: str = ".cache/lmrecipes",
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        heldout_fraction: float = 0.02,
        val_max_docs: int | None = 1000,
        shuffle_seed: int = 0,
        train_tokenizer_vocab: int | None = None,
        train_tokenizer_max_chars: int = 20_000_000,
        progress: bool = True,
    ):
        """
        Args:
            tokenizer: tokenizer folder or Hub id; a folder that does not exist yet is trained first when
                ``train_tokenizer_vocab`` is set (on the training source, after the filters).
            train_source: ``python-install`` (this interpreter's stdlib + site-packages), a directory of source
                files, local files (jsonl/json/csv/parquet/txt, globs, comma-separated) or a Hub dataset id.
            val_source: validation source; None holds out ``heldout_fraction`` of ``train_source`` by path hash.
            text_column: column that holds the document text.
            train_split: split of ``train_source`` (datasets sources).
            val_split: split of ``val_source``.
            streaming: stream datasets sources instead of downloading/materialising them.
            pattern: file glob for directory sources.
            keywords: keep only documents containing one of these strings (the course's filter); None keeps all.
            quality_filter: apply the book's line-length / alphanumeric / auto-generated heuristics.
            dedup: drop exact duplicates (whitespace-insensitive), globally across ranks and workers.
            on_error: ``error`` stops at a bad record (naming file and line); ``skip`` drops and counts it.
            seq_len: tokens per training sequence.
            packing: ``concat`` (EOS-joined stream cut in windows) or ``overflow`` (full chunks per document).
            pretokenize: tokenize once into a memory-mapped cache under ``cache_dir`` instead of streaming.
            cache_dir: where pre-tokenized caches live (shared by later runs with the same inputs).
            batch_size: sequences per batch per device.
            val_batch_size: validation batch size (default ``batch_size``).
            num_workers: DataLoader worker processes; streaming tokenization runs inside them.
            heldout_fraction: share of documents held out for validation when ``val_source`` is None.
            val_max_docs: validation documents read at most (per run, before packing); None reads them all.
            shuffle_seed: seed of the per-epoch window order in pre-tokenized mode.
            train_tokenizer_vocab: vocabulary size of a tokenizer trained when ``tokenizer`` is missing.
            train_tokenizer_max_chars: characters of training text read for tokenizer training.
            progress: show progress bars for corpus reading, tokenizer training and tokenization.
        """
        super().__init__()
        self.save_hyperparameters()
        check_mode(packing)
        if on_error not in ("error", "skip"):
            raise ValueError(f"data.on_error={on_error!r} is not one of ('error', 'skip')")
        if not 0 <= heldout_fraction < 1:
            raise ValueError(f"data.heldout_fraction={heldout_fraction} must be in [0, 1)")
        if val_source is None and heldout_fraction == 0:
            raise ValueError(
                "set data.val_source or a positive data.heldout_fraction: validation needs documents"
            )
        self.tokenizer_path = self._ensure_tokenizer()
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {self.tokenizer_path!r} has no EOS token; packing needs one")
        self._val_batches: list[dict] | None = None
        self._consumed = 0
        self._cursors: dict[int, list[int]] = {}
        self._stats: dict[int, list[int]] = {}
        self._resume: dict | None = None
        self._fingerprint: str | None = None

    # values linked into the model by the CLI
    @property
    def seq_len(self) -> int:
        return self.hparams.seq_len

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_token_id

    def _ensure_tokenizer(self) -> str:
        """The tokenizer path, training it first (once, under a file lock shared by all ranks) when asked to."""
        path, vocab = self.hparams.tokenizer, self.hparams.train_tokenizer_vocab
        if vocab is None or Path(path, "tokenizer.json").exists():
            return path
        from lmrecipes.bpe import TooFewDocuments, tokenizer_command

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{Path(path)}.lock"):
            if not Path(path, "tokenizer.json").exists():
                try:
                    tokenizer_command(
                        source=self.hparams.train_source,
                        out=path,
                        vocab_size=vocab,
                        keywords=self.hparams.keywords,
                        max_chars=self.hparams.train_tokenizer_max_chars,
                        report_docs=REPORT_DOCS,
                        text_column=self.hparams.text_column,
                        pattern=self.hparams.pattern,
                        on_error=self.hparams.on_error,
                        progress=self.hparams.progress,
                    )
                except TooFewDocuments as err:  # names the data keys, not the tokenizer command's options
                    raise ValueError(
                        f"data.train_source={self.hparams.train_source!r} gave only {err.kept} documents (after "
                        "data.keywords and data.train_tokenizer_max_chars), too few to train a tokenizer on (it "
                        f"needs more than {REPORT_DOCS}; that many are held out to report on): add "
                        "documents, loosen data.keywords, or give a trained tokenizer in data.tokenizer and leave "
                        "data.train_tokenizer_vocab unset"
                    ) from None
        return path

    def _source_factory(self, split: str) -> functools.partial:
        """A picklable ``open_source`` call (workers rebuild the source; no DataModule travels with it)."""
        h = self.hparams
        use_val = split != "train" and h.val_source is not None
        return functools.partial(
            open_source,
            h.val_source if use_val else h.train_source,
            text_column=h.text_column,
            split=h.val_split if use_val else h.train_split,
            streaming=h.streaming,
            pattern=h.pattern,
            on_error=h.on_error,
            progress=h.progress,
        )

    def _source(self, split: str):
        return self._source_factory(split)()

    def _filters(self) -> FilterPipeline:
        return self._filter_factory()()

    def _filter_factory(self) -> functools.partial:
        h = self.hparams
        return functools.partial(FilterPipeline, keywords=h.keywords, quality=h.quality_filter, dedup=h.dedup)

    def _heldout(self) -> float:
        return self.hparams.heldout_fraction if self.hparams.val_source is None else 0.0

    def _train_docs(self):
        """Kept training documents of the whole source (pre-tokenized mode)."""
        filters, heldout = self._filters(), self._heldout()
        for raw_index, doc in self._source("train").iter_raw():
            if not is_heldout(doc, heldout) and filters(doc):
                yield raw_index, doc
        if filters.counts["kept"] == 0:
            raise ValueError(f"the filters kept no training documents: {filters.summary()}")

    def _source_fingerprint(self) -> str:
        """The training source's fingerprint, computed once per run (listing a big tree takes seconds)."""
        if self._fingerprint is None:
            self._fingerprint = self._source("train").fingerprint()
        return self._fingerprint

    def _cache_key(self) -> dict:
        h = self.hparams
        return {
            "source": self._source_fingerprint(),
            "filters": [h.keywords, h.quality_filter, h.dedup],
            "heldout": self._heldout(),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "packing": h.packing,
        }

    def prepare_data(self) -> None:
        if self.hparams.pretokenize:
            ensure_token_file(
                Path(self.hparams.cache_dir),
                self._cache_key(),
                self._train_docs,
                self.tokenizer,
                mode=self.hparams.packing,
                progress=self.hparams.progress,
            )

    def setup(self, stage: str) -> None:
        if self._val_batches is None:
            self._val_batches = self._build_val_batches()

    def _build_val_batches(self) -> list[dict]:
        """Validation windows of this rank (windows i with i % world_size == rank), batched once."""
        h = self.hparams
        filters, heldout = self._filters(), self._heldout()
        docs, source = [], self._source("val")
        if isinstance(source, SourceTree) and h.val_source is None:  # read only held-out files
            raw = source.iter_raw(select_path=functools.partial(path_is_heldout, fraction=heldout))
        else:
            raw = source.iter_raw()
        with tqdm(desc="validation documents", total=h.val_max_docs, disable=not h.progress) as bar:
            for _, doc in raw:
                if (h.val_source is not None or is_heldout(doc, heldout)) and filters(doc):
                    docs.append((len(docs), doc))
                    bar.update()
                    if h.val_max_docs is not None and len(docs) >= h.val_max_docs:
                        break
        ids = tokenize_groups(docs, self.tokenizer)
        windows = [
            w for w, _ in iter_windows(ids, seq_len=h.seq_len, eos_id=self.eos_token_id, mode=h.packing)
        ]
        if not windows:
            raise ValueError(
                f"no validation sequence of {h.seq_len} tokens could be built from {len(docs)} documents "
                f"({filters.summary()}); check data.val_source/heldout_fraction, the filters, or lower seq_len"
            )
        rank_zero_info(
            f"validation: {len(windows)} sequences of {h.seq_len} tokens from {len(docs)} documents "
            f"({filters.summary()})"
        )
        rank, world = self._rank_world()
        mine = torch.from_numpy(np.stack(windows[rank::world]))  # (N, T)
        size = h.val_batch_size or h.batch_size
        return [{"input_ids": mine[i : i + size]} for i in range(0, len(mine), size)]

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _token_windows(self) -> tuple[Path, np.ndarray, np.ndarray, dict]:
        """(cache folder, memory-mapped tokens, window starts, stats) of the pre-tokenized training set."""
        h = self.hparams
        folder = ensure_token_file(Path(h.cache_dir), self._cache_key(), self._train_docs, self.tokenizer,
                                   mode=h.packing, progress=h.progress)  # fmt: skip
        tokens, lengths, meta = load_token_file(folder)
        return folder, tokens, window_starts(lengths, seq_len=h.seq_len, mode=h.packing), meta

    def batches_per_epoch(self) -> int | None:
        """Batches per rank that use every training window once (pre-tokenized data); None when streamed, whose
        length nobody knows before reading it all."""
        if not self.hparams.pretokenize:
            return None
        _, world = self._rank_world()
        return len(self._token_windows()[2]) // (self.hparams.batch_size * world)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        rank, world = self._rank_world()
        resume = self._resume_for(rank, world)
        if h.pretokenize:
            folder, tokens, starts, meta = self._token_windows()
            packed = len(starts) * h.seq_len / max(1, len(tokens))
            rank_zero_info(
                f"pre-tokenized cache {folder}: {meta['documents']:,} documents, {meta['tokens']:,} "
                f"tokens, {len(starts):,} sequences ({packed:.2%} of the token file packed)"
            )
            dataset = WindowStream(
                tokens,
                starts,
                seq_len=h.seq_len,
                batch_size=h.batch_size,
                seed=h.shuffle_seed,
                rank=rank,
                world_size=world,
                resume=resume,
            )
        else:
            spec = StreamSpec(
                make_source=self._source_factory("train"),
                make_filters=self._filter_factory(),
                tokenizer_path=self.tokenizer_path,
                seq_len=h.seq_len,
                batch_size=h.batch_size,
                mode=h.packing,
                heldout_fraction=self._heldout(),
            )
            dataset = PackedStream(spec, rank=rank, world_size=world, resume=resume)
        return DataLoader(
            dataset, batch_size=None, pin_memory=torch.cuda.is_available(), **loader_options(h.num_workers)
        )

    def val_dataloader(self) -> DataLoader:
        if self._val_batches is None:
            self.setup("validate")
        return DataLoader(BatchList(self._val_batches), batch_size=None, **loader_options(0))

    test_dataloader = val_dataloader

    # -- data position: the DataModule, not the loader, owns it (see data/stream.py) --

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        position = batch.pop("position", None)
        stats = batch.pop("stats", None)
        if position is not None and self.trainer is not None and self.trainer.training:
            logical, *cursor = position.tolist()
            self._cursors[logical] = cursor
            self._consumed += 1
            if stats is not None:
                self._stats[logical] = stats.tolist()
        return batch

    def data_stats(self) -> dict[str, float]:
        """Documents seen/kept and tokens packed by this rank's streams since this process started."""
        if not self._stats:
            return {}
        seen, kept, tokens_in, tokens_out = (sum(col) for col in zip(*self._stats.values()))
        return {
            "data/docs_seen": seen,
            "data/docs_kept": kept,
            "data/tokens_tokenized": tokens_in,
            "data/packed_fraction": tokens_out / max(1, tokens_in),
        }

    def _signature(self) -> dict:
        """What a saved position depends on; resuming with any of it changed cannot reuse the cursors."""
        h = self.hparams
        return {
            "batch_size": h.batch_size,
            "seq_len": h.seq_len,
            "packing": h.packing,
            # streamed positions are per DataLoader worker; pre-tokenized ones are one count for all
            "num_workers": None if h.pretokenize else max(1, h.num_workers),
            "pretokenize": h.pretokenize,
            "shuffle_seed": h.shuffle_seed,
            "source": self._source_fingerprint(),
            "filters": [h.keywords, h.quality_filter, h.dedup, self._heldout()],
        }

    def state_dict(self) -> dict:
        mine = {"consumed": self._consumed, "cursors": [[k, *v] for k, v in sorted(self._cursors.items())]}
        # every rank's position, not only rank 0's
        return {"signature": self._signature(), "ranks": gather_from_ranks(mine)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def _resume_for(self, rank: int, world: int) -> dict | None:
        """This rank's saved position, after checking the run still reads the same data the same way."""
        if self._resume is None:
            return None
        saved, now = self._resume["signature"], self._signature()
        changed = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
        if len(self._resume["ranks"]) != world:
            changed["world_size"] = (len(self._resume["ranks"]), world)
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"cannot resume the data position: the checkpoint was written with different data settings ({detail}). "
                "Resume with the original settings, or start a new run from the weights (model.pretrained)."
            )
        mine = self._resume["ranks"][rank]
        self._consumed = mine["consumed"]
        self._cursors = {c[0]: c[1:] for c in mine["cursors"]}
        return {"consumed": self._consumed, "cursors": dict(self._cursors)}
