#!/usr/bin/env bash
# One GPU lease: the GPU suite (eager, compiled, the paper's loops), then the generalist base (all our training images at
# 32 px, configs/stages/pretrain-generalist-32.yaml) for $BASE_SECONDS seconds of training; <= 12 minutes together.
# Before it, on the CPU machine: python benchmarks/pack_generalist.py (-> .gpu/data/generalist-32.npz, ~40 MiB) and the
# wheels of benchmarks/README.md in .whl/; carry both, with bases/ moved aside (the tree and carried paths: 64 MiB). Results (JSON, logs, the base as tar.gz) land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
out=${OUT:-runs/gpu}; mkdir -p "$out" && out=$(cd "$out" && pwd)
SUITE_TIMEOUT=${SUITE_TIMEOUT:-300} RESULTS="$out" bash benchmarks/gpu_suite.sh
secs=${BASE_SECONDS:-300}
timeout $((secs + 150)) python3 -m diffinv.cli pretrain-base --config configs/stages/pretrain-generalist-32.yaml \
  --max-seconds "$secs" --quiet --overwrite --out /tmp/generalist-32 > "$out/pretrain-generalist.log" 2>&1
echo "pretrain exit $? $(tr -d '\n ' < /tmp/generalist-32/pretrain.json 2>/dev/null)" | tee -a "$out/pretrain-generalist.log"
tar czf "$out/generalist-32.tar.gz" -C /tmp generalist-32 && ls -la "$out"
