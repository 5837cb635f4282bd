"""Reading what a run folder holds: its config, metrics.jsonl, kNN history and evaluation JSONs."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from swav.config import ConfigError, load_config

CONFIG_NAME = "train_config.yaml"
METRICS_NAME = "metrics.jsonl"
EVAL_FILES = ("knn.json", "linear.json", "semisup.json", "svm.json")

# Keys that hold a score (top1, top5, top-1, mAP, AP, acc, accuracy, ...): they become table columns.
_METRIC_KEY = re.compile(r"top-?\d|(^|_)m?ap($|_)|acc", re.IGNORECASE)


def check_run_dir(run_dir: Path) -> None:
    """Raise FileNotFoundError with what is missing when `run_dir` is not a training run folder."""
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir} is not a folder: give the run folder (config.CHECKPOINT.DIR of a training run)"
        )
    has_config = (run_dir / CONFIG_NAME).is_file()
    has_metrics = (run_dir / METRICS_NAME).is_file()
    if not has_config and not has_metrics:
        raise FileNotFoundError(
            f"{run_dir} is not a swav run folder: it has no {CONFIG_NAME} and no {METRICS_NAME} "
            "(a training run writes both into its config.CHECKPOINT.DIR)"
        )
    if not has_config:
        raise FileNotFoundError(
            f"{run_dir} has {METRICS_NAME} but no {CONFIG_NAME}: not a complete swav run folder"
        )
    if not has_metrics:
        raise FileNotFoundError(
            f"{run_dir} has no {METRICS_NAME} yet: the run has not logged a step "
            "(it logs every config.LOG_FREQUENCY iterations)"
        )


def load_run_config(run_dir: Path) -> tuple[DictConfig, str | None]:
    """The run's resolved config, and a note when it no longer passes today's validation.

    A run from an older version may carry keys that were renamed since; its own resolved values
    are still what trained the model, so they are used as they are.
    """
    path = run_dir / CONFIG_NAME
    try:
        return load_config([f"config={path}"]), None
    except ConfigError as e:
        with open(path) as f:
            raw = yaml.safe_load(f)
        if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
            raise ConfigError(f"{path}: not a swav config (no top-level `config:`)") from e
        return OmegaConf.create(
            raw["config"]
        ), f"{CONFIG_NAME} does not validate with this version ({e}); its values are used as saved"


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """Rows of metrics.jsonl sorted by iteration, and the number of unreadable lines.

    A resumed run may log an iteration twice (the part after the last checkpoint is redone);
    the later row wins, as it belongs to the history that continued.
    """
    by_iteration: dict[int, dict] = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_iteration[int(row["iteration"])] = row
        except (ValueError, KeyError, TypeError):
            bad += 1  # e.g. the last line of a run killed mid-write
    return [by_iteration[i] for i in sorted(by_iteration)], bad


def knn_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """kNN top-1 per epoch, {"trained": [(epoch, top1), ...], "random_init": [...]}.

    knn.json only keeps the latest result; the per-epoch values are in the TensorBoard events
    (`knn/<name>_top1`, step = epoch). A `history` list in knn.json is read too, if present.
    """
    points: dict[str, dict[int, float]] = {"trained": {}, "random_init": {}}
    tb_dir = run_dir / "tensorboard"
    if tb_dir.is_dir() and any(tb_dir.glob("events.out.tfevents.*")):
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
            events.Reload()
            tags = set(events.Tags().get("scalars", []))
            for name in points:
                if f"knn/{name}_top1" in tags:
                    for e in events.Scalars(f"knn/{name}_top1"):
                        points[name][int(e.step)] = float(e.value)
        except Exception:  # noqa: BLE001 - a damaged event file must not stop the report
            pass
    for entry in _knn_entries(run_dir):
        for name in points:
            top1 = _top1(entry, name)
            if top1 is not None:
                points[name][entry["epoch"]] = top1
    return {name: sorted(p.items()) for name, p in points.items() if p}


def knn_over_time(run_dir: Path) -> list[tuple[int, float, float]]:
    """The trained trunk's kNN top-1 with the training time it took: [(epoch, train_seconds, top1)].

    Read from knn.json alone (TensorBoard events carry no training time). Results without
    `train_seconds` (files from before it was recorded) cannot be placed in time and are left out.
    """
    points = {}
    for entry in _knn_entries(run_dir):
        top1, seconds = _top1(entry, "trained"), entry.get("train_seconds")
        if top1 is not None and _is_number(seconds):
            points[entry["epoch"]] = (float(seconds), top1)
    return [(epoch, seconds, top1) for epoch, (seconds, top1) in sorted(points.items())]


def _knn_entries(run_dir: Path) -> list[dict]:
    """The training-time results in knn.json: the latest record and its `history`, if any.

    A file from before `history` existed is a single record. The latest record repeats the last
    history entry; readers key by epoch, so it counts once.
    """
    data = _read_json(run_dir / "knn.json")
    if not isinstance(data, dict):
        return []
    entries = [data] + [h for h in data.get("history", []) if isinstance(h, dict)]
    # Without an epoch it is a stand-alone evaluation (`swav knn`), not a training-time measurement.
    return [e for e in entries if isinstance(e.get("epoch"), int)]


def _top1(entry: dict, name: str) -> float | None:
    result = entry.get(name)
    top1 = result.get("top1") if isinstance(result, dict) else None
    return float(top1) if _is_number(top1) else None


@dataclass
class ResultTable:
    """One evaluation file as a table: named rows of metrics plus the other settings it holds."""

    file: str
    columns: list[str] = field(default_factory=list)
    rows: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    details: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


def read_eval_results(run_dir: Path) -> list[ResultTable]:
    """A table for each of knn.json, linear.json, semisup.json, svm.json present in `run_dir`."""
    tables = []
    for name in EVAL_FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            tables.append(ResultTable(name, error=f"unreadable: {e}"))
            continue
        tables.append(results_table(name, data))
    return tables


def results_table(name: str, data: Any) -> ResultTable:
    """Whatever nesting the file has: every dict with score keys becomes a row named by its path."""
    table = ResultTable(name)
    _walk(data, [], table)
    if not table.rows and not table.details:
        table.error = "no results in the file"
    return table


def _walk(obj: Any, path: list[str], table: ResultTable) -> None:
    label = ".".join(path)
    if isinstance(obj, dict):
        metrics = {
            str(k): float(v) for k, v in obj.items() if _METRIC_KEY.search(str(k)) and _is_number(v)
        }
        if metrics:
            table.rows.append((label or "result", metrics))
            for key in metrics:
                if key not in table.columns:
                    table.columns.append(key)
        for key, value in obj.items():
            if str(key) in metrics or key == "history":  # history is plotted, not tabulated
                continue
            _walk(value, [*path, str(key)], table)
    elif isinstance(obj, list):
        if all(isinstance(v, dict) for v in obj) and obj:
            for i, value in enumerate(obj):
                _walk(value, [*path, str(i)], table)
        else:
            text = json.dumps(obj)
            table.details.append(
                (label, text if len(text) <= 120 else f"list of {len(obj)} values")
            )
    else:
        table.details.append((label or "value", format_value(obj)))


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
