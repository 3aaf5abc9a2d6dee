"""Reconstruction PSNR of a latent base's VAE on the test splits of datasets in and out of its pretraining mix.

A VAE that never saw a domain should still reconstruct it (Stable Diffusion's VAE reconstructs
X-rays it never saw): the gap between held-out and in-mix PSNR says how generalist the first stage is.

    python benchmarks/vae_heldout.py --vae runs/generalist-32-vae --root ../shared/data --n 1000
Prints one JSON object, then a one-line summary.
"""

from __future__ import annotations

import argparse
import json

import torch

from diffinv.data.real import load_pixels, open_images
from diffinv.diffusion.model_io import load_vae
from diffinv.diffusion.pretrain import psnr

SETS = {  # name -> (path under --root, test split, in the generalist mix?)
    "cifar10": ("cifar10", "test", True), "mnist": ("mnist", "test", True), "imagenette": ("imagenette-96", "val", True),
    "fashion-mnist": ("fashion-mnist", "test", False), "pneumoniamnist": ("pneumoniamnist.npz", "test", False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True)
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--n", type=int, default=1000, help="test images per dataset (the first N)")
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = load_vae(args.vae).eval()
    out = {}
    for name, (path, split, in_mix) in SETS.items():
        images = open_images(f"{args.root}/{path}", "auto", split)
        images = images.subset(range(min(args.n, len(images))))
        x = load_pixels(images, args.resolution)  # [-1, 1]
        with torch.no_grad():
            values = torch.cat([psnr(vae.decode(vae.encode(b).latent_dist.mean).sample.clamp(-1, 1), b)
                                for b in x.split(250)])
        out[name] = {"in_mix": in_mix, "images": len(x), "psnr_db_mean": round(float(values.mean()), 2),
                     "psnr_db_p10": round(float(values.quantile(0.1)), 2)}
    print(json.dumps(out, indent=1))
    held = [v["psnr_db_mean"] for v in out.values() if not v["in_mix"]]
    seen = [v["psnr_db_mean"] for v in out.values() if v["in_mix"]]
    print(f"VAE PSNR: in the mix {min(seen):.1f}-{max(seen):.1f} dB, held out {min(held):.1f}-{max(held):.1f} dB "
          "(" + ", ".join(f"{k} {v['psnr_db_mean']:.1f}" for k, v in out.items()) + ")")


if __name__ == "__main__":
    main()
