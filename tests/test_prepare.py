"""``lmrecipes prepare``: the same tokens for any number of processes, resumable after SIGKILL, global dedup,
exactly-once and exact-resume training from the folder, and the bad input it refuses."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from test_cli import OFFLINE, TINY_MODEL, fit_args, read_metric
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from lmrecipes.bpe import train_bpe_tokenizer
from lmrecipes.cli import main
from lmrecipes.data.clm import CodeDataModule
from lmrecipes.data.filters import FilterPipeline, content_digest
from lmrecipes.data.prepare import PrepareSpec, digest64, ensure_prepared, first_occurrences, prepare
from lmrecipes.data.prepared import PreparedData, WindowStream
from lmrecipes.data.pretokenize import encode_batch, tokenizer_fingerprint
from lmrecipes.data.sources import open_source

SHARD_CHARS = 3000  # smaller than most files: about one document per shard, so copies land in other shards


@pytest.fixture(scope="module")
def corpus(code_tree, tmp_path_factory) -> tuple[Path, str]:
    """The real-code tree plus an exact copy and a whitespace-only variant of two of its files; a tokenizer."""
    root = tmp_path_factory.mktemp("prepare")
    tree = root / "tree"
    shutil.copytree(code_tree, tree)
    files = sorted(tree.glob("*.py"))
    (tree / "zz_exact_copy.py").write_text(files[3].read_text())
    (tree / "zz_tabbed_copy.py").write_text(files[10].read_text().replace("    ", "\t"))
    tokenizer = train_bpe_tokenizer([f.read_text() for f in files[:20]], vocab_size=300, progress=False)
    tokenizer.save_pretrained(root / "tok")
    return tree, str(root / "tok")


def _spec(corpus, **overrides) -> PrepareSpec:
    tree, tok = corpus
    fields = dict(make_source=functools.partial(open_source, str(tree), progress=False), source_fingerprint="t",
                  tokenizer_path=tok, shard_chars=SHARD_CHARS)  # fmt: skip
    return PrepareSpec(**(fields | overrides))


def _all_tokens(folder: Path) -> np.ndarray:
    data = PreparedData(folder)
    return np.concatenate([np.asarray(data.tokens(i)) for i in range(len(data.manifest["shards"]))])


def _expected_tokens(corpus) -> tuple[np.ndarray, int]:
    """Independently: the streaming filter pipeline's dedup (first occurrence in source order) + EOS-joined ids."""
    tree, tok = corpus
    tokenizer, filters = AutoTokenizer.from_pretrained(tok), FilterPipeline(dedup=True)
    texts = [d["content"] for _, d in open_source(str(tree), progress=False).iter_raw() if filters(d)]
    ids = [t for doc in encode_batch(tokenizer, texts) for t in (*doc, tokenizer.eos_token_id)]
    return np.asarray(ids), filters.counts["dropped_duplicate"]


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("built")
    return {n: prepare(_spec(corpus), root / f"n{n}", num_proc=n) for n in (1, 2)}


def test_same_tokens_with_1_and_2_processes_and_global_dedup(corpus, built):
    expected, duplicates = _expected_tokens(corpus)
    assert duplicates == 2
    manifests = [json.loads((built[n] / "manifest.json").read_text()) for n in (1, 2)]
    assert manifests[0] == manifests[1]  # every shard's size and checksum, every count
    m = manifests[0]
    assert len(m["shards"]) > 20 and m["counts"]["duplicates"] == 2 and m["dtype"] == "uint16"
    assert m["tokenizer"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(corpus[1]))
    for n in (1, 2):
        assert np.array_equal(_all_tokens(built[n]), expected)
        assert sorted(p.name for p in built[n].iterdir() if not p.name.startswith("shard-")) == [
            "manifest.json"
        ]


def test_first_occurrences_keeps_source_order():
    digests = np.array([5, -3, 5, 9, -3, 9, 7], dtype=np.int64)
    assert first_occurrences(digests).tolist() == [0, 1, 3, 6]


def _prepare_cli(corpus, output: Path, num_proc: int) -> list[str]:
    tree, tok = corpus
    return ["prepare", "-c", OFFLINE, "--data.init_args.source.train_source", str(tree),
            "--data.init_args.tokenizer", tok, "--data.init_args.train_tokenizer.vocab_size", "null",
            "--data.init_args.filters.keywords", "null", "--data.init_args.filters.dedup", "true",
            "--data.init_args.source.heldout_fraction", "0.15", "--model.init_args.config", TINY_MODEL,
            "--data.init_args.packing.seq_len", "32", "--output", str(output), "--num_proc", str(num_proc), "--shard_chars", str(SHARD_CHARS)]  # fmt: skip


@pytest.mark.slow
def test_killed_build_reruns_to_the_uninterrupted_tokens(corpus, tmp_path):
    """SIGKILL a real 2-process ``lmrecipes prepare`` once shards are done; a rerun (1 process) keeps them."""
    out, whole = tmp_path / "killed", tmp_path / "whole"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "lmrecipes", *_prepare_cli(corpus, out, 2)]
    log = open(tmp_path / "prepare.log", "w")  # a file, not a pipe: a full pipe would stall the build
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while len(list(out.glob("shard-*.json"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    ended = proc.poll() is not None
    assert not ended, f"prepare ended before it was killed: {(tmp_path / 'prepare.log').read_text()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the workers of datasets' pool too
    proc.wait()
    log.close()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.bin") if p.with_suffix(".json").exists()}
    assert len(done) >= 4
    main(_prepare_cli(corpus, out, 1))
    main(_prepare_cli(corpus, whole, 2))
    assert {
        name: (out / name).stat().st_mtime_ns for name in done
    } == done  # finished shards kept, not redone
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (whole / "manifest.json").read_text()
    )
    assert np.array_equal(_all_tokens(out), _all_tokens(whole))
    assert not list(out.glob("*.tmp*"))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_of_a_prepared_folder_once_per_epoch(built, world_size, workers):
    data = PreparedData(built[2])
    seq_len, batch_size = 512, 5
    files, starts = data.windows(seq_len)
    tokens = [data.tokens(i) for i in range(len(data.manifest["shards"]))]
    n = len(starts)
    windows = Counter(tuple(tokens[f][s : s + seq_len].tolist()) for f, s in zip(files, starts))
    steps = -(-2 * n // (world_size * batch_size))  # two epochs on every rank
    per_rank = []
    for rank in range(world_size):
        stream = WindowStream(data, starts, files=files, seq_len=seq_len, batch_size=batch_size, seed=1,
                              rank=rank, world_size=world_size)  # fmt: skip
        batches = list(itertools.islice(DataLoader(stream, batch_size=None, num_workers=workers), steps))
        per_rank.append([[tuple(row) for row in b["input_ids"].tolist()] for b in batches])
    run = [w for s in range(steps) for mine in per_rank for w in mine[s]]
    assert Counter(run[:n]) == windows and Counter(run[n : 2 * n]) == windows
    assert run[:n] != run[n : 2 * n]  # reshuffled each epoch


def _window_run(data, files, starts, *, seq_len, batch_size, world_size, steps, resume=None) -> list[tuple]:
    """The windows ``steps`` global batches of ``world_size`` ranks train on, in the order of the global batches."""
    per_rank = []
    for rank in range(world_size):
        stream = WindowStream(data, starts, files=files, seq_len=seq_len, batch_size=batch_size, seed=1,
                              rank=rank, world_size=world_size, resume=resume)  # fmt: skip
        per_rank.append(
            [[tuple(r) for r in b["input_ids"].tolist()] for b in itertools.islice(stream, steps)]
        )
    return [w for s in range(steps) for mine in per_rank for w in mine[s]]


@pytest.mark.parametrize("old_world, new_world, steps_before", [(2, 1, 3), (1, 2, 5), (3, 2, 2)])
def test_prepared_windows_resume_on_another_world_size_once_each(
    corpus, built, old_world, new_world, steps_before
):
    """Resumed on another number of processes, the windows go on where the global sample count stopped: over two
    epochs every window is trained once per epoch, none twice and none skipped (the DataModule's conversion)."""
    tree, tok = corpus
    data = PreparedData(built[2])
    seq_len, batch_size = 512, 5
    files, starts = data.windows(seq_len)
    n = len(starts)
    windows = Counter(tuple(data.tokens(f)[s : s + seq_len].tolist()) for f, s in zip(files, starts))
    before = _window_run(data, files, starts, seq_len=seq_len, batch_size=batch_size, world_size=old_world,
                         steps=steps_before)  # fmt: skip
    dm = CodeDataModule(tokenizer=tok, source={"train_source": str(tree)}, progress=False,
                        packing={"seq_len": seq_len, "prepared": str(built[2])},
                        loader={"batch_size": batch_size, "shuffle_seed": 1})  # fmt: skip
    saved = {"consumed": steps_before, "base": 0, "cursors": [], "seen": []}
    dm.load_state_dict({"signature": dm._signature(), "ranks": [saved] * old_world})
    resume = dm._resume_for(0, new_world)
    assert resume["base"] == steps_before * old_world * batch_size and resume["consumed"] == 0
    left = -(-(2 * n - len(before)) // (new_world * batch_size))
    after = _window_run(data, files, starts, seq_len=seq_len, batch_size=batch_size, world_size=new_world,
                        steps=left, resume=resume)  # fmt: skip
    run = before + after
    assert Counter(run[:n]) == windows and Counter(run[n : 2 * n]) == windows
    assert dm.state_dict()["ranks"][0]["base"] == resume["base"]  # saved again for the next resume


@pytest.mark.slow
def test_training_from_a_prepared_folder_resumes_exactly(code_tree, tmp_path, monkeypatch):
    """``lmrecipes prepare`` then fit from the folder (2 DataLoader workers): stopped after 3 steps and resumed
    with --ckpt_path last, steps 4-6 match an uninterrupted run (as the pretokenize resume test, shards now)."""
    monkeypatch.chdir(tmp_path)
    prep, straight, resumed = tmp_path / "prepared", tmp_path / "straight", tmp_path / "resumed"
    common = ["--data.init_args.tokenizer", str(tmp_path / "tok"), "--trainer.val_check_interval", "100",
              "--trainer.limit_val_batches", "0", "--data.init_args.loader.num_workers", "2"]  # fmt: skip
    main(["prepare", *fit_args(code_tree, tmp_path, *common)[1:], "--output", str(prep), "--num_proc", "2",
          "--shard_chars", "20000"])  # fmt: skip
    assert len(PreparedData(prep).manifest["shards"]) > 10
    common += ["--data.init_args.packing.prepared", str(prep)]
    for run in (straight, resumed):
        run.mkdir()
    monkeypatch.chdir(straight)
    main(fit_args(code_tree, straight, *common))
    monkeypatch.chdir(resumed)
    main(fit_args(code_tree, resumed, *common, "--trainer.max_steps", "3"))
    main(fit_args(code_tree, resumed, *common, "--ckpt_path", "last"))
    a, b = dict(read_metric(straight, "train/loss")), dict(read_metric(resumed, "train/loss"))
    assert sorted(a) == sorted(b) == list(range(6))
    for step in range(6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    assert not (straight / ".cache").exists()  # read from the prepared folder, nothing tokenized again
    other = Path(shutil.copytree(prep, tmp_path / "other"))
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest | {"fingerprint": "0123456789abcdef"}))
    resume_other = [*common[:-1], str(other), "--trainer.max_steps", "8", "--ckpt_path", "last"]
    with pytest.raises(ValueError, match=rf"pretokenize: '{manifest['fingerprint']}' -> '0123456789abcdef'"):
        main(fit_args(code_tree, resumed, *resume_other))


@pytest.mark.slow
def test_max_epochs_resized_from_2_processes_to_1_trains_the_epoch_once(code_tree, tmp_path):
    """Pre-tokenized windows, max_epochs 1: preempted after 3 steps of 2 DDP processes, resumed on 1 and preempted
    again at step 6, then resumed on 1 once more: the steps left are counted from the windows left each time
    (counting the epoch's steps afresh would train batches twice, at the first resume or at the second)."""
    from faults import read_log
    from test_resilience import callbacks_config, run_cli, signal_at

    run = tmp_path / "run"
    run.mkdir()
    batch = 8
    runs = [(signal_at("SIGTERM", step=3), ["--trainer.devices", "2", "--trainer.strategy", "ddp"]),
            (signal_at("SIGTERM", step=6), ["--trainer.devices", "1", "--ckpt_path", "last"]),
            (None, ["--trainer.devices", "1", "--ckpt_path", "last"])]  # fmt: skip
    logs = []
    for n, (fault, launch) in enumerate(runs):
        config = callbacks_config(run / f"cb{n}.yaml", run / "log", *[fault] if fault else [], every=100)
        args = ["--config", config, "--data.init_args.packing.pretokenize", "true", "--trainer.max_steps", "-1",
                "--trainer.max_epochs", "1", "--data.init_args.packing.seq_len", "64", "--trainer.limit_val_batches",
                "0", "--data.init_args.loader.batch_size", str(batch), "--trainer.accelerator", "cpu", *launch]  # fmt: skip
        proc = run_cli(fit_args(code_tree, run, *args), run)
        assert "max_steps=" in proc.stderr and (run / "runs/clm-offline/checkpoints/last.ckpt").exists(), (
            proc.stderr[-3000:]
        )
        logs.append(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the last run trained to the end of the epoch
    found = re.search(r"resumed on 1 processes \(saved by 2\): ([\d,]+) of ([\d,]+) windows done", logs[1])
    assert found, logs[1][-3000:]
    done, windows = (int(g.replace(",", "")) for g in found.groups())
    assert done == 3 * 2 * batch
    again = re.search(r"resumed on 1 processes \(saved by 1\): ([\d,]+) of", logs[2])
    assert again and int(again.group(1).replace(",", "")) == done + 3 * batch, logs[2][-3000:]
    batches = sum(len(rows) for rows in read_log(run / "log").values())  # every rank's, all three runs
    assert (
        batches * batch == done + -(-(windows - done) // batch) * batch
    )  # the epoch once, the last batch filled


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_a_missing_or_truncated_shard_is_named(built, tmp_path):
    folder = _copy(built[1], tmp_path)
    (folder / "shard-00003.bin").unlink()
    with pytest.raises(ValueError, match=r"shard-00003\.bin is missing; the manifest .* says [\d,]+ bytes"):
        PreparedData(folder).check_files()
    shutil.copy(built[1] / "shard-00003.bin", folder)
    with open(folder / "shard-00007.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"shard-00007\.bin has 10 bytes"):
        PreparedData(folder).check_files()
    (folder / "shard-00002.lengths.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(ValueError, match=r"shard-00002\.lengths\.npy is missing or truncated"):
        PreparedData(folder).windows(32)


def test_a_missing_or_truncated_manifest_is_named(built, tmp_path):
    folder = _copy(built[1], tmp_path)
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"manifest\.json is truncated or not JSON"):
        PreparedData(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"has no manifest\.json: its build did not finish"):
        PreparedData(folder)


def _datamodule(corpus, tokenizer: str, **packing) -> CodeDataModule:
    tree, _ = corpus
    return CodeDataModule(tokenizer=tokenizer, source={"train_source": str(tree), "heldout_fraction": 0.15},
                          packing={"seq_len": 32, **packing}, loader={"batch_size": 2}, progress=False)  # fmt: skip


def test_a_prepared_dataset_of_another_tokenizer_or_mode_is_refused(corpus, built, tmp_path):
    tree, tok = corpus
    other = train_bpe_tokenizer([p.read_text() for p in sorted(tree.glob("*.py"))[:5]], vocab_size=280)
    other.save_pretrained(tmp_path / "other")
    mine, theirs = tokenizer_fingerprint(other), PreparedData(built[1]).manifest["tokenizer"]
    with pytest.raises(ValueError, match=rf"tokenizer fingerprint {theirs}; this run's tokenizer .* {mine}"):
        _datamodule(corpus, str(tmp_path / "other"), prepared=str(built[1])).batches_per_epoch()
    with pytest.raises(
        ValueError, match=r"packed with mode 'concat'; this run has data.packing.mode='overflow'"
    ):
        _datamodule(corpus, tok, prepared=str(built[1]), mode="overflow").batches_per_epoch()
    with pytest.raises(ValueError, match=r"set one"):
        _datamodule(corpus, tok, prepared=str(built[1]), pretokenize=True).batches_per_epoch()
    assert _datamodule(corpus, tok, prepared=str(built[1])).batches_per_epoch() > 0


def test_bad_prepare_arguments_and_output_folders(corpus, built, tmp_path):
    with pytest.raises(ValueError, match=r"--num_proc=0: expected a positive number"):
        main(["prepare", "-c", OFFLINE, "--output", str(tmp_path / "x"), "--num_proc", "0"])
    found = PreparedData(built[1]).manifest["fingerprint"]
    with pytest.raises(
        ValueError, match=rf"holds another prepared dataset \(fingerprint {found}; this config's"
    ):
        prepare(_spec(corpus, mode="overflow"), built[1], num_proc=1)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files and no manifest.json"):
        prepare(_spec(corpus), tmp_path, num_proc=1)
    assert prepare(_spec(corpus), built[1], num_proc=2) == built[1]  # finished: nothing to do


def test_a_hub_id_offline_names_the_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        ValueError, match=r"HF_HUB_OFFLINE=1 .* data\.init_args\.packing\.prepared='someone/code-prepared'"
    ):
        PreparedData("someone/code-prepared")


@pytest.mark.parametrize("mode", ["concat", "overflow"])
def test_prepared_windows_equal_packed_windows(corpus, tmp_path, mode):
    """One shard, no dedup: the windows of the folder are exactly what the streaming packer cuts."""
    from test_packing import concat_windows, overflow_chunks

    tree, tok = corpus
    tokenizer, keep = AutoTokenizer.from_pretrained(tok), FilterPipeline()
    ids = encode_batch(tokenizer, [d["content"] for _, d in open_source(str(tree)).iter_raw() if keep(d)])
    folder = prepare(_spec(corpus, mode=mode, dedup=False, shard_chars=10**9), tmp_path / mode)
    data = PreparedData(folder)
    assert data.lengths(0).tolist() == [len(i) for i in ids] and len(data) == 1
    files, starts = data.windows(32)
    windows = np.stack([data[f][s : s + 32] for f, s in zip(files, starts)]).astype(np.int64)
    if mode == "concat":
        packed = concat_windows([np.asarray(i) for i in ids], 32, tokenizer.eos_token_id)
    else:
        packed = np.concatenate([overflow_chunks(np.asarray(i), 32) for i in ids])
    assert np.array_equal(windows, packed)


def test_pretokenize_folders_are_named_by_their_inputs_reused_and_finished(corpus, tmp_path):
    tree, tok = corpus
    first = AutoTokenizer.from_pretrained(tok)
    second = train_bpe_tokenizer([p.read_text() for p in sorted(tree.glob("*.py"))[:5]], vocab_size=280)
    second.save_pretrained(tmp_path / "second")
    specs = [_spec(corpus), _spec(corpus, tokenizer_path=str(tmp_path / "second")), _spec(corpus)]
    folders = [ensure_prepared(tmp_path / "cache", s, t) for s, t in zip(specs, (first, second, first))]
    assert folders[0] != folders[1] and folders[2] == folders[0]
    assert PreparedData(folders[1]).manifest["tokenizer"] == tokenizer_fingerprint(second)
    built = (folders[0] / "manifest.json").stat().st_mtime_ns
    assert ensure_prepared(tmp_path / "cache", _spec(corpus), first) == folders[0]
    assert (folders[0] / "manifest.json").stat().st_mtime_ns == built  # reused, not rebuilt
    assert np.array_equal(_all_tokens(folders[0]), _expected_tokens(corpus)[0])
    (folders[0] / "manifest.json").unlink()  # shards with neither a manifest nor a build record: not trusted
    with pytest.raises(ValueError, match=r"cache/\w+ holds other files and no manifest.json"):
        ensure_prepared(tmp_path / "cache", _spec(corpus), first)


def test_filters_that_keep_nothing_are_named(corpus, tmp_path):
    with pytest.raises(
        ValueError, match=r"no training document passed the filters \(kept 0 of \d+ documents"
    ):
        prepare(_spec(corpus, keywords=["no-such-keyword-anywhere"]), tmp_path / "empty")


READ_UNDER_LIMIT = """
import hashlib, resource, sys
import numpy as np
from lmrecipes.data.prepared import PreparedData, WindowStream
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
data = PreparedData(sys.argv[1])
data.check_files()
files, starts = data.windows(16)
stream = WindowStream(data, starts, files=files, seq_len=16, batch_size=1, seed=1, rank=0, world_size=1)
batches = [b["input_ids"].numpy() for b, _ in zip(stream, range(len(starts)))]
print(hashlib.sha1(np.sort(np.concatenate(batches), axis=0).tobytes()).hexdigest(), len(batches))
"""


def test_a_folder_of_more_shards_than_file_descriptors_is_read_whole(corpus, tmp_path):
    folder = prepare(_spec(corpus, shard_chars=400), tmp_path / "many", num_proc=1)
    data = PreparedData(folder)
    assert len(data) > 40  # more shards than the limit below lets a process open
    files, starts = data.windows(16)
    windows = np.stack([data.tokens(f)[s : s + 16] for f, s in zip(files, starts)]).astype(np.int64)
    expected = f"{hashlib.sha1(np.sort(windows, axis=0).tobytes()).hexdigest()} {len(starts)}"
    run = subprocess.run([sys.executable, "-c", READ_UNDER_LIMIT, str(folder), "40"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == expected.split()  # every window once, read under the limit


def test_prepare_and_streaming_dedup_share_one_digest():
    docs = ["x = 1\ny = 2\n", "x=1 y=2", "x = 1\ny = 3\n"]  # the first two differ by whitespace only
    filters = FilterPipeline(dedup=True)
    assert [filters({"content": d}) for d in docs] == [True, False, True]
    digests = [content_digest(d) for d in docs]
    assert filters.seen_since(0).tolist() == [digests[0], digests[2]]  # what the stream remembers ...
    stage1 = np.array([digest64(d) for d in docs], dtype=np.int64)  # ... is what prepare sorts, as int64
    assert stage1.view(np.uint64).tolist() == digests
    assert first_occurrences(stage1).tolist() == [0, 2]


def test_a_build_in_progress_on_another_node_is_waited_for_not_refused(corpus, tmp_path):
    # Another node holds the lock and has only created work/ (no key.json yet): judged outside the lock, the
    # folder looked like one of other files and prepare refused it; under the lock it waits, then builds.
    output = tmp_path / "shared"
    result: dict = {}
    with FileLock(f"{output}.lock"):
        (output / "work").mkdir(parents=True)
        waiter = threading.Thread(target=lambda: result.update(out=_try_prepare(corpus, output)))
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive() and not result  # waiting on the lock, not failed
        (output / "work").rmdir()  # the other node gave up and cleaned up
    waiter.join(timeout=120)
    assert result["out"] == output and (output / "manifest.json").exists()


def _try_prepare(corpus, output: Path):
    try:
        return prepare(_spec(corpus), output)
    except ValueError as err:
        return err
