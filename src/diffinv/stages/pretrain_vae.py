"""``diffinv pretrain-vae``: unlabeled images -> the latent autoencoder of a base (Stable Diffusion's first stage).

The model and its loss are in :mod:`diffinv.diffusion.pretrain`; the loop, checkpoints and the
pretraining mix are ``pretrain-base``'s (:mod:`diffinv.stages.pretrain`). The output folder holds
``vae/`` (a diffusers ``AutoencoderKL`` whose ``scaling_factor`` is measured on the training
images), which ``pretrain-base --vae`` trains a UNet on, plus the curve and a grid of
reconstructions. Labels are never read; the config refuses a test split.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffinv import rng
from diffinv.config import VaeConfig, config_to_dict
from diffinv.device import resolve_device
from diffinv.diffusion.pretrain import build_vae, latent_scale, psnr, vae_loss
from diffinv.diffusion.views import denoiser_view
from diffinv.runs import read_json, write_json, write_text, write_yaml
from diffinv.stages import Stage
from diffinv.stages.pretrain import batch_indices, load_checkpoint, mix_comment, open_pretraining, plot_losses, train_loop

MARKER = "pretrain-vae.json"
SCALE_IMAGES = 10_000  # images whose latents set the scaling factor (SD measured it on a batch of its data)


def pretrain_vae(config: VaeConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train an autoencoder and write it to ``out/vae`` as a diffusers folder, with its curve, reconstructions and figures."""
    out = Path(out)
    device = resolve_device(config.device)
    autocast = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")

    # 1-2. The output folder (fresh, resumed with the same settings only, or done) and the unlabeled training images in
    #      [-1, 1], always RGB (grey sources as R = G = B): one VAE for every domain.
    opened = open_pretraining(config, out, MARKER, "autoencoder", resume=resume, overwrite=overwrite, progress=progress, log=log)
    if opened is None:
        return out
    state, pixels, mix = opened
    pixels = pixels.to(device)

    # 3. The model, its average and the optimiser; seeded.
    torch.manual_seed(config.seed)
    vae = build_vae(config.channels, config.layers_per_block, config.latent_channels, config.resolution).to(device).train()
    trained, averaged = nn.ModuleDict({"vae": vae}), nn.ModuleDict({"vae": copy.deepcopy(vae)}).requires_grad_(False)
    opt = torch.optim.AdamW(trained.parameters(), lr=config.lr, weight_decay=0.0)

    # 4. Resume, then the loop (pretrain-base's).
    ckpt = out / "checkpoint.safetensors"
    start, history = 0, list[dict[str, Any]]()
    if state == "resume" and ckpt.is_file():
        start, history = load_checkpoint(ckpt, trained, averaged, opt)
        log(f"resuming {out} at step {start}/{config.steps}")
    keys = torch.arange(config.batch_size, dtype=torch.int64, device=device) + config.seed * 1_000_003

    def step_loss(step: int) -> torch.Tensor:
        x = denoiser_view(pixels[batch_indices(config, step, len(pixels)).to(device)], keys, step, rng.STREAM_LATENT,
                          config.hflip)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return vae_loss(vae, x, keys, step, config.kl_weight)[0]

    steps = train_loop(config, trained, averaged, opt, step_loss, ckpt, start, history, progress, log, "pretrain-vae")
    if steps != config.steps:
        write_yaml(out / "config.yaml", {**config_to_dict(config), "steps": steps}, mix_comment(mix))

    # 5. The averaged weights, with the scaling factor that gives unit-variance latents; the curve and the figures.
    final: Any = averaged["vae"].eval()  # a diffusers AutoencoderKL
    scale, figures = _measure(final, pixels, out / "reconstructions.png")
    final.register_to_config(scaling_factor=scale)
    final.save_pretrained(out / "vae")
    write_text(out / "losses.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot_losses(history, out / "loss.png", "L1 + KL loss per pixel")
    write_json(out / MARKER, {
        "status": "complete", "steps": steps, "steps_asked": config.steps, "images": len(pixels), "mix": mix,
        "made_in": os.path.relpath(os.getcwd(), out.resolve()),  # where the mix's relative paths start, from here
        "parameters": sum(p.numel() for p in final.parameters()), "factor": 2 ** (len(config.channels) - 1),
        "latent_shape": [config.latent_channels] + [config.resolution // 2 ** (len(config.channels) - 1)] * 2,
        "scaling_factor": scale, **figures, "final_loss": history[-1]["loss"] if history else None, "device": str(device),
        "train_seconds": history[-1]["seconds"] if history else None,
    })
    ckpt.unlink(missing_ok=True)
    return out


@torch.no_grad()
def _measure(vae: Any, pixels: torch.Tensor, grid_path: Path, n: int = 16) -> tuple[float, dict[str, Any]]:
    """The scaling factor (from up to SCALE_IMAGES evenly spaced training images), their reconstruction PSNR from the latent
    means, and a grid of real images over their reconstructions."""
    from PIL import Image

    from diffinv.diffusion.sampling import pixels_to_uint8
    from diffinv.runs import atomic_write

    pick = torch.linspace(0, len(pixels) - 1, min(SCALE_IMAGES, len(pixels))).long()
    means, scores = [], []
    for part in pick.split(500):
        x = pixels[part.to(pixels.device)]
        mean = vae.encode(x).latent_dist.mean
        means.append(mean.float())
        scores.append(psnr(vae.decode(mean, return_dict=False)[0].clamp(-1, 1), x).cpu())
    show = pixels[pick[torch.linspace(0, len(pick) - 1, min(n, len(pick))).long()].to(pixels.device)]
    recon = vae.decode(vae.encode(show).latent_dist.mean, return_dict=False)[0].clamp(-1, 1)
    grid = torch.cat([torch.cat(list(pixels_to_uint8(r, None)), dim=1) for r in (show, recon)], dim=0).numpy()
    img = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST)
    atomic_write(grid_path, lambda p: img.save(p, format="PNG"))
    all_means = torch.cat(means)
    return latent_scale(all_means), {"train_psnr_db": round(float(torch.cat(scores).mean()), 2),
                                     "latent_mean": round(float(all_means.mean()), 4)}


def _summary(config: VaeConfig, out: Path) -> str:
    info = read_json(out / MARKER)
    c, h, w = info["latent_shape"]
    return (f"autoencoder {out / 'vae'}: {info['parameters'] / 1e6:.2f}M parameters, factor {info['factor']} ({c} x {h} x {w} "
            f"latents at {config.resolution} px), scaling factor {info['scaling_factor']:.4f}, reconstruction PSNR "
            f"{info['train_psnr_db']:.1f} dB on training images; next: diffinv pretrain-base --vae {out} ...")


def _run(config: VaeConfig, out: Path, *, resume: bool, overwrite: bool, progress: bool, log: Callable[[str], None],
         **_: Any) -> Path:
    return pretrain_vae(config, out, resume=resume, overwrite=overwrite, progress=progress, log=log)


STAGE = Stage(name="pretrain-vae", config=VaeConfig, marker=MARKER, run=_run, summary=_summary, path_fields=("data",),
              description=("Stable Diffusion's first stage in miniature: a diffusers AutoencoderKL trained on the L1 pixel error "
                           "plus a small KL term, its latent scaling factor measured on the training images. Saved as vae/ "
                           "for `diffinv pretrain-base --vae OUT`. Labels are never read."),
              outputs=("folder to write the autoencoder to", "continue an interrupted pretraining from its last checkpoint",
                       "replace an existing autoencoder"))
