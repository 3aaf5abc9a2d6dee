#!/usr/bin/env bash
# The GPU suite: diffinv (eager and compiled) vs the paper's inversion and sampling loops on an SD 1.x-sized
# random model at 128 and 256 px, bf16 and fp32, peak memory, TFLOP/s, CUDA batch invariance.
# One command, a few minutes on one H100/H200; writes $RESULTS/gpu_suite.json (default runs/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
out=${RESULTS:-runs/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > "$out/gpu_info.csv" 2>&1
timeout "${SUITE_TIMEOUT:-420}" python3 benchmarks/gpu_suite.py --steps "${SUITE_STEPS:-5}" --out "$out/gpu_suite.json" 2>&1 | grep -v "should be kept in float32" | tee "$out/gpu_suite.log"
