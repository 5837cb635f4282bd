"""What a run writes for people: log.txt, metrics.jsonl, TensorBoard events, knn.json."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("swav")


class _TqdmHandler(logging.StreamHandler):
    """Console lines that do not tear an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never kill training
            self.handleError(record)


class _LazyFileHandler(logging.FileHandler):
    """Appends from the first record on (``delay``), creating the folder if need be: a rank > 0
    may log before rank 0 has made the run folder."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def setup_logging(log_file: Path | None = None, console_level: int = logging.INFO, rank: int = 0) -> None:
    """INFO to the console and, when given, to `log_file` (appended: a resumed run keeps its history).

    Processes other than rank 0 pass `console_level=logging.WARNING`: one voice per run. Given
    `rank` > 0 and the run's `log_file`, they append their WARNINGs and above to it too, tagged
    "[rank N]", so that every rank's replaced images and problems are in one log.txt. A record
    logged with `extra={"console": False}` goes to the file only.
    """
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = _TqdmHandler()
    console.setLevel(console_level)
    console.addFilter(lambda record: getattr(record, "console", True))
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(console)
    if log_file is None:
        return
    if rank == 0:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    else:
        # Opened only when this rank has something to say; append mode, so ranks (and their
        # forked loader workers) add whole lines to rank 0's file.
        file_handler = _LazyFileHandler(log_file, mode="a", delay=True)
        file_handler.setLevel(logging.WARNING)
        file_handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(message)s"))
    logger.addHandler(file_handler)


class RunLogger:
    """Rank 0's metrics: one JSON object per logged step, the same scalars in TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.collapse_warned = False
        self._metrics = None
        self._tb = None
        if enabled:
            self._metrics = open(self.run_dir / "metrics.jsonl", "a")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log_step(self, *, iteration: int, epoch: int, loss: float, lr: float, images_per_sec: float,
                 eta_seconds: float, train_seconds: float | None = None, quiet: bool = False) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration, "epoch": epoch, "loss": loss, "lr": lr,
               "images_per_sec": images_per_sec, "time": time.time()}
        if train_seconds is not None:
            row["train_seconds"] = round(train_seconds, 2)  # without kNN monitoring: accuracy-vs-time plots
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        for key in ("loss", "lr", "images_per_sec"):
            self._tb.add_scalar(f"train/{key}", row[key], iteration)
        line = (f"epoch {epoch + 1} iter {iteration}: loss {loss:.4f} lr {lr:.4g} "
                f"{images_per_sec:.1f} img/s eta {format_duration(eta_seconds)}")
        # With a live progress bar the console already shows this; log.txt always gets it.
        logger.info(line, extra={"console": not quiet})

    def check_collapse(self, loss: float, level: float | None, epoch: int) -> None:
        """Warn once when the loss sits at `level` (the objective's ln K: uniform codes and
        predictions, nothing learned); None: the objective has no such level."""
        if level is None or not self.enabled or self.collapse_warned or epoch < 1 or not math.isfinite(loss):
            return
        # Within 1 % from both sides: uniform predictions give ln K itself, while a run that learns
        # may still be 2-3 % below it after one epoch of warm-up; a loss far above is divergence.
        if abs(loss - level) < 0.01 * level:
            self.collapse_warned = True
            logger.warning(
                "the loss %.3f is still near ln(K)=%.3f after %d epochs: the predictions look uniform (collapse). "
                "Usual remedies: lower the learning rate or add warm-up, use fewer prototypes (clusters) for a "
                "small dataset, or a larger batch; for SwAV also freeze the prototypes longer "
                "(MODEL.TEMP_FROZEN_PARAMS_ITER_MAP), lower LOSS.swav_loss.epsilon (e.g. 0.03) or start the queue "
                "later (queue.start_iter).",
                loss, level, epoch,
            )

    def epoch_summary(self, epoch: int, replaced: int) -> None:
        """The epoch's one console line about replaced images (`replaced`: the count over every
        rank); each file's path and error are in log.txt. Rank 0's alone, like the metrics."""
        if not self.enabled:
            return
        if replaced:
            logger.warning("epoch %d: %d unreadable images were replaced by others (their paths are in log.txt)",
                           epoch + 1, replaced)
        logger.info("epoch %d done", epoch + 1)

    def log_knn(self, results: dict) -> None:
        if not self.enabled:
            return
        # knn.json: the latest result plus every monitored result of the run ("history"), kept
        # across resumes; an epoch measured again (a resumed run redoing it) keeps the latest.
        path = self.run_dir / "knn.json"
        history = []
        try:
            old = json.loads(path.read_text())
            history = [h for h in old.get("history", []) if isinstance(h, dict) and h.get("epoch") != results.get("epoch")]
        except (OSError, ValueError, AttributeError):
            pass  # no file yet, or not ours
        entry = {key: value for key, value in results.items() if key != "history"}
        history = sorted(history + [entry], key=lambda h: h.get("epoch", 0))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**entry, "history": history}, indent=2))
        tmp.replace(path)
        for name in ("trained", "random_init"):
            if name in results:
                r = results[name]
                self._tb.add_scalar(f"knn/{name}_top1", r["top1"], results["epoch"])
                logger.info("kNN (k=%d, T=%g) %s trunk: top-1 %.2f %%, top-5 %.2f %%",
                            results["k"], results["temperature"], name.replace("_", " "), r["top1"], r["top5"])

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
