"""The causal-LM DataModule: documents -> filters -> tokenizer -> packed windows, streaming or pre-tokenized."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from lmrecipes.data.filters import FilterPipeline
from lmrecipes.data.groups import (
    CodeFilters,
    CodeSource,
    LoaderConfig,
    PackingConfig,
    TokenizerTraining,
    plain,
)
from lmrecipes.data.packing import PACKING_MODES, iter_windows
from lmrecipes.data.position import StreamPosition, check_same_data
from lmrecipes.data.prepare import PrepareSpec, ensure_prepared
from lmrecipes.data.prepared import PreparedData, WindowStream
from lmrecipes.data.pretokenize import tokenize_groups, tokenizer_fingerprint
from lmrecipes.data.shards import describe_change, parts_per_shard
from lmrecipes.data.sources import SourceTree, open_source
from lmrecipes.data.splits import is_heldout, path_is_heldout
from lmrecipes.data.stream import PackedStream, StreamSpec, load_tokenizer, loader_options
from lmrecipes.ranks import gather_from_ranks

REPORT_DOCS = 20  # documents held out to measure the tokenizer trained at first use (tokenizer_report.json)
# default groups (frozen, so one instance serves every call)
SOURCE, FILTERS, PACKING, TRAIN_TOKENIZER = CodeSource(), CodeFilters(), PackingConfig(), TokenizerTraining()
LOADER = LoaderConfig(batch_size=32, shuffle_seed=0)


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
        source: CodeSource = SOURCE,
        filters: CodeFilters = FILTERS,
        packing: PackingConfig = PACKING,
        loader: LoaderConfig = LOADER,
        train_tokenizer: TokenizerTraining = TRAIN_TOKENIZER,
        progress: bool = True,
    ):
        """
        Args:
            tokenizer: tokenizer folder or Hub id; a folder that does not exist yet is trained first when
                ``train_tokenizer.vocab_size`` is set (on the training source, after the filters).
            source: the documents, and which of them are held out for validation.
            filters: which documents are kept.
            packing: sequence length, packing mode, and streamed or pre-tokenized.
            loader: batch sizes, DataLoader workers (streaming tokenization runs inside them), the seed of the
                per-epoch shard order (streamed) or window order (pre-tokenized), and the streamed shuffle block.
            train_tokenizer: the tokenizer trained when ``tokenizer`` is missing.
            progress: show progress bars for corpus reading, tokenizer training and tokenization.
        """
        super().__init__()
        self.source, self.filters = CodeSource.of(source), CodeFilters.of(filters)
        self.packing, self.loader = PackingConfig.of(packing), LoaderConfig.of(loader)
        self.train_tokenizer = TokenizerTraining.of(train_tokenizer)
        # checkpoints' hyper-parameters hold plain types only (weights_only loading): the groups as dicts
        source, filters, packing = plain(self.source), plain(self.filters), plain(self.packing)
        loader, train_tokenizer = plain(self.loader), plain(self.train_tokenizer)
        self.save_hyperparameters()
        s = self.source
        if self.packing.mode not in PACKING_MODES:
            raise ValueError(f"data.packing.mode={self.packing.mode!r} is not one of {PACKING_MODES}")
        if s.on_error not in ("error", "skip"):
            raise ValueError(f"data.source.on_error={s.on_error!r} is not one of ('error', 'skip')")
        if not 0 <= s.heldout_fraction < 1:
            raise ValueError(f"data.source.heldout_fraction={s.heldout_fraction} must be in [0, 1)")
        if s.val_source is None and s.heldout_fraction == 0:
            raise ValueError(
                "set data.source.val_source or a positive data.source.heldout_fraction: validation needs documents"
            )
        self.tokenizer_path = self._ensure_tokenizer()
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {self.tokenizer_path!r} has no EOS token; packing needs one")
        self._val_batches: list[dict] | None = None
        self._position = StreamPosition()
        self._resume: dict | None = None
        self._fingerprint: str | None = None
        self._shards: list | None = None
        self._logged_streams = 0
        self._windows: tuple | None = None  # (prepared data, shard of each window, window starts)
        self._train_built = False  # a train loader was built (load_state_dict may come after it)

    # values linked into the model by the CLI
    @property
    def seq_len(self) -> int:
        return self.packing.seq_len

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
        path, vocab = self.hparams.tokenizer, self.train_tokenizer.vocab_size
        if vocab is None or Path(path, "tokenizer.json").exists():
            return path
        from lmrecipes.bpe import TooFewDocuments, tokenizer_command

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{Path(path)}.lock"):
            if not Path(path, "tokenizer.json").exists():
                try:
                    tokenizer_command(
                        source=self.source.train_source,
                        out=path,
                        vocab_size=vocab,
                        keywords=self.filters.keywords,
                        max_chars=self.train_tokenizer.max_chars,
                        report_docs=REPORT_DOCS,
                        text_column=self.source.text_column,
                        pattern=self.source.pattern,
                        on_error=self.source.on_error,
                        progress=self.hparams.progress,
                    )
                except TooFewDocuments as err:  # names the data keys, not the tokenizer command's options
                    raise ValueError(
                        f"data.source.train_source={self.source.train_source!r} gave only {err.kept} documents "
                        "(after data.filters.keywords and data.train_tokenizer.max_chars), too few to train a "
                        f"tokenizer on (it needs more than {REPORT_DOCS}; that many are held out to report on): add "
                        "documents, loosen data.filters.keywords, or give a trained tokenizer in data.tokenizer and "
                        "leave data.train_tokenizer.vocab_size unset"
                    ) from None
        return path

    def _source_factory(self, split: str) -> functools.partial:
        """A picklable ``open_source`` call (workers rebuild the source; no DataModule travels with it)."""
        s = self.source
        use_val = split != "train" and s.val_source is not None
        return functools.partial(
            open_source,
            s.val_source if use_val else s.train_source,
            text_column=s.text_column,
            split=s.val_split if use_val else s.train_split,
            streaming=s.streaming,
            pattern=s.pattern,
            on_error=s.on_error,
            progress=self.hparams.progress,
        )

    def _source(self, split: str):
        return self._source_factory(split)()

    def _filters(self) -> FilterPipeline:
        return self._filter_factory()()

    def _filter_factory(self) -> functools.partial:
        f = self.filters
        return functools.partial(FilterPipeline, keywords=f.keywords, quality=f.quality_filter, dedup=f.dedup)

    def _heldout(self) -> float:
        return self.source.heldout_fraction if self.source.val_source is None else 0.0

    def _source_fingerprint(self) -> str:
        """The training source's fingerprint, computed once per run (listing a big tree takes seconds)."""
        if self._fingerprint is None:
            self._fingerprint = self._source("train").fingerprint()
        return self._fingerprint

    def prepare_spec(self, shard_chars: int | None = None) -> PrepareSpec:
        """What ``lmrecipes prepare`` (and ``packing.pretokenize``) builds from this run's data settings."""
        f, sizes = self.filters, {} if shard_chars is None else {"shard_chars": shard_chars}
        return PrepareSpec(
            make_source=self._source_factory("train"),
            source_fingerprint=self._source_fingerprint(),
            tokenizer_path=self.tokenizer_path,
            mode=self.packing.mode,
            keywords=f.keywords,
            quality=f.quality_filter,
            dedup=f.dedup,
            heldout_fraction=self._heldout(),
            **sizes,
        )

    def prepare_data(self) -> None:
        if self.packing.pretokenize and self.packing.prepared is None:
            ensure_prepared(Path(self.packing.cache_dir), self.prepare_spec(), self.tokenizer)

    def setup(self, stage: str) -> None:
        if self._val_batches is None:
            self._val_batches = self._build_val_batches()

    def _build_val_batches(self) -> list[dict]:
        """Validation windows of this rank (windows i with i % world_size == rank), batched once."""
        s, p, max_docs = self.source, self.packing, self.source.val_max_docs
        filters, heldout = self._filters(), self._heldout()
        docs, source = [], self._source("val")
        if isinstance(source, SourceTree) and s.val_source is None:  # read only held-out files
            raw = source.iter_raw(select_path=functools.partial(path_is_heldout, fraction=heldout))
        else:
            raw = source.iter_raw()
        with tqdm(desc="validation documents", total=max_docs, disable=not self.hparams.progress) as bar:
            for _, doc in raw:
                if (s.val_source is not None or is_heldout(doc, heldout)) and filters(doc):
                    docs.append((len(docs), doc))
                    bar.update()
                    if max_docs is not None and len(docs) >= max_docs:
                        break
        ids = tokenize_groups(docs, self.tokenizer)
        windows = [w for w, _ in iter_windows(ids, seq_len=p.seq_len, eos_id=self.eos_token_id, mode=p.mode)]
        if not windows:
            raise ValueError(
                f"no validation sequence of {p.seq_len} tokens could be built from {len(docs)} documents "
                f"({filters.summary()}); check data.source.val_source/heldout_fraction, the filters, or lower "
                "data.packing.seq_len"
            )
        rank_zero_info(
            f"validation: {len(windows)} sequences of {p.seq_len} tokens from {len(docs)} documents "
            f"({filters.summary()})"
        )
        rank, world = self._rank_world()
        mine = torch.from_numpy(np.stack(windows[rank::world]))  # (N, T)
        size = self.loader.val_batch_size or self.loader.batch_size
        return [{"input_ids": mine[i : i + size]} for i in range(0, len(mine), size)]

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _windowed(self) -> bool:
        """Training reads pre-tokenized windows (a prepared folder, or one built in cache_dir), not a stream."""
        return self.packing.pretokenize or self.packing.prepared is not None

    def _token_windows(self) -> tuple[PreparedData, np.ndarray, np.ndarray]:
        """(prepared data, shard of each window, window starts) of the pre-tokenized training set: the folder
        ``packing.prepared`` names, or the one ``pretokenize`` builds under ``cache_dir``. Read once per run: the
        step count, every train loader Lightning asks for and every checkpoint's signature use it (a folder of
        thousands of shards has as many index files to read and sizes to check)."""
        if self._windows is not None:
            return self._windows
        p = self.packing
        if p.prepared is not None and p.pretokenize:
            raise ValueError(
                f"data.packing.prepared={p.prepared!r} and data.packing.pretokenize=true both say where the "
                "pre-tokenized data comes from; set one"
            )
        if p.prepared is None:
            location = ensure_prepared(Path(p.cache_dir), self.prepare_spec(), self.tokenizer)
        else:
            location = p.prepared
        data = PreparedData(location)
        data.check_matches(tokenizer=tokenizer_fingerprint(self.tokenizer), mode=p.mode)
        data.check_files()
        self._windows = (data, *data.windows(p.seq_len))
        return self._windows

    def batches_per_epoch(self) -> int | None:
        """Batches per rank that use every training window once (pre-tokenized data); None when streamed, whose
        length nobody knows before reading it all."""
        if not self._windowed():
            return None
        _, world = self._rank_world()
        return len(self._token_windows()[2]) // (self.loader.batch_size * world)

    def train_dataloader(self) -> DataLoader:
        p, batch_size = self.packing, self.loader.batch_size
        rank, world = self._rank_world()
        resume = self._resume_for(rank, world)
        if self._windowed():
            data, files, starts = self._token_windows()
            m = data.manifest
            rank_zero_info(
                f"pre-tokenized data {data.location}: {m['counts']['documents']:,} documents, {m['tokens']:,} "
                f"tokens in {len(m['shards'])} shards, {len(starts):,} sequences "
                f"({len(starts) * p.seq_len / max(1, m['tokens']):.2%} of the tokens packed)"
            )
            dataset = WindowStream(
                data,
                starts,
                files=files,
                seq_len=p.seq_len,
                batch_size=batch_size,
                seed=self._shuffle_seed(),
                rank=rank,
                world_size=world,
                resume=resume,
            )
        else:
            spec = StreamSpec(
                make_source=self._source_factory("train"),
                make_filters=self._filter_factory(),
                tokenizer_path=self.tokenizer_path,
                seq_len=p.seq_len,
                batch_size=batch_size,
                mode=p.mode,
                heldout_fraction=self._heldout(),
                shuffle_buffer=self.loader.shuffle_buffer,
                seed=self._shuffle_seed(),
            )
            self._log_streams(world * max(1, self.loader.num_workers))
            dataset = PackedStream(spec, rank=rank, world_size=world, resume=resume)
        self._train_built = True
        return DataLoader(
            dataset,
            batch_size=None,
            **loader_options(self.loader.num_workers),
        )

    def _shard_list(self) -> list:
        """The training source's shards, listed once per run."""
        if self._shards is None:
            self._shards = self._source("train").shards()
        return self._shards

    def _log_streams(self, streams: int) -> None:
        """Rank 0, once: how the shards spread over the streams, and what that costs."""
        if self._logged_streams == streams:  # Lightning asks for the train loader more than once per fit
            return
        self._logged_streams = streams
        n = len(self._shard_list())
        parts = parts_per_shard(n, streams)
        rank_zero_info(
            f"streaming {n:,} shard(s) to {streams} stream(s) (ranks x DataLoader workers): "
            + (f"fewer shards than streams, each is split into {parts} row-interleaved parts, so every document "
               f"is read {parts} times per epoch (read amplification {parts}x); more files avoid it"
               if parts > 1 else "each document is read once per epoch")
        )  # fmt: skip
        if self.filters.dedup and streams > 1:
            rank_zero_info(
                "data.filters.dedup drops documents repeated within one stream's shards only; global exact "
                "de-duplication across all shards is what `lmrecipes prepare` does"
            )

    def val_dataloader(self) -> DataLoader:
        if self._val_batches is None:
            self.setup("validate")
        return DataLoader(BatchList(self._val_batches), batch_size=None, **loader_options(0))

    test_dataloader = val_dataloader

    # -- data position: the DataModule, not the loader, owns it (see data/stream.py) --

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Before the copy to the device (Lightning calls both hooks right before the step): reading the position of
        # a GPU tensor would wait for the previous step's kernels and undo the non-blocking copy.
        position, stats, seen = (batch.pop(key, None) for key in ("position", "stats", "seen"))
        if position is not None and self.trainer is not None and self.trainer.training:
            self._position.count(position, stats, seen)
        return batch

    def data_stats(self) -> dict[str, float]:
        """Documents seen/kept and tokens packed by this rank's streams since this process started."""
        return self._position.data_stats()

    def _signature(self) -> dict:
        """What a saved position depends on; resuming with any of it changed cannot reuse the cursors."""
        p, loader, f = self.packing, self.loader, self.filters
        return {  # keys as in checkpoints written before the groups (data.loader.batch_size was data.batch_size...)
            "batch_size": loader.batch_size,
            "seq_len": p.seq_len,
            "packing": p.mode,
            # streamed positions are per DataLoader worker; pre-tokenized ones are one count for all
            "num_workers": None if self._windowed() else max(1, loader.num_workers),
            "pretokenize": p.pretokenize if p.prepared is None else self._prepared_fingerprint(),
            "shuffle_seed": self._shuffle_seed(),
            # streamed positions are places in shards (format 2); checkpoints of the content-hash streams lack it
            "stream_format": None if self._windowed() else 2,
            "shuffle_buffer": None if self._windowed() else loader.shuffle_buffer,
            "source": self._source_fingerprint(),
            "filters": [f.keywords, f.quality_filter, f.dedup, self._heldout()],
        }

    def _prepared_fingerprint(self) -> str:
        """A prepared folder is named in a saved position by its content: it may move, it may not change."""
        return self._token_windows()[0].manifest["fingerprint"]

    def _shuffle_seed(self) -> int:
        """``loader.shuffle_seed``; when None, the run's ``seed_everything`` value (a resume keeps the saved one)."""
        seed = self.loader.shuffle_seed
        if seed is None and self._resume is not None:
            return self._resume["signature"]["shuffle_seed"]
        return seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def state_dict(self) -> dict:
        state = {"signature": self._signature(), "ranks": gather_from_ranks(self._position.mine())}
        if not self._windowed():  # to name what changed if the source does
            state["shards"] = [[shard.name, shard.size] for shard in self._shard_list()]
        return state

    def load_state_dict(self, state: dict) -> None:
        self._resume = state
        loop = getattr(self.trainer, "fit_loop", None)
        if self._train_built and loop is not None:
            # FSDP2 (ModelParallelStrategy) restores after its setup, where configure_optimizers ->
            # estimated_stepping_batches (max_epochs) already built the train loader and prefetched its first batch
            # without this position. Private, no public way: drop that loader so the fit loop builds it again from
            # here (a persistent worker holds its own copy of the dataset, so the loader must be new).
            # tests/test_fsdp_data.py fails if Lightning renames it.
            if loop._data_fetcher is not None:
                loop._data_fetcher.teardown()  # its iterator (and workers) with the prefetched batch
            loop._combined_loader = None

    def _resume_for(self, rank: int, world: int) -> dict | None:
        """This rank's saved position, after checking the run still reads the same data the same way."""
        if self._resume is None:
            return None
        saved, now = self._resume["signature"], self._signature()
        old_world, more = len(self._resume["ranks"]), []
        if old_world != world and not self._windowed():
            more.append(
                f"world_size: {old_world} -> {world} (a streamed position is a place in each rank and DataLoader "
                "worker's own shards, with no global sample count to convert: resume on the same number of "
                "processes, or train from `lmrecipes prepare`d data, which resumes on any number)"
            )
        if saved.get("source") != now["source"] and "shards" in self._resume:
            more.append(
                f"shards: {describe_change(self._resume['shards'], self._shard_list()) or 'same list'}"
            )
        check_same_data(saved, now, more="; ".join(more))
        if old_world == world:
            return self._position.restore(self._resume["ranks"][rank])
        resume = self._position.resized(self._resume["ranks"][0], old_world=old_world,
                                        batch_size=self.loader.batch_size)  # fmt: skip
        rank_zero_info(
            f"lmrecipes: resuming a data position saved by {old_world} processes on {world}: "
            f"{self._position.base:,} pre-tokenized windows done; the sequence goes on from there"
        )
        return resume
