#!/usr/bin/env bash
# One GPU lease, one call, at most 9 minutes, everything into one folder ($OUT, default runs/gpu-all), in this order, each
# step under its own time cap so that one failure leaves the rest standing:
#   1. user_path: the commands a new user runs first, every default, on an SD 1.x-sized random model built here
#      (benchmarks/user_path.py): invert (--batch-size 0 probes the free memory), generate di / img2img, train;
#   2. gpu_suite: eager, compiled, auto-batch and channels-last bf16 inversion at 128 / 256 px against the paper's loop,
#      3 timed repeats a figure, share of the measured bf16 peak; sampling against the paper's sampler;
#   3. generalist: the latent generalist base (pretrain-vae, then pretrain-base --vae, as configs/stages/*generalist-32*)
#      at GPU batch sizes for the rest of the cap, from .gpu/data/generalist-mix-32.npz, back as a tar.gz under 60 MiB.
# Before the lease, on the CPU machine:
#   python benchmarks/pack_generalist.py --only cifar10 --only imagenette --only mnist --per-dataset 10000 \
#       --out .gpu/data/generalist-mix-32.npz                      # ~40 MiB; carry .gpu and .whl (benchmarks/README.md)
#   bash benchmarks/gpu_all.sh --cpu-check                          # every step at toy sizes on the CPU, <= 3 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
check=""
py=${PYTHON:-python3}  # the interpreter with torch (a venv: PYTHON=.venv/bin/python)
[ "${1:-}" = "--cpu-check" ] && check=1
out=${OUT:-runs/gpu-all}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-all.XXXXXX")
if [ -n "$check" ]; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" CUDA_VISIBLE_DEVICES=""
else
  source benchmarks/gpu_env.sh
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > "$out/gpu_info.csv" 2>&1
fi
: > "$out/steps.jsonl"

step() {  # step NAME CAP_SECONDS COMMAND...: run it under its cap, log to $out/NAME.log, one JSON line of how it ended
  local name=$1 cap=$2 began rc
  shift 2
  began=$(date +%s)
  timeout "$cap" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - began )), \"cap\": $cap}" | tee -a "$out/steps.jsonl"
}

# 1. The user's path.
step user_path "${USER_CAP:-150}" "$py" benchmarks/user_path.py ${check:+--cpu-check} --out "$work/user-path"
cp "$work/user-path/user_path.json" "$out/" 2>/dev/null

# 2. The suite.
step gpu_suite "${SUITE_CAP:-240}" "$py" benchmarks/gpu_suite.py ${check:+--cpu-check} --steps "${SUITE_STEPS:-5}" \
  --out "$out/gpu_suite.json"

# 3. The generalist latent base: the autoencoder, then the UNet on its latents, each for its share of the time left.
if [ -n "$check" ]; then
  "$py" benchmarks/pack_generalist.py --only digits --per-dataset 200 --resolution 16 --out "$work/mix.npz" > /dev/null
  data="$work/mix.npz" res=16 vae_size="--channels 16,32,32" unet_size="--channels 32,64 --layers-per-block 1" batch=16
  vae_secs=10 base_secs=10 steps=3
else
  data=.gpu/data/generalist-mix-32.npz res=32 vae_size="--channels 32,64,64" unet_size="--channels 64,96" batch=1024
  vae_secs=${VAE_SECONDS:-60} base_secs=${BASE_SECONDS:-90} steps=1000000
fi
step pretrain_vae $((vae_secs + 60)) "$py" -m diffinv.cli pretrain-vae --data "$data" --resolution $res $vae_size \
  --batch-size $batch --lr 2e-3 --warmup 100 --ema 0.998 --steps $steps --max-seconds $vae_secs --log-every 50 \
  --quiet --out "$work/generalist-32-vae"
step pretrain_base $((base_secs + 60)) "$py" -m diffinv.cli pretrain-base --data "$data" --resolution $res $unet_size \
  --vae "$work/generalist-32-vae" --views invariant --view-min-area 0.5 --batch-size $batch --lr 2e-3 --warmup 200 \
  --ema 0.998 --steps $steps --max-seconds $base_secs --log-every 50 --quiet --out "$work/generalist-32-latent"
cp "$work/generalist-32-vae/pretrain-vae.json" "$out/" 2>/dev/null
cp "$work/generalist-32-latent/pretrain.json" "$out/" 2>/dev/null
tar czf "$out/generalist-32-latent.tar.gz" -C "$work" generalist-32-latent generalist-32-vae 2>/dev/null
ls -la "$out"
rm -rf "$work"
