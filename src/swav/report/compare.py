"""`swav report RUN_DIR RUN_DIR2 ...`: several runs' kNN top-1 against training time on one page."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from swav.report import plots
from swav.report.page import Section, render_page
from swav.report.runfiles import format_value, knn_over_time

DEFAULT_OUTPUT = Path("report_compare.html")


class CompareError(ValueError):
    """Runs that cannot be compared as given (labels, knn.json contents); the message says why."""


@dataclass
class RunCurve:
    """One run's training-time kNN results, in epoch order."""

    label: str
    run_dir: Path
    epochs: list[int]
    minutes: list[float]
    top1: list[float]


def read_curve(run_dir: str | Path, label: str) -> RunCurve:
    """The run's kNN top-1 against training minutes, from its knn.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder: give the run folders to compare")
    if not (run_dir / "knn.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} has no knn.json: the comparison plots the kNN monitor's results, so train "
            "the run with the monitor on (config.KNN_MONITOR.ENABLED=true)"
        )
    points = knn_over_time(run_dir)
    if not points:
        raise CompareError(
            f"{run_dir / 'knn.json'} holds no kNN result measured during training with its training "
            "time (epoch, train_seconds, trained.top1): it is damaged, written by `swav knn`, or by a "
            "version that did not record train_seconds yet"
        )
    epochs, seconds, top1 = (list(column) for column in zip(*points, strict=True))
    return RunCurve(label, run_dir, epochs, [s / 60 for s in seconds], top1)


def comparison_rows(curves: list[RunCurve]) -> list[list[str]]:
    """The table: run, final epoch, training minutes, last and best kNN top-1 (both in %)."""
    return [
        [
            c.label,
            str(c.epochs[-1]),
            f"{c.minutes[-1]:.1f}",
            format_value(c.top1[-1]),
            format_value(max(c.top1)),
        ]
        for c in curves
    ]


def build_comparison(
    run_dirs: list[str | Path],
    output: str | Path | None = None,
    labels: list[str] | None = None,
) -> dict:
    """Write the comparison page (default ./report_compare.html) and its PNG next to it.

    The PNG is named after the page (`report_compare_knn.png`; `knn.png` for an `index.html`) so
    that two pages in one folder keep their own figure. Returns ``html``, ``images`` and ``curves``.
    """
    curves = [
        read_curve(d, name) for d, name in zip(run_dirs, run_labels(run_dirs, labels), strict=True)
    ]
    html_path = Path(output) if output is not None else DEFAULT_OUTPUT
    if html_path.is_dir():
        html_path = html_path / "index.html"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "" if html_path.stem == "index" else f"{html_path.stem}_"
    png = html_path.parent / f"{prefix}knn.png"
    plots.knn_against_time(
        [(c.label, list(zip(c.minutes, c.top1, strict=True))) for c in curves], png
    )

    section = Section("kNN top-1 against training time")
    section.image(
        png.name,
        "kNN top-1 against training minutes, one line per run",
        "Weighted kNN top-1 of each run's trunk, measured by the kNN monitor during training, against "
        "the training time it had taken (kNN evaluations excluded), so runs of different speeds are "
        "compared at equal training time rather than at equal epochs.",
    )
    section.table(
        ["run", "final epoch", "training minutes", "last kNN top-1 (%)", "best kNN top-1 (%)"],
        comparison_rows(curves),
    )
    section.text(
        "Final epoch and training minutes are those of the last kNN measurement. Folders: "
        + ", ".join(f"{c.label} = {c.run_dir.resolve()}" for c in curves)
    )
    generated = datetime.now().strftime("%Y-%m-%d %H:%M")
    html_path.write_text(
        render_page(
            f"SwAV runs compared: {', '.join(c.label for c in curves)}",
            f"{len(curves)} runs, kNN top-1 against training time",
            [section],
            f"swav report, {generated}",
        )
    )
    return {"html": html_path, "images": [png], "curves": curves}


def run_labels(run_dirs: list[str | Path], labels: list[str] | None) -> list[str]:
    """The given labels, one per run, or the run folders' names; raise CompareError when they clash."""
    if labels is None:
        labels = [Path(d).resolve().name for d in run_dirs]
    elif len(labels) != len(run_dirs):
        raise CompareError(
            f"{len(labels)} --label for {len(run_dirs)} runs: give one --label per run folder, in "
            "the same order, or none"
        )
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if repeated:
        # The legend tells runs apart by label alone.
        raise CompareError(
            f"two or more runs are labelled {', '.join(repeated)}: name each run with --label"
        )
    return labels
