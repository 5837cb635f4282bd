"""`swav report RUN_DIR`: assemble the page from the run folder."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from swav.report import plots
from swav.report.compare import DEFAULT_OUTPUT, CompareError, build_comparison
from swav.report.gallery import (
    GalleryData,
    GallerySkipped,
    center_crop,
    compute_gallery,
    majority_label,
    most_used,
    top_images,
    usage_stats,
)
from swav.report.page import Section, render_page
from swav.report.runfiles import (
    METRICS_NAME,
    check_run_dir,
    format_value,
    knn_history,
    load_run_config,
    read_eval_results,
    read_metrics,
)
from swav.runlog import format_duration

DEFAULT_NUM_IMAGES = 1024


class _Outputs:
    """Where the page and its PNGs go, and the summary `build_report` returns as they are made."""

    def __init__(self, run_dir: Path, output: str | Path | None) -> None:
        html_path = Path(output) if output is not None else run_dir / "report" / "index.html"
        if html_path.is_dir():
            html_path = html_path / "index.html"
        self.html_path = html_path
        self.out_dir = html_path.parent
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A page not called index.html prefixes its PNGs, so two pages can share a folder.
        self.prefix = "" if html_path.stem == "index" else f"{html_path.stem}_"
        self.summary: dict = {"html": html_path, "images": [], "notes": []}

    def png(self, name: str) -> Path:
        """The path of the page's PNG `name`, listed in the summary."""
        path = self.out_dir / f"{self.prefix}{name}.png"
        self.summary["images"].append(path)
        return path

    def note(self, section: Section, text: str) -> None:
        """A note on the page that the summary also lists (the command line prints them)."""
        section.note(text)
        self.summary["notes"].append(text)


def build_report(
    run_dir: str | Path,
    output: str | Path | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    gallery: bool = True,
    num_prototypes_shown: int = 12,
    images_per_prototype: int = 8,
    image_size: int | None = None,
    seed: int = 0,
) -> dict:
    """Write the HTML page (default RUN_DIR/report/index.html) and its PNGs next to it.

    Returns a summary: ``html`` path, ``images`` (PNG paths), ``notes``, and ``usage`` (counts per
    prototype) with ``usage_stats`` when the gallery was made.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    outputs = _Outputs(run_dir, output)
    cfg, config_note = load_run_config(run_dir)
    rows, bad_lines = read_metrics(run_dir / METRICS_NAME)
    # The curves' red "nothing learned" line is ln K of SwAV's prototypes; other methods draw none.
    swav = cfg.LOSS.name == "swav_loss"
    num_prototypes = [int(k) for k in cfg.LOSS.swav_loss.num_prototypes] if swav else []
    sections = [
        _overview_section(cfg, rows, config_note, outputs),
        _training_section(run_dir, rows, bad_lines, num_prototypes, outputs),
        _results_section(run_dir),
    ]
    if gallery:
        gallery_options = _GalleryOptions(num_images, num_prototypes_shown, images_per_prototype, image_size, seed)
        sections.append(_gallery_section(cfg, run_dir, gallery_options, outputs))

    generated = datetime.now().strftime("%Y-%m-%d %H:%M")
    outputs.html_path.write_text(
        render_page(
            f"SwAV run: {run_dir.resolve().name}",
            str(run_dir.resolve()),
            sections,
            f"swav report, {generated}",
        )
    )
    return outputs.summary


def _overview_section(cfg: DictConfig, rows: list[dict], config_note: str | None, outputs: _Outputs) -> Section:
    overview = Section("Run")
    overview.facts(_run_facts(cfg, rows))
    if config_note:
        outputs.note(overview, config_note)
    return overview


def _training_section(
    run_dir: Path, rows: list[dict], bad_lines: int, num_prototypes: list[int], outputs: _Outputs
) -> Section:
    """The loss curves from the metrics file, and the kNN monitor's curve when it has two points."""
    training = Section("Training")
    if rows:
        path = outputs.png("curves")
        collapse = float(np.mean([math.log(k) for k in num_prototypes])) if num_prototypes else None
        plots.training_curves(rows, path, collapse)
        training.image(
            path.name,
            "loss, learning rate and throughput against the iteration",
            "Loss (mean over each logging window), learning rate and throughput per logged step. "
            "A loss that stays on the red line has not learned anything: codes and predictions are uniform.",
        )
    else:
        outputs.note(training, f"{METRICS_NAME} has no rows yet.")
    if bad_lines:
        outputs.note(training, f"{bad_lines} unreadable line(s) in {METRICS_NAME} were skipped.")
    history = knn_history(run_dir)
    if any(len(points) >= 2 for points in history.values()):
        path = outputs.png("knn")
        plots.knn_curve(history, path)
        training.image(
            path.name,
            "kNN top-1 over epochs",
            "Weighted kNN top-1 of the trunk's features, measured during training.",
        )
    return training


def _results_section(run_dir: Path) -> Section:
    results = Section("Evaluation results")
    tables = read_eval_results(run_dir)
    for table in tables:
        results.results(table)
    if not tables:
        results.text(
            "No evaluation results in the run folder yet (knn.json, linear.json, semisup.json, svm.json "
            "are written by swav knn, linear, semisup and svm)."
        )
    return results


@dataclass(frozen=True)
class _GalleryOptions:
    num_images: int  # training images scored
    num_shown: int  # prototypes in the mosaic
    per_row: int  # images per prototype
    image_size: int | None  # centre-crop side; None: the training's large crop
    seed: int  # of the image sample


def _gallery_section(cfg: DictConfig, run_dir: Path, options: _GalleryOptions, outputs: _Outputs) -> Section:
    """The training images scored against the prototypes: usage histogram and image mosaic."""
    section = Section("Clusters")
    start = time.perf_counter()
    try:
        data, dataset = compute_gallery(
            cfg, run_dir, options.num_images, image_size=options.image_size, seed=options.seed
        )
    except GallerySkipped as e:
        outputs.note(section, f"No cluster gallery: {e}")
        return section
    stats = usage_stats(data.counts)
    outputs.summary["usage"], outputs.summary["usage_stats"] = data.counts, stats
    sets = (
        f" (the first of {data.num_prototype_sets} prototype sets)"
        if data.num_prototype_sets > 1
        else ""
    )
    section.text(
        f"{stats['images']} training images (a fixed random sample, centre crops of {data.image_size} px) "
        f"through the model of {data.checkpoint}; each image goes to the prototype{sets} it scores highest on."
    )
    _usage_image(section, data, stats, outputs)
    rows = _mosaic_rows(data, dataset, options.num_shown, options.per_row)
    if rows:
        _mosaic_image(section, data, rows, options.per_row, outputs)
    section.text(f"Computed in {time.perf_counter() - start:.1f} s.")
    return section


def _usage_image(section: Section, data: GalleryData, stats: dict, outputs: _Outputs) -> None:
    n, k = stats["images"], stats["prototypes"]
    path = outputs.png("usage")
    plots.usage_histogram(data.counts, path)
    fewer = f" With fewer images than prototypes, at most {n} can be used." if n < k else ""
    section.image(
        path.name,
        "prototype usage histogram",
        f"Prototype usage: {stats['used']} of {k} prototypes used; entropy {stats['entropy']:.2f} nats "
        f"(uniform: ln K = {stats['max_entropy']:.2f}), i.e. {stats['effective']:.1f} effective prototypes. "
        "Counts close to the grey line (what equal probabilities give at this sample size) are the equipartition "
        f"SwAV aims for; a few tall bars and a long empty tail mean collapse.{fewer}",
    )


def _mosaic_rows(
    data: GalleryData, dataset, num_shown: int, per_row: int
) -> list[tuple[str, list, list[bool]]]:
    """(caption, images, assigned) of each of the most used prototypes, for `plots.gallery_mosaic`."""
    rows = []
    for p in most_used(data.counts, num_shown):
        positions = top_images(data.scores, p, per_row)
        images = [center_crop(dataset[int(data.indices[i])][0], data.image_size) for i in positions]
        assigned = [bool(data.assignments[i] == p) for i in positions]
        caption = f"prototype {p}\n{int(data.counts[p])} images"
        majority = majority_label(data.labels, data.assignments, p)
        if majority is not None:
            label, share = majority
            name = (
                data.class_names[label]
                if data.class_names and label < len(data.class_names)
                else f"class {label}"
            )
            caption += f"\n{share:.0%} {name}"
        rows.append((caption, images, assigned))
    return rows


def _mosaic_image(section: Section, data: GalleryData, rows: list, per_row: int, outputs: _Outputs) -> None:
    path = outputs.png("gallery")
    plots.gallery_mosaic(rows, path)
    section.image(
        path.name,
        "images with the highest score for the most used prototypes",
        f"The {len(rows)} most used prototype{'s' if len(rows) > 1 else ''}, each with the {per_row} sampled images that score highest on it "
        "(green frame: the prototype is the image's argmax; grey: another prototype wins it)"
        + (
            "; the share is the commonest label among the images assigned to it."
            if data.labels.ge(0).any()
            else "."
        ),
    )


def _loss_facts(cfg: DictConfig) -> list[tuple[str, str]]:
    """What the method's own section says: SwAV's prototypes and Sinkhorn, else its settings."""
    name = cfg.LOSS.name
    if name != "swav_loss":
        section = cfg.LOSS.get(name) or {}
        settings = ", ".join(f"{k} {v}" for k, v in section.items() if not OmegaConf.is_config(v))
        return [("method", name), ("loss", settings or "-")]
    loss = cfg.LOSS.swav_loss
    queue = loss.queue
    queued = (
        f", queue {queue.queue_length} from iteration {queue.start_iter}"
        if queue.queue_length
        else ""
    )
    return [
        (
            "prototypes",
            " + ".join(str(k) for k in loss.num_prototypes) + f", embedding {loss.embedding_dim}-d",
        ),
        (
            "loss",
            f"temperature {loss.temperature}, epsilon {loss.epsilon}, "
            f"{loss.num_iters} Sinkhorn iterations{queued}",
        ),
    ]


def _run_facts(cfg: DictConfig, rows: list[dict]) -> list[tuple[str, str]]:
    r = cfg.MODEL.TRUNK.RESNETS
    crops = cfg.DATA.TRAIN.TRANSFORMS[0]
    lr = cfg.OPTIMIZER.param_schedulers.lr
    world = int(cfg.DISTRIBUTED.NUM_NODES) * int(cfg.DISTRIBUTED.NUM_PROC_PER_NODE)
    batch = int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA)
    facts = [
        (
            "data",
            ", ".join(
                f"{s}: {p}"
                for s, p in zip(
                    cfg.DATA.TRAIN.DATA_SOURCES, cfg.DATA.TRAIN.DATA_PATHS, strict=False
                )
            ),
        ),
        (
            "trunk",
            f"ResNet-{r.DEPTH}"
            + (f" w{r.WIDTH_MULTIPLIER:g}" if r.WIDTH_MULTIPLIER != 1 else "")
            + (f" (small stem{', stride 2' if r.get('SMALL_STEM_STRIDE', 1) == 2 else ''})"
               if r.SMALL_STEM else ""),
        ),
        *_loss_facts(cfg),
        (
            "crops",
            " + ".join(f"{n}x{s}" for n, s in zip(crops.num_crops, crops.size_crops, strict=False)),
        ),
        ("batch", f"{batch} x {world} process(es) = {batch * world}"),
        (
            "learning rate",
            f"{lr.name}, {format_value(float(lr.scaled.base_value))} to {format_value(float(lr.scaled.end_value))}"
            f" after {lr.warmup_epochs} warm-up epoch(s)",
        ),
    ]
    if rows:
        last = rows[-1]
        facts.append(
            (
                "progress",
                f"iteration {last['iteration']}, epoch {int(last.get('epoch', 0)) + 1} of "
                f"{cfg.OPTIMIZER.num_epochs}",
            )
        )
        facts.append(("last loss", format_value(float(last.get("loss", math.nan)))))
        times = [row["time"] for row in rows if isinstance(row.get("time"), (int, float))]
        if len(times) >= 2:
            span = format_duration(times[-1] - times[0])
            facts.append(
                ("logged wall time", f"{span} (first to last logged step, pauses included)")
            )
    return facts


def main(argv: list[str]) -> int:
    """`swav report RUN_DIR [--output PATH] [--num-images N] [--no-gallery]`, or with several
    run folders `swav report RUN_DIR RUN_DIR2 ... [--label NAME ...] [--output PATH]`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.run_dir) > 1:
        return _compare(parser, args)
    if args.label is not None:
        parser.error("--label names runs in a comparison: give two or more run folders")
    return _report(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swav report",
        description="An HTML page about a training run: curves, evaluation results and a cluster gallery. "
        "With several run folders, a page comparing their kNN top-1 against training minutes. "
        "Opens in a browser from disk.",
    )
    parser.add_argument(
        "run_dir",
        nargs="+",
        help="the run folder (config.CHECKPOINT.DIR of a training run); several to compare them "
        "(each needs the knn.json of the kNN monitor)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help=f"the HTML file (default RUN_DIR/report/index.html, ./{DEFAULT_OUTPUT} for several runs); "
        "PNGs go next to it",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=None,
        metavar="NAME",
        help="comparison only: the run's name in the plot and table (default: its folder's name); "
        "give it once per run folder, in the same order",
    )
    parser.add_argument(
        "--num-images",
        type=_positive,
        default=DEFAULT_NUM_IMAGES,
        help=f"training images scored for the gallery (default {DEFAULT_NUM_IMAGES}); use several "
        "times the number of prototypes for a telling usage histogram (one-run page only)",
    )
    parser.add_argument(
        "--no-gallery",
        action="store_true",
        help="plots and results only: no model, no images (a comparison never has a gallery)",
    )
    parser.add_argument(
        "--image-size",
        type=_positive,
        default=None,
        help="centre-crop size for the gallery (default: the training's large crop size; "
        "one-run page only)",
    )
    return parser


def _report(args: argparse.Namespace) -> int:
    summary = build_report(
        args.run_dir[0],
        output=args.output,
        num_images=args.num_images,
        gallery=not args.no_gallery,
        image_size=args.image_size,
    )
    for text in summary["notes"]:
        print(f"note: {text}")
    html_path = Path(summary["html"]).resolve()
    print(f"report written to {html_path}\nopen it in a browser: {html_path.as_uri()}")
    return 0


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # The gallery options belong to the one-run page; the comparison only reads knn.json.
    try:
        summary = build_comparison(args.run_dir, output=args.output, labels=args.label)
    except CompareError as e:
        parser.error(str(e))
    html_path = Path(summary["html"]).resolve()
    print(
        f"comparison written to {html_path} (plot: {summary['images'][0].resolve()})\n"
        f"open it in a browser: {html_path.as_uri()}"
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
