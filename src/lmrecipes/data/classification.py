"""The sequence(-pair) classification DataModule: labelled texts -> tokenized examples -> dynamically padded batches."""

from __future__ import annotations

import glob
import itertools

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lmrecipes.data.groups import Columns, LabelledSource, LoaderConfig, PaddingConfig, plain
from lmrecipes.data.samplers import Draw, ShardSampler, TrainPosition, fingerprint
from lmrecipes.data.sources import open_source
from lmrecipes.data.stream import loader_options
from lmrecipes.losses import IGNORE_INDEX
from lmrecipes.paths import resolve_pretrained

SPLITS = ("train", "validation", "test", "predict")
# default groups (frozen, so one instance serves every call)
COLUMNS, PADDING, LOADER = Columns(), PaddingConfig(), LoaderConfig(batch_size=8)


def _local_files(spec: str) -> bool:
    """Whether ``spec`` names local files, folders or globs (comma-separated), as opposed to a Hub dataset."""
    return all(glob.glob(part.strip()) for part in spec.split(",") if part.strip())


class Examples(Dataset):
    """Tokenized examples as dicts of lists; ``index`` is the row's position in its split (for ordered predictions).
    A padding draw of the exactly-once sampler (``keep`` False, see data/samplers.py) comes with label -100."""

    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, item: int | Draw) -> dict:
        i, keep = item if isinstance(item, tuple) else (item, True)
        return self.features[i] if keep else {**self.features[i], "labels": IGNORE_INDEX}

    def fingerprint(self) -> str:
        """A hash of every row's tokens and label, in order."""
        rows = self.features
        ids = np.fromiter(itertools.chain.from_iterable(f["input_ids"] for f in rows), dtype=np.int64)
        lengths = np.array([len(f["input_ids"]) for f in rows], dtype=np.int64)
        labels = np.array([f.get("labels", IGNORE_INDEX) for f in rows], dtype=np.int64)
        return fingerprint(ids, lengths, labels)


class ClassificationDataModule(pl.LightningDataModule):
    """One or two text columns and a label column from any source (HF course ch.3: GLUE MRPC)."""

    def __init__(
        self,
        *,
        tokenizer: str,
        source: LabelledSource,
        columns: Columns = COLUMNS,
        label_names: list[str] | None = None,
        padding: PaddingConfig = PADDING,
        loader: LoaderConfig = LOADER,
        progress: bool = True,
    ):
        """
        Args:
            tokenizer: tokenizer folder, Hub id or ``package://module/folder`` (the model's).
            source: each split's source and split name.
            columns: the text, text pair, label and id columns.
            label_names: class names in id order; default: ``["0", "1", ...]`` for integer labels or the sorted
                distinct strings of the training labels.
            padding: truncation, padding and length grouping.
            loader: batch sizes (the course: 8), DataLoader workers and the training order's seed.
            progress: progress bars.
        """
        super().__init__()
        self.source, self.columns = LabelledSource.of(source), Columns.of(columns)
        self.padding, self.loader = PaddingConfig.of(padding), LoaderConfig.of(loader)
        # checkpoints' hyper-parameters hold plain types only (weights_only loading): the groups as dicts
        source, columns, padding, loader = map(plain, (self.source, self.columns, self.padding, self.loader))
        # label_names lives in the model's hparams (linked, resolved); loggers refuse a key the two hold differently.
        self.save_hyperparameters(ignore=["label_names"])
        pair = self.columns.text_pair_column
        if pair is not None and pair == self.columns.text_column:
            raise ValueError(
                f"data.columns.text_pair_column={pair!r} is the same column as data.columns.text_column"
            )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(tokenizer))
        self._rows: dict[str, list[dict]] = {}
        self._label_names = list(label_names) if label_names else None
        self._data: dict[str, Examples] = {}
        self._position = TrainPosition()

    # values linked into the model by the CLI
    @property
    def tokenizer_path(self) -> str:
        return resolve_pretrained(self.hparams.tokenizer)

    @property
    def label_names(self) -> list[str]:
        if self._label_names is None:
            self._label_names = self._infer_label_names(self._read("train"))
        return self._label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def _source_args(self, split: str) -> tuple[str, str]:
        h = self.source
        sources = {"train": h.train_source, "validation": h.val_source, "test": h.test_source,
                   "predict": h.predict_source or h.test_source}  # fmt: skip
        splits = {"train": h.train_split, "validation": h.val_split, "test": h.test_split,
                  "predict": h.predict_split}  # fmt: skip
        spec = sources[split] or h.train_source
        if not _local_files(spec):
            return spec, splits[split]
        # Local files have no splits: a split without its own source would silently be the training rows.
        if split != "train" and sources[split] is None:
            key = {"validation": "val_source", "test": "test_source", "predict": "predict_source"}[split]
            raise ValueError(f"data.source.{key} is not set and data.source.train_source={spec!r} is local "
                             f"files, which hold no {splits[split]!r} split; set data.source.{key}")  # fmt: skip
        return spec, "train"  # the csv/json/parquet builders name a file's only split "train"

    def _read(self, split: str) -> list[dict]:
        """Raw rows of a split (cached), with the text, pair and label columns checked."""
        if split in self._rows:
            return self._rows[split]
        h, pair = self.source, self.columns.text_pair_column
        spec, name = self._source_args(split)
        source = open_source(spec, text_column=self.columns.text_column, split=name, streaming=h.streaming,
                             config_name=h.dataset_config, on_error=h.on_error,
                             progress=self.hparams.progress)  # fmt: skip
        rows = []
        for _, doc in source.iter_raw():
            if pair is not None and pair not in doc:
                raise ValueError(f"{spec} [{name}] has no column {pair!r} (data.columns.text_pair_column); "
                                 f"columns: {sorted(doc)}")  # fmt: skip
            rows.append(doc)
            if h.max_examples is not None and len(rows) >= h.max_examples:
                break
        if not rows:
            raise ValueError(f"the {split} split of {spec!r} ({name!r}) is empty")
        self._rows[split] = rows
        return rows

    def _infer_label_names(self, rows: list[dict]) -> list[str]:
        labels = [r.get(self.columns.label_column) for r in rows]
        if any(v is None for v in labels):
            raise ValueError(f"training rows lack the label column {self.columns.label_column!r}")
        if all(isinstance(v, int) for v in labels):
            return [str(i) for i in range(max(labels) + 1)]
        return sorted({str(v) for v in labels})

    def _label_id(self, value, *, split: str, row: int) -> int:
        """Integer label of a row, checked against the label set; -100 means "no label" and is kept."""
        names = self.label_names
        if isinstance(value, bool) or value is None:
            raise ValueError(f"{split} row {row}: label {value!r} is not an integer or a label name")
        if isinstance(value, int):
            if value == IGNORE_INDEX or 0 <= value < len(names):
                return value
            raise ValueError(
                f"{split} row {row}: label {value} is outside [0, {len(names)}) (labels: {names})"
            )
        if str(value) not in names:
            raise ValueError(f"{split} row {row}: unknown label {value!r}; known labels: {names}")
        return names.index(str(value))

    def _tokenize(self, split: str) -> Examples:
        h = self.columns
        rows = self._read(split)
        pairs = [r[h.text_pair_column] for r in rows] if h.text_pair_column else None
        encoded = self.tokenizer(
            [r["content"] for r in rows], pairs, truncation=True, max_length=self.padding.max_length
        )
        features = []
        for i, row in enumerate(rows):
            feature = {key: encoded[key][i] for key in encoded}
            feature["index"] = i
            if row.get(h.label_column) not in (None, -1):  # GLUE test splits carry -1: unlabelled
                feature["labels"] = self._label_id(row[h.label_column], split=split, row=i)
            features.append(feature)
        labelled = sum("labels" in f for f in features)
        if 0 < labelled < len(features):
            raise ValueError(
                f"the {split} split has {len(features) - labelled} unlabelled rows among labelled ones"
            )
        if split != "predict" and labelled == 0:
            spec, name = self._source_args(split)
            raise ValueError(
                f"the {split} split ({spec!r} [{name!r}]) has no labels in column {h.label_column!r} (every row "
                "is -1 or missing, as in GLUE's test splits, whose labels are private): metrics on it would be "
                "wrong; use `lmrecipes validate`, or `lmrecipes predict` to label it"
            )
        rank_zero_info(f"{split}: {len(features):,} examples")
        return Examples(features)

    def setup(self, stage: str) -> None:
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                  "predict": ("predict",)}[stage]  # fmt: skip
        for split in wanted:
            if split not in self._data:
                self._data[split] = self._tokenize(split)

    def collate(self, features: list[dict]) -> dict:
        """Dynamic padding (to the batch's longest, or a multiple of ``pad_to_multiple_of``), or fixed length."""
        from transformers import DataCollatorWithPadding

        h = self.padding
        padding = "max_length" if h.pad_to_max_length else "longest"
        collator = DataCollatorWithPadding(self.tokenizer, padding=padding, max_length=h.max_length,
                                           pad_to_multiple_of=self._multiple())  # fmt: skip
        return collator(features)

    def _multiple(self) -> int | None:
        multiple = self.padding.pad_to_multiple_of
        if multiple is not None:
            return multiple if multiple > 1 else None
        precision = str(self.trainer.precision) if self.trainer is not None else ""
        return 8 if "16" in precision else None

    def _eval_loader(self, split: str) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        data = self._data[split]
        return DataLoader(data, batch_size=self.loader.val_batch_size or self.loader.batch_size,
                          sampler=ShardSampler(data, rank=rank, world_size=world), collate_fn=self.collate,
                          **loader_options(self.loader.num_workers, persistent=False))  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        """Every training row once per epoch over all ranks, equal batch counts per rank, resumable mid-epoch."""
        h = self.loader
        data = self._data["train"]
        lengths = [len(f["input_ids"]) for f in data.features] if self.padding.group_by_length else None
        sampler = self._position.sampler(data, trainer=self.trainer, batch_size=h.batch_size,
                                         seed=h.shuffle_seed, signature={"data": data.fingerprint()},
                                         lengths=lengths)  # fmt: skip
        return DataLoader(data, batch_size=h.batch_size, sampler=sampler, collate_fn=self.collate,
                          **loader_options(h.num_workers))  # fmt: skip

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Lightning transfers a training batch right before its step: count the batches trained on, for resume
        if self.trainer is not None and self.trainer.training:
            self._position.count()
        return batch

    def state_dict(self) -> dict:
        return {"position": self._position.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "position" in state:
            self._position.load_state_dict(state["position"])

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")

    def prediction_ids(self) -> list:
        """The id of each predict row (``id_column`` or the row number), in row order."""
        column = self.columns.id_column
        return [r.get(column, i) if column else i for i, r in enumerate(self._read("predict"))]
