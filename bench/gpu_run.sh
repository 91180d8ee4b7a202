#!/usr/bin/env bash
# The GPU measurements: the benchmark's CIFAR-10 and ImageNet-64 rows
# in priority order, each bounded in time, with logs and JSON under $OUT.
#   OUT=/tmp/out bash bench/gpu_run.sh [sample|train|imagenet|profile|demo]...
set -u
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
$PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'

for part in "$@"; do
    case $part in
    sample)   timeout 420 $PY bench/bench.py --configs=cifar10-ddpmpp --what=sample --modes=${SAMPLE_MODES:-fp32,fast,fp16} --timeout=200 --json="$OUT/cifar-sample.json" ;;
    train)    timeout 420 $PY bench/bench.py --configs=cifar10-ddpmpp --what=train --modes=${TRAIN_MODES:-fp32,fast,fp16} --timeout=250 --json="$OUT/cifar-train.json" ;;
    imagenet) timeout 420 $PY bench/bench.py --configs=imagenet-adm --modes=fp16,fast --timeout=200 --iters=2 --json="$OUT/imagenet.json" ;;
    profile)  # where the time of the fast modes goes: tables of operations, most device time first
              timeout 420 $PY bench/bench.py --configs=cifar10-ddpmpp --modes=${PROFILE_MODES:-fast} --iters=1 --timeout=300 --profile-dir="$OUT" --json="$OUT/profile.json" ;;
    demo)     # generate.py end to end on the demo model: faithful vs fp16 + CUDA graphs, PSNR over 512 images.
              time timeout 200 $PY generate.py --network=demo/edm-digits-16x16-cond.pkl --outdir=/tmp/demo-fp32 --seeds=0-511 --batch=256 &&
              time timeout 300 $PY generate.py --network=demo/edm-digits-16x16-cond.pkl --outdir=/tmp/demo-fast --seeds=0-511 --batch=256 --precision=fp16 --compile &&
              $PY bench/psnr_dirs.py /tmp/demo-fp32 /tmp/demo-fast ;;
    esac
done
