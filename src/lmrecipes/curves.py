"""Training curves from a run's own CSV log: ``runs/<name>/curves.png`` at the end of fit, ``lmrecipes plot``.

    lmrecipes plot runs/clm-offline            # any run, also one still training

matplotlib is an optional extra (``pip install -e ".[plot]"``); without it a one-line note replaces the picture.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

# (panel title, y label, (legend label, column pattern) series, log scale if the values span 10x or more)
PANELS = (
    ("loss", "loss", (("train", r"train/loss"), ("validation", r"val/loss")), True),
    ("validation perplexity", "perplexity", (("validation", r"val/ppl"),), True),
    ("learning rate", "lr", (("lr", r"lr-[^/]*(/pg1)?"),), False),  # one group: they share the schedule
    ("throughput", "tokens/s", (("tokens/s", r"tokens/s"),), False),
)


def metric_files(run_dir: Path) -> list[Path]:
    """Every CSV log of a run, oldest version first (a resumed run adds a version)."""
    files = [run_dir / "metrics.csv"] if (run_dir / "metrics.csv").is_file() else []
    files += run_dir.glob("**/version_*/metrics.csv")
    number = re.compile(r"version_(\d+)")
    return sorted(set(files), key=lambda p: int(m.group(1)) if (m := number.search(str(p))) else -1)


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{column: {step: value}}`` from every version; a later version wins a step (resumed runs), and a row
    still being written by a running job is skipped."""
    metrics: dict[str, dict[int, float]] = {}
    for path in metric_files(run_dir):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(row.get("step") or "")
                except ValueError:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or key is None or not value:
                        continue
                    try:
                        metrics.setdefault(key, {})[step] = float(value)
                    except (TypeError, ValueError):
                        continue
    metrics["tokens/s"] = tokens_per_second(metrics)
    return metrics


def tokens_per_second(metrics: dict[str, dict[int, float]]) -> dict[int, float]:
    """TokenThroughput's tokens/s (``train/tokens_per_sec``); for runs logged by its older, ThroughputMonitor-based
    version, ``train/items_per_sec`` or, before its window filled, the rate between consecutive logged steps of
    its cumulative token count (``train/lengths``) and time (``train/time``)."""
    if metrics.get("train/tokens_per_sec"):
        return dict(metrics["train/tokens_per_sec"])
    if metrics.get("train/items_per_sec"):
        return dict(metrics["train/items_per_sec"])
    tokens, seconds = metrics.get("train/lengths", {}), metrics.get("train/time", {})
    steps = sorted(set(tokens) & set(seconds))
    return {b: (tokens[b] - tokens[a]) / (seconds[b] - seconds[a])
            for a, b in zip(steps, steps[1:]) if seconds[b] > seconds[a]}  # fmt: skip


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train/validation loss, perplexity, learning rate and tokens/s against step into ``out``
    (default ``<run_dir>/curves.png``); a ValueError when the run has logged no metrics yet."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(
            f"run folder {str(run_dir)!r} does not exist; expected a run folder like runs/clm-offline"
        )
    metrics = read_metrics(run_dir)
    if not any(v for v in metrics.values()):
        raise ValueError(
            f"{run_dir} has no metrics yet (no rows in a CSVLogger metrics.csv under it); a run writes them "
            "every trainer.log_every_n_steps steps once its CSVLogger flushes"
        )
    fig = Figure(figsize=(11, 7), layout="constrained")
    for ax, (title, ylabel, series, log) in zip(fig.subplots(2, 2).flat, PANELS):
        drawn: list[float] = []
        for label, pattern in series:
            for column in sorted(c for c in metrics if re.fullmatch(pattern, c)):
                points = sorted(metrics[column].items())
                name = label
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=name)
                drawn += [v for _, v in points]
        if drawn and log and min(drawn) > 0 and max(drawn) >= 10 * min(drawn):
            ax.set_yscale("log")  # losses and perplexities fall over orders of magnitude
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    return out


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every validation/test metric of a run (for the model card)."""
    last = {}
    for column, points in read_metrics(run_dir).items():
        if column.startswith(("val/", "test/")) and points and math.isfinite(points[max(points)]):
            last[column] = points[max(points)]
    return last


def plot_command(run_dir: str, *, out: str | None = None) -> Path | None:
    """Draw a run's curves (train/val loss, perplexity, learning rate, tokens/s against step) from its CSV log.

    Args:
        run_dir: the run's folder (``runs/<name>``, the CSVLogger's save_dir), finished or still training.
        out: picture to write (default ``<run_dir>/curves.png``).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('lmrecipes plot needs matplotlib: pip install -e ".[plot]"')
        return None
    path = plot_run(run_dir, out)
    print(f"wrote {path}")
    return path


class Curves(pl.Callback):
    """At the end of fit, rank 0 draws ``curves.png`` next to the CSV log (the CSVLogger's ``save_dir``)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end runs before on_fit_end, so RecipeReport's export finds the picture.
        logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if logger is None or not trainer.is_global_zero:
            return
        logger.save()  # flush the rows logged since the last save
        run_dir = Path(logger.save_dir)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            rank_zero_info(
                f'no {run_dir / "curves.png"}: install matplotlib (pip install -e ".[plot]") to draw it'
            )
            return
        if any(read_metrics(run_dir).values()):
            rank_zero_info(f"training curves: {plot_run(run_dir)}")


def run_curves(checkpoint: dict) -> Path | None:
    """The curves.png of the run that wrote ``checkpoint`` (recorded by export.record_class), if drawn."""
    run_dir = checkpoint.get("lmrecipes", {}).get("run_dir")
    path = Path(run_dir) / "curves.png" if run_dir else None
    return path if path is not None and path.is_file() else None
