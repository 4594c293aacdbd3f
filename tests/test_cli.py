"""End-to-end runs of the real CLI on a tiny real-code corpus: fit, resume, export, generate, configs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lmrecipes.checkpoints import AtomicCheckpointIO
from lmrecipes.cli import RecipeCLI, expand_configs, main
from lmrecipes.resume import ExactResume

REPO = Path(__file__).resolve().parents[1]
OFFLINE = str(REPO / "configs" / "clm" / "offline.yaml")
TINY_MODEL = (
    "{n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}"
)


def fit_args(tree: Path, run: Path, *extra: str) -> list[str]:
    """The offline config, pointed at the tiny corpus and scaled to seconds; paths under ``run``."""
    return [
        "fit", "--config", OFFLINE,
        "--data.init_args.source.train_source", str(tree),
        "--data.init_args.tokenizer", str(run / "tokenizer"),
        "--data.init_args.train_tokenizer.vocab_size", "400",
        "--data.init_args.source.heldout_fraction", "0.15",
        "--data.init_args.packing.seq_len", "32",
        "--data.init_args.loader.batch_size", "4",
        "--data.init_args.loader.num_workers", "0",
        "--data.init_args.source.val_max_docs", "8",
        "--data.init_args.progress", "false",
        "--model.init_args.config", TINY_MODEL,
        "--model.init_args.optimizer.warmup_steps", "2",
        "--trainer.max_steps", "6",
        "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "4",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def read_metric(run: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) rows of one metric from every CSV log written under ``run``."""
    rows = []
    for path in sorted(run.glob("runs/clm-offline/csv/*/metrics.csv")):
        with open(path) as f:
            rows += [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]
    return rows


@pytest.fixture(scope="module")
def fitted(code_tree, tmp_path_factory):
    """One real ``lmrecipes fit`` of the offline config (scaled down), run from an empty folder."""
    run = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run)
        main(fit_args(code_tree, run))
    return run


@pytest.mark.slow
def test_fit_writes_checkpoints_config_logs_and_export(fitted):
    ckpts = fitted / "runs" / "clm-offline" / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    saved = yaml.safe_load(next(fitted.glob("runs/clm-offline/**/config.yaml")).read_text())
    assert saved["seed_everything"] == 42
    ckpt = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)  # plain types only
    assert ckpt["global_step"] == 6
    assert ckpt["hyper_parameters"]["vocab_size"] == 400  # linked from the trained tokenizer
    assert ckpt["CodeDataModule"]["ranks"][0]["consumed"] == 6
    ppl = read_metric(fitted, "val/ppl")
    assert [s for s, _ in ppl] == [2, 5]  # validated after batches 3 and 6
    assert all(1.0 < v < 400 * 1.5 for _, v in ppl)
    export = fitted / "runs" / "clm-offline" / "export"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    assert "val/ppl" in (export / "README.md").read_text()
    # the curves, drawn at the end of fit from the run's CSV log, and shown in the model card
    curves = fitted / "runs" / "clm-offline" / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (export / "curves.png").read_bytes() == curves.read_bytes()
    assert "![training curves](curves.png)" in (export / "README.md").read_text()


@pytest.mark.slow
def test_export_command_then_pipeline_generates(fitted, capsys):
    from transformers import pipeline

    out = fitted / "exported"
    main(["export", str(fitted / "runs/clm-offline/checkpoints/last.ckpt"), str(out)])
    generator = pipeline("text-generation", model=str(out), device="cpu")
    text = generator("import pandas as pd\n", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("import pandas as pd\n") and len(text) > len("import pandas as pd\n")
    with pytest.raises(ValueError, match="already exists"):
        main(["export", str(fitted / "runs/clm-offline/checkpoints/last.ckpt"), str(out)])
    assert (out / "model.safetensors").is_file()  # the refused export left the folder intact
    capsys.readouterr()
    main(
        [
            "generate",
            str(out),
            "--prompt",
            "[def f(]",
            "--max_new_tokens",
            "5",
            "--num_return_sequences",
            "2",
            "--json_out",
            "true",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["prompt"] == "def f(" and len(printed[0]["completions"]) == 2


@pytest.mark.slow
def test_resume_continues_with_identical_losses(code_tree, tmp_path, monkeypatch):
    """Stop after 3 steps, resume with --ckpt_path last: steps 4-6 match an uninterrupted run exactly.

    The first part runs with max_steps=3, so its cosine schedule is shorter; with warmup_steps=2 both schedules
    give the same LRs for steps 0-2, and the resumed run must recompute the LR of step 3 for max_steps=6
    (a restored optimizer still holds the old schedule's last LR).
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tokenizer = ["--data.init_args.tokenizer", str(tmp_path / "tok")]
    every_step = ["--trainer.val_check_interval", "100", "--trainer.limit_val_batches", "0"]
    every_step += ["--data.init_args.filters.dedup", "true"]  # its seen-set travels in the checkpoint
    for run in (straight, resumed):
        run.mkdir()
    monkeypatch.chdir(straight)
    main(fit_args(code_tree, straight, *tokenizer, *every_step))
    monkeypatch.chdir(resumed)
    main(fit_args(code_tree, resumed, *tokenizer, *every_step, "--trainer.max_steps", "3"))
    ckpt = resumed / "runs/clm-offline/checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    main(fit_args(code_tree, resumed, *tokenizer, *every_step, "--ckpt_path", "last"))
    a = dict(read_metric(straight, "train/loss"))
    b = dict(read_metric(resumed, "train/loss"))
    assert sorted(a) == sorted(b) == list(range(6))
    for step in range(6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


@pytest.mark.slow
def test_resume_refuses_changed_data_settings(code_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = ["--data.init_args.tokenizer", str(tmp_path / "tok"), "--trainer.limit_val_batches", "0"]
    main(fit_args(code_tree, tmp_path, *tokenizer, "--trainer.max_steps", "2"))
    resume = [*tokenizer, "--ckpt_path", "last"]
    with pytest.raises(ValueError, match=r"batch_size: 4 -> 8"):
        main(fit_args(code_tree, tmp_path, *resume, "--data.init_args.loader.batch_size", "8"))
    with pytest.raises(ValueError, match=r"seq_len: 32 -> 16"):
        main(fit_args(code_tree, tmp_path, *resume, "--data.init_args.packing.seq_len", "16"))
    with pytest.raises(ValueError, match=r"shuffle_seed: 0 -> 5"):
        main(fit_args(code_tree, tmp_path, *resume, "--data.init_args.loader.shuffle_seed", "5"))
    edited = tmp_path / "edited"
    shutil.copytree(code_tree, edited)
    next(edited.rglob("*.py")).write_text("x = 1\n")  # the same files, one changed: a new fingerprint
    with pytest.raises(
        ValueError, match=r"source: '\w+' -> '\w+'.*; shards: resized \['[\w/.]+\.py'\] \(1\)"
    ):
        main(fit_args(edited, tmp_path, *resume))
    with pytest.raises(ValueError, match=r"shuffle_buffer: 1000 -> 7"):
        main(fit_args(code_tree, tmp_path, *resume, "--data.init_args.loader.shuffle_buffer", "7"))
    # A different world size: the checkpoint holds one rank's position, a 2-process run needs two.
    from lmrecipes.data.clm import CodeDataModule

    saved = torch.load(tmp_path / "runs/clm-offline/checkpoints/last.ckpt", weights_only=True)
    hparams = {k: v for k, v in saved["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    assert hparams["packing"] == {"seq_len": 32, "mode": "concat", "pretokenize": False,
                                  "cache_dir": ".cache/lmrecipes", "prepared": None}  # groups saved as plain dicts  # fmt: skip
    data = CodeDataModule(**hparams)
    data.load_state_dict(saved["CodeDataModule"])
    with pytest.raises(ValueError, match=r"world_size: 1 -> 2"):
        data._resume_for(0, 2)


@pytest.mark.parametrize(
    "no_last",
    [["--checkpoint.save_last", "false"], ["--trainer.enable_checkpointing", "false"],
     ["--trainer.callbacks", "[{class_path: ModelCheckpoint, init_args: {dirpath: ckpts}}]"]],
    ids=["default without save_last", "checkpointing off", "own ModelCheckpoint without save_last"],
)  # fmt: skip
def test_ckpt_path_last_without_save_last_is_an_error(no_last, code_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="save_last"):
        main(fit_args(code_tree, tmp_path, *no_last, "--ckpt_path", "last"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.init_args.packing.seq_len", "128"], "exceeds the model's n_positions=64"),
        (["--data.init_args.filters.keywords", "[no_such_keyword_anywhere]"], "kept no"),
        (["--model.init_args.loss", "keytoken", "--model.init_args.keytokens", "[zzqx]"], "single token"),
        (
            ["--data.init_args.loader.batch_size", "0"],
            "--data.init_args.loader.batch_size 0: a batch holds at least 1",
        ),
        (
            ["--data.init_args.loader.val_batch_size", "-2"],
            "--data.init_args.loader.val_batch_size -2: a batch holds",
        ),
    ],
)
def test_bad_settings_fail_before_training(code_tree, tmp_path, monkeypatch, override, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, SystemExit)) as err:
        main(fit_args(code_tree, tmp_path, "--data.init_args.tokenizer", str(tmp_path / "tok"), *override))
    assert message in str(err.value)
    assert not (tmp_path / "runs/clm-offline/checkpoints/last.ckpt").exists()


def test_a_corpus_too_small_for_a_tokenizer_says_what_to_change(tmp_path, monkeypatch):
    tree = tmp_path / "tiny"
    tree.mkdir()
    for i in range(5):
        (tree / f"m{i}.py").write_text(f"import pandas as pd\n\nx = {i}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"data.source.train_source='.*tiny' gave only 5 documents .* add documents, "
                       "loosen data.filters.keywords, or give a trained tokenizer in data.tokenizer") as err:  # fmt: skip
        main(fit_args(tree, tmp_path))
    assert "report_docs" not in str(err.value)  # the tokenizer command's option, which fit does not have


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "clm").glob("*.yaml")))
def test_every_config_parses_and_instantiates(name, code_tree, tmp_path, monkeypatch):
    """Each shipped YAML builds its Trainer, DataModule and model (Hub ids swapped for local paths)."""
    monkeypatch.chdir(tmp_path)
    local = [
        "--data.init_args.source.train_source", str(code_tree), "--data.init_args.source.val_source", "null",
        "--data.init_args.tokenizer", str(tmp_path / "tok"), "--data.init_args.train_tokenizer.vocab_size", "300",
        "--data.init_args.source.heldout_fraction", "0.1", "--data.init_args.progress", "false",
    ]  # fmt: skip
    if (
        "accelerate" in name
    ):  # the course's key tokens (plt, pd, sk...) are not single tokens of a 300-token BPE
        local += ["--model.init_args.keytokens", '[self, "="]']
    args = expand_configs(["--config", str(REPO / "configs" / "clm" / name), *local])
    with torch.device("meta"):  # the 1.5B config is built without allocating its weights
        cli = RecipeCLI(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=args,
        )
    raw = yaml.safe_load((REPO / "configs" / "clm" / name).read_text())
    n_layer = {"codeparrot.yaml": 48, "codeparrot-fsdp.yaml": 48, "offline-fsdp.yaml": 4}.get(
        name, (raw.get("model", {}).get("init_args", {}).get("config") or {}).get("n_layer", 12)
    )
    assert cli.model.model.config.n_layer == n_layer
    assert cli.model.hparams.vocab_size == 300
    # a step budget, or epochs counted from pre-tokenized data (EpochsFromData)
    assert cli.trainer.max_steps > 0 or (cli.trainer.max_epochs == 1 and cli.datamodule.packing.pretokenize)
    # the code defaults, once each: exact resume and atomic checkpoint writes
    assert sum(isinstance(c, ExactResume) for c in cli.trainer.callbacks) == 1
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    if (
        "fsdp" in name
    ):  # sharded checkpoints are written atomically by the strategy itself (checkpoints_sharded.py)
        assert type(cli.trainer.strategy).__name__ == "FSDP2Strategy"


@pytest.mark.slow
def test_overfit_one_batch_loss_falls():
    import lightning.pytorch as pl

    from lmrecipes.models.clm import CausalLM
    from lmrecipes.optim import OptimizerConfig

    pl.seed_everything(0)
    model = CausalLM(
        config={"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32},
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
        seq_len=32,
        optimizer=OptimizerConfig(lr=3e-3, lr_schedule="constant"),
    )
    batch = {"input_ids": torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))}
    loader = torch.utils.data.DataLoader([batch] * 60, batch_size=None)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        max_steps=60,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(model, train_dataloaders=loader)
    assert losses[0] > 4.0  # ~ln(64) at init
    assert losses[-1] < 0.25 * losses[0]


@pytest.mark.slow
def test_pretokenized_mode_builds_the_cache_once_and_trains(code_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "--data.init_args.tokenizer",
        str(tmp_path / "tok"),
        "--data.init_args.packing.pretokenize",
        "true",
        "--data.init_args.packing.mode",
        "overflow",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.max_steps",
        "3",
    ]
    main(fit_args(code_tree, tmp_path, *args))
    caches = list((tmp_path / ".cache/lmrecipes").glob("*/manifest.json"))
    assert len(caches) == 1
    built = caches[0].stat().st_mtime_ns
    main(fit_args(code_tree, tmp_path, *args, "--trainer.max_steps", "5", "--ckpt_path", "last"))
    assert caches[0].stat().st_mtime_ns == built  # reused, not rebuilt
    assert (
        torch.load(tmp_path / "runs/clm-offline/checkpoints/last.ckpt", weights_only=True)["global_step"] == 5
    )
    main(
        fit_args(
            code_tree,
            tmp_path,
            *args,
            "--model.init_args.activation_checkpointing",
            "true",
            "--data.init_args.packing.mode",
            "concat",
            "--trainer.max_steps",
            "2",
        )
    )
    caches = list((tmp_path / ".cache/lmrecipes").glob("*/manifest.json"))
    assert len(caches) == 2  # packing changed: new cache
