"""The GPU suite: diffinv vs the paper's loops on an SD 1.x-sized random model, one run, one JSON.

What it measures, at 128 and 256 px (the paper's CIFAR and STL-10 inversion resolutions):

* inversion image-steps/s: diffinv's engine (latents once, whole group per step, bf16 or fp32),
  eager and through ``torch.compile`` (bf16; CUDA graphs, mode reduce-overhead), and the paper's
  loop (VAE re-encode every step, fp32, batches of half the group); each figure the median of 3
  timed repeats, with their spread and the first call's seconds (compiling included);
* sampling images/s: diffinv's default (DDIM 25, guidance in one batched call, bf16) and the
  paper's (PNDM 100, fp32), VAE decode included;
* peak GPU memory of each, counted FLOPs per image-step (torch's FlopCounterMode) and the
  achieved TFLOP/s as a share of this card's measured bf16 matrix-product peak;
* the group ``invert --batch-size 0`` chooses from the free memory, timed like the others, and
  channels-last layout (``--channels-last``) against the default, both bf16 eager;
* CUDA batch invariance of the keyed RNG: a batch's embeddings against the same images inverted
  one at a time, and keyed noise on CUDA against the CPU.

Random weights: loss values mean nothing here; only speed, memory and invariance do.
Prints one JSON object (also written to --out) and a one-line summary. Needs a CUDA GPU::

    python benchmarks/gpu_suite.py --out gpu_suite.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from invert_speed import paper_loop  # noqa: E402  (the benchmarks' own reference loops)
from sample_speed import paper_sampler  # noqa: E402

from diffinv import rng  # noqa: E402
from diffinv.diffusion.backbone import SCHEDULER_DEFAULTS, Backbone  # noqa: E402
from diffinv.diffusion.inversion import InversionSettings, invert_batch  # noqa: E402
from diffinv.diffusion.sampling import sample_latents  # noqa: E402
from diffinv.diffusion.tiny import build_unet, build_vae  # noqa: E402
from diffinv.stages.invert import auto_batch  # noqa: E402

OOM = torch.cuda.OutOfMemoryError
DEVICE = "cuda"  # --cpu-check runs every code path on the CPU with a tiny model, to catch mistakes before a GPU lease


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else 0.0


def timed(fn, repeats: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, device synchronised around each."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops() -> float:
    """This card's bf16 matrix-product rate, measured (8192^3, random data, median of 10)."""
    n = 8192 if DEVICE == "cuda" else 256
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: a @ b, 10)
    return 2 * n**3 / seconds / 1e12


def sd1_backbone(dtype: torch.dtype) -> Backbone:
    """An SD 1.x-sized UNet (860M) + VAE with random weights, built directly on the GPU."""
    torch.manual_seed(0)
    kind = "sd1" if DEVICE == "cuda" else "latent"
    with torch.device(DEVICE):
        unet, vae = build_unet(kind, sample_size=64 if kind == "sd1" else 16), build_vae(kind)
    for m in (unet, vae):
        m.requires_grad_(False).eval()
    return Backbone(unet, vae, dict(SCHEDULER_DEFAULTS), f"random-{kind}").to(DEVICE, dtype)


def flops_per_image_step(backbone: Backbone, resolution: int) -> float:
    """Counted FLOPs of one inversion image-step (UNet forward + backward to the conditioning)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = backbone.latent_shape(resolution)
    x = torch.randn(2, *shape, device=DEVICE)
    cond = torch.randn(2, 5, backbone.cond_dim, device=DEVICE, requires_grad=True)
    t = torch.tensor([10, 500], device=DEVICE)
    with FlopCounterMode(display=False) as counter:
        backbone.predict(x, t, cond).pow(2).mean().backward()
    return counter.get_total_flops() / 2


def measure_inversion(backbone: Backbone, pixels: torch.Tensor, steps: int, repeats: int = 3) -> dict:
    """diffinv's steady image-steps/s on a group (one-off encode/eval cost removed as in invert_speed.py): the median
    of ``repeats`` timed runs, each of them, their spread, and the first call's seconds (warm-up and any compiling)."""
    keys = rng.keys_tensor(0, [f"img{i}" for i in range(len(pixels))])

    def run(n: int):
        config = InversionSettings(steps=n, log_every=10**9, eval_timesteps=1)
        return lambda: invert_batch(backbone, pixels, keys, config)

    first = timed(run(1))  # warm-up (kernels, autotuning, compiling)
    reset_peak()
    fixed = timed(run(1), 3)
    rates = sorted(steps * len(pixels) / max(timed(run(1 + steps)) - fixed, 1e-9) for _ in range(repeats))
    median = rates[len(rates) // 2]
    return {"images": len(pixels), "image_steps_per_s": round(median, 2), "repeats": [round(r, 2) for r in rates],
            "spread_pct": round(100 * (rates[-1] - rates[0]) / median, 1), "first_call_s": round(first, 1),
            "peak_gib": peak_gib()}


def measure_paper_inversion(backbone: Backbone, pixels: torch.Tensor, steps: int) -> dict:
    batch = len(pixels) // 2
    paper_loop(backbone, pixels, 1, batch, 5)
    reset_peak()
    seconds = timed(lambda: paper_loop(backbone, pixels, steps, batch, 5))
    return {"images": len(pixels), "batch": batch, "image_steps_per_s": round(steps * batch / seconds, 2),
            "peak_gib": peak_gib()}


def share(measured: dict, flops: float, peak: float) -> None:
    """Add the achieved TFLOP/s and its share of the measured bf16 peak to an inversion figure."""
    rate = measured.get("image_steps_per_s", 0.0)
    measured["tflops"] = round(rate * flops / 1e12, 1)
    measured["pct_of_bf16_peak"] = round(100 * rate * flops / 1e12 / peak, 1)


def with_halving(measure, backbone: Backbone, pixels: torch.Tensor, steps: int) -> dict:
    """Run ``measure``, halving the group on out-of-memory (recorded in the result)."""
    while True:
        try:
            return measure(backbone, pixels, steps)
        except OOM:
            torch.cuda.empty_cache()
            if len(pixels) <= 2:
                return {"error": "out of memory at 2 images"}
            pixels = pixels[: len(pixels) // 2]


def measure_sampling(backbone: Backbone, resolution: int, n: int, paper: bool) -> dict:
    shape = backbone.latent_shape(resolution)
    keys = torch.arange(n, device=DEVICE)
    noise = rng.keyed_normal(keys, 0, rng.STREAM_NOISE, shape)
    cond = rng.keyed_normal(keys, 0, rng.STREAM_PERTURB, (5, backbone.cond_dim))
    uncond = cond.mean(0, keepdim=True).expand_as(cond)
    if paper:
        run = lambda: paper_sampler(backbone, cond, uncond, noise, steps=100, guidance=2.0)  # noqa: E731
    else:
        run = lambda: backbone.decode(sample_latents(backbone, cond, uncond, noise, sampler="ddim", steps=25, guidance=2.0))  # noqa: E731
    if paper:
        paper_sampler(backbone, cond[:2], uncond[:2], noise[:2], steps=2)
    else:
        backbone.decode(sample_latents(backbone, cond[:2], uncond[:2], noise[:2], sampler="ddim", steps=2, guidance=2.0))
    reset_peak()
    seconds = timed(run)
    return {"samples": n, "sampler": "pndm 100" if paper else "ddim 25", "images_per_s": round(n / seconds, 2),
            "peak_gib": peak_gib()}


def layout_and_batch(backbone: Backbone, pixels: torch.Tensor, res: int, steps: int, flops: float, peak: float,
                     cap: int) -> dict:
    """bf16 eager inversion at the group ``--batch-size 0`` picks (up to ``cap``), and in channels-last layout."""
    found = {"auto_batch": min(cap, auto_batch(backbone, 5, res, cap, log=lambda _: None))}
    group = torch.rand(found["auto_batch"], 3, res, res, device=DEVICE) * 2 - 1
    found["invert_auto_batch"] = with_halving(measure_inversion, backbone, group, steps)
    share(found["invert_auto_batch"], flops, peak)
    backbone.channels_last()
    found["invert_channels_last"] = with_halving(measure_inversion, backbone, pixels, steps)
    share(found["invert_channels_last"], flops, peak)
    backbone.channels_last(False)  # the default layout again for the next figures
    return found


def batch_invariance(backbone: Backbone, resolution: int) -> dict:
    """Max |difference| between 4 images inverted together and one at a time (fp32, 3 steps)."""
    pixels = torch.rand(4, 3, resolution, resolution, device=DEVICE) * 2 - 1
    keys = rng.keys_tensor(0, [f"inv{i}" for i in range(4)])
    config = InversionSettings(steps=3, log_every=10**9, eval_timesteps=2)
    together = invert_batch(backbone, pixels, keys, config)[0]
    alone = torch.cat([invert_batch(backbone, pixels[i:i + 1], keys[i:i + 1], config)[0] for i in range(4)])
    cuda_noise = rng.keyed_normal(keys.to(DEVICE), 7, rng.STREAM_NOISE, (4, 16, 16)).cpu()
    cpu_noise = rng.keyed_normal(keys, 7, rng.STREAM_NOISE, (4, 16, 16))
    return {"embedding_max_abs_diff": float((together - alone).abs().max()),
            "embedding_scale": float(together.abs().mean()),
            "keyed_noise_cuda_equals_cpu": bool(torch.equal(cuda_noise, cpu_noise)),
            "keyed_noise_max_abs_diff": float((cuda_noise - cpu_noise).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", default="128,256")
    ap.add_argument("--group", default="64,32", help="images per inversion group at each resolution")
    ap.add_argument("--steps", type=int, default=5, help="timed inversion steps per measurement")
    ap.add_argument("--samples", default="32,16", help="samples timed per sampler at each resolution")
    ap.add_argument("--out", default="gpu_suite.json")
    ap.add_argument("--cpu-check", action="store_true", help="run every code path on the CPU with a tiny model (no figures)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile figures")
    ap.add_argument("--auto-batch-cap", type=int, default=256, help="largest group timed for --batch-size 0")
    args = ap.parse_args()
    global DEVICE
    if args.cpu_check:  # every code path at toy sizes: the figures mean nothing here
        DEVICE = "cpu"
        args.resolutions, args.group, args.samples, args.steps = "16,32", "4,4", "2,2", 2
    elif not torch.cuda.is_available():
        sys.exit("gpu_suite: no CUDA GPU is visible; run it on a GPU machine (or --cpu-check)")

    began = time.time()
    peak = matmul_peak_tflops()
    result = {"benchmark": "gpu_suite", "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (check only)",
              "torch": torch.__version__,
              "bf16_matmul_peak_tflops_measured": round(peak, 1), "model": "random SD 1.x-sized UNet + VAE", "runs": []}
    resolutions = [int(r) for r in args.resolutions.split(",")]
    groups = [int(g) for g in args.group.split(",")]
    samples = [int(s) for s in args.samples.split(",")]
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        backbone = sd1_backbone(dtype)
        for res, group, n in zip(resolutions, groups, samples):
            pixels = torch.rand(group, 3, res, res, device=DEVICE) * 2 - 1
            flops = flops_per_image_step(backbone, res)
            run = {"precision": precision, "resolution": res, "flops_per_image_step_g": round(flops / 1e9, 1)}
            run["invert_diffinv"] = with_halving(measure_inversion, backbone, pixels, args.steps)
            share(run["invert_diffinv"], flops, peak)
            if precision == "fp32":  # the paper's loop runs in fp32 only
                run["invert_paper"] = with_halving(measure_paper_inversion, backbone, pixels, args.steps)
                run["sample_paper"] = measure_sampling(backbone, res, n, paper=True)
            run["sample_diffinv"] = measure_sampling(backbone, res, n, paper=False)
            if precision == "bf16" and not args.no_compile:  # compiled: the UNet through torch.compile, same shapes
                backbone.compile(backend="inductor" if DEVICE == "cuda" else "aot_eager")
                run["invert_compiled"] = with_halving(measure_inversion, backbone, pixels, args.steps)
                share(run["invert_compiled"], flops, peak)
                run["sample_compiled"] = measure_sampling(backbone, res, n, paper=False)
                backbone._compiled = None  # eager again for the next resolution's eager figures
            if precision == "bf16":
                run.update(layout_and_batch(backbone, pixels, res, args.steps, flops, peak,
                                            args.auto_batch_cap if DEVICE == "cuda" else 4))
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
        if precision == "fp32":
            result["batch_invariance_fp32_128px"] = batch_invariance(backbone, resolutions[0])
        del backbone
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    # Headline ratios at each resolution: diffinv bf16 against the paper's fp32 loop.
    by = {(r["precision"], r["resolution"]): r for r in result["runs"]}
    result["speedups"] = {}
    for res in resolutions:
        ours, paper = by.get(("bf16", res)), by.get(("fp32", res))
        if ours and paper and "image_steps_per_s" in ours["invert_diffinv"] and "image_steps_per_s" in paper.get("invert_paper", {}):
            result["speedups"][f"invert_{res}"] = round(ours["invert_diffinv"]["image_steps_per_s"]
                                                        / paper["invert_paper"]["image_steps_per_s"], 2)
            result["speedups"][f"sample_{res}"] = round(ours["sample_diffinv"]["images_per_s"] / paper["sample_paper"]["images_per_s"], 2)
            if "image_steps_per_s" in ours.get("invert_compiled", {}):
                result["speedups"][f"invert_compiled_{res}"] = round(
                    ours["invert_compiled"]["image_steps_per_s"] / paper["invert_paper"]["image_steps_per_s"], 2)
                result["speedups"][f"compiled_over_eager_{res}"] = round(
                    ours["invert_compiled"]["image_steps_per_s"] / ours["invert_diffinv"]["image_steps_per_s"], 2)
            for name in ("invert_auto_batch", "invert_channels_last"):
                if "image_steps_per_s" in ours.get(name, {}):
                    result["speedups"][f"{name[7:]}_over_eager_{res}"] = round(
                        ours[name]["image_steps_per_s"] / ours["invert_diffinv"]["image_steps_per_s"], 2)
    result["seconds"] = round(time.time() - began, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(f"gpu_suite on {result['device']}: invert diffinv bf16 vs paper fp32 "
          + ", ".join(f"{k} {v}x" for k, v in result["speedups"].items())
          + f"; batch invariance max diff {result.get('batch_invariance_fp32_128px', {}).get('embedding_max_abs_diff')}"
          + f"; {result['seconds']} s")


if __name__ == "__main__":
    main()
