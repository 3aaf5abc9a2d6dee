#!/usr/bin/env bash
# One lent GPU call: the GPU suite alone first (its timings must not share the card;
# SUITE_STEPS timed inversion steps a figure), then invariant bases (three at once, or one alone) at batches
# in the thousands (small bases are launch-bound, so three processes lose little). Each stops after
# $SECONDS_PER_BASE s (or its --steps) and saves its bias-corrected weight average; each comes back
# as a tar.gz in $RESULTS. BASE_SET picks the three:
#   long   (2026-11-27, the second lease): digits 8 px (the demo's, ~5x the embedded base's 384 steps),
#          CIFAR-10 16 px and PneumoniaMNIST 16 px;
#   narrow (2026-11-27, the third lease): digits 8 px with conditioning too narrow to hold the image
#          (5 x 16 and 2 x 16 numbers instead of 5 x 64; and 5 x 64 with token noise 1.0), each
#          1,327 steps like the `long` set's shared-card digits base, so width is what differs;
#   cifar  (2026-11-27, the fourth lease): one CIFAR-10 16 px base alone on the card (the `long` set's
#          shared-card one reached only 600 steps: still noise).
# Data: .gpu3/ holds cifar10-train.tar.gz, mnist8-train.npz, pneumoniamnist-train.npz
# (benchmarks/README.md says how they were packed; `narrow` needs only mnist8-train.npz).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${RESULTS:-runs/gpu}; data=${GPU_DATA:-.gpu3}; secs=${SECONDS_PER_BASE:-270}; work=${WORK:-/tmp/diffinv-gpu}
mkdir -p "$out" "$work/data" "$work/bases" && out=$(cd "$out" && pwd)
set_=${BASE_SET:-long}
[[ $set_ == long || $set_ == narrow || $set_ == cifar ]] || { echo "BASE_SET must be long, narrow or cifar; got $set_" >&2; exit 2; }
[[ -n ${SKIP_SUITE:-} ]] || SUITE_TIMEOUT=${SUITE_TIMEOUT:-150} RESULTS="$out" bash benchmarks/gpu_suite.sh
source benchmarks/gpu_env.sh
[[ $set_ == narrow ]] || tar xzf "$data/cifar10-train.tar.gz" -C "$work/data" || exit 1
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 15 > "$out/pretrain_gpu_util.csv" 2>&1 &
smi=$!
common=(--max-seconds "$secs" --lr 2e-3 --warmup 200 --ema 0.998 --views invariant --log-every 250
        --checkpoint-every 100000 --quiet --overwrite)
base() {
  local name=$1; shift
  timeout $((secs + 200)) python3 -m diffinv.cli pretrain-base --steps 1000000 "${common[@]}" "$@" --out "$work/bases/$name" \
    > "$out/pretrain-$name.log" 2>&1
  echo "$name exit $? $(tr -d '\n ' < "$work/bases/$name/pretrain.json" 2>/dev/null)"
}
digits=(--data digits --extra-data "$data/mnist8-train.npz" --resolution 8 --channels 32,64 --view-min-area 0.6
        --batch-size 2048)
if [[ $set_ == long ]]; then
  names=(digits8-inv-2k cifar16-inv-2k pneumonia16-inv-2k)
  base digits8-inv-2k "${digits[@]}" & pids=($!)
  base cifar16-inv-2k --data "$work/data/cifar10" --resolution 16 --channels 32,64 --hflip --batch-size 2048 & pids+=($!)
  base pneumonia16-inv-2k --data "$data/pneumoniamnist-train.npz" --resolution 16 --channels 32,64 \
    --view-min-area 0.5 --batch-size 1024 & pids+=($!)
elif [[ $set_ == cifar ]]; then
  names=(cifar16-inv-alone)
  base cifar16-inv-alone --data "$work/data/cifar10" --resolution 16 --channels 32,64 --hflip --batch-size 2048 & pids=($!)
else
  names=(digits8-k5d16 digits8-k2d16 digits8-k5d64-tn1)
  steps=${NARROW_STEPS:-1327}
  base digits8-k5d16 "${digits[@]}" --tokens 5 --cross-attention-dim 16 --steps "$steps" & pids=($!)
  base digits8-k2d16 "${digits[@]}" --tokens 2 --cross-attention-dim 16 --steps "$steps" & pids+=($!)
  base digits8-k5d64-tn1 "${digits[@]}" --token-noise 1.0 --steps "$steps" & pids+=($!)
fi
wait "${pids[@]}"   # not a bare wait: nvidia-smi -l never ends
kill $smi 2>/dev/null
for name in "${names[@]}"; do
  tar czf "$out/$name.tar.gz" -C "$work/bases" "$name"
done
# At most 8 files come back: the logs go in one.
(cd "$out" && logs=$(ls gpu_info.csv gpu_suite.log pretrain-*.log pretrain_gpu_util.csv 2>/dev/null); tar czf logs.tar.gz $logs && rm -f $logs)
ls -la "$out"
