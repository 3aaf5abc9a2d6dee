"""Sampling throughput and fidelity: `diffinv generate`'s batches vs the paper's sampler, one run.

The paper's sampler (reimplemented here as the baseline): PNDM (PLMS, as Stable Diffusion v1-4)
for 100 steps, classifier-free guidance with the mean embedding as the unconditional input,
fp32 throughout, batches of 100, VAE decode in fp32. Both get the same conditionings (the same
DI perturbations of the same store) and the same initial noise, so besides images/s we report
how far each faster sampler lands from the paper's own output (RMSE in 8-bit pixel levels).

The store is made on the spot (a short inversion of ``--images`` digits) unless ``--store`` is
given. Prints one JSON object and a one-line summary. Examples::

    python benchmarks/sample_speed.py                                   # CPU, tiny latent model, 32 px
    python benchmarks/sample_speed.py --kind sd1 --resolution 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from diffinv import rng
from diffinv.config import InvertConfig
from diffinv.device import resolve_device, resolve_dtype
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.generation import Conditioning, generate_batch, plan_samples
from diffinv.diffusion.methods import get_method
from diffinv.diffusion.methods.base import GenerationSettings
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.sampling import pixels_to_uint8
from diffinv.diffusion.store import EmbeddingStore
from diffinv.diffusion.tiny import save_tiny_model
from diffinv.stages.invert import invert_dataset


@torch.no_grad()
def paper_sampler(backbone: Backbone, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int = 100,
                  guidance: float = 2.0) -> torch.Tensor:
    """The reference sampling loop, faithfully: PNDM, CFG as one doubled batch, fp32, VAE decode."""
    scheduler = backbone.make_scheduler("pndm")
    scheduler.set_timesteps(steps, device=backbone.device)
    latents = noise.to(backbone.device) * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond]).to(backbone.device)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        out = backbone.unet(model_in, t, encoder_hidden_states=context).sample
        out_uncond, out_cond = out.chunk(2)
        latents = scheduler.step(out_uncond + guidance * (out_cond - out_uncond), t, latents).prev_sample
    return backbone.decode(latents)


def _pretrained(model: str, resolution: int, steps: int, device: torch.device, out: str) -> str:
    from diffinv.data.real import load_pixels, open_images, select
    from diffinv.diffusion.model_io import save_folder
    from diffinv.diffusion.tiny import memorise

    backbone = load_backbone(model).to(device)
    pixels = load_pixels(select(open_images("digits"), 20, 0), resolution).to(device)
    memorise(backbone, pixels, steps=steps, batch_size=32, lr=3e-3)
    return str(save_folder(backbone, out))


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="latent", choices=["latent", "pixel", "sd1"], help="random model to build")
    ap.add_argument("--model", help="an existing model instead of a random one")
    ap.add_argument("--pretrain", type=int, default=0,
                    help="first train the random model N steps as a diffusion autoencoder on digits, so samples have structure")
    ap.add_argument("--store", help="an existing store (else one is inverted from --images digits)")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--images", type=int, default=20, help="real images in the made-up store")
    ap.add_argument("--samples", type=int, default=100, help="samples timed per method (paper batch: 100)")
    ap.add_argument("--paper-steps", type=int, default=100)
    ap.add_argument("--candidates", default="ddim:25,dpm++2m:25,dpm++2m:15,euler:25,pndm:25,pndm:50",
                    help="diffinv sampler:steps settings to compare; the first is the headline")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        size = args.resolution // 8 if args.kind == "sd1" else 16
        model = args.model or str(save_tiny_model(f"{tmp}/model", args.kind, sample_size=size))
        if args.pretrain:
            model = _pretrained(model, args.resolution, args.pretrain, device, f"{tmp}/pretrained")
        store_dir = args.store or str(invert_dataset(
            InvertConfig(model=model, data="digits", per_class=max(1, args.images // 10), resolution=args.resolution, steps=2,
                         device=args.device), f"{tmp}/store", progress=False, log=lambda m: None))
        store = EmbeddingStore.open(store_dir)
        per_image = -(-args.samples // len(store.rows))
        base = GenerationSettings(per_image=per_image)
        rows = plan_samples(base, store, model)[: args.samples]

        # The paper's sampler, fp32, on the same conditionings and initial noise.
        backbone = load_backbone(model).to(device, torch.float32)
        source = Conditioning(store.embeddings.to(device), store.mean_embedding().to(device),
                              resolution=int(store.info["resolution"]))
        keys = torch.tensor([r["_key"] for r in rows], device=device)
        cond, uncond = get_method(base.method).conditioning(rows, source, base, keys)
        noise = rng.keyed_normal(keys, 0, rng.STREAM_NOISE, backbone.latent_shape(source.resolution))
        b = args.batch_size
        paper_sampler(backbone, cond[:2], uncond[:2], noise[:2], steps=2)  # warm-up
        paper, t_paper = _timed(lambda: torch.cat([paper_sampler(backbone, cond[i:i + b], uncond[i:i + b], noise[i:i + b], args.paper_steps)
                                                   for i in range(0, len(rows), b)]), device)
        paper_u8 = pixels_to_uint8(paper, None).float()

        # diffinv's batches (conditioning, sampling, decode) in its working precision.
        dtype = resolve_dtype(args.precision, device)
        backbone.to(device, dtype)
        results = []
        for spec in args.candidates.split(","):
            sampler, steps = spec.split(":")
            config = GenerationSettings(per_image=per_image, sampler=sampler, steps=int(steps))
            generate_batch(backbone, rows[:2], source, config)  # warm-up
            ours, t_ours = _timed(lambda config=config: torch.cat([generate_batch(backbone, rows[i:i + b], source, config)
                                                     for i in range(0, len(rows), b)]), device)
            rmse = (pixels_to_uint8(ours, None).float() - paper_u8).pow(2).mean().sqrt().item()
            results.append({"sampler": sampler, "steps": int(steps), "images_per_s": round(len(rows) / t_ours, 3),
                            "speedup": round(t_paper / t_ours, 2), "rmse_vs_paper_8bit": round(rmse, 2)})

    # Yardstick for the RMSEs: how far apart two different samples of the paper's sampler are.
    spread = (paper_u8 - paper_u8.roll(1, 0)).pow(2).mean().sqrt().item()
    result = {
        "benchmark": "sample_speed", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "model": args.model or f"random-{args.kind}", "resolution": int(store.info["resolution"]),
        "samples": len(rows), "paper": {"sampler": "pndm", "steps": args.paper_steps, "precision": "fp32", "batch": b,
                                        "images_per_s": round(len(rows) / t_paper, 3)},
        "rmse_between_different_samples_8bit": round(spread, 2),
        "pretrain_steps": args.pretrain, "diffinv_precision": str(dtype).replace("torch.", ""), "diffinv": results,
    }
    print(json.dumps(result))
    head = results[0]
    print(f"sample_speed: diffinv {head['sampler']} {head['steps']} steps {head['images_per_s']} vs paper PNDM {args.paper_steps} "
          f"steps {result['paper']['images_per_s']} images/s ({head['speedup']}x, RMSE {head['rmse_vs_paper_8bit']} levels from "
          f"the paper's images; different samples are {result['rmse_between_different_samples_8bit']} apart) "
          f"on {result['device']}, {result['model']} at {result['resolution']}px")


if __name__ == "__main__":
    main()
