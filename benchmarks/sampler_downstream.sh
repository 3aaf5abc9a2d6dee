#!/usr/bin/env bash
# Which sampler and step count, judged by downstream accuracy (issue: fewest UNet calls at equal accuracy).
#   bash benchmarks/sampler_downstream.sh SEED...
# Uses the stores of benchmarks/invert_cost_downstream.sh (STORES=runs/invert-cost/ours by default); each candidate makes
# the same 5 DI variants per image (same keyed noise, partners and guidance), only the sampler
# differs. Then: diffinv experiment configs/sampler-digits.yaml --out runs/sampler/study --report
set -euo pipefail
for r in "$@"; do
  store=${STORES:-runs/invert-cost/ours}/r$r/store
  for c in ddim:10 ddim:25 dpm++2m:10 euler:25 pndm:100; do
    sampler=${c%%:*}; steps=${c##*:}
    out=runs/sampler/${sampler}-${steps}/r$r
    start=$(date +%s.%N)
    diffinv generate --store "$store" --per-image 5 --save-size 8 --sampler "$sampler" --steps "$steps" --out "$out" --resume --quiet
    echo "$c r$r: $(python -c "print(round($(date +%s.%N)-$start, 1))") s"
  done
done
