#!/usr/bin/env bash
# One lent GPU call (issue 18): the GPU suite alone first (its timings must not share the card),
# then three invariant bases trained at once at batches in the thousands (small bases are
# launch-bound, so three processes lose little): digits 8 px (the demo's, ~5x the embedded
# base's 384 steps), CIFAR-10 16 px and PneumoniaMNIST 16 px. Each stops after
# $SECONDS_PER_BASE s and saves its bias-corrected weight average; each comes back as a tar.gz
# in $RESULTS. Data: .gpu3/ holds cifar10-train.tar.gz, mnist8-train.npz, pneumoniamnist-train.npz
# (benchmarks/README.md says how they were packed).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${RESULTS:-runs/gpu}; data=${GPU_DATA:-.gpu3}; secs=${SECONDS_PER_BASE:-270}; work=${WORK:-/tmp/diffinv-gpu}
mkdir -p "$out" "$work/data" "$work/bases" && out=$(cd "$out" && pwd)
SUITE_TIMEOUT=${SUITE_TIMEOUT:-150} RESULTS="$out" bash benchmarks/gpu_suite.sh
source benchmarks/gpu_env.sh
tar xzf "$data/cifar10-train.tar.gz" -C "$work/data" || exit 1
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 15 > "$out/pretrain_gpu_util.csv" 2>&1 &
smi=$!
common=(--steps 1000000 --max-seconds "$secs" --lr 2e-3 --warmup 200 --ema 0.998 --views invariant --log-every 250
        --checkpoint-every 100000 --quiet --overwrite)
base() {
  local name=$1; shift
  timeout $((secs + 200)) python3 -m diffinv.cli pretrain-base "$@" "${common[@]}" --out "$work/bases/$name" \
    > "$out/pretrain-$name.log" 2>&1
  echo "$name exit $? $(tr -d '\n ' < "$work/bases/$name/pretrain.json" 2>/dev/null)"
}
base digits8-inv-2k --data digits --extra-data "$data/mnist8-train.npz" --resolution 8 --channels 32,64 \
  --view-min-area 0.6 --batch-size 2048 &
p1=$!
base cifar16-inv-2k --data "$work/data/cifar10" --resolution 16 --channels 32,64 --hflip --batch-size 2048 &
p2=$!
base pneumonia16-inv-2k --data "$data/pneumoniamnist-train.npz" --resolution 16 --channels 32,64 \
  --view-min-area 0.5 --batch-size 1024 &
p3=$!
wait $p1 $p2 $p3
kill $smi 2>/dev/null
for name in digits8-inv-2k cifar16-inv-2k pneumonia16-inv-2k; do
  tar czf "$out/$name.tar.gz" -C "$work/bases" "$name"
done
# At most 8 files come back: the logs go in one.
(cd "$out" && tar czf logs.tar.gz gpu_info.csv gpu_suite.log pretrain-*.log pretrain_gpu_util.csv && rm -f gpu_info.csv gpu_suite.log pretrain-*.log pretrain_gpu_util.csv)
ls -la "$out"
