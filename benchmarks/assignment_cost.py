"""Cost of the per-epoch assignment phase of DeepCluster-v2 and SeLa-v2, one process.

Once per epoch and per head, DeepCluster-v2 runs spherical k-means over the memory bank and SeLa-v2
runs Sinkhorn over the bank's scores against the prototypes, then takes the argmax. This times
both on random unit rows of the bank's shape (N images x D = 128), in a fresh subprocess per
setting, and reports the wall time and the peak resident memory it added (VmHWM after minus the
resident size before; Linux):

    python benchmarks/assignment_cost.py                      # CIFAR-10 size: 50,000 x 500, and 100,000 x 3000
    python benchmarks/assignment_cost.py --rows 20018 --clusters 3000   # one of 64 ranks on ImageNet

Compare the times with an epoch's training time (BENCHMARKS.md: the CIFAR recipe's epoch) to see
what the phase costs; the heads run one after another, so multiply by the number of heads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
from swav.losses.kmeans import spherical_kmeans
from swav.losses.sela_v2 import sinkhorn_labels

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

method, rows, clusters, dim, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
bank = F.normalize(torch.randn(rows, dim), dim=1)
prototypes = F.normalize(torch.randn(clusters, dim), dim=1)
before = rss_kib("VmRSS")
t0 = time.perf_counter()
if method == "kmeans":
    spherical_kmeans(bank, clusters, num_iters=iters)
else:
    sinkhorn_labels(bank, prototypes, epsilon=0.05, num_iters=iters)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mib": (rss_kib("VmHWM") - before) / 1024}))
"""


def measure(method: str, rows: int, clusters: int, dim: int, iters: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, method, str(rows), str(clusters), str(dim), str(iters)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[50_000, 100_000])
    parser.add_argument("--clusters", type=int, nargs="*", default=[500, 3000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--kmeans-iters", type=int, default=10)
    parser.add_argument("--sinkhorn-iters", type=int, default=3)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, torch threads as torch chooses; one head each, bank of {args.dim}-d rows")
    print("| rows x clusters | k-means (10 iterations) s | k-means peak MiB | Sinkhorn + argmax s | Sinkhorn peak MiB |")
    print("|---|---|---|---|---|")
    for rows, clusters in zip(args.rows, args.clusters, strict=True):
        k = measure("kmeans", rows, clusters, args.dim, args.kmeans_iters)
        s = measure("sinkhorn", rows, clusters, args.dim, args.sinkhorn_iters)
        print(f"| {rows:,} x {clusters:,} | {k['seconds']:.2f} | {k['peak_mib']:.0f} | "
              f"{s['seconds']:.2f} | {s['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
