"""kNN top-1 on the CIFAR-10 test split against wall-clock training time: ours and a lightly peer loop.

Answers "does ``swav train`` reach the same kNN accuracy in less training time than an equivalent
plain-PyTorch loop built from lightly's SwAV modules?" with both measured in one invocation, one
side after the other (never in parallel: they would share the cores).

Sides:
- ``ours``: the real user command, ``python -m swav train config=pretrain/swav/swav_cifar10_resnet18``
  with the data paths, the kNN monitor after every epoch, ``--epochs`` and the extra config
  overrides, in a subprocess (output in OUT/ours.log, run folder OUT/ours). Its knn.json history
  gives, per epoch, the training seconds so far (kNN evaluations excluded) and the kNN accuracy.
- ``peer-default``: a plain PyTorch loop in this process as lightly's examples write it:
  SwaVTransform crops from an ImageFolder, our trunk (same type, seed 0) + SwaVProjectionHead +
  SwaVPrototypes, SwaVLoss with its defaults, Adam (lr 1e-3), each crop forwarded separately,
  float32. Crops, global batch, prototypes, prototype-freezing iterations, flip, colour-jitter
  strength, blur and normalisation are read from ours' resolved config (OUT/ours/train_config.yaml).
- ``peer-best``: the same with channels-last (model and inputs), and bfloat16 autocast where the
  CPU has native bfloat16 (the rule ours follows, ``swav.precision``).
- ``peer-tuned``: peer-best with ours' settings, so that the gap left is the implementation's, not
  the settings': SwaVLoss with ours' temperature, Sinkhorn iterations and epsilon (lightly's 0.05
  default stalls at ln K on small data), SGD with ours' momentum, weight decay and per-iteration
  LR schedule (warm-up and cosine), and the crops of one resolution forwarded as one batch.
After every peer epoch the clock pauses and the trunk is scored with exactly our kNN protocol
(``swav.eval.knn.evaluate_knn`` on ``swav.train.build_knn_data``'s datasets, ours' K, T and image
size, float32). Records go to OUT/peer-<side>.json as they are made; everything to OUT/results.json.

Time to accuracy: for each peer side its best kNN top-1, and the first training minute at which
ours reached at least that (ours is only scored at epoch ends, so its time is an upper bound).

    /work/benchenv/bin/python benchmarks/time_to_accuracy.py --data /work/data/cifar10 --epochs 6 \\
        --out /work/runs/tta                                        # every side, in SIDES order
    /work/benchenv/bin/python benchmarks/time_to_accuracy.py --data /work/data/cifar10 --epochs 6 \\
        --out /work/runs/tta --sides ours,peer-best config.DATA.NUM_DATALOADER_WORKERS=1
    /work/benchenv/bin/python benchmarks/time_to_accuracy.py --data /work/data/cifar10 --epochs 2 \\
        --out /work/runs/tta --sides ours,peer-tuned                # the peer with ours' settings
    /work/benchenv/bin/python benchmarks/time_to_accuracy.py --out /work/runs/tta --report-only

An existing side's output (OUT/ours, OUT/ours.log, OUT/peer-<side>.json) makes the run refuse;
``--overwrite`` deletes the outputs of the sides being run (and only those).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

CONFIG = "config=pretrain/swav/swav_cifar10_resnet18"
SIDES = ("ours", "peer-default", "peer-best", "peer-tuned")


def ours_argv(data: Path, out: Path, epochs: int, overrides: list[str]) -> list[str]:
    """`swav train`'s arguments (after `swav train`)."""
    return [
        CONFIG,
        f"config.DATA.TRAIN.DATA_PATHS=[{data / 'train'}]",
        f"config.KNN_MONITOR.TRAIN.DATA_PATHS=[{data / 'train'}]",
        f"config.KNN_MONITOR.TEST.DATA_PATHS=[{data / 'test'}]",
        "config.KNN_MONITOR.ENABLED=true",
        "config.KNN_MONITOR.EPOCH_FREQUENCY=1",
        f"config.OPTIMIZER.num_epochs={epochs}",
        f"config.CHECKPOINT.DIR={out / 'ours'}",
        *overrides,
    ]


def resolved_config(out: Path, argv: list[str]):
    """Ours' resolved config: the run's train_config.yaml, or the same overrides composed here."""
    from omegaconf import OmegaConf

    path = out / "ours" / "train_config.yaml"
    if path.exists():
        return OmegaConf.load(path).config
    from swav.config import load_config

    return load_config(argv)


def global_batch(cfg) -> int:
    from swav.config import world_size_of

    return int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA) * world_size_of(cfg)


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def side_file(out: Path, side: str) -> Path:
    return out / "ours" / "knn.json" if side == "ours" else out / f"{side}.json"


def _history(out: Path, side: str) -> list[dict]:
    path = side_file(out, side)
    if not path.exists():
        return []
    return [h for h in json.loads(path.read_text()).get("history", []) if "trained" in h]


def epoch_line(side: str, rec: dict, prev: dict | None, batch: int, epochs: int | str) -> str:
    d_img = (rec["iteration"] - (prev["iteration"] if prev else 0)) * batch
    d_s = rec["train_seconds"] - (prev["train_seconds"] if prev else 0.0)
    return (f"{side:12s} epoch {rec['epoch']}/{epochs}  train {rec['train_seconds'] / 60:6.2f} min  "
            f"{d_img / max(d_s, 1e-9):7.1f} img/s  kNN top-1 {rec['trained']['top1']:5.2f} %")


# ----------------------------------------------------------------------------------------------
# Ours: the user command in a subprocess
# ----------------------------------------------------------------------------------------------


def run_ours(out: Path, argv: list[str], epochs: int) -> float:
    """Runs `swav train`, printing a line per kNN evaluation as knn.json grows; wall seconds."""
    cmd = [sys.executable, "-m", "swav", "train", *argv]
    print(f"# ours: {shlex.join(cmd)}  (output: {out / 'ours.log'})", flush=True)
    t0 = time.perf_counter()
    shown = 0
    with open(out / "ours.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            try:
                history = _history(out, "ours")
            except ValueError:  # read while being replaced: next round
                history = []
            if len(history) > shown:
                batch = global_batch(resolved_config(out, argv))
                for i in range(shown, len(history)):
                    prev = history[i - 1] if i else None
                    print(epoch_line("ours", history[i], prev, batch, epochs), flush=True)
                shown = len(history)
            if proc.returncode is not None:
                break
    if proc.returncode != 0:
        tail = (out / "ours.log").read_text().splitlines()[-15:]
        sys.exit(f"ours failed (exit code {proc.returncode}); end of {out / 'ours.log'}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# The peer: a plain PyTorch loop from lightly's modules, as its examples write it
# ----------------------------------------------------------------------------------------------


def _transform_spec(cfg, name: str) -> dict | None:
    for spec in cfg.DATA.TRAIN.TRANSFORMS:
        if spec.name == name:
            return dict(spec)
    return None


def peer_transform(cfg):
    """lightly's SwaVTransform with ours' crops, flip, colour strength, blur and normalisation."""
    from lightly.transforms import SwaVTransform

    crops = _transform_spec(cfg, "ImgPilToMultiCrop")
    flip = _transform_spec(cfg, "RandomHorizontalFlip")
    color = _transform_spec(cfg, "ImgPilColorDistortion")
    blur = _transform_spec(cfg, "ImgPilGaussianBlur")
    norm = _transform_spec(cfg, "Normalize")
    return SwaVTransform(
        crop_sizes=tuple(int(s) for s in crops["size_crops"]),
        crop_counts=tuple(int(n) for n in crops["num_crops"]),
        crop_min_scales=tuple(float(s[0]) for s in crops["crop_scales"]),
        crop_max_scales=tuple(float(s[1]) for s in crops["crop_scales"]),
        hf_prob=float(flip.get("p", 0.5)) if flip else 0.0,
        # Ours: jitter with p 0.8 then grey with p 0.2, as lightly's defaults; none without the op.
        cj_prob=0.8 if color else 0.0,
        cj_strength=float(color.get("strength", 1.0)) if color else 0.0,
        random_gray_scale=0.2 if color else 0.0,
        gaussian_blur=float(blur.get("p", 0.5)) if blur else 0.0,
        normalize={"mean": list(norm["mean"]), "std": list(norm["std"])} if norm else None,
    )


def frozen_prototype_iterations(cfg) -> int:
    for pattern, iters in cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP:
        if "prototypes" in str(pattern):
            return int(iters) if int(iters) >= 0 else sys.maxsize
    return 0


def run_peer(side: str, cfg, data: Path, out: Path, epochs: int, workers: int) -> float:
    """Trains and scores one peer side, writing OUT/<side>.json after every epoch; wall seconds."""
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from swav import precision
    from swav.build import build_knn_data, build_lr_schedule, build_model
    from swav.eval.knn import evaluate_knn

    t_wall = time.perf_counter()
    tuned = side == "peer-tuned"
    best = side in ("peer-best", "peer-tuned")
    head = cfg.MODEL.HEAD.PARAMS[0][1]
    in_dim, hidden, out_dim = (int(d) for d in head["dims"])
    n_prototypes = int(head["num_clusters"][0])
    n_frozen = frozen_prototype_iterations(cfg)
    batch = global_batch(cfg)
    n_high = int(_transform_spec(cfg, "ImgPilToMultiCrop")["num_crops"][0])
    k = cfg.KNN_MONITOR

    torch.manual_seed(0)

    class PeerSwaV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = build_model(cfg).trunk  # the same trunk as ours
            self.projection_head = SwaVProjectionHead(in_dim, hidden, out_dim)
            self.prototypes = SwaVPrototypes(out_dim, n_prototypes=n_prototypes,
                                             n_steps_frozen_prototypes=n_frozen)

        def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
            x = self.backbone(x).flatten(start_dim=1)
            x = nn.functional.normalize(self.projection_head(x), dim=1, p=2)
            return self.prototypes(x, step)  # the step unfreezes the prototypes after n_frozen

    memory_format = torch.channels_last if best else torch.contiguous_format
    model = PeerSwaV().to(memory_format=memory_format)
    if tuned:
        o, swav = cfg.OPTIMIZER, cfg.LOSS.swav_loss
        if o.use_larc:
            sys.exit("peer-tuned: ours uses LARC here, which lightly does not have (its LARS does not clip); "
                     "compare with config.OPTIMIZER.use_larc=false")
        criterion = SwaVLoss(temperature=swav.temperature, sinkhorn_iterations=swav.num_iters,
                             sinkhorn_epsilon=swav.epsilon)
        # Every parameter decayed, as ours does; the LR is set every iteration from ours' schedule.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=o.momentum, nesterov=o.nesterov,
                                    weight_decay=o.weight_decay)
    else:
        criterion = SwaVLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    bf16 = best and precision.cpu_has_native_bfloat16()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    dataset = ImageFolder(str(data / "train"), transform=peer_transform(cfg))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)
    if len(loader) == 0:
        sys.exit(f"{side}: {len(dataset)} images make no batch of {batch}")
    knn_data = build_knn_data(cfg)
    lr_schedule = build_lr_schedule(cfg, len(loader), epochs) if tuned else None

    def forward(group: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """The scores of each crop of one resolution; peer-tuned forwards them as one batch, as ours does."""
        if tuned and group:
            return list(model(torch.cat(group), step).chunk(len(group)))
        return [model(v, step) for v in group]

    record = {
        "side": side, "global_batch": batch, "iters_per_epoch": len(loader), "workers": workers,
        "threads": torch.get_num_threads(), "bfloat16": bf16, "channels_last": best, "tuned": tuned,
        "prototypes": n_prototypes, "frozen_prototype_iterations": n_frozen, "history": [],
    }
    print(f"# {side}: {len(dataset)} images, global batch {batch}, {len(loader)} iterations per epoch, "
          f"{workers} loader workers, {torch.get_num_threads()} threads, prototypes {n_prototypes} "
          f"(frozen {n_frozen} iterations), bfloat16 {bf16}, channels-last {best}", flush=True)
    train_seconds, step = 0.0, 0
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss_sum = torch.zeros(())
        for views, _ in loader:
            model.prototypes.normalize()
            views = [v.to(memory_format=memory_format) for v in views]
            if lr_schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = float(lr_schedule[step])
            with autocast():
                high, low = forward(views[:n_high], step), forward(views[n_high:], step)
            # Scores back to float32 for the loss: lightly's Sinkhorn would otherwise exponentiate
            # bfloat16 scores (its best use, as ours keeps the codes in float32).
            loss = criterion([h.float() for h in high], [lo.float() for lo in low])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss_sum += loss.detach().float().sum()  # lightly returns shape [1]
            step += 1
        train_seconds += time.perf_counter() - t0
        # Clock paused: our kNN protocol, float32. extract_features restores the mode, but the
        # loop must not depend on that.
        trained = evaluate_knn(model.backbone, *knn_data, image_size=k.IMAGE_SIZE, k=k.K,
                               temperature=k.TEMPERATURE, num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
                               amp=False)
        model.train()
        rec = {"epoch": epoch + 1, "iteration": step, "train_seconds": round(train_seconds, 2),
               "k": k.K, "temperature": k.TEMPERATURE, "loss": float(loss_sum) / len(loader),
               "trained": trained}
        prev = record["history"][-1] if record["history"] else None
        record["history"].append(rec)
        side_file(out, side).write_text(json.dumps(record, indent=2))
        print(epoch_line(side, rec, prev, batch, epochs) + f"  loss {rec['loss']:.3f}", flush=True)
    return time.perf_counter() - t_wall


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def summarise(out: Path, batches: dict[str, int], wall: dict[str, float]) -> dict:
    """Prints the tables from the side files in `out`; returns them as a dict."""
    sides = {}
    for side in SIDES:
        history = _history(out, side)
        if history and side in batches:
            sides[side] = {"global_batch": batches[side], "history": history}
    if not sides:
        sys.exit(f"no results in {out} (ours/knn.json, peer-*.json)")

    print(f"\n{'side':12s} {'epoch':>5s} {'train min':>9s} {'img/s':>7s} {'kNN top-1':>9s}")
    for side, s in sides.items():
        prev = None
        for rec in s["history"]:
            d_img = (rec["iteration"] - (prev["iteration"] if prev else 0)) * s["global_batch"]
            d_s = rec["train_seconds"] - (prev["train_seconds"] if prev else 0.0)
            print(f"{side:12s} {rec['epoch']:5d} {rec['train_seconds'] / 60:9.2f} "
                  f"{d_img / max(d_s, 1e-9):7.1f} {rec['trained']['top1']:9.2f}")
            prev = rec
        last = s["history"][-1]
        s["images"] = last["iteration"] * s["global_batch"]
        s["train_seconds"] = last["train_seconds"]
        s["images_per_sec"] = s["images"] / max(last["train_seconds"], 1e-9)
        if side in wall:
            s["wall_seconds"] = round(wall[side], 1)

    print("\nend to end (training time, kNN evaluations excluded):")
    for side, s in sides.items():
        wall_text = f", {s['wall_seconds'] / 60:.2f} min wall with start-up and kNN" if "wall_seconds" in s else ""
        print(f"  {side:12s} {s['images']:8d} images in {s['train_seconds'] / 60:7.2f} min: "
              f"{s['images_per_sec']:7.1f} img/s{wall_text}")
    ours = sides.get("ours")
    tta = {}
    for side, s in sides.items():
        if side == "ours" or ours is None:
            continue
        ratio = ours["images_per_sec"] / s["images_per_sec"]
        print(f"  ours / {side}: {ratio:.2f}x img/s")
        top = max(s["history"], key=lambda r: r["trained"]["top1"])
        target = top["trained"]["top1"]
        hit = next((r for r in ours["history"] if r["trained"]["top1"] >= target), None)
        entry = {"peer_best_top1": target, "peer_minutes": top["train_seconds"] / 60,
                 "peer_epoch": top["epoch"], "images_per_sec_ratio": ratio}
        if hit is not None:
            entry.update(ours_minutes=hit["train_seconds"] / 60, ours_epoch=hit["epoch"],
                         time_ratio=hit["train_seconds"] / max(top["train_seconds"], 1e-9))
        tta[side] = entry
    if tta:
        print("\ntime to accuracy (ours is scored at epoch ends: its time is an upper bound):")
        for side, e in tta.items():
            what = (f"ours reached it at {e['ours_minutes']:.2f} min (epoch {e['ours_epoch']}): "
                    f"{e['time_ratio']:.2f}x the peer's time" if "ours_minutes" in e else "ours: not reached")
            print(f"  {side:12s} best kNN top-1 {e['peer_best_top1']:.2f} % at {e['peer_minutes']:.2f} min "
                  f"(epoch {e['peer_epoch']}); {what}")
    return {"sides": sides, "time_to_accuracy": tta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides for ours (the peer reads them back)")
    parser.add_argument("--data", type=Path, default=Path("/work/data/cifar10"), help="folder with train/ and test/")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, run in this order: {SIDES}")
    parser.add_argument("--workers", type=int, default=None,
                        help="peer loader workers (default: DATA.NUM_DATALOADER_WORKERS x NUM_PROC_PER_NODE)")
    parser.add_argument("--overwrite", action="store_true", help="delete the outputs of the sides being run first")
    parser.add_argument("--report-only", action="store_true", help="re-read OUT's results and print the tables")
    args = parser.parse_intermixed_args()
    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - set(SIDES)
    if unknown:
        parser.error(f"unknown sides {sorted(unknown)}; choose from {SIDES}")
    out, data = args.out.resolve(), args.data.resolve()
    command = shlex.join([sys.executable, *sys.argv])

    if args.report_only:
        machine = {}
        with contextlib.suppress(OSError, ValueError):
            machine = json.loads((out / "results.json").read_text()).get("machine", {})
        if machine:
            print(f"# measured on {machine.get('platform')} ({machine.get('cpus')} cores), torch {machine.get('torch')}, "
                  f"load average {machine.get('load_start')} -> {machine.get('load_end')}\n# {machine.get('command')}")
        batches = {}
        for side in SIDES:
            path = side_file(out, side)
            if path.exists():
                batches[side] = (global_batch(resolved_config(out, [])) if side == "ours"
                                 else json.loads(path.read_text())["global_batch"])
        summarise(out, batches, {})
        return

    argv = ours_argv(data, out, args.epochs, args.overrides)
    for side in sides:
        outputs = [out / "ours", out / "ours.log"] if side == "ours" else [side_file(out, side)]
        existing = [p for p in outputs if p.exists()]
        if existing and not args.overwrite:
            sys.exit(f"{', '.join(map(str, existing))} exist(s): choose another --out, add --overwrite "
                     "to delete them, or --report-only to print what they hold")
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for split in ("train", "test"):
        if not (data / split).is_dir():
            sys.exit(f"{data / split} is not a folder: --data needs train/<class>/*.jpg and test/<class>/*.jpg")
    out.mkdir(parents=True, exist_ok=True)

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "load_start": load_text(), "command": command}
    print(f"# {machine['platform']} ({machine['cpus']} cores), torch {machine['torch']}, "
          f"{machine['threads']} threads in this process; load average {machine['load_start']}")
    print(f"# {command}", flush=True)

    wall = {}
    for side in sides:
        if side == "ours":
            wall[side] = run_ours(out, argv, args.epochs)
            continue
        cfg = resolved_config(out, argv)
        workers = args.workers
        if workers is None:
            workers = int(cfg.DATA.NUM_DATALOADER_WORKERS) * int(cfg.DISTRIBUTED.NUM_PROC_PER_NODE)
        wall[side] = run_peer(side, cfg, data, out, args.epochs, workers)

    cfg = resolved_config(out, argv)
    batches = {"ours": global_batch(cfg)}
    for side in SIDES[1:]:
        if side_file(out, side).exists():
            batches[side] = json.loads(side_file(out, side).read_text())["global_batch"]
    results = summarise(out, batches, wall)
    machine["load_end"] = load_text()
    print(f"# load average at the end {machine['load_end']}")
    (out / "results.json").write_text(json.dumps({"machine": machine, **results}, indent=2))
    print(f"# written {out / 'results.json'}")


if __name__ == "__main__":
    main()
