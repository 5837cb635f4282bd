"""Bytes all-reduced per training iteration: Sinkhorn's sums against the gradients.

The paper's claim: SwAV's online clustering needs only row and column sums across processes, so
its communication is negligible next to the gradient all-reduce every data-parallel method pays.

    python benchmarks/allreduce_bytes.py                          # computed for swav_8node_resnet
    python benchmarks/allreduce_bytes.py --measure config=quickstart   # counted on 2 gloo processes

Computed: Sinkhorn all-reduces, per assignment crop and prototype set, the K-vector of maxima
(the shift), one total and one K-vector of row sums per iteration: K * (num_iters + 1) + 1
float32 values. DDP all-reduces every gradient once: 4 bytes per parameter. SyncBatchNorm's
statistics are listed apart (2C + 1 values per BatchNorm call with our CPU implementation).
The measured mode counts the bytes that actually pass through `dist.all_reduce` in Sinkhorn
and through DDP's gradient buckets (a communication hook), for two processes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from swav.build import build_model
from swav.config import load_config


def computed(cfg) -> dict:
    loss = cfg.LOSS.swav_loss
    sinkhorn_values = sum(k * (loss.num_iters + 1) + 1 for k in loss.num_prototypes) * len(loss.crops_for_assign)
    with torch.device("meta"):
        model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    bn_calls = sum(1 for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    # The trunk runs once per crop resolution; the head's BatchNorm runs once.
    resolutions = len(cfg.DATA.TRAIN.TRANSFORMS[0].size_crops)
    return {
        "sinkhorn_bytes": 4 * sinkhorn_values,
        "gradient_bytes": 4 * params,
        "parameters": params,
        "syncbn_bytes_per_resolution": 4 * (2 * bn_channels + bn_calls),
        "resolutions": resolutions,
    }


def _worker(rank: int, overrides: list[str], port: int, steps: int, out) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from swav.build import build_step_context, place_model, wrap_distributed
    from swav.train import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config(overrides)
    counts = {"sinkhorn": 0, "gradients": 0}

    # The package exports the function `sinkhorn`, which hides the module of the same name.
    sinkhorn_module = importlib.import_module("swav.losses.sinkhorn")
    real_all_reduce = sinkhorn_module._all_reduce

    def counting_all_reduce(x, op, group):
        counts["sinkhorn"] += x.numel() * x.element_size()
        real_all_reduce(x, op, group)

    sinkhorn_module._all_reduce = counting_all_reduce

    def counting_hook(state, bucket):
        counts["gradients"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = wrap_distributed(cfg, place_model(cfg, build_model(cfg), device), device)
    model.register_comm_hook(None, counting_hook)
    ctx = build_step_context(cfg, model, device)
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    crops = [torch.randn(batch, 3, s, s) for n, s in zip(spec.num_crops, spec.size_crops, strict=True) for _ in range(n)]
    for iteration in range(steps):
        train_step(ctx, crops, iteration, lr=0.01)
    if rank == 0:
        out.put({k: v / steps for k, v in counts.items()})
    dist.destroy_process_group()


def measure(overrides: list[str], steps: int = 3) -> dict:
    import torch.multiprocessing as mp

    from swav.distributed import free_port

    overrides = [*overrides, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(overrides, free_port(), steps, queue), nprocs=2, start_method="spawn")
    return queue.get()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="count the bytes on 2 gloo processes")
    parser.add_argument("overrides", nargs="*", default=None)
    args = parser.parse_args(argv)
    overrides = args.overrides or ["config=pretrain/swav/swav_8node_resnet"]
    cfg = load_config(overrides)
    c = computed(cfg)
    print(f"config: {' '.join(overrides)}")
    print(f"  parameters                       {c['parameters']:>14,}")
    print(f"  gradient all-reduce per iter     {c['gradient_bytes']:>14,} bytes")
    print(f"  Sinkhorn all-reduce per iter     {c['sinkhorn_bytes']:>14,} bytes")
    print(f"  ratio gradients / Sinkhorn       {c['gradient_bytes'] / c['sinkhorn_bytes']:>14,.0f}")
    print(f"  SyncBN statistics per resolution {c['syncbn_bytes_per_resolution']:>14,} bytes (x{c['resolutions']} resolutions, when on)")
    if args.measure:
        counted = measure(overrides)
        print("counted on 2 gloo processes (per iteration, per process):")
        print(f"  gradient all-reduce              {counted['gradients']:>14,.0f} bytes (computed {c['gradient_bytes']:,})")
        print(f"  Sinkhorn all-reduce              {counted['sinkhorn']:>14,.0f} bytes (computed {c['sinkhorn_bytes']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
