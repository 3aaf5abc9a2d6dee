"""bf16 against fp32 inversion: the same images, the same keyed draws, the final loss measured in fp32.

The UNet runs in the given precision during the optimisation (embeddings and AdamW stay fp32,
as in ``diffinv invert``); the resulting embeddings of both runs are then scored by one fp32 model
on identical evaluation draws, so the difference is what bf16 did to the optimisation, not to
the measurement. CPU is enough for this correctness question (bf16 is emulated here and slow).
Prints one JSON object and a one-line summary.

    python benchmarks/precision_loss.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from diffinv import rng
from diffinv.config import InvertConfig
from diffinv.data.real import load_pixels, open_images, select
from diffinv.diffusion.inversion import InversionSettings, invert_batch
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.objective import evaluation_loss
from diffinv.study.demo import EMBEDDED_BASE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=str(EMBEDDED_BASE))
    parser.add_argument("--data", default="digits")
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    images = select(open_images(args.data), args.per_class, seed=0)
    reference = load_backbone(args.base).to(args.device, torch.float32)
    resolution = reference.choose_resolution(min(images.image(0).size))
    pixels = load_pixels(images, resolution).to(args.device)
    keys = rng.keys_tensor(0, images.ids)
    clean = reference.encode(pixels).mean
    config = InvertConfig(model=args.base, data=args.data, resolution=resolution, steps=args.steps, lr=args.lr, log_every=args.steps)
    runs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        backbone = load_backbone(args.base).to(args.device, dtype)
        start = time.perf_counter()
        embeddings, init, _, _ = invert_batch(backbone, pixels, keys, InversionSettings.of(config))
        seconds = time.perf_counter() - start
        loss = evaluation_loss(reference, clean, embeddings.to(args.device), keys)  # fp32 judge, same draws
        runs[name] = {"loss": loss.tolist(), "mean": loss.mean().item(), "seconds": round(seconds, 1), "embeddings": embeddings}
    diff = torch.tensor(runs["bf16"]["loss"]) - torch.tensor(runs["fp32"]["loss"])
    n = len(diff)
    half = 1.96 * diff.std().item() / math.sqrt(n)  # images are the replicates of this paired comparison
    drift = (runs["bf16"]["embeddings"] - runs["fp32"]["embeddings"]).norm() / runs["fp32"]["embeddings"].norm()
    report = {"base": args.base, "images": n, "steps": args.steps, "lr": args.lr, "device": args.device,
              "fp32_loss": runs["fp32"]["mean"], "bf16_loss": runs["bf16"]["mean"],
              "bf16_minus_fp32": diff.mean().item(), "ci95": [diff.mean().item() - half, diff.mean().item() + half],
              "relative_embedding_difference": drift.item(),
              "seconds": {k: v["seconds"] for k, v in runs.items()}}
    text = json.dumps(report, indent=1)
    if args.out:
        open(args.out, "w").write(text + "\n")
    print(text)
    print(f"bf16 vs fp32 after {args.steps} steps on {n} images: final loss {report['bf16_loss']:.5f} vs {report['fp32_loss']:.5f} "
          f"(difference {report['bf16_minus_fp32']:+.5f}, 95% CI [{report['ci95'][0]:+.5f}, {report['ci95'][1]:+.5f}]); "
          f"embeddings differ by {100 * report['relative_embedding_difference']:.1f}%")


if __name__ == "__main__":
    main()
