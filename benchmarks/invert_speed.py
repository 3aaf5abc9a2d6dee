"""Inversion throughput: diffinv's engine vs the paper's loop, same model, same images, one run.

The paper's loop (reimplemented here as the baseline): a group of 100 images, each step a batch
of 50 drawn from it, the VAE re-encodes the batch every step, fp32, torch's global RNG.
diffinv: latents encoded once, the whole group optimised every step, bf16 UNet on GPU.
"image-steps/s" counts one image getting one optimisation step. diffinv's steady rate excludes its
one-off per-batch work (encoding, initial/final evaluation), reported separately; real runs take
thousands of steps, so that cost vanishes there.

Prints one JSON object and a one-line summary. Examples::

    python benchmarks/invert_speed.py                                  # CPU, tiny latent model, 32 px
    python benchmarks/invert_speed.py --kind sd1 --resolution 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from diffinv import rng
from diffinv.data.real import load_pixels, open_images, select
from diffinv.device import resolve_device, resolve_dtype
from diffinv.diffusion.inversion import InversionSettings, invert_batch
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.tiny import save_tiny_model


def paper_loop(backbone, pixels: torch.Tensor, steps: int, batch: int, tokens: int, lr: float = 3e-2) -> None:
    """The reference implementation's inner loop, faithfully: encode every step, fp32, mean MSE."""
    device = backbone.device
    pixels = pixels.to(device)
    emb = torch.nn.Parameter(torch.randn(len(pixels), tokens, backbone.cond_dim, device=device))
    opt = torch.optim.AdamW([emb], lr=lr, weight_decay=1e-2)
    scale = backbone.vae.config.scaling_factor if backbone.vae is not None else 1.0
    for _ in range(steps):
        idx = torch.randperm(len(pixels), device=device)[:batch]
        with torch.no_grad():
            x0 = backbone.vae.encode(pixels[idx]).latent_dist.sample() * scale if backbone.vae is not None else pixels[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, backbone.num_train_timesteps, (batch,), device=device)
        a = backbone.process.alphas_cumprod[t].view(-1, 1, 1, 1)  # the paper's loop: a DDPM model
        pred = backbone.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=emb[idx]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="latent", choices=["latent", "pixel", "sd1"], help="random model to build")
    ap.add_argument("--model", help="an existing model instead of a random one")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--group", type=int, default=100, help="images per group (paper: 100)")
    ap.add_argument("--paper-batch", type=int, default=50, help="paper's batch drawn from the group (paper: 50)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method (after one warm-up step)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(save_tiny_model(f"{tmp}/model", args.kind))
        images = select(open_images(args.data), None, 0)
        images = images.subset(range(min(args.group, len(images))))
        pixels = load_pixels(images, args.resolution)
        keys = rng.keys_tensor(0, images.ids)

        baseline = load_backbone(model).to(device, torch.float32)
        paper_loop(baseline, pixels, 1, args.paper_batch, 5)  # warm-up
        t_paper = _timed(lambda baseline=baseline: paper_loop(baseline, pixels, args.steps, args.paper_batch, 5), device)
        del baseline

        ours = load_backbone(model)
        dtype = resolve_dtype(args.precision, device)
        ours.to(device, dtype)

        def run(steps: int) -> float:
            cfg = InversionSettings(steps=steps, log_every=10**9, eval_timesteps=1)
            return _timed(lambda: invert_batch(ours, pixels, keys, cfg), device)

        run(1)  # warm-up
        # One-off per-batch work (encoding, initial/final evaluation) is the difference of two runs.
        t_fixed = run(1)
        t_ours = run(1 + args.steps)

    paper_rate = args.steps * args.paper_batch / t_paper
    ours_rate = args.steps * len(pixels) / (t_ours - t_fixed)
    ours_end_to_end = (1 + args.steps) * len(pixels) / t_ours
    result = {
        "benchmark": "invert_speed", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "model": args.model or f"random-{args.kind}", "resolution": args.resolution,
        "images": len(pixels), "steps": args.steps, "paper": {"image_steps_per_s": round(paper_rate, 2), "batch": args.paper_batch,
                                                              "precision": "fp32", "vae_every_step": True},
        "diffinv": {"image_steps_per_s": round(ours_rate, 2), "batch": len(pixels), "precision": str(dtype).replace("torch.", ""),
                    "vae_every_step": False, "end_to_end_image_steps_per_s": round(ours_end_to_end, 2),
                    "fixed_cost_s_per_batch": round(t_fixed, 3)},
        "speedup": round(ours_rate / paper_rate, 2), "speedup_end_to_end": round(ours_end_to_end / paper_rate, 2),
    }
    print(json.dumps(result))
    print(f"invert_speed: diffinv {ours_rate:.1f} vs paper loop {paper_rate:.1f} image-steps/s "
          f"({result['speedup']}x steady, {result['speedup_end_to_end']}x end to end over {args.steps + 1} steps) "
          f"on {result['device']}, {result['model']} at {args.resolution}px")


if __name__ == "__main__":
    main()
