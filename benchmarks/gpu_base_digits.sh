#!/usr/bin/env bash
# The demo's digits base on a GPU, one process (seven sharing the card ran at 42 steps/s in all):
# invariant views, 8 px, one channel, digits' training split + MNIST's (resized to 8 px like
# --extra-data ../shared/data/mnist does), stopped after $SECONDS_PER_BASE s. Brings back a tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
out=${RESULTS:-runs/gpu}; secs=${SECONDS_PER_BASE:-200}; mnist=${MNIST8:-.gpu2/mnist8-train.npz}
mkdir -p "$out" /tmp/bases && out=$(cd "$out" && pwd)
python3 -m diffinv.cli pretrain-base --data digits --extra-data "$mnist" --resolution 8 --channels 32,64 --views invariant \
  --view-min-area 0.6 --batch-size 256 --lr 1e-3 --warmup 500 --ema 0.999 --steps 1000000 --max-seconds "$secs" \
  --log-every 500 --checkpoint-every 100000 --quiet --overwrite --out /tmp/bases/digits8-inv-long 2>&1 | tee "$out/pretrain-digits8-inv-long.log"
cat /tmp/bases/digits8-inv-long/pretrain.json
tar czf "$out/digits8-inv-long.tar.gz" -C /tmp/bases digits8-inv-long
