"""PNG figures of the report.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas directly:
no pyplot, so no global backend is switched and no GUI is touched, whatever the caller uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

BLUE, ORANGE, GREY, GREEN = "#2563eb", "#ea580c", "#9ca3af", "#16a34a"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax) -> None:
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", facecolor="white")


def training_curves(rows: Sequence[dict], path: Path, collapse_level: float | None = None) -> None:
    """Loss, learning rate and throughput against the iteration, epoch starts marked.

    `collapse_level` is the loss of uniform codes and predictions (mean of ln K over prototype sets).
    """
    it = np.array([r["iteration"] for r in rows], dtype=np.float64)

    def column(key: str) -> np.ndarray:
        return np.array([float(r.get(key, math.nan)) for r in rows], dtype=np.float64)

    fig = _figure(9.0, 7.2)
    axes = fig.subplots(3, 1, sharex=True)
    panels = (
        ("loss", "loss", BLUE),
        ("lr", "learning rate", ORANGE),
        ("images_per_sec", "images / s", GREEN),
    )
    epochs = [int(r.get("epoch", 0)) for r in rows]
    # An epoch's first logged row marks where it starts; too many lines would hide the curves.
    starts = [it[i] for i in range(1, len(rows)) if epochs[i] != epochs[i - 1]]
    for ax, (key, label, colour) in zip(axes, panels, strict=True):
        _style(ax)
        y = column(key)
        ax.plot(
            it, y, color=colour, linewidth=1.4, marker="o" if len(it) < 30 else None, markersize=3
        )
        ax.set_ylabel(label)
        if len(starts) <= 50:
            for s in starts:
                ax.axvline(s, color=GREY, linewidth=0.6, linestyle=":")
    if collapse_level is not None:
        axes[0].axhline(collapse_level, color="#dc2626", linestyle="--", linewidth=1)
        axes[0].annotate(
            f"ln K = {collapse_level:.2f}: uniform codes (collapse)",
            (0.99, collapse_level),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=8,
            color="#dc2626",
        )
    speed = column("images_per_sec")
    if np.isfinite(speed).any():
        axes[2].set_title(
            f"median {np.nanmedian(speed):.1f} images/s", fontsize=9, loc="right", color="#4b5563"
        )
    axes[-1].set_xlabel(
        "iteration" + ("   (dotted: epoch starts)" if starts and len(starts) <= 50 else "")
    )
    _save(fig, path)


def knn_curve(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """kNN top-1 over epochs, the trained trunk next to a random one."""
    fig = _figure(9.0, 3.2)
    ax = fig.subplots()
    _style(ax)
    styles = {"trained": (BLUE, "trained trunk"), "random_init": (GREY, "random-init trunk")}
    for name, points in history.items():
        colour, label = styles.get(name, (ORANGE, name))
        epochs, top1 = zip(*points, strict=True)
        ax.plot(epochs, top1, color=colour, marker="o", markersize=4, linewidth=1.6, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.legend(frameon=False, fontsize=9)
    _save(fig, path)


def knn_against_time(
    runs: Sequence[tuple[str, Sequence[tuple[float, float]]]], path: Path
) -> None:
    """Several runs' kNN top-1 against training minutes: one line per run, [(label, [(minutes, top1)])]."""
    fig = _figure(9.0, 4.2)
    ax = fig.subplots()
    _style(ax)
    for label, points in runs:
        minutes, top1 = zip(*points, strict=True)
        # Labels are folder names: a "$" is shown as itself, not taken to start mathtext.
        shown = label.replace("$", r"\$")
        ax.plot(minutes, top1, marker="o", markersize=4, linewidth=1.6, label=shown)
    ax.set_xlim(left=0)
    ax.set_xlabel("training minutes (kNN evaluations excluded)")
    ax.set_ylabel("kNN top-1 (%)")
    ax.legend(frameon=False, fontsize=9)
    _save(fig, path)


def usage_histogram(counts: np.ndarray, path: Path) -> None:
    """Images per prototype, sorted, against the uniform level N / K."""
    counts = np.sort(np.asarray(counts))[::-1]
    k, n = counts.size, counts.sum()
    fig = _figure(9.0, 3.2)
    ax = fig.subplots()
    _style(ax)
    ranks = np.arange(k)
    if k <= 300:
        ax.bar(ranks, counts, width=0.9 if k <= 100 else 1.0, color=BLUE, linewidth=0)
    else:
        ax.fill_between(ranks, counts, step="post", color=BLUE, linewidth=0)
    ax.axhline(
        n / k, color="#dc2626", linestyle="--", linewidth=1, label=f"uniform: N/K = {n / k:.3g}"
    )
    # Even with equal probabilities a finite sample spreads its counts (about Poisson(N/K)): this
    # is the profile healthy equipartition produces at this sample size.
    rng = np.random.default_rng(0)
    reference = np.sort(rng.multinomial(int(n), np.full(k, 1.0 / k), size=20), axis=1)[
        :, ::-1
    ].mean(axis=0)
    ax.step(
        ranks,
        reference,
        where="mid",
        color="#111827",
        linewidth=1,
        alpha=0.6,
        label="equal probabilities, same sample size",
    )
    ax.set_xlim(-0.5, k - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("prototypes, most used first")
    ax.set_ylabel("images assigned")
    ax.legend(frameon=False, fontsize=9, loc="upper right")
    _save(fig, path)


def gallery_mosaic(
    rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[bool]]],
    path: Path,
    thumb: int = 64,
    pad: int = 4,
    label_width: int = 170,
) -> None:
    """A grid: one row per prototype, its caption on the left; images framed in green when the
    prototype is their argmax, in grey when another prototype wins them."""
    per_row = max((len(images) for _, images, _ in rows), default=1)
    cell = thumb + 2 * pad
    height, width = cell * len(rows) + pad, cell * per_row + pad
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    frame = 3
    for r, (_, images, mine) in enumerate(rows):
        for c, (image, assigned) in enumerate(zip(images, mine, strict=True)):
            top, left = r * cell + pad, c * cell + pad
            colour = (22, 163, 74) if assigned else (209, 213, 219)
            canvas[top : top + cell - pad, left : left + cell - pad] = colour
            small = _thumbnail(image, thumb - 2 * frame)
            t, lft = top + frame + pad // 2, left + frame + pad // 2
            canvas[t : t + small.shape[0], lft : lft + small.shape[1]] = small
    dpi = 100
    total = width + label_width
    fig = Figure(figsize=(total / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((label_width / total, 0, width / total, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for r, (caption, _, _) in enumerate(rows):
        y = 1 - (r * cell + pad + (cell - pad) / 2) / height
        fig.text(
            8 / total,
            y,
            caption,
            ha="left",
            va="center",
            fontsize=9,
            color="#111827",
            linespacing=1.4,
            # Captions carry class folder names: shown literally, never parsed as mathtext or TeX
            # (a "$" or a backslash in a folder name would otherwise break or garble the figure).
            parse_math=False,
            usetex=False,
        )
    _save(fig, path)


def _thumbnail(image: Image.Image, size: int) -> np.ndarray:
    image = image.convert("RGB")
    # Pixel-doubling keeps small images (32 px) crisp; photos are shrunk smoothly.
    resample = Image.NEAREST if image.width < size else Image.LANCZOS
    return np.asarray(image.resize((size, size), resample))
