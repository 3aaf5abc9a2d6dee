#!/usr/bin/env bash
# DI generation settings (and the img2img rival's strength) on the stores of a multi-replicate demo, for a
# study that picks each method's setting on validation (issue 18: the fidelity / diversity frontier).
#   bash benchmarks/di_settings_sweep.sh DEMO_OUT SEED...
# DEMO_OUT is `diffinv demo --seeds ... --out DEMO_OUT`; every set goes to DEMO_OUT/sweep/<setting>/r<seed>.
# Each candidate differs from the demo's DI set in one or two settings only (same keyed noise otherwise).
# "enc" is DI with the base encoder's own tokens (`invert --init encoder --steps 0`): no inversion at all;
# "enc-x10-st4" / "inv8-x10-st4": the encoder's tokens / 8 inversion steps from them, then x10-st4's generation.
# SETTINGS="enc g4" (in the environment) makes only those; K=2 sweeps a demo run with --per-class 2 (default 5);
# SWEEP=sweep-k10 writes under DEMO_OUT/sweep-k10 instead (a demo with several sizes: one folder per size).
# The st4c-* settings are the PneumoniaMNIST studies' generation (4 steps, --clip-x0 --unit-noise, 5 per image);
# x10-st4c-* the CIFAR-10 study's on its GPU base (the same with 10 per image).
set -euo pipefail
demo=$1; shift
save=${SAVE_SIZE:-8}
k=${K:-5}
sweep=${SWEEP:-sweep}
settings=${SETTINGS:-"s0.5 n0.3 s0.5-n0.3 g4 x20 s0.5-n0.3-x20 img2img-0.3 img2img-0.7 enc"}
declare -A flags=(
  [g3]="--guidance 3" [s0.5]="--interp 0.5" [n0.3]="--noise 0.3" [s0.5-n0.3]="--interp 0.5 --noise 0.3" [g4]="--guidance 4"
  [x10]="--per-image 10" [x20]="--per-image 20" [s0.5-n0.3-x20]="--interp 0.5 --noise 0.3 --per-image 20"
  [img2img-0.3]="--method img2img --strength 0.3" [img2img-0.7]="--method img2img --strength 0.7"
  [x10-st6]="--per-image 10 --steps 6" [img2img-x10]="--method img2img --per-image 10"
  [img2img-x10-st6]="--method img2img --per-image 10 --steps 6"
  [x10-st4]="--per-image 10 --steps 4" [img2img-x10-st4]="--method img2img --per-image 10 --steps 4"
  [x10-st4-n0.3]="--per-image 10 --steps 4 --noise 0.3" [x10-st4-s0.5-n0.3]="--per-image 10 --steps 4 --interp 0.5 --noise 0.3"
  [x10-st4-g1]="--per-image 10 --steps 4 --guidance 1" [x10-st4-n0.5]="--per-image 10 --steps 4 --noise 0.5"
  [x10-st4-g1-n0.5]="--per-image 10 --steps 4 --guidance 1 --noise 0.5"
  [img2img-x10-st4-g1]="--method img2img --per-image 10 --steps 4 --guidance 1"
  [img2img-x10-st4-0.75]="--method img2img --per-image 10 --steps 4 --strength 0.75"
)
# The st4c / x10-st4c generation (header) with one or two knobs moved (the frontier studies, configs/frontier-*.yaml).
for x in "" "x10-"; do
  base="--steps 4 --clip-x0 --unit-noise${x:+ --per-image 10}"
  flags[${x}st4c]="$base"
  flags[${x}st4c-g1]="$base --guidance 1"
  flags[${x}st4c-g3]="$base --guidance 3"
  flags[${x}st4c-n0.5]="$base --noise 0.5"
  flags[${x}st4c-g1-n0.5]="$base --guidance 1 --noise 0.5"
  flags[img2img-${x}st4c-g1]="--method img2img $base --guidance 1"
  flags[img2img-${x}st4c-0.75]="--method img2img $base --strength 0.75"
  flags[img2img-${x}st4c-0.25]="--method img2img $base --strength 0.25"
done
for r in "$@"; do
  store=$demo/k$k/r$r/store
  for name in $settings; do
    if [[ $name =~ ^(enc|inv([0-9]+))(-(.+))?$ ]]; then
      # enc[-SETTING] / invN-SETTING: the demo store's images, model and settings, but the encoder's tokens kept as
      # they are (no inversion at all) or N inversion steps from them; then SETTING's generation (default: generate's)
      prefix=${BASH_REMATCH[1]}; isteps=${BASH_REMATCH[2]:-0}; setting=${BASH_REMATCH[4]}
      diffinv invert --config "$store/config.yaml" --init encoder --steps "$isteps" --out "$demo/$sweep/$prefix-store/r$r" --resume --quiet
      # shellcheck disable=SC2086
      diffinv generate --store "$demo/$sweep/$prefix-store/r$r" --save-size "$save" --out "$demo/$sweep/$name/r$r" --resume --quiet \
        ${setting:+${flags[$setting]}}
    else
      # shellcheck disable=SC2086  # the flags are words on purpose
      diffinv generate --store "$store" --save-size "$save" --out "$demo/$sweep/$name/r$r" --resume --quiet ${flags[$name]}
    fi
  done
  echo "r$r done"
done
