"""SwAV pretraining: the training step and the epoch loop with resume, checkpoints and logs.

Objects come from swav.build; only the command line imports this module."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from swav import checkpoint, distributed, precision
from swav.build import (
    StepContext,
    amp_dtype,
    build_knn_data,
    build_lr_schedule,
    build_model,
    build_step_context,
    build_train_data,
    place_model,
    select_device,
    unwrap,
    wrap_distributed,
)
from swav.config import ConfigError, to_yaml, world_size_of
from swav.data import shut_down_workers
from swav.eval.monitor import run_knn_monitor
from swav.losses import EpochContext, StepOutputs
from swav.losses.objective import NON_FINITE_ADVICE
from swav.resume import ConfigChanges, check_resume, compare_configs, saved_config
from swav.runlog import RunLogger, format_duration, setup_logging
from swav.threads import ThreadTuner, thread_options

logger = logging.getLogger("swav")


# ----------------------------------------------------------------------------------------------
# The training step: the whole algorithm, in order, in one function
# ----------------------------------------------------------------------------------------------


def train_step(ctx: StepContext, crops: list[torch.Tensor], iteration: int, lr: float,
               indices: torch.Tensor | None = None, draws: torch.Tensor | None = None) -> torch.Tensor | None:
    """One iteration of the configured method on a batch (`indices`: the images' dataset indices;
    `draws`: the augmentation's random numbers, when the step augments: DATA.TRAIN.GPU_AUGMENT);
    returns the detached loss tensor, or None when a float16 forward pass overflowed and the step
    was skipped. On a CPU the objective stops at a non-finite loss (reading it is free); on a GPU
    the loop's LossWatch does, once per logging window."""
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    # Prototypes live on the unit sphere, so scores are cosine similarities.
    core = unwrap(ctx.model)
    if ctx.normalize_prototypes:
        core.normalize_prototypes()

    crops = _on_device(ctx, crops, draws)
    with ctx.autocast():
        embedding, scores = ctx.model(crops)
    # The objective runs in float32 outside autocast: SwAV's exp(scores / epsilon) overflows in
    # half precision.
    outputs = StepOutputs(
        embeddings=embedding.float(),
        scores=[s.float() for s in scores],
        prototypes=[w.detach() for w in core.prototype_weights()],
        indices=indices,
        check_finite=ctx.check_each_step,
    )
    if ctx.scaler is not None and _overflowed(outputs, ctx.device):
        _skip_overflowed_step(ctx)
        return None
    loss = ctx.objective.step(outputs, iteration)

    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
    else:
        loss.backward()
    # Frozen early on: a parameter without gradient gets neither momentum nor weight decay.
    for param, until in ctx.frozen:
        if iteration < until:
            param.grad = None
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    return loss.detach()


def _on_device(ctx: StepContext, crops: list[torch.Tensor], draws: torch.Tensor | None,
               which: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The batch's crops (crop indices `which`, all by default) on the device, in the model's
    memory format; augmented there first when the loader sent them uncoloured (GPU_AUGMENT)."""
    memory_format = torch.channels_last if ctx.channels_last else torch.contiguous_format
    if ctx.augment is None:
        return [c.to(ctx.device, non_blocking=True, memory_format=memory_format) for c in crops]
    crops = ctx.augment([c.to(ctx.device, non_blocking=True) for c in crops], draws, which)
    return [c.contiguous(memory_format=memory_format) for c in crops]


# float16 with a gradient scaler: the scaler skips a step whose gradients overflowed; a forward
# pass that overflowed is skipped the same way, and only this many in a row stop the run (a
# transient overflow, one unlucky batch, passes in a step or two; ten in a row is the weights).
MAX_OVERFLOWED_STEPS_IN_A_ROW = 10


def _overflowed(outputs: StepOutputs, device: torch.device) -> bool:
    """True on every process when the forward pass of any one gave a non-finite value: they all
    skip the step together (a process that went on to backward would wait for the others' gradients)."""
    finite = torch.isfinite(outputs.embeddings).all()
    for s in outputs.scores:
        finite &= torch.isfinite(s).all()
    return distributed.any_rank(~finite, device)  # one host sync per step, under float16 only


class LossWatch:
    """The first iteration whose loss was not finite, kept on the loss's device: recording it
    needs no host sync, and `check()` reads it (when a logging window's loss is not finite, and
    before every checkpoint, so that none is written after a bad step), the earliest over all
    processes, so that every process stops there together (a loss can be non-finite on one
    process only)."""

    NONE = 2**62  # no bad iteration yet

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), self.NONE, dtype=torch.long, device=device)

    def record(self, loss: torch.Tensor, iteration: int) -> None:
        bad = ~torch.isfinite(loss) & (self.first_bad == self.NONE)
        self.first_bad = torch.where(bad, iteration, self.first_bad)

    def check(self, iteration: int) -> None:
        first = int(distributed.min_over_ranks(self.first_bad))
        if first != self.NONE:
            raise FloatingPointError(
                f"the loss is not finite at iteration {first} (read at iteration {iteration}: on a GPU the "
                "loss is read once per logging window, config.LOG_FREQUENCY; no checkpoint was written "
                f"after it). {NON_FINITE_ADVICE}"
            )


def _skip_overflowed_step(ctx: StepContext) -> None:
    """No update; the objective is not called, so its state (a queue, a memory bank) takes nothing
    from this batch. The loss scale stays: it scales the gradients, not the forward pass."""
    ctx.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def embed_epoch(ctx: StepContext, loader, sampler, crops: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The `crops` of this rank's images of the sampler's epoch, in the epoch's order and whole
    batches as the steps see them, through the model without gradient: (indices [N],
    embeddings [len(crops), N, D]). What a memory bank is filled with (EpochContext.embed).

    The model stays in training mode, so BatchNorm normalises with batch statistics as in the
    steps whose embeddings later overwrite these (its running averages move, as in a step)."""
    resume_at = sampler.start_index
    sampler.set_epoch(sampler.epoch, start_index=0)  # the whole epoch, even in a run resumed inside it
    steps = len(sampler) // loader.batch_size
    indices, embeddings = [], []
    try:
        for step, batch_data in enumerate(loader):
            if step >= steps:
                break
            chosen = _on_device(ctx, [batch_data["crops"][c] for c in crops], batch_data.get("draws"), crops)
            with ctx.autocast():
                embedding, _ = ctx.model(chosen)
            indices.append(batch_data["indices"])
            embeddings.append(embedding.float().view(len(crops), -1, embedding.shape[1]))
    finally:
        sampler.set_epoch(sampler.epoch, start_index=resume_at)
    return torch.cat(indices).to(ctx.device), torch.cat(embeddings, dim=1)


# ----------------------------------------------------------------------------------------------
# The run: resume, epochs, logs, checkpoints
# ----------------------------------------------------------------------------------------------


class _StopRequested(Exception):
    pass


class _StopNow(Exception):
    """A second stop signal: leave at once. The step it interrupted is half done (its queue push
    or BatchNorm update without its optimizer step), so nothing is saved: the last checkpoint stays."""


class _TrainClock:
    """Seconds spent training, across resumes, without the kNN monitor's evaluations: the x axis
    of accuracy-against-time curves."""

    def __init__(self) -> None:
        self.previous = 0.0  # from the checkpoint of a resumed run
        self._start = time.perf_counter()
        self._paused = 0.0

    def seconds(self) -> float:
        return self.previous + time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0


class _StopSignals:
    """SIGTERM (a scheduler's pre-emption) and SIGINT (Ctrl-C): stop and save, between two steps.

    The handler only notes the request: a signal that landed inside a step (after the queue push,
    before the optimizer step) or inside a checkpoint write would otherwise save a state that mixes
    two iterations. One process stops after the step it is in; several processes must stop at the
    same iteration, because saving gathers every rank's queue, so they agree on it over all ranks
    at the next logging boundary (`deferred`). A second signal stops at once.

    With several processes one stop often arrives twice: `kill -TERM -PGID`, `timeout` or a
    scheduler signal the whole process group, and the launcher (ours or torchrun) passes the
    signal on as well. So there a repeat within `same_stop_seconds` is the same request.
    """

    same_stop_seconds = 2.0

    def __init__(self, deferred: bool) -> None:
        self.deferred = deferred
        self.requested: str | None = None
        self._requested_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested is not None:
            if self.deferred and now - self._requested_at < self.same_stop_seconds:
                return
            raise _StopNow(f"signal {signum}, the second one")
        self.requested = f"signal {signum}"
        self._requested_at = now

    def __enter__(self) -> _StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def train(cfg: DictConfig, stop_after_iters: int | None = None) -> dict:
    """Pretrain as configured; rerunning with the same CHECKPOINT.DIR resumes.

    Runs in every process of a multi-process job (`swav train` starts or joins them, see
    swav.distributed); only rank 0 writes files, and rank 0 holds the run folder's lock while the
    run lasts. `stop_after_iters` stops (with a checkpoint) after that many iterations in total,
    as a pre-empted job would; it exists for tests and smoke runs.
    """
    rank, world_size = distributed.rank(), distributed.world_size()
    if world_size != world_size_of(cfg):
        raise ConfigError(
            f"{world_size} processes are running but the config asks for {world_size_of(cfg)} "
            "(config.DISTRIBUTED.NUM_NODES x NUM_PROC_PER_NODE); start runs with `swav train`, which matches them"
        )
    run_dir = Path(cfg.CHECKPOINT.DIR)
    if rank != 0:
        # Warnings of every rank (unreadable images, say) go to the one log.txt, tagged with the rank.
        setup_logging(run_dir / "log.txt", console_level=logging.WARNING, rank=rank)
        return _train(cfg, stop_after_iters, rank, world_size)
    with checkpoint.RunFolderLock(run_dir):
        setup_logging(run_dir / "log.txt")
        checkpoint.remove_stale_temporaries(run_dir)
        return _train(cfg, stop_after_iters, rank, world_size)


def _resume_state(cfg: DictConfig, run_dir: Path, main_process: bool) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume from, as AUTO_RESUME and OVERWRITE_EXISTING say."""
    latest, prev = run_dir / checkpoint.CHECKPOINT_NAME, run_dir / checkpoint.PREV_NAME
    if not (latest.exists() or prev.exists()):
        return None, None
    if cfg.CHECKPOINT.AUTO_RESUME:
        return checkpoint.load_latest(run_dir)
    if not cfg.CHECKPOINT.OVERWRITE_EXISTING:
        raise ConfigError(
            f"{latest} exists and config.CHECKPOINT.AUTO_RESUME=false: choose another "
            "config.CHECKPOINT.DIR, or set config.CHECKPOINT.OVERWRITE_EXISTING=true to start over"
        )
    if main_process:
        # Starting over: the previous run's checkpoints must not be resumed or fallen back to
        # later, and its curves must not continue into the new run's (the logs append).
        for path in (latest, prev, run_dir / checkpoint.FINAL_NAME, run_dir / "metrics.jsonl", run_dir / "knn.json"):
            path.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        logger.info("config.CHECKPOINT.OVERWRITE_EXISTING=true: starting over in %s (old checkpoints, "
                    "metrics.jsonl, knn.json and TensorBoard events removed)", run_dir)
    return None, None


def _write_train_config(cfg: DictConfig, run_dir: Path, changed: bool) -> None:
    """train_config.yaml is the config of the run going on; a resume with changes keeps the old one."""
    path = run_dir / "train_config.yaml"
    if changed and path.exists():
        kept = run_dir / f"train_config.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        path.replace(kept)
        logger.info("the previous config is kept as %s", kept.name)
    tmp = path.with_name(".train_config.yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


def _train(cfg: DictConfig, stop_after_iters: int | None, rank: int, world_size: int) -> dict:
    """This process's part of a run: set up, restore what it resumes, train the remaining epochs,
    save the final model; a stop saves the state to resume from instead."""
    resume, ckpt_path = _resume_state(cfg, Path(cfg.CHECKPOINT.DIR), rank == 0)
    changes, notes = _resume_changes(cfg, resume, ckpt_path, world_size)
    run = _set_up(cfg, rank, world_size, resume, changes, notes)
    threads = torch.get_num_threads()
    try:
        return _run_epochs(run, resume, ckpt_path, stop_after_iters)
    finally:
        shut_down_workers(run.loader)
        torch.set_num_threads(threads)  # the thread tuner's choice ends with the run


def _run_epochs(run: _Run, resume: dict | None, ckpt_path: Path | None, stop_after_iters: int | None) -> dict:
    """Restore what the run resumes, train the remaining epochs, then the final save (or, on a
    stop, the checkpoint to resume from)."""
    cfg, world_size = run.cfg, run.world_size
    if resume is not None:
        run.iteration, run.epoch, run.position = _restore(resume, run.ctx, run.rank, world_size, run.batch, run.iters_per_epoch)
        run.clock.previous = float(resume.get("train_seconds", 0.0))
        if run.iteration >= run.total_iters:
            logger.info("%s is already complete (%d iterations); nothing to do", run.run_dir, run.iteration)
            return {"iteration": run.iteration, "run_dir": str(run.run_dir)}
        logger.info("resumed from %s at epoch %d, iteration %d", ckpt_path, run.epoch, run.iteration)
    _start(run)

    stopped = False
    with _StopSignals(deferred=world_size > 1) as signals:
        try:
            for epoch in range(run.epoch, cfg.OPTIMIZER.num_epochs):
                run.epoch = epoch
                # run.position is 0 except in the epoch that a resumed run starts inside.
                run.sampler.set_epoch(epoch, start_index=run.position)
                run.dataset.set_epoch(epoch)
                run.ctx.objective.start_epoch(epoch, run.epoch_context)  # methods with an assignment phase compute targets here
                replaced = train_one_epoch(run, epoch, signals, stop_after_iters)
                _end_epoch(run, epoch, replaced)
        except _StopNow as e:
            stopped = True
            logger.info("stopped at once (%s) inside iteration %d, which is not saved; rerun the same command "
                        "to resume from the last checkpoint", e, run.iteration + 1)
        except (_StopRequested, KeyboardInterrupt) as e:
            stopped = True
            _save_on_stop(run, e)
    if stopped:
        run.runlog.close()
        return {"iteration": run.iteration, "run_dir": str(run.run_dir), "stopped": True}
    return _finish(run)


@dataclass(eq=False)
class _Run:
    """What the steps, epochs and checkpoints of one run share, and where the run is.

    _set_up builds it; what exists only once the run is known to train (the metrics files, the
    start of the speed and ETA clock) _start adds.
    """

    cfg: DictConfig
    run_dir: Path
    rank: int
    world_size: int
    main_process: bool
    device: torch.device
    dataset: Any
    sampler: Any
    loader: Any
    knn_data: tuple | None
    batch: int  # per process
    iters_per_epoch: int
    total_iters: int
    global_batch: int
    model: torch.nn.Module  # wrapped in DistributedDataParallel when there are several processes
    core: torch.nn.Module  # the model itself: what is saved and evaluated
    ctx: StepContext
    autocast_dtype: torch.dtype | None  # None: float32
    lr_schedule: np.ndarray
    lr_restart: tuple[int, float] | None
    clock: _TrainClock
    loss_watch: LossWatch  # the first non-finite loss, read once per logging window
    # Where the run is: iterations done, the epoch, and the images of it this process has consumed.
    iteration: int = 0
    epoch: int = 0
    position: int = 0
    saved_at: int = -1  # the iteration of the latest checkpoint this run wrote
    overflows_in_a_row: int = 0  # float16 steps skipped since the last one that was made
    threads: ThreadTuner | None = None  # chooses the CPU thread count from step times
    # Set by _start.
    runlog: RunLogger | None = None
    collapse_level: float | None = None
    epoch_context: EpochContext | None = None
    start_iteration: int = 0
    start_time: float = 0.0


def _resume_changes(cfg: DictConfig, resume: dict | None, ckpt_path: Path | None,
                    world_size: int) -> tuple[ConfigChanges | None, list[str]]:
    """How the config differs from the resumed checkpoint's, and the log lines that say so;
    ConfigError for changes that are refused."""
    if resume is None:
        return None, []
    # Checked before anything is written: a refused resume leaves the folder as it was.
    saved_world = resume.get("world_size", 1)
    changes = compare_configs(saved_config(resume), OmegaConf.to_container(cfg),
                              world_size_changed=saved_world != world_size)
    return changes, check_resume(changes, str(ckpt_path), accept=cfg.CHECKPOINT.RESUME_CHANGED)


def _set_up(cfg: DictConfig, rank: int, world_size: int, resume: dict | None,
            changes: ConfigChanges | None, notes: list[str]) -> _Run:
    """Data, model, objective, optimizer and LR schedule, at iteration 0; the run folder gets
    the config. Of `resume`, only the LR schedule's restart point is read here."""
    main_process = rank == 0
    run_dir = Path(cfg.CHECKPOINT.DIR)
    device = select_device(cfg)
    torch.manual_seed(cfg.SEED_VALUE)  # the same initial weights in every process
    dataset, sampler, loader = build_train_data(cfg, rank, world_size, device)
    knn_data = build_knn_data(cfg) if cfg.KNN_MONITOR.ENABLED else None  # a bad path fails now, not after training
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    iters_per_epoch = len(sampler) // batch

    model = place_model(cfg, build_model(cfg), device)
    if world_size > 1:
        model = wrap_distributed(cfg, model, device)
    ctx = build_step_context(cfg, model, device)
    # Only now that data, model and objective are built (each may refuse the config) does the run
    # folder get this run's config.
    if main_process:
        _write_train_config(cfg, run_dir, changed=changes is not None and changes.any)
        for line in notes:
            logger.info(line)
    amp = cfg.MODEL.AMP_PARAMS
    dtype = amp_dtype(cfg, device)
    if dtype is not None and "opt_level" in amp.AMP_ARGS:
        logger.info("AMP_ARGS %s are apex options; mapped to torch.autocast(%s)", dict(amp.AMP_ARGS), dtype)
    lr_restart = _lr_restart(cfg, resume, changes, iters_per_epoch)
    lr_schedule = build_lr_schedule(cfg, iters_per_epoch, restart=lr_restart)
    return _Run(
        cfg=cfg, run_dir=run_dir, rank=rank, world_size=world_size, main_process=main_process,
        device=device, dataset=dataset, sampler=sampler, loader=loader, knn_data=knn_data,
        batch=batch, iters_per_epoch=iters_per_epoch, total_iters=cfg.OPTIMIZER.num_epochs * iters_per_epoch,
        global_batch=batch * world_size, model=model, core=unwrap(model), ctx=ctx, autocast_dtype=dtype,
        lr_schedule=lr_schedule, lr_restart=lr_restart, clock=_TrainClock(),
        loss_watch=LossWatch(device),
    )


def _detached_prototypes(core: torch.nn.Module) -> list[torch.Tensor]:
    return [w.detach() for w in core.prototype_weights()]


def _start(run: _Run) -> None:
    """Open the metrics, log what trains, and start the clocks of the speed and the ETA."""
    cfg = run.cfg
    run.runlog = RunLogger(run.run_dir, enabled=run.main_process)
    run.collapse_level = run.ctx.objective.collapse_level()
    logger.info(
        "training: %d images, %d processes, global batch %d (%d per process), %d iterations per epoch, "
        "%d epochs, device %s, %s, channels_last %s",
        len(run.dataset), run.world_size, run.global_batch, run.batch, run.iters_per_epoch, cfg.OPTIMIZER.num_epochs,
        run.device, precision.describe(cfg.MODEL.AMP_PARAMS.USE_AMP, run.device, run.autocast_dtype), cfg.MODEL.CHANNELS_LAST,
    )
    # What an objective's assignment phase may ask of the model before an epoch (a memory-bank pass).
    run.epoch_context = EpochContext(
        embed=functools.partial(embed_epoch, run.ctx, run.loader, run.sampler),
        prototypes=functools.partial(_detached_prototypes, run.core),
    )
    options = thread_options(torch.get_num_threads())
    if cfg.MACHINE.ADAPT_THREADS and run.device.type == "cpu" and options:
        run.threads = ThreadTuner(options)
    run.model.train()
    run.start_time = time.perf_counter()
    run.start_iteration = run.iteration


def train_one_epoch(run: _Run, epoch: int, signals: _StopSignals, stop_after_iters: int | None) -> int:
    """The steps of `epoch` from image `run.position` on (where the caller started the sampler),
    with the progress bar, the logged windows and the checkpoints every CHECKPOINT_ITER_FREQUENCY
    iterations; raises _StopRequested to stop. Returns how many unreadable images this process
    replaced."""
    cfg, batch = run.cfg, run.batch
    first = run.position // batch
    replaced = 0
    window_loss, window_start, window_iters = torch.zeros((), device=run.device), time.perf_counter(), 0
    window_steps = 0  # the window's iterations that made a step (float16 skips overflowed ones)
    bar = tqdm(
        total=run.iters_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.OPTIMIZER.num_epochs}",
        disable=None if run.main_process else True, dynamic_ncols=True, leave=False, file=sys.stderr,
    )
    for step_in_epoch, batch_data in enumerate(run.loader, start=first):
        lr = float(run.lr_schedule[min(run.iteration, len(run.lr_schedule) - 1)])
        loss = train_step(run.ctx, batch_data["crops"], run.iteration, lr, indices=batch_data["indices"],
                          draws=batch_data.get("draws"))
        replaced += int(batch_data["replaced"].sum())
        if run.threads is not None and (note := run.threads.step_done()):
            logger.info(note)
        if loss is None:
            _note_overflow(run)
        else:
            run.overflows_in_a_row = 0
            if not run.ctx.check_each_step:  # a CPU objective already stopped at a bad step
                run.loss_watch.record(loss, run.iteration)
            window_loss += loss
            window_steps += 1
        window_iters += 1
        run.iteration += 1
        run.position = (step_in_epoch + 1) * batch
        bar.update(1)
        if run.iteration % cfg.LOG_FREQUENCY == 0 or step_in_epoch + 1 == run.iters_per_epoch:
            # One host sync per logging window, not per iteration; the loss is the mean over ranks.
            # A bad step anywhere makes the summed window loss non-finite on every process, so the
            # watch's own collective (the earliest bad iteration) is needed only then.
            window_total = distributed.mean_over_ranks(window_loss).item()
            if not run.ctx.check_each_step and not math.isfinite(window_total):
                run.loss_watch.check(run.iteration)
            elapsed = time.perf_counter() - window_start
            mean_loss = window_total / window_steps if window_steps else float("nan")
            speed = window_iters * run.global_batch / max(elapsed, 1e-9)
            done = (run.iteration - run.start_iteration) / max(time.perf_counter() - run.start_time, 1e-9)
            eta = (run.total_iters - run.iteration) / max(done, 1e-9)
            run.runlog.log_step(
                iteration=run.iteration, epoch=epoch, loss=mean_loss, lr=lr, images_per_sec=speed,
                eta_seconds=eta, train_seconds=run.clock.seconds(), quiet=not bar.disable,
            )
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.3g}", img_s=f"{speed:.0f}", eta=format_duration(eta))
            run.runlog.check_collapse(mean_loss, run.collapse_level, epoch)
            window_loss, window_start, window_iters = torch.zeros((), device=run.device), time.perf_counter(), 0
            window_steps = 0
            if signals.deferred and distributed.any_rank(signals.requested is not None, run.device):
                raise _StopRequested(signals.requested or "a signal to another process")
        if cfg.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY > 0 and run.iteration % cfg.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY == 0:
            _save(run, checkpoint.CHECKPOINT_NAME, epoch, run.position)
        if signals.requested is not None and not signals.deferred:
            raise _StopRequested(signals.requested)
        if stop_after_iters is not None and run.iteration >= stop_after_iters:
            raise _StopRequested(f"stop_after_iters={stop_after_iters}")
        if step_in_epoch + 1 >= run.iters_per_epoch:
            break
    bar.close()
    run.position = 0  # the epoch is done: the next one starts at its first image
    return replaced


def _note_overflow(run: _Run) -> None:
    """A skipped float16 step: a warning, and a stop once too many came in a row."""
    run.overflows_in_a_row += 1
    if run.overflows_in_a_row >= MAX_OVERFLOWED_STEPS_IN_A_ROW:
        raise FloatingPointError(
            f"the float16 forward pass overflowed in {run.overflows_in_a_row} iterations in a row (up to "
            f"iteration {run.iteration + 1}). Try: a lower learning rate (or a longer warm-up); check the "
            "data for NaN/inf images; bfloat16 where the GPU has it (config.MODEL.AMP_PARAMS.AMP_TYPE=bfloat16) "
            "or float32 (config.MODEL.AMP_PARAMS.USE_AMP=false)."
        )
    logger.warning("iteration %d: the float16 forward pass overflowed; step skipped (%d in a row, the run stops at %d)",
                   run.iteration + 1, run.overflows_in_a_row, MAX_OVERFLOWED_STEPS_IN_A_ROW)


def _end_epoch(run: _Run, epoch: int, replaced: int) -> None:
    """The epoch's summary line, its checkpoint when one is due, and the kNN monitor when due
    (after the last epoch _finish runs it)."""
    cfg = run.cfg
    # Every rank replaced its own share of unreadable images: the summary counts them all.
    replaced = round(distributed.mean_over_ranks(torch.tensor(float(replaced), device=run.device)).item() * run.world_size)
    run.runlog.epoch_summary(epoch, replaced)
    last = epoch + 1 == cfg.OPTIMIZER.num_epochs
    if (epoch + 1) % cfg.CHECKPOINT.CHECKPOINT_FREQUENCY == 0 or last:
        _save(run, checkpoint.CHECKPOINT_NAME, epoch + 1, 0)
    knn_every = cfg.KNN_MONITOR.EPOCH_FREQUENCY
    if cfg.KNN_MONITOR.ENABLED and knn_every > 0 and (epoch + 1) % knn_every == 0 and not last:
        with run.clock.paused():
            # Every process takes a share of the images (rank 0 writes the result).
            run_knn_monitor(cfg, run.core, run.device, epoch + 1, run.runlog, run.knn_data,
                            iteration=run.iteration, train_seconds=run.clock.seconds())


def _save(run: _Run, path_name: str, epoch: int, position: int) -> None:
    """Checkpoint the training state at `run.iteration`, to go on at image `position` of `epoch`."""
    if not run.ctx.check_each_step:
        run.loss_watch.check(run.iteration)
    # Every rank takes part: each one's queue goes into the checkpoint (rank 0 writes it).
    run.saved_at = run.iteration
    objective_states = distributed.gather_objects({k: v.cpu() for k, v in run.ctx.objective.state_dict().items()})
    if not run.main_process:
        return
    state = checkpoint.training_state(
        run.core, run.ctx.optimizer, objective_states, world_size=run.world_size, scaler=run.ctx.scaler,
        iteration=run.iteration, epoch=epoch, position=position, train_seconds=run.clock.seconds(),
        lr_restart=run.lr_restart, config_yaml=to_yaml(run.cfg),
    )
    checkpoint.check_finite(state["model"], [], run.iteration)
    _save_logged(state, run.run_dir / path_name, keep_previous=True)


def _save_on_stop(run: _Run, reason: BaseException) -> None:
    """Checkpoint where a requested stop left the run, in the epoch and at the image it was at."""
    try:
        if run.saved_at != run.iteration:  # else the same state is on disk, and the previous one stays
            _save(run, checkpoint.CHECKPOINT_NAME, run.epoch, run.position)
        logger.info("stopped (%s) at iteration %d; checkpoint saved, rerun the same command to resume", reason or "interrupt", run.iteration)
    except _StopNow:  # the atomic write was cut short: the previous checkpoint is intact
        logger.info("stopped at once while saving iteration %d; rerun the same command to resume from the last checkpoint", run.iteration)


def _finish(run: _Run) -> dict:
    """The final model, the final kNN accuracy when monitored, and the run's summary."""
    cfg = run.cfg
    if run.main_process:
        final = checkpoint.final_state(run.core, run.iteration, to_yaml(cfg))
        checkpoint.check_finite(final["model"], [], run.iteration)
        _save_logged(final, run.run_dir / checkpoint.FINAL_NAME)
    summary = {"iteration": run.iteration, "run_dir": str(run.run_dir), "minutes": (time.perf_counter() - run.start_time) / 60}
    if cfg.KNN_MONITOR.ENABLED:
        summary["knn"] = run_knn_monitor(cfg, run.core, run.device, cfg.OPTIMIZER.num_epochs, run.runlog, run.knn_data,
                                         iteration=run.iteration, train_seconds=run.clock.seconds())
    run.runlog.close()
    logger.info("done: %d iterations in %.1f min; run folder %s", run.iteration, summary["minutes"], run.run_dir)
    return summary


def _restore(resume: dict, ctx: StepContext, rank: int, world_size: int, batch: int,
             iters_per_epoch: int) -> tuple[int, int, int]:
    """Load a checkpoint's model, optimizer, scaler and this rank's objective state into `ctx`;
    returns where to go on: (iteration, epoch, images of that epoch this rank has consumed)."""
    unwrap(ctx.model).load_state_dict(resume["model"])
    ctx.optimizer.load_state_dict(resume["optimizer"])
    if ctx.scaler is not None and resume.get("scaler"):
        ctx.scaler.load_state_dict(resume["scaler"])
    iteration, epoch, position = resume["iteration"], resume["epoch"], resume["position"]
    saved_world = resume.get("world_size", 1)
    if saved_world == world_size:
        ctx.objective.load_state_dict(resume.get("loss_per_rank", [resume["loss"]])[rank])
        return iteration, epoch, position
    # Each rank's queue holds its own past embeddings: they cannot be re-dealt to another number
    # of ranks, so the queue refills. The epoch goes on after the images already seen.
    position = position * saved_world // world_size // batch * batch
    # Iterations count this run's steps (another global batch): the LR schedule and the end of
    # the run are in those units, so the count restarts from the epoch and image.
    iteration = epoch * iters_per_epoch + position // batch
    logger.info(
        "the checkpoint was written by %d processes and this run has %d: the model and optimizer "
        "resume, the embedding queue starts empty (a memory bank is filled again), the epoch continues at image %d",
        saved_world, world_size, position * world_size,
    )
    return iteration, epoch, position


def _lr_restart(cfg: DictConfig, resume: dict | None, changes, iters_per_epoch: int) -> tuple[int, float] | None:
    """Where the cosine LR restarts from when a resume changed the number of epochs.

    Kept in the checkpoint, so that later resumes of the lengthened run follow the same schedule.
    During warm-up nothing restarts: the warm-up does not depend on the run's length.
    """
    if resume is None:
        return None
    restart = tuple(resume["lr_restart"]) if resume.get("lr_restart") else None
    lr = cfg.OPTIMIZER.param_schedulers.lr
    iteration = resume["iteration"]
    if changes is None or changes.num_epochs is None or lr.name != "cosine":
        return restart
    if iteration < lr.warmup_epochs * iters_per_epoch:
        return restart
    old = build_lr_schedule(cfg, iters_per_epoch, num_epochs=changes.num_epochs[0], restart=restart)
    return iteration, float(old[min(iteration, len(old) - 1)])


def _save_logged(state: dict, path: Path, keep_previous: bool = False) -> None:
    try:
        checkpoint.save_atomic(state, path, keep_previous=keep_previous)
    except checkpoint.CheckpointError as e:
        # The command prints the message; log.txt keeps it too.
        logger.error("%s", e, extra={"console": False})
        raise
