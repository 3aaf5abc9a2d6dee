#!/usr/bin/env bash
# Downstream half of the inversion-cost benchmark: DI data from one inversion recipe, per replicate.
#   bash benchmarks/invert_cost_downstream.sh NAME "INVERT FLAGS" SEED...
# Replicate r inverts its own 5-per-class subset of digits (subset seed r, 20 per class held out
# for validation, as the demo does) into BASE (default bases/digits-8-ae, the digits base embedded
# until 2026-11-26, on which the README's figures were measured), then generates 5 DI variants per image
# with the same generation settings (DDIM 25), so recipes differ only in the inversion. Then:
#   diffinv experiment configs/invert-cost-digits.yaml --out runs/invert-cost/study --report
set -euo pipefail
name=$1; flags=$2; shift 2
base=${BASE:-bases/digits-8-ae}
for r in "$@"; do
  out=runs/invert-cost/$name/r$r
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  diffinv invert --model "$base" --data digits --per-class 5 --subset-seed "$r" --val-per-class 20 $flags \
    --out "$out/store" --resume --quiet
  mid=$(date +%s.%N)
  diffinv generate --store "$out/store" --per-image 5 --save-size 8 --sampler ddim --steps 25 --out "$out/di" --resume --quiet
  end=$(date +%s.%N)
  python -c "import json,sys; json.dump({'invert_s': round($mid-$start, 1), 'generate_s': round($end-$mid, 1)}, open('$out/seconds.json','w'))"
  echo "$name r$r: invert $(python -c "print(round($mid-$start))") s, generate $(python -c "print(round($end-$mid))") s"
done
