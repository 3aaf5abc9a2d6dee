"""Where inversion's gradient noise comes from: the gradient's second moment per tenth of the schedule.

Inverts the images with the library's defaults (``--steps``), then, at those embeddings, draws
``--draws`` gradients per image in each tenth of the schedule and reports E|g|^2 (the total),
|E g|^2 (the signal; its estimate carries var/draws of noise) and the variance that importance
sampling with the variance-minimising proposal (p proportional to sqrt(E|g|^2)) leaves, relative
to uniform timesteps. This is the measurement behind ``--timesteps importance`` (objective.py).
Prints one JSON object (also written to ``--out``) and a one-line summary.

    python benchmarks/timestep_profile.py --base bases/pneumoniamnist-16 --data ../shared/data/pneumoniamnist.npz
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from diffinv import rng
from diffinv.config import InvertConfig, load_config
from diffinv.data.real import load_pixels, open_images, select
from diffinv.diffusion.encoder import encoder_tokens
from diffinv.diffusion.inversion import InversionSettings, invert_batch
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.objective import denoising_losses, timestep_bin_edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="src/diffinv/assets/digits-base")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300, help="inversion steps before measuring (0: at the random start)")
    parser.add_argument("--timesteps", default="stratified", help="the inversion's --timesteps")
    parser.add_argument("--draws", type=int, default=24, help="gradients per image and tenth of the schedule")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = load_backbone(args.base)
    images = select(open_images(args.data), args.per_class, seed=0)
    resolution = backbone.choose_resolution(min(images.image(0).size))
    pixels = load_pixels(images, resolution)
    keys = rng.keys_tensor(0, images.ids)
    config = load_config(InvertConfig, None, {"model": args.base, "data": "-", "resolution": resolution, "steps": max(args.steps, 1),
                                              "log_every": max(args.steps, 1), "timesteps": args.timesteps,
                                              "tokens": encoder_tokens(args.base) or InvertConfig.tokens})
    emb = invert_batch(backbone, pixels, keys, InversionSettings.of(replace(config, steps=args.steps)))[0]  # 0 steps: the keyed start
    clean = backbone.encode(pixels).mean
    T = backbone.num_train_timesteps
    edges = timestep_bin_edges(T).tolist()
    generator = torch.Generator().manual_seed(0)
    bins = []
    for k in range(len(edges) - 1):
        grads = []
        for _ in range(args.draws):
            t = torch.randint(edges[k], edges[k + 1], (len(keys),), generator=generator)
            noise = torch.randn(clean.shape, generator=generator)
            cond = emb.clone().requires_grad_()
            loss = denoising_losses(backbone, clean, noise, t, cond)
            grads.append(torch.autograd.grad(loss.sum(), cond)[0])
        g = torch.stack(grads)  # [draws, B, K, D]
        bins.append({"timesteps": [edges[k], edges[k + 1]], "second_moment": g.pow(2).flatten(2).sum(-1).mean().item(),
                     "mean_squared": g.mean(0).pow(2).flatten(1).sum(-1).mean().item()})
    second = torch.tensor([b["second_moment"] for b in bins])
    ratio = (second.sqrt().mean() ** 2 / second.mean()).item()
    report = {"base": args.base, "data": args.data, "images": len(keys), "steps": args.steps, "draws": args.draws, "bins": bins,
              "importance_variance_ratio": round(ratio, 3), "top_to_bottom": round((second[0] / second[-1]).item(), 1)}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    print(f"{args.base}: E|g|^2 is {report['top_to_bottom']}x larger in the lowest tenth of the schedule than in the highest; "
          f"importance sampling leaves {ratio:.2f} of uniform timesteps' gradient variance")


if __name__ == "__main__":
    main()
