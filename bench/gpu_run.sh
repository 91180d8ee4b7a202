#!/usr/bin/env bash
# The GPU measurements, in priority order, each bounded in time; the log goes
# to stdout; $OUT gets the merged JSON (results.json) and, packed after each
# part into one file (artifacts.tgz), the tables of operations and generated code.
#   OUT=/tmp/out bash bench/gpu_run.sh [warm] [sample] [nofreeze] [train] [graphs] [b512] [block] [blockbw] [ab] [cdt] [variants] [imagenet] [demo]
# Parts:
#   warm      compile the compiled measurements of the parts named after it (sample, nofreeze, train, graphs, b512,
#             ab; not cdt or variants, whose tuning times kernels and must have the GPU alone) at once, in parallel processes, so that those parts load their kernels from
#             the compiler cache (with a cold cache, compiling and profiling sample or train alone took
#             over 180 s in run E)
#   sample    CIFAR-10 DDPM++ sampling, batch 256: fp32 (the default) and fast, with tables of operations
#   nofreeze  fast sampling, batch 256, with the weights as inputs of the compiled network rather than constants
#             (no freezing: their casts to fp16 run in every call), against part sample
#   train     CIFAR-10 DDPM++ training, batch 512: fast and tf32, with tables of operations
#   graphs    CIFAR-10 DDPM++ training, batch 512, fast with the compiled network replayed as CUDA graphs
#   block     two 32x32 decoder blocks alone (bench_block.py), with their generated code and kernels
#   blockbw   the same blocks' training step (forward + backward)
#   ab        the fast modes with the fast layer forms off (--slow-ops=paths), against the rows above
#   b512      fast sampling at batch 512
#   cdt       coordinate-descent tuning of the kernels for sampling (block sizes and warps of each Triton kernel)
#   variants  coordinate-descent tuning of the kernels for sampling and training
#   imagenet  ImageNet-64 ADM sampling, fp16 eager (the network's use_fp16 path)
#   demo      generate.py end to end on the demo model: fp32 vs fp16 + CUDA graphs, PSNR over 512 images
set -u
OUT=${OUT:-/tmp/bench-out}
JSON_DIR=/tmp/bench-json
WORK=/tmp/bench-artifacts
mkdir -p "$OUT" "$JSON_DIR" "$WORK"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
PY=${PY:-python3}
C=--configs=cifar10-ddpmpp
CDT=--inductor=coordinate_descent_tuning=true
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
$PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'

# name, seconds, bench arguments: one measurement, its JSON kept for the merge.
measure() {
    local name=$1 secs=$2; shift 2
    echo "== $name"
    timeout "$secs" $PY bench/bench.py "$@" --json="$JSON_DIR/$name.json"
    $PY - "$JSON_DIR" "$OUT/results.json" <<'EOF'
import glob, json, os, sys
merged = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], '*.json')))}
json.dump(merged, open(sys.argv[2], 'w'), indent=1)
EOF
}

# name, bench arguments: one fast-mode run in the background, for its compilation alone.
compile_only() {
    local name=$1; shift
    timeout 300 $PY bench/bench.py $C --modes=fast --iters=1 "$@" > "/tmp/warm-$name.log" 2>&1 &
}

# Everything in $WORK as one file in $OUT, however many files the parts wrote.
pack() {
    tar -czf "$OUT/artifacts.tgz.tmp" -C "$WORK" . && mv "$OUT/artifacts.tgz.tmp" "$OUT/artifacts.tgz"
}

for part in "$@"; do
    case $part in
    warm)
        echo "== warm: compiling in parallel"
        start=$SECONDS; rm -f /tmp/warm-*.log
        for later in "$@"; do
            case $later in
            sample)   compile_only s256 --what=sample ;;
            nofreeze) compile_only s256-nofreeze --what=sample --slow-ops=freeze ;;
            train)    compile_only t --what=train ;;
            graphs)   compile_only t-graphs --what=train --train-graphs ;;
            b512)     compile_only s512 --what=sample --batch=512 ;;
            ab)       compile_only s256-paths --what=sample --slow-ops=paths; compile_only t-paths --what=train --slow-ops=paths ;;
            esac
        done
        wait
        echo "warm: $((SECONDS - start)) s"
        tail -n 3 /tmp/warm-*.log ;;
    sample)   measure sample-256 300 $C --what=sample --modes=fp32,fast --profile-dir="$WORK" ;;
    nofreeze) measure sample-256-no-freeze 300 $C --what=sample --modes=fast --slow-ops=freeze ;;
    train)    measure train-512 300 $C --what=train --modes=fast,tf32 --iters=5 --profile-dir="$WORK" ;;
    graphs)   measure train-512-graphs 300 $C --what=train --modes=fast --iters=5 --train-graphs --profile-dir="$WORK/graphs" ;;
    block)    echo "== block"; timeout 240 $PY bench/bench_block.py --code-dir="$WORK/block" ;;
    blockbw)  echo "== blockbw"; timeout 240 $PY bench/bench_block.py --backward --batch=512 --code-dir="$WORK/blockbw" ;;
    ab)       measure train-512-no-paths 120 $C --what=train --modes=fast --iters=5 --slow-ops=paths
              measure sample-256-no-paths 120 $C --what=sample --modes=fast --slow-ops=paths ;;
    b512)     measure sample-512 120 $C --what=sample --modes=fast --batch=512 ;;
    cdt)      measure sample-256-cdt 420 $C --what=sample --modes=fast $CDT --profile-dir="$WORK/cdt" ;;
    variants) measure sample-256-cdt 200 $C --what=sample --modes=fast $CDT
              measure train-512-cdt 200 $C --what=train --modes=fast --iters=5 $CDT ;;
    imagenet) measure imagenet-64 120 --configs=imagenet-adm --what=sample --modes=fp16 --iters=2 ;;
    demo)     time timeout 200 $PY generate.py --network=demo/edm-digits-16x16-cond.pkl --outdir=/tmp/demo-fp32 --seeds=0-511 --batch=256 &&
              time timeout 300 $PY generate.py --network=demo/edm-digits-16x16-cond.pkl --outdir=/tmp/demo-fast --seeds=0-511 --batch=256 --precision=fp16 --compile &&
              $PY bench/psnr_dirs.py /tmp/demo-fp32 /tmp/demo-fast ;;
    esac
    pack
done
