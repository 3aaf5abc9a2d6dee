"""``diffinv pretrain-base``: unlabeled images -> the project's own small base generator (a diffusers folder).

The parts and the loss are in :mod:`diffinv.diffusion.pretrain`; this module owns the run: data,
the keyed loop (:func:`train_loop`, which ``pretrain-vae`` shares), checkpoints (a resumed run ends
with the same weights), the saved folder with its loss curve and preview grid. With ``--vae`` the
UNet learns the autoencoder's latents and the folder gets its ``vae/``: a latent model, loaded as
Stable Diffusion is. Labels are never read; the config refuses a test split.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from diffinv import rng
from diffinv.config import PretrainConfig, config_to_dict
from diffinv.device import resolve_device, slow_bf16_warning
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.encoder import TokenEncoder
from diffinv.diffusion.model_io import load_vae, save_folder
from diffinv.diffusion.pretrain import PretrainError, autoencoder_loss, base_scheduler_config, build_base_unet, ema_update, is_grey
from diffinv.diffusion.process import flow_scheduler_config
from diffinv.diffusion.views import denoiser_view, flips, random_views, strong
from diffinv.runs import (
    RunError,
    load_optimiser_tensors,
    open_output,
    prefixed,
    read_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
    write_safetensors,
    write_text,
    write_yaml,
)
from diffinv.schedule import lr_factor
from diffinv.stages import Stage

MARKER = "pretrain.json"
CHECKPOINT_SECONDS = 300.0


def pretrain_base(config: PretrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Pretrain a base model and write it to ``out`` as a diffusers folder that ``load_backbone`` reads.

    ``out`` also gets ``config.yaml``, ``losses.jsonl`` (mean loss per ``log_every`` steps),
    ``loss.png``, ``samples.png`` (real images, their reconstructions from the encoder's tokens,
    unconditional samples), ``encoder.safetensors`` and ``pretrain.json``. A checkpoint is
    written every ``checkpoint_every`` steps; ``resume`` continues it to the same weights as an
    uninterrupted run (batches and draws are keyed by (seed, step)).
    """
    out = Path(out)
    device = resolve_device(config.device)
    autocast = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if autocast and (warning := slow_bf16_warning(torch.bfloat16, device)):
        log(f"warning: {warning}")

    # 1-2. The output folder (fresh, resumed with the same settings only, or done) and the unlabeled training images as
    #      pixels in [-1, 1]; on the device one channel for grey data (a VAE reads its own channels); with a VAE, every
    #      image's latent posterior, computed once.
    opened = open_pretraining(config, out, MARKER, "base", resume=resume, overwrite=overwrite, progress=progress, log=log)
    if opened is None:
        return out
    state, pixels, mix = opened
    vae = load_vae(config.vae).to(device) if config.vae else None
    channels = vae.config.in_channels if vae is not None else config.image_channels or (1 if is_grey(pixels) else 3)
    pixels = (pixels[:, :1] if channels == 1 else pixels).to(device)
    latents = _Latents.encode(vae, pixels, config.hflip, progress) if vae is not None else None

    # 3. Model, encoder, their average and the optimiser; everything seeded.
    models = _Models.build(config, channels, device, out, vae)

    # 4. Resume: weights, average, Adam moments, the loss history.
    ckpt = out / "checkpoint.safetensors"
    start, history = 0, list[dict[str, Any]]()
    if state == "resume" and ckpt.is_file():
        start, history = load_checkpoint(ckpt, models.trained, models.averaged, models.opt)
        log(f"resuming {out} at step {start}/{config.steps}")

    # 5. The loop; a --max-seconds stop makes the run exactly a run of the steps done.
    step_loss = _step_loss(config, models, pixels, latents, autocast)
    steps = train_loop(config, models.trained, models.averaged, models.opt, step_loss, ckpt, start, history, progress, log,
                       "pretrain")
    if steps != config.steps:
        write_yaml(out / "config.yaml", {**config_to_dict(config), "steps": steps}, mix_comment(mix))

    # 6. Save the averaged weights as a diffusers folder, the curves and the preview grid, then mark done.
    final = Backbone(models.averaged["unet"].eval(), vae, models.scheduler_config, str(out))
    save_folder(final, out)
    write_safetensors(out / "encoder.safetensors", models.averaged["encoder"].state_dict(),
                      {"tokens": str(config.tokens), "dim": str(config.cross_attention_dim), "in_channels": str(channels)})
    write_text(out / "losses.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot_losses(history, out / "loss.png", "denoising loss")
    _preview(final, models.encoder_average(), pixels, config, out / "samples.png")
    n_params = sum(p.numel() for p in final.unet.parameters())
    write_json(out / MARKER, {
        "status": "complete", "steps": steps, "steps_asked": config.steps, "images": len(pixels), "mix": mix,
        "made_in": os.path.relpath(os.getcwd(), out.resolve()),  # where the mix's relative paths start, from here
        "image_channels": channels, "unet_parameters": n_params, "space": "latent" if vae is not None else "pixel",
        "final_loss": history[-1]["loss"] if history else None, "device": str(device),
        "train_seconds": history[-1]["seconds"] if history else None,
    })
    ckpt.unlink(missing_ok=True)
    return out


@dataclass
class _Latents:
    """Every training image's latent posterior under a frozen VAE (and its mirror image's, with hflip), on the device."""

    mean: torch.Tensor  # [N, C, h, w], scaled as the UNet sees them
    std: torch.Tensor
    flipped: _Latents | None = None

    @classmethod
    @torch.no_grad()
    def encode(cls, vae: Any, pixels: torch.Tensor, hflip: bool, progress: bool) -> _Latents:
        from diffinv.progress import bar

        # As Backbone.encode scales and shifts them: what inversion and sampling will see.
        scale, shift = float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)
        means, stds = [], []
        for start in bar(range(0, len(pixels), 512), desc="encoding latents", unit="batch", disable=not progress):
            dist = vae.encode(pixels[start:start + 512]).latent_dist
            means.append((dist.mean - shift) * scale)
            stds.append(dist.std * scale)
        flipped = cls.encode(vae, pixels.flip(-1), False, progress) if hflip else None
        return cls(torch.cat(means), torch.cat(stds), flipped)

    def sample(self, idx: torch.Tensor, keys: torch.Tensor, step: int, flip: torch.Tensor | None) -> torch.Tensor:
        """[B, C, h, w] one keyed draw from each image's posterior (its mirror image's where ``flip``)."""
        mean, std = self.mean[idx], self.std[idx]
        if flip is not None and self.flipped is not None:
            mean = torch.where(flip[:, None, None, None], self.flipped.mean[idx], mean)
            std = torch.where(flip[:, None, None, None], self.flipped.std[idx], std)
        return mean + std * rng.keyed_normal(keys, step, rng.STREAM_POSTERIOR, tuple(mean.shape[1:])).to(mean.dtype)


@dataclass
class _Models:
    """What pretraining optimises (UNet and token encoder), their running average and the optimiser."""

    backbone: Backbone
    encoder: TokenEncoder
    trained: nn.ModuleDict
    averaged: nn.ModuleDict
    opt: torch.optim.Optimizer
    scheduler_config: dict

    def encoder_average(self) -> TokenEncoder:
        """The averaged token encoder, in eval mode."""
        return cast(TokenEncoder, self.averaged["encoder"].eval())

    @classmethod
    def build(cls, config: PretrainConfig, channels: int, device: torch.device, out: Path, vae: Any | None) -> _Models:
        torch.manual_seed(config.seed)
        size, unet_channels = config.resolution, channels
        if vae is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            size, unet_channels = config.resolution // factor, vae.config.latent_channels
            if config.resolution % factor or size % 2 ** (len(config.channels) - 1):
                raise PretrainError(f"--resolution {config.resolution} gives a {config.resolution / factor:g} px latent under "
                                    f"{config.vae}'s factor-{factor} VAE, which {len(config.channels)} UNet blocks cannot halve "
                                    f"evenly; use a resolution that is a multiple of {factor * 2 ** (len(config.channels) - 1)}")
        unet = build_base_unet(config.channels, size, config.layers_per_block, config.cross_attention_dim,
                               unet_channels).to(device).train()
        scheduler_config = (flow_scheduler_config(shift=config.flow_shift) if config.process == "flow"
                            else base_scheduler_config(config.beta_schedule, config.prediction_type))
        encoder = TokenEncoder(channels, config.tokens, config.cross_attention_dim).to(device).train()
        averaged = nn.ModuleDict({"unet": copy.deepcopy(unet), "encoder": copy.deepcopy(encoder)}).requires_grad_(False)
        trained = nn.ModuleDict({"unet": unet, "encoder": encoder})
        opt = torch.optim.AdamW(trained.parameters(), lr=config.lr, weight_decay=0.0)
        return cls(Backbone(unet, vae, scheduler_config, str(out)), encoder, trained, averaged, opt, scheduler_config)


def _step_loss(config: PretrainConfig, models: _Models, pixels: torch.Tensor, latents: _Latents | None,
               autocast: bool) -> Callable[[int], torch.Tensor]:
    """The loss of step ``step``: its keyed batch, what the UNet denoises and what the encoder sees."""
    device = pixels.device
    # Draws are keyed by (batch position, step): an image drawn twice in one batch still gets two noises.
    keys = torch.arange(config.batch_size, dtype=torch.int64, device=device) + config.seed * 1_000_003

    def step_loss(step: int) -> torch.Tensor:
        idx = batch_indices(config, step, len(pixels)).to(device)
        # The image itself, mirrored at random; with a VAE its latent, drawn from the posterior (of the mirror image).
        shown = denoiser_view(pixels[idx], keys, step, rng.STREAM_LATENT, config.hflip)
        x0 = shown
        if latents is not None:
            x0 = latents.sample(idx, keys, step, flips(keys, step, rng.STREAM_LATENT) if config.hflip else None)
        seen = shown if latents is not None else None  # the encoder reads pixels in either space
        if config.views == "invariant":
            seen = random_views(pixels[idx], keys, step, rng.STREAM_VIEW, strong(config.view_min_area), config.hflip)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return autoencoder_loss(models.backbone, models.encoder, x0, keys, step, config.cond_dropout, seen, config.token_noise)

    return step_loss


def train_loop(config: Any, trained: nn.Module, averaged: nn.Module, opt: torch.optim.Optimizer,
               step_loss: Callable[[int], torch.Tensor], ckpt: Path, start: int, history: list[dict], progress: bool,
               log: Callable[[str], None], desc: str) -> int:
    """Steps start..steps of a pretraining: loss, update, running average; host syncs only every log_every steps.

    ``config`` gives steps, lr, warmup, ema, log_every, checkpoint_every and max_seconds. Returns the steps run.
    """
    from diffinv.progress import bar as progress_bar

    bar = progress_bar(total=config.steps, initial=start, desc=desc, unit="step", disable=not progress)
    window = torch.zeros(())
    began = time.time() - (history[-1]["seconds"] if history else 0.0)  # seconds count across resumes
    saved = time.time()
    steps = config.steps
    for step in range(start, config.steps):
        # a. Loss, update, running average.
        for group in opt.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.steps, "constant", config.warmup)
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(averaged, trained, config.ema, step + 1)
        window = window.to(loss.device) + loss.detach()
        # b. Out of time, the log line and the checkpoint.
        done = step + 1
        out_of_time = bool(config.max_seconds) and time.time() - began >= config.max_seconds
        if out_of_time:
            steps = done  # the run ends here; it is then exactly a run of `done` steps
        if done % config.log_every == 0 or done == steps:
            _log_window(history, done, float(window), time.time() - began, config.lr, ckpt.parent)
            window.zero_()
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        # Every checkpoint_every steps, and at a logged step once CHECKPOINT_SECONDS have passed (a slow run killed
        # early keeps its work; the loss curve stays whole because windows end at logged steps).
        due = done % config.checkpoint_every == 0 or (done % config.log_every == 0 and time.time() - saved >= CHECKPOINT_SECONDS)
        if due and done < steps:
            saved = time.time()
            save_checkpoint(ckpt, {**{f"model.{k}": v for k, v in trained.state_dict().items()},
                                   **{f"ema.{k}": v for k, v in averaged.state_dict().items()}}, opt,
                            {"step": done, "history": history})
        bar.update(1)
        if out_of_time:
            log(f"stopping after {done} steps: --max-seconds {config.max_seconds:g} reached")
            break
    bar.close()
    return steps


def _log_window(history: list[dict], done: int, total: float, seconds: float, lr: float, out: Path) -> None:
    """Append the mean loss since the last entry; a non-finite one stops the run (its last checkpoint is kept)."""
    mean = total / (done - (history[-1]["step"] if history else 0))
    if not math.isfinite(mean):
        raise PretrainError(f"the loss became {mean} before step {done}; lower --lr (now {lr}) or use "
                            f"--precision fp32; the last checkpoint in {out} is kept")
    history.append({"step": done, "loss": mean, "seconds": round(seconds, 2)})


def open_pretraining(config: Any, out: Path, marker: str, noun: str, *, resume: bool, overwrite: bool, progress: bool,
                     log: Callable[[str], None]) -> tuple[str, torch.Tensor, dict[str, int]] | None:
    """Every pretraining stage's opening: the folder (fresh / resume / None when done), its config and running marker,
    then the training images (pixels, mix), the mix written at the top of config.yaml."""
    state = open_output(out, marker, config, noun=noun, resume=resume, overwrite=overwrite)
    if state == "done":
        log(f"{out} is already complete")
        return None
    write_yaml(out / "config.yaml", config_to_dict(config))
    write_json(out / marker, {"status": "running", "steps_total": config.steps})
    pixels, mix = training_pixels(config, progress)
    write_yaml(out / "config.yaml", config_to_dict(config), mix_comment(mix))
    return state, pixels, mix


def training_pixels(config: Any, progress: bool) -> tuple[torch.Tensor, dict[str, int]]:
    """[N, 3, R, R] float in [-1, 1]: every training image of ``data`` and ``extra_data``, labels ignored; and the
    images each source gave (the pretraining mix)."""
    from diffinv.data.real import load_uint8, open_images, select

    parts, mix = [], {}
    for spec, fmt in [(config.data, config.format)] + [(extra, "auto") for extra in config.extra_data]:
        images = select(open_images(spec, fmt, config.split), None, 0, config.bad_images)
        if len(images) == 0:
            raise PretrainError(f"{spec} ({config.split} split) holds no readable images to pretrain on")
        parts.append(load_uint8(images, config.resolution, progress=progress, desc=f"loading {Path(spec).name}"))
        mix[spec] = len(images)
    return torch.cat(parts).float().div(127.5).sub(1.0), mix


def mix_comment(mix: dict[str, int]) -> str:
    """The pretraining mix as comment lines for the top of config.yaml (what each source gave, never its labels)."""
    lines = [f"#   {spec}: {n:,} images" for spec, n in mix.items()]
    return "\n".join([f"pretraining mix, {sum(mix.values()):,} training images (labels unused):"] + lines)


def batch_indices(config: Any, step: int, n: int) -> torch.Tensor:
    """[B] image indices of a step: a pure function of (seed, step), so a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(rng.key_of(config.seed, f"pretrain-step/{step}"))
    return torch.randint(n, (config.batch_size,), generator=gen)


def plot_losses(history: list[dict[str, Any]], path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} (mean of {history[0]['step'] if history else 0} steps)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from diffinv.runs import atomic_write

    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


@torch.no_grad()
def _preview(backbone: Backbone, encoder: TokenEncoder, pixels: torch.Tensor, config: PretrainConfig, path: Path,
             n: int = 16) -> None:
    """Three rows of ``n``: real training images, their reconstructions from the encoder's tokens, unconditional samples."""
    from PIL import Image

    from diffinv.diffusion.sampling import pixels_to_uint8, sample_latents
    from diffinv.runs import atomic_write

    n = min(n, len(pixels))
    real = pixels[torch.linspace(0, len(pixels) - 1, n).long()]
    keys = torch.arange(n, dtype=torch.int64, device=real.device) + 7_777_777
    noise = rng.keyed_normal(keys, 0, rng.STREAM_NOISE, backbone.latent_shape(config.resolution))
    cond = encoder(real)
    recon = backbone.decode(sample_latents(backbone, cond, None, noise, sampler="ddim", steps=25, guidance=1.0))
    uncond = backbone.decode(sample_latents(backbone, torch.zeros_like(cond), None, noise, sampler="ddim", steps=25, guidance=1.0))
    rows = [pixels_to_uint8(x.expand(-1, 3, -1, -1), None) for x in (real, recon, uncond)]  # each [n, R, R, 3]
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).numpy()
    scale = max(1, 64 // config.resolution)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


def load_checkpoint(path: Path, trained: nn.Module, averaged: nn.Module,
                     opt: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    tensors, meta = read_checkpoint(path)
    try:
        trained.load_state_dict(prefixed(tensors, "model"))
        averaged.load_state_dict(prefixed(tensors, "ema"))
    except RuntimeError as exc:
        raise RunError(f"{path} does not match this configuration ({exc}); use --overwrite to start over") from exc
    load_optimiser_tensors(opt, tensors)
    return int(meta["step"]), meta["history"]


def _summary(config: PretrainConfig, out: Path) -> str:
    info = read_json(out / MARKER)
    size = sum(f.stat().st_size for f in (out / "unet").iterdir()) / 2 ** 20
    return (f"base {out}: {info['unet_parameters'] / 1e6:.2f}M-parameter {info.get('space', 'pixel')} UNet ({size:.1f} MB) "
            f"trained {info['steps']} steps on {info['images']} images, final loss {info['final_loss']:.4f}; samples in "
            f"{out / 'samples.png'}")


def _run(config: PretrainConfig, out: Path, *, resume: bool, overwrite: bool, progress: bool, log: Callable[[str], None],
         **_: Any) -> Path:
    return pretrain_base(config, out, resume=resume, overwrite=overwrite, progress=progress, log=log)


STAGE = Stage(name="pretrain-base", config=PretrainConfig, marker=MARKER, run=_run, summary=_summary,
              path_fields=("data",),
              description=("A diffusion autoencoder: a UNet2DConditionModel reading K tokens that a small encoder makes from "
                          "the image (dropped with --cond-dropout, for guidance), in pixel space or, with --vae, in the latent "
                          "space of an autoencoder from `diffinv pretrain-vae`. Saved as a diffusers folder that invert/generate "
                          "load like Stable Diffusion. Labels are never read."),
              outputs=("folder to write the base model to", "continue an interrupted pretraining from its last checkpoint",
                      "replace an existing base"))
