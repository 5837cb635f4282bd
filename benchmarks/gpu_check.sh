#!/usr/bin/env bash
# Everything the CUDA path needs checked and measured on one GPU (an H200), in one go: its steps' time
# limits add up to 600 s, one device call. The CUDA tests, the training step of the paper's recipe in
# each precision and batch size,
# an end-to-end run from JPEG files with 15 loader workers (augmenting in them, then on the GPU),
# and the quickstart on CUDA with kNN.
# Writes its logs and results into the folder given as the first argument and prints a summary.
#
# It assumes a bare machine where python3 has torch and torchvision but not omegaconf: bring
# omegaconf and antlr4-python3-runtime as wheels in .whl/ (made on a machine with internet):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl omegaconf==2.3.0
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # published as a source archive only
#   pip download --no-deps -d .whl lightly==1.6.0                 # the peer loop (pure Python)
#
#   bash benchmarks/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: gpu_check.sh OUTPUT_FOLDER}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

if ! python3 -c "import omegaconf, lightly.loss" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT_DIR/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv >> "$OUT_DIR/versions.txt" 2>&1

step() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local code=$?
    echo "$name: exit $code after $((SECONDS - start)) s" | tee -a "$OUT_DIR/summary.txt"
}

# (1) The CUDA tests.
step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests

# (2) + (3) The bf16 matrix peak, and the paper's training step per precision and batch size.
PEER=$(python3 -c "import lightly.loss" 2>/dev/null && echo --peer)
step gpu_step 150 python3 benchmarks/gpu_step.py --batches 64,128,256 --precisions bfloat16,float16,float32 \
    $PEER --out "$OUT_DIR/gpu_step.json"

# (4) End to end from JPEG files: 3,200 images, 15 loader workers, 200 iterations of batch 64, with
# the GPU's utilisation sampled every second beside it.
JPEGS=/tmp/gpu_check_jpegs
step make_jpegs 45 python3 benchmarks/make_jpegs.py "$JPEGS" --images 3200 --classes 10 --processes 16
nvidia-smi dmon -s u -d 1 > "$OUT_DIR/dmon.txt" 2>&1 &
DMON=$!
step end_to_end 120 python3 -m swav train config=pretrain/swav/swav_8node_resnet \
    config.DISTRIBUTED.NUM_NODES=1 config.DISTRIBUTED.NUM_PROC_PER_NODE=1 config.MACHINE.DEVICE=cuda \
    "config.DATA.TRAIN.DATA_PATHS=[$JPEGS]" config.DATA.TRAIN.DATA_SOURCES=[disk_folder] \
    config.DATA.NUM_DATALOADER_WORKERS=15 config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64 \
    config.OPTIMIZER.num_epochs=4 config.LOG_FREQUENCY=10 config.KNN_MONITOR.ENABLED=false \
    config.CHECKPOINT.DIR=/tmp/gpu_check_run
kill $DMON 2>/dev/null
cp /tmp/gpu_check_run/metrics.jsonl "$OUT_DIR/end_to_end_metrics.jsonl" 2>/dev/null
# (4b) The same with the augmentation on the GPU (DATA.TRAIN.GPU_AUGMENT): 100 iterations.
step end_to_end_gpu_augment 75 python3 -m swav train config=pretrain/swav/swav_8node_resnet \
    config.DISTRIBUTED.NUM_NODES=1 config.DISTRIBUTED.NUM_PROC_PER_NODE=1 config.MACHINE.DEVICE=cuda \
    "config.DATA.TRAIN.DATA_PATHS=[$JPEGS]" config.DATA.TRAIN.DATA_SOURCES=[disk_folder] \
    config.DATA.NUM_DATALOADER_WORKERS=15 config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64 config.DATA.TRAIN.GPU_AUGMENT=true \
    config.OPTIMIZER.num_epochs=2 config.LOG_FREQUENCY=10 config.KNN_MONITOR.ENABLED=false \
    config.CHECKPOINT.DIR=/tmp/gpu_check_run_gpu_augment
cp /tmp/gpu_check_run_gpu_augment/metrics.jsonl "$OUT_DIR/end_to_end_gpu_augment_metrics.jsonl" 2>/dev/null

# (5) The quickstart on CUDA, with its kNN score at the end.
step quickstart 90 python3 -m swav train config=quickstart config.MACHINE.DEVICE=cuda \
    config.CHECKPOINT.DIR=/tmp/gpu_check_quickstart
cp /tmp/gpu_check_quickstart/knn.json "$OUT_DIR/quickstart_knn.json" 2>/dev/null

echo
tail -3 "$OUT_DIR/cuda_tests.log"
sed -n '/^| precision/,$p' "$OUT_DIR/gpu_step.log"
python3 - "$OUT_DIR" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
for name, what in (("end_to_end", "augmenting in the loader"), ("end_to_end_gpu_augment", "augmenting on the GPU")):
    path = out / f"{name}_metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    speeds = [r["images_per_sec"] for r in rows if "images_per_sec" in r][2:]
    if speeds:
        print(f"end to end from JPEG files, {what}: median {statistics.median(speeds):.0f} images/s over {len(speeds)} windows")
util = [int(line.split()[1]) for line in (out / "dmon.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#") and line.split()[1].isdigit()] if (out / "dmon.txt").exists() else []
if util:
    print(f"GPU utilisation while it ran: median {statistics.median(util)} % of {len(util)} samples")
if (out / "quickstart_knn.json").exists():
    print("quickstart kNN:", json.loads((out / "quickstart_knn.json").read_text()).get("trained"))
EOF
cat "$OUT_DIR/summary.txt"
