"""Cost of Sinkhorn and the SwAV loss against the trunk's training step, by number of prototypes.

One process of the paper's recipe (`pretrain/swav/swav_8node_resnet`: 64 images x (2x224 + 6x96)
crops = 512 embedding rows of 128-d, codes for crops 0 and 1), for each number of prototypes K
and queue length (rows per assignment crop, this process: 3840 = 15 x 256 in the small-batch
recipe). Every setting runs in a fresh subprocess, which measures:

- sinkhorn ms: ``swav.losses.sinkhorn`` alone on the (64 + queue) x K scores of one assignment
  crop (the loss calls it once per assignment crop, so twice), float32 or float64 as
  ``use_double_precision`` runs it; median of ``--repeats`` after ``--warmup`` calls;
- loss ms: random unit 128-d embeddings (requiring grad, standing in for the head's output) ->
  prototypes Linear(128, K, bias=False), normalised first as the training step does -> our
  SwAVLoss with its queue filled (``load_state_dict`` with random unit rows; each step then
  pushes the batch, as in training), so the queue's scores are recomputed against the current
  prototypes -> backward. Under bfloat16 autocast like the CPU configs, and in float32;
- peak MiB: the subprocess's peak resident size (VmHWM) over the loss steps minus its resident
  size just before them (built prototypes, embeddings and queue);
- loss GFLOP: one loss step under ``torch.utils.flop_counter.FlopCounterMode``, which counts
  matrix products only (scores, their backward, the queue's scores), not Sinkhorn's elementwise work.

The reference: the FLOPs of the trunk + projection head forward and backward for the same 64
images, counted on the meta device, at ``--step-efficiency`` (the fraction of the peak our step
reaches) of a measured 4096^3 matmul's GFLOP/s in the precision training uses on this CPU
(bfloat16 where native, else float32): the estimated step time that "% of step" compares with.

    /work/benchenv/bin/python benchmarks/sinkhorn_cost.py --prototypes 3000,30000,100000 --queue 0,3840 --double
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peak_flops import matmul_gflops  # noqa: E402  (the same peak as peak_flops.py)

from swav import precision  # noqa: E402

BASE = "config=pretrain/swav/swav_8node_resnet"
ITERATION = 10_000  # past any hard-assignment or freezing iterations, as most of a run is


def _status_kib(field: str) -> int:
    # VmHWM, not getrusage's ru_maxrss: the latter survives fork + exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def recipe(overrides: list[str]) -> dict:
    """Batch, crops, embedding width and loss settings of the config."""
    from swav.config import load_config

    cfg = load_config(overrides)
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    c = cfg.LOSS.swav_loss
    return {
        "batch": int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA),
        "crops": [[int(n), int(s)] for n, s in zip(spec.num_crops, spec.size_crops, strict=True)],
        "dim": int(cfg.MODEL.HEAD.PARAMS[0][1].dims[-1]),
        "crops_for_assign": [int(v) for v in c.crops_for_assign],
        "temperature": float(c.temperature),
        "epsilon": float(c.epsilon),
        "num_iters": int(c.num_iters),
    }


def trunk_step_flops(overrides: list[str]) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of trunk + projection head for one batch, on meta.

    The prototypes are left out: they are part of the loss step measured here.
    """
    from swav.build import build_model
    from swav.config import load_config

    cfg = load_config(overrides)
    r = recipe(overrides)
    with torch.device("meta"):
        model = build_model(cfg)
        head = model.heads[0]
        # One trunk call per crop size, as SSLModel runs it.
        groups = [torch.empty(n * r["batch"], 3, s, s) for n, s in r["crops"]]
        with FlopCounterMode(display=False) as fwd:
            feats = torch.cat([model.trunk(x) for x in groups])
            z = F.normalize(head.projection_head(feats), dim=1)
        with FlopCounterMode(display=False) as bwd:
            z.sum().backward()
    return fwd.get_total_flops(), fwd.get_total_flops() + bwd.get_total_flops()


def _median_ms(fn, warmup: int, repeats: int) -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), min(times), max(times)


def measure(s: dict) -> dict:
    """One setting, in a fresh process: loss step memory, time and FLOPs, then Sinkhorn alone."""
    from swav.losses import SwAVLoss, sinkhorn

    if s["threads"]:
        torch.set_num_threads(s["threads"])
    torch.manual_seed(0)
    r, k, queue = s["recipe"], s["k"], s["queue"]
    rows = r["batch"] * sum(n for n, _ in r["crops"])
    prototypes = torch.nn.Linear(r["dim"], k, bias=False)
    z = F.normalize(torch.randn(rows, r["dim"]), dim=1).requires_grad_()
    loss_fn = SwAVLoss(
        num_crops=sum(n for n, _ in r["crops"]), crops_for_assign=r["crops_for_assign"],
        temperature=r["temperature"], epsilon=r["epsilon"], num_iters=r["num_iters"],
        use_double_precision=s["double"], queue_length=queue, embedding_dim=r["dim"],
    )
    if queue:
        state = loss_fn.state_dict()
        state["queue"] = F.normalize(torch.randn_like(state["queue"]), dim=2)
        state["queue_filled"] = torch.tensor(queue)
        loss_fn.load_state_dict(state)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=s["amp"])

    def step() -> None:
        # What train_step does from the embeddings on (normalise, scores, loss, backward).
        with torch.no_grad():
            prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))
        with autocast:
            scores = prototypes(z)
        loss = loss_fn([scores.float()], iteration=ITERATION, embeddings=z.detach().float(),
                       prototypes=[prototypes.weight.detach()])
        z.grad = prototypes.weight.grad = None
        loss.backward()

    before = _status_kib("VmRSS")
    loss_ms = _median_ms(step, s["warmup"], s["repeats"])
    peak_mib = (_status_kib("VmHWM") - before) / 1024
    with FlopCounterMode(display=False) as counter:
        step()
    out = {**{key: s[key] for key in ("k", "queue", "amp", "double")}, "loss_ms": loss_ms,
           "peak_mib": peak_mib, "loss_flops": counter.get_total_flops()}
    if s["sinkhorn"]:
        with torch.no_grad():
            emb = F.normalize(torch.randn(r["batch"] + queue, r["dim"]), dim=1)
            scores = emb @ prototypes.weight.t()  # cosine similarities, as in training
        out["sinkhorn_ms"] = _median_ms(
            lambda: sinkhorn(scores, r["epsilon"], r["num_iters"], s["double"]), s["warmup"], s["repeats"]
        )
    return out


def _subprocess(setting: dict) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--_setting", json.dumps(setting)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides after the base config")
    parser.add_argument("--config", default=BASE)
    parser.add_argument("--prototypes", default="3000,30000,100000", help="numbers of prototypes K")
    parser.add_argument("--queue", default="0,3840", help="queue rows per assignment crop")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="add bfloat16-autocast rows (float32 rows are always measured)")
    parser.add_argument("--double", action="store_true", help="add rows with Sinkhorn in float64")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--step-efficiency", type=float, default=0.0,
                        help="fraction of the matmul peak the training step reaches (0: 0.72 in bfloat16, "
                             "measured on an AVX512_BF16 EPYC; 0.32 in float32, measured on an AVX2 EPYC)")
    parser.add_argument("--peak-gflops", type=float, default=0.0,
                        help="matmul GFLOP/s to use (0: measure it in the training precision)")
    parser.add_argument("--matmul-size", type=int, default=4096, help="n of the n^3 peak matmul")
    parser.add_argument("--_setting", help=argparse.SUPPRESS)  # the per-setting subprocess
    args = parser.parse_args()
    if args._setting:
        print(json.dumps(measure(json.loads(args._setting))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    command = shlex.join([sys.executable, *sys.argv])
    print(f"# {_cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {_load()} at start")
    print(f"# {command}")
    overrides = [args.config, *args.overrides]
    r = recipe(overrides)
    fwd, step_flops = trunk_step_flops(overrides)
    # The reference step runs in the precision training would use here (swav.precision).
    peak_dtype = precision.autocast_dtype(True, torch.device("cpu")) or torch.float32
    if args.amp is None:  # bfloat16 rows only where training would autocast
        args.amp = peak_dtype == torch.bfloat16
    efficiency = args.step_efficiency or (0.72 if peak_dtype == torch.bfloat16 else 0.32)
    gflops = args.peak_gflops or matmul_gflops(peak_dtype, n=args.matmul_size)
    step_s = step_flops / (efficiency * gflops * 1e9)
    rows = r["batch"] * sum(n for n, _ in r["crops"])
    crops = " + ".join(f"{n}x{s}" for n, s in r["crops"])
    print(f"# reference: trunk + projection head, {r['batch']} images x ({crops}) = {rows} rows: "
          f"{fwd / 1e9:.0f} GFLOP forward, {step_flops / 1e9:.0f} GFLOP forward + backward "
          f"({step_flops / fwd:.2f}x forward)")
    dtype_name = str(peak_dtype).removeprefix("torch.")
    print(f"# {dtype_name} matmul {args.matmul_size}^3: {gflops:.0f} GFLOP/s"
          f"{' (given)' if args.peak_gflops else ''}; trunk step at {100 * efficiency:.0f} % "
          f"of that peak = {step_s:.2f} s")
    print(f"# sinkhorn: one call on (batch + queue) x K, {r['num_iters']} iterations (the loss makes "
          f"{len(r['crops_for_assign'])}); loss: fwd + bwd from the embeddings (prototypes layer, "
          f"codes, swapped prediction); median (min-max) of {args.repeats} after {args.warmup} warm-up")
    print()
    print("| K | queue rows | precision | sinkhorn ms | loss fwd+bwd ms | peak MiB | loss GFLOP "
          "| % of step FLOPs | % of est. step time |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    sinkhorn_done: dict[tuple, tuple] = {}
    for k in _ints(args.prototypes):
        for queue in _ints(args.queue):
            for double in ([False, True] if args.double else [False]):
                for amp in ([True, False] if args.amp else [False]):
                    key = (k, queue, double)
                    res = _subprocess({
                        "recipe": r, "k": k, "queue": queue, "amp": amp, "double": double,
                        "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
                        "sinkhorn": key not in sinkhorn_done,
                    })
                    sk = sinkhorn_done.setdefault(key, res.get("sinkhorn_ms"))
                    ms, lo, hi = res["loss_ms"]
                    label = f"{'bf16 autocast' if amp else 'float32'}, sinkhorn {'float64' if double else 'float32'}"
                    print(f"| {k} | {queue} | {label} | {sk[0]:.1f} ({sk[1]:.1f}-{sk[2]:.1f}) | "
                          f"{ms:.1f} ({lo:.1f}-{hi:.1f}) | {res['peak_mib']:.0f} | "
                          f"{res['loss_flops'] / 1e9:.1f} | {100 * res['loss_flops'] / step_flops:.2f} | "
                          f"{100 * ms / 1000 / step_s:.2f} |", flush=True)
    end_gflops = matmul_gflops(peak_dtype, n=args.matmul_size)
    print(f"\n# load average {_load()} at end; {dtype_name} matmul {end_gflops:.0f} GFLOP/s at end "
          "(a drift from the start value means the machine's load changed)")


if __name__ == "__main__":
    main()
