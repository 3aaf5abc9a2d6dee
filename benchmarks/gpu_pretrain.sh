#!/usr/bin/env bash
# GPU base pretraining: several `diffinv pretrain-base` runs at once on one GPU. Small
# bases are launch-bound (the GPU idles between a step's ~1,000 small kernels), so processes
# sharing the card lose little. Each stops after $SECONDS_PER_BASE seconds of training and saves
# its averaged weights (config.yaml then records the steps reached). Data comes packed in
# .gpu/data (benchmarks/README.md says how it was made); bases come back as tar.gz in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
data=${GPU_DATA:-.gpu/data}; out=${RESULTS:-runs/gpu}; secs=${SECONDS_PER_BASE:-270}; work=${WORK:-/tmp/diffinv-gpu}
mkdir -p "$out" "$work/data" "$work/bases" && out=$(cd "$out" && pwd)
tar xzf "$data/cifar10-train.tar.gz" -C "$work/data" || exit 1
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 15 > "$out/pretrain_gpu_util.csv" 2>&1 &
smi=$!
common=(--steps 1000000 --max-seconds "$secs" --batch-size 128 --warmup 500 --ema 0.999 --log-every 250
        --checkpoint-every 5000 --quiet)
base() {
  local name=$1; shift
  timeout $((secs + 240)) python3 -m diffinv.cli pretrain-base "$@" "${common[@]}" --overwrite --out "$work/bases/$name" \
    > "$out/pretrain-$name.log" 2>&1
  echo "$name exit $? $(cat "$work/bases/$name/pretrain.json" 2>/dev/null | tr -d '\n ')"
}
cifar=("$work/data/cifar10")
pids=()
base cifar16-same    --data "${cifar[@]}" --resolution 16 --channels 32,64 --hflip --lr 1e-3 --views same &
pids+=($!)
base cifar16-inv     --data "${cifar[@]}" --resolution 16 --channels 32,64 --hflip --lr 1e-3 --views invariant &
pids+=($!)
base cifar16-inv-tn  --data "${cifar[@]}" --resolution 16 --channels 32,64 --hflip --lr 1e-3 --views invariant --token-noise 0.5 &
pids+=($!)
base cifar32-inv     --data "${cifar[@]}" --extra-data "$data/imagenette32-train.npz" --resolution 32 --channels 48,96,96 \
                     --layers-per-block 1 --hflip --lr 5e-4 --views invariant &
pids+=($!)
base pneumonia16-inv --data "$data/pneumoniamnist-train.npz" --resolution 16 --channels 32,64 --lr 1e-3 --views invariant --view-min-area 0.5 &
pids+=($!)
base digits8-inv     --data digits --extra-data "$data/mnist8-train.npz" --resolution 8 --channels 32,64 --lr 1e-3 --views invariant --view-min-area 0.6 &
pids+=($!)
base digits8-same    --data digits --extra-data "$data/mnist8-train.npz" --resolution 8 --channels 32,64 --lr 1e-3 --views same &
pids+=($!)
wait "${pids[@]}"
kill $smi 2>/dev/null
# At most 8 files of 16 MiB come back: pair the small bases.
cd "$work/bases"
tar czf "$out/bases-cifar16-a.tar.gz" cifar16-same cifar16-inv
tar czf "$out/bases-cifar16-b.tar.gz" cifar16-inv-tn pneumonia16-inv
tar czf "$out/bases-digits8.tar.gz" digits8-inv digits8-same
tar czf "$out/bases-cifar32.tar.gz" cifar32-inv
ls -la "$out"
