"""`swav report`: the page renders from a real short run, its numbers are right, errors are clear."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from matplotlib.figure import Figure
from PIL import Image

from swav import checkpoint
from swav.build import build_model
from swav.cli import guarded
from swav.config import load_config
from swav.data.synthetic import SyntheticShapes
from swav.report import build_report, main, plots, prototype_usage, usage_stats
from swav.report.compare import CompareError, build_comparison
from swav.report.gallery import compute_gallery
from swav.report.runfiles import (
    knn_history,
    knn_over_time,
    read_eval_results,
    read_metrics,
    results_table,
)
from swav.train import train

RUN = [
    "config=quickstart",
    "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=64",
    "config.DATA.SYNTHETIC.NUM_IMAGES_TEST=64",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
    "config.OPTIMIZER.num_epochs=2",
    "config.MODEL.AMP_PARAMS.USE_AMP=false",
    'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [512, 64, 16], "use_bn": true, "num_clusters": [20]}]]',
    "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[]",
    "config.LOG_FREQUENCY=1",
    "config.KNN_MONITOR.EPOCH_FREQUENCY=1",  # a kNN point after epoch 1 and one at the end: a history
]
LINEAR = {"top1": 71.25, "top5": 97.5, "mode": "fast (precomputed features, no augmentation)"}
SVM = {"mAP": 63.4, "low_shot": [{"k": 13, "mAP": 40.5}, {"k": 128, "mAP": 58.25}]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("run")
    train(load_config([*RUN, f"config.CHECKPOINT.DIR={path}"]))
    # What the evaluation commands leave in the run folder.
    (path / "linear.json").write_text(json.dumps(LINEAR))
    (path / "svm.json").write_text(json.dumps(SVM))
    return path


def referenced_images(html_path: Path) -> list[Path]:
    srcs = re.findall(r'<img src="([^"]+)"', html_path.read_text())
    assert all(not Path(s).is_absolute() and "/" not in s for s in srcs), srcs
    return [html_path.parent / s for s in srcs]


def test_report_renders_every_part(run_dir, tmp_path):
    out = tmp_path / "page" / "index.html"
    summary = build_report(run_dir, output=out, num_images=48)
    assert out.is_file() and summary["html"] == out
    images = referenced_images(out)
    assert sorted(p.name for p in images) == ["curves.png", "gallery.png", "knn.png", "usage.png"]
    for path in images:
        assert path.stat().st_size > 0
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 50
            im.verify()
    assert sorted(images) == sorted(summary["images"])
    text = out.read_text()
    # Every evaluation file present becomes a table with its numbers.
    for needle in (
        "knn.json",
        "linear.json",
        "svm.json",
        "71.25",
        "97.50",
        "63.40",
        "low_shot.1",
        "58.25",
    ):
        assert needle in text, needle
    assert "semisup.json" not in text  # absent files are not mentioned
    # The usage histogram covers exactly the sample.
    counts = summary["usage"]
    assert counts.shape == (20,) and counts.sum() == 48
    assert summary["usage_stats"]["images"] == 48
    assert f"{summary['usage_stats']['used']} of 20 prototypes used" in text
    assert summary["notes"] == []


def test_gallery_scores_equal_an_independent_computation(run_dir):
    cfg = load_config([f"config={run_dir / 'train_config.yaml'}"])
    data, _ = compute_gallery(cfg, run_dir, num_images=40, seed=3)
    assert len(data.indices) == 40 and len(set(data.indices.tolist())) == 40
    # Reference in float64: trunk -> projection -> unit embedding -> cosine with unit prototypes.
    model = build_model(cfg).double().eval()
    model.load_state_dict(checkpoint.load(run_dir / checkpoint.FINAL_NAME)["model"])
    images = SyntheticShapes("train", 64, 32, 10, seed=cfg.SEED_VALUE)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = torch.stack(
        [
            (
                torch.from_numpy(np.asarray(images[int(i)][0], dtype=np.float64) / 255).permute(
                    2, 0, 1
                )
                - mean[:, None, None]
            )
            / std[:, None, None]
            for i in data.indices
        ]
    ).double()
    with torch.no_grad():
        z = F.normalize(model.heads[0].projection_head(model.trunk(x)), dim=1)
        protos = F.normalize(model.heads[0].prototypes0.weight, dim=1)
        ref = z @ protos.T
    torch.testing.assert_close(data.scores.double(), ref, atol=2e-4, rtol=0)
    assert data.labels.tolist() == [images.labels[int(i)] for i in data.indices]
    clear = (ref.topk(2, dim=1).values[:, 0] - ref.topk(2, dim=1).values[:, 1]) > 1e-3
    assert (torch.from_numpy(data.assignments)[clear] == ref.argmax(1)[clear]).all()
    np.testing.assert_array_equal(data.counts, np.bincount(data.assignments, minlength=20))
    # The sample is deterministic.
    again, _ = compute_gallery(cfg, run_dir, num_images=40, seed=3)
    np.testing.assert_array_equal(again.indices, data.indices)


def test_prototype_usage_hand_example():
    counts = prototype_usage(np.array([0, 2, 2, 3, 2]), 5)
    np.testing.assert_array_equal(counts, [1, 0, 3, 1, 0])
    stats = usage_stats(counts)
    entropy = -(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6))
    assert stats["images"] == 5 and stats["used"] == 3 and stats["prototypes"] == 5
    assert stats["entropy"] == pytest.approx(entropy)
    assert stats["effective"] == pytest.approx(math.exp(entropy))
    assert stats["max_entropy"] == pytest.approx(math.log(5))
    collapsed = usage_stats(prototype_usage(torch.full((7,), 4), 6))
    assert (
        collapsed["used"] == 1
        and collapsed["entropy"] == 0.0
        and collapsed["effective"] == pytest.approx(1.0)
    )
    uniform = usage_stats(prototype_usage(np.arange(12) % 4, 4))
    assert uniform["entropy"] == pytest.approx(math.log(4)) and uniform[
        "effective"
    ] == pytest.approx(4)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        prototype_usage(np.array([0, 5]), 5)


def test_folders_that_are_not_runs_are_errors(tmp_path, run_dir, capsys):
    with pytest.raises(FileNotFoundError, match="not a swav run folder"):
        build_report(tmp_path)
    assert guarded(lambda: main([str(tmp_path)])) == 2
    assert "not a swav run folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        build_report(tmp_path / "missing")
    shutil.copy(run_dir / "train_config.yaml", tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl yet"):
        build_report(tmp_path)
    assert not (tmp_path / "report").exists()
    # A run that has not logged yet but has an (empty) metrics file renders, and says so.
    (tmp_path / "metrics.jsonl").write_text("")
    summary = build_report(tmp_path, gallery=False)
    assert summary["notes"] == ["metrics.jsonl has no rows yet."] and summary["images"] == []


def test_run_without_checkpoint_or_data_gets_a_note(run_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train_config.yaml", "metrics.jsonl"):
        shutil.copy(run_dir / name, bare)
    summary = build_report(bare, num_images=16)
    assert len(summary["notes"]) == 1 and "no checkpoint" in summary["notes"][0]
    html = (bare / "report" / "index.html").read_text()
    assert "No cluster gallery: no checkpoint" in html
    assert [p.name for p in referenced_images(bare / "report" / "index.html")] == ["curves.png"]
    assert "usage" not in summary

    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", moved)
    (moved / checkpoint.FINAL_NAME).symlink_to(run_dir / checkpoint.FINAL_NAME)
    raw = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    raw["config"]["DATA"]["TRAIN"]["DATA_SOURCES"] = ["disk_folder"]
    raw["config"]["DATA"]["TRAIN"]["DATA_PATHS"] = [str(tmp_path / "gone")]
    (moved / "train_config.yaml").write_text(yaml.safe_dump(raw))
    summary = build_report(moved, num_images=16)
    assert len(summary["notes"]) == 1 and "not available any more" in summary["notes"][0]
    assert str(tmp_path / "gone") in summary["notes"][0]


def test_command_line_without_gallery(run_dir, tmp_path, monkeypatch, capsys):
    import swav.cli

    monkeypatch.setitem(swav.cli.EXTRA_COMMANDS, "report", "swav.report:main")
    out = tmp_path / "plots.html"
    assert swav.cli.main(["report", str(run_dir), "--no-gallery", "--output", str(out)]) == 0
    assert "report written to" in capsys.readouterr().out
    names = sorted(p.name for p in referenced_images(out))
    assert names == ["plots_curves.png", "plots_knn.png"]  # not index.html: names carry the page's
    assert "Clusters" not in out.read_text()
    with pytest.raises(SystemExit):
        main([str(run_dir), "--num-images", "0"])


def test_results_tables_take_any_nesting():
    knn = results_table(
        "knn.json",
        {
            "k20": {"top1": 50.0, "top5": 80.0},
            "k200": {"top1": 48.5, "top5": 81.0},
            "temperature": 0.1,
            "weights": "ckpt.torch",
        },
    )
    assert knn.columns == ["top1", "top5"]
    assert knn.rows == [
        ("k20", {"top1": 50.0, "top5": 80.0}),
        ("k200", {"top1": 48.5, "top5": 81.0}),
    ]
    assert ("temperature", "0.1") in knn.details and ("weights", "ckpt.torch") in knn.details
    flat = results_table("semisup.json", {"top1": 53.9, "top5": 78.5, "labels_percent": 1})
    assert flat.rows == [("result", {"top1": 53.9, "top5": 78.5})] and flat.details == [
        ("labels_percent", "1")
    ]
    assert results_table("svm.json", {}).error


def test_a_damaged_results_file_is_shown_as_such(tmp_path):
    (tmp_path / "linear.json").write_text('{"top1": 7')
    (tmp_path / "knn.json").write_text('{"top1": 7.5}')
    tables = read_eval_results(tmp_path)
    assert [t.file for t in tables] == ["knn.json", "linear.json"]
    assert tables[0].rows == [("result", {"top1": 7.5})] and tables[1].error.startswith(
        "unreadable"
    )


def test_metrics_reader_survives_resumes_and_torn_lines(tmp_path):
    rows = [
        {"iteration": i, "epoch": 0, "loss": 9.0 - i, "lr": 0.1, "images_per_sec": 10.0}
        for i in (1, 2, 3)
    ]
    redo = {
        "iteration": 3,
        "epoch": 0,
        "loss": 1.5,
        "lr": 0.1,
        "images_per_sec": 10.0,
    }  # after a resume
    text = "\n".join(json.dumps(r) for r in [*rows, redo]) + '\n{"iteration": 4, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    read, bad = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in read] == [1, 2, 3] and read[-1]["loss"] == 1.5 and bad == 1


def test_class_names_with_tex_specials_are_shown_literally(run_dir, tmp_path, monkeypatch):
    # Folder names are user data: "$...$" must not be parsed as mathtext (it crashed the page).
    rng = np.random.default_rng(0)
    names = {"cls$\\foo$": 10, "a_b^c": 2}  # 10 of 12: some prototype's majority is cls$\foo$
    for name, count in names.items():
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", run)
    (run / checkpoint.FINAL_NAME).symlink_to(run_dir / checkpoint.FINAL_NAME)
    raw = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    raw["config"]["DATA"]["TRAIN"]["DATA_SOURCES"] = ["disk_folder"]
    raw["config"]["DATA"]["TRAIN"]["DATA_PATHS"] = [str(tmp_path / "images")]
    raw["config"]["DATA"]["NUM_DATALOADER_WORKERS"] = 0
    (run / "train_config.yaml").write_text(yaml.safe_dump(raw))
    texts = []
    original = Figure.text

    def recording(self, *args, **kwargs):
        texts.append(original(self, *args, **kwargs))
        return texts[-1]

    monkeypatch.setattr(Figure, "text", recording)
    summary = build_report(run, num_images=12)
    assert summary["notes"] == [] and summary["usage"].sum() == 12
    assert "gallery.png" in [p.name for p in summary["images"]]
    captions = [t for t in texts if t.get_text().startswith("prototype ")]
    assert any(t.get_text().endswith("% cls$\\foo$") for t in captions)
    assert all(not t.get_parse_math() and not t.get_usetex() for t in captions)


def knn_entry(epoch: int, seconds: float | None, top1: float, random_top1: float = 10.0) -> dict:
    """One kNN monitor result as eval/monitor.py writes it."""
    entry = {"epoch": epoch, "iteration": 100 * epoch, "k": 20, "temperature": 0.1}
    if seconds is not None:
        entry["train_seconds"] = seconds
    entry["trained"] = {"top1": top1, "top5": top1 + 30}
    entry["random_init"] = {"top1": random_top1, "top5": 50.0}
    return entry


def write_knn_run(folder: Path, entries: list[dict], with_history: bool = True) -> Path:
    """A run folder whose knn.json is what runlog.log_knn leaves: the latest result plus `history`
    (with_history=False: the single record of older versions)."""
    folder.mkdir(parents=True)
    data = {**entries[-1], "history": entries} if with_history else entries[-1]
    (folder / "knn.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    # Best is not last in the first run, so the table's two top-1 columns differ.
    swav = write_knn_run(
        tmp_path / "runs" / "swav",
        [knn_entry(5, 120.0, 30.5), knn_entry(10, 240.0, 41.25), knn_entry(15, 390.0, 39.0)],
    )
    simclr = write_knn_run(
        tmp_path / "runs" / "simclr", [knn_entry(4, 90.0, 35.0)], with_history=False
    )
    return [swav, simclr]


def table_rows(html_text: str) -> dict[str, list[str]]:
    rows = re.findall(r"<tr><th>([^<]*)</th>((?:<td[^>]*>[^<]*</td>)+)</tr>", html_text)
    return {name: re.findall(r"<td[^>]*>([^<]*)</td>", cells) for name, cells in rows}


def record_comparison_plot(monkeypatch) -> list:
    calls = []
    original = plots.knn_against_time

    def recording(runs, path):
        calls.append((runs, path))
        original(runs, path)

    monkeypatch.setattr(plots, "knn_against_time", recording)
    return calls


def test_comparison_page_plot_and_table(two_runs, tmp_path, monkeypatch):
    calls = record_comparison_plot(monkeypatch)
    out = tmp_path / "page" / "recipes.html"
    summary = build_comparison(two_runs, output=out)
    png = tmp_path / "page" / "recipes_knn.png"
    assert summary["html"] == out and summary["images"] == [png]
    assert referenced_images(out) == [png]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200
        im.verify()
    # One line per run: training minutes (train_seconds / 60) against the trained trunk's top-1.
    assert calls == [
        (
            [
                ("swav", [(2.0, 30.5), (4.0, 41.25), (6.5, 39.0)]),
                ("simclr", [(1.5, 35.0)]),
            ],
            png,
        )
    ]
    # run, final epoch, training minutes, last top-1, best top-1
    assert table_rows(out.read_text()) == {
        "swav": ["15", "6.5", "39.00", "41.25"],
        "simclr": ["4", "1.5", "35.00", "35.00"],
    }


def test_comparison_from_the_command_line_with_labels(two_runs, tmp_path, monkeypatch, capsys):
    calls = record_comparison_plot(monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = [str(d) for d in two_runs] + ["--label", "SwAV 2x32", "--label", "Sim$CLR$"]
    assert main(argv) == 0
    out = tmp_path / "report_compare.html"
    assert "comparison written to" in capsys.readouterr().out
    assert referenced_images(out) == [tmp_path / "report_compare_knn.png"]
    assert [label for label, _ in calls[0][0]] == ["SwAV 2x32", "Sim$CLR$"]
    rows = table_rows(out.read_text())
    assert list(rows) == ["SwAV 2x32", "Sim$CLR$"] and rows["SwAV 2x32"][0] == "15"


def test_comparison_errors_name_the_problem(two_runs, tmp_path, capsys):
    bare = tmp_path / "runs" / "no_monitor"
    bare.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no_monitor has no knn.json.*KNN_MONITOR\.ENABLED=true"
    ):
        build_comparison([two_runs[0], bare], output=tmp_path / "x.html")
    assert guarded(lambda: main([str(two_runs[0]), str(bare)])) == 2
    assert "no_monitor has no knn.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="gone is not a folder"):
        build_comparison([two_runs[0], tmp_path / "gone"], output=tmp_path / "x.html")
    # A knn.json of `swav knn` (no epoch) cannot be placed in training time.
    (bare / "knn.json").write_text(json.dumps({"k20": {"top1": 50.0}, "temperature": 0.1}))
    with pytest.raises(CompareError, match="no_monitor/knn.json holds no kNN result measured"):
        build_comparison([two_runs[0], bare], output=tmp_path / "x.html")

    with pytest.raises(CompareError, match="1 --label for 2 runs"):
        build_comparison(two_runs, output=tmp_path / "x.html", labels=["one"])
    with pytest.raises(SystemExit) as exit_info:
        main([str(d) for d in two_runs] + ["--label", "one"])
    assert exit_info.value.code == 2 and "1 --label for 2 runs" in capsys.readouterr().err
    with pytest.raises(CompareError, match="labelled same: name each run with --label"):
        build_comparison(two_runs, output=tmp_path / "x.html", labels=["same", "same"])
    with pytest.raises(SystemExit):
        main([str(two_runs[0]), "--label", "one"])  # a label needs a comparison
    assert not (tmp_path / "x.html").exists()
    # One folder is still the one-run page, with its own checks.
    assert guarded(lambda: main([str(two_runs[0])])) == 2
    assert "not a swav run folder" in capsys.readouterr().err


def test_knn_readers_share_knn_json(tmp_path):
    run = write_knn_run(
        tmp_path / "run",
        [knn_entry(1, None, 20.0, 9.0), knn_entry(2, 60.0, 25.0, 9.5), knn_entry(3, 90.5, 27.5)],
    )
    # Without train_seconds (older versions) a result has an epoch but no place in time.
    assert knn_over_time(run) == [(2, 60.0, 25.0), (3, 90.5, 27.5)]
    assert knn_history(run) == {
        "trained": [(1, 20.0), (2, 25.0), (3, 27.5)],
        "random_init": [(1, 9.0), (2, 9.5), (3, 10.0)],
    }
