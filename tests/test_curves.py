"""curves.png from a run's CSV log: finished, still training, resumed, empty, and without matplotlib."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from lmrecipes.cli import main
from lmrecipes.curves import Curves, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def log_run(run_dir, steps: range, *, version: int | None = None) -> CSVLogger:
    """Rows as a real run's CSVLogger writes them: train loss and lr every step, validation every 4."""
    logger = CSVLogger(save_dir=str(run_dir), name="csv", version=version)
    for step in steps:
        logger.log_metrics(
            {"train/loss": 6.0 / (1 + step), "lr-AdamW/pg1": 1e-3 * min(1, step / 3)}, step=step
        )
        logger.log_metrics({"train/lengths": 512.0 * (step + 1), "train/time": 0.5 * (step + 1)}, step=step)
        if step % 4 == 3:
            logger.log_metrics({"val/loss": 5.0 / (1 + step), "val/ppl": 100.0 / (1 + step)}, step=step)
    logger.save()
    return logger


def test_plot_draws_a_run_and_a_resumed_run_joins_its_versions(tmp_path, capsys):
    log_run(tmp_path, range(0, 8), version=0)
    log_run(tmp_path, range(6, 12), version=1)  # resumed from step 6: the later version wins its steps
    metrics = read_metrics(tmp_path)
    assert sorted(metrics["train/loss"]) == list(range(12))
    assert sorted(metrics["val/ppl"]) == [3, 7, 11]
    assert metrics["tokens/s"][5] == pytest.approx(1024.0)  # 512 tokens per 0.5 s between logged steps
    main(["plot", str(tmp_path)])
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().out


def test_plot_of_a_run_still_writing_its_log(tmp_path):
    log_run(tmp_path, range(0, 6), version=0)
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    path.write_bytes(path.read_bytes() + b"0,5.9")  # a row the training process is in the middle of writing
    main(["plot", str(tmp_path), "--out", str(tmp_path / "now.png")])
    assert (tmp_path / "now.png").read_bytes()[:8] == PNG


def test_plot_of_a_run_with_no_metrics_yet_says_so(tmp_path):
    CSVLogger(save_dir=str(tmp_path), name="csv").log_hyperparams({"lr": 1e-3})  # started, nothing logged
    with pytest.raises(ValueError, match=r"has no metrics yet"):
        main(["plot", str(tmp_path)])
    with pytest.raises(ValueError, match=r"does not exist"):
        main(["plot", str(tmp_path / "runs" / "typo")])


def test_without_matplotlib_a_one_line_note_and_no_failure(tmp_path, monkeypatch, capsys):
    log_run(tmp_path, range(0, 4), version=0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["plot", str(tmp_path)]) is None
    assert capsys.readouterr().out.strip() == 'lmrecipes plot needs matplotlib: pip install -e ".[plot]"'

    trainer = pl.Trainer(logger=CSVLogger(save_dir=str(tmp_path), name="csv", version=0), accelerator="cpu",
                         enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    Curves().on_train_end(trainer, None)
    assert not (tmp_path / "curves.png").exists()
