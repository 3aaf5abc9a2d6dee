"""Pretraining the project's own base generator, whose conditioning space carries the image.

A diffusion autoencoder (Preechakul et al. 2022): a small convolutional encoder turns each
training image into K tokens that the UNet reads through cross-attention, trained jointly on
the denoising loss; with probability ``cond_dropout`` the tokens are zeroed so that the model
also learns an unconditional mode (needed for classifier-free guidance). Only the UNet is what
inversion uses: each real image's tokens are then learned directly, as for Stable Diffusion.
The encoder is saved beside it (``encoder.safetensors``) but nothing downstream needs it.

Labels are never read; the config refuses a test split.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from diffinv.config import BETA_SCHEDULES, PretrainConfig, config_to_dict
from diffinv.diffusion import rng
from diffinv.diffusion.backbone import SCHEDULER_DEFAULTS, Backbone, resolve_device, save_folder, slow_bf16_warning
from diffinv.diffusion.inversion import denoising_target, per_image_loss, q_sample
from diffinv.diffusion.views import denoiser_view, random_views, strong
from diffinv.runs import RunError, open_output, write_json, write_safetensors, write_text, write_yaml

MARKER = "pretrain.json"


class PretrainError(RuntimeError):
    """Pretraining cannot go on (NaN loss, nothing to train on); the message says what to change."""


# ----------------------------------------------------------------------------- parts and pure maths


class TokenEncoder(nn.Module):
    """pixels/latents [B, C, H, W] -> conditioning tokens [B, K, D].

    The tokens are layer-normalised (no affine), so every token has unit scale per element: the
    scale at which inversion initialises c_i (N(0, 1)) and at which generation's sigma = 0.1 is a
    small step, as for Stable Diffusion's text embeddings.
    """

    def __init__(self, in_channels: int, tokens: int, dim: int, width: int = 64):
        super().__init__()
        self.in_channels, self.tokens, self.dim = in_channels, tokens, dim
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, tokens * dim),
        )
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1 and x.shape[1] == 3:  # a grey base given RGB pixels (as inversion loads them)
            x = x.mean(dim=1, keepdim=True)
        return self.norm(self.net(x).view(-1, self.tokens, self.dim))


def load_encoder(model: str | Path) -> TokenEncoder:
    """The token encoder a ``pretrain-base`` folder saved beside its UNet (for ``invert --init encoder``)."""
    from safetensors import safe_open

    path = Path(model) / "encoder.safetensors"
    if not path.is_file():
        raise RunError(f"--init encoder needs the encoder that `diffinv pretrain-base` saves ({path} does not exist); "
                       f"use --init random with other models")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    encoder = TokenEncoder(int(meta.get("in_channels", 3)), int(meta["tokens"]), int(meta["dim"]))
    encoder.load_state_dict(load_file(str(path)))
    return encoder.eval().requires_grad_(False)


def build_base_unet(config: PretrainConfig, image_channels: int = 3):
    """A diffusers ``UNet2DConditionModel`` in pixel space with cross-attention at every level."""
    from diffusers import UNet2DConditionModel

    n = len(config.channels)
    return UNet2DConditionModel(
        sample_size=config.resolution, in_channels=image_channels, out_channels=image_channels,
        layers_per_block=config.layers_per_block,
        block_out_channels=tuple(config.channels), down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=8, norm_num_groups=min(32, config.channels[0] // 2),
    )


def base_scheduler_config(config: PretrainConfig) -> dict[str, Any]:
    """The diffusers scheduler settings a base is trained with and saved with (SD's unless asked otherwise)."""
    start, end = BETA_SCHEDULES[config.beta_schedule]
    return {**SCHEDULER_DEFAULTS, "beta_schedule": config.beta_schedule, "beta_start": start, "beta_end": end,
            "prediction_type": config.prediction_type}


def autoencoder_loss(backbone: Backbone, encoder: TokenEncoder, x0: torch.Tensor, keys: torch.Tensor, step: int,
                     cond_dropout: float, encoder_input: torch.Tensor | None = None, token_noise: float = 0.0) -> torch.Tensor:
    """Mean denoising loss (scalar) of the UNet conditioned on the encoder's tokens.

    x0 [B, C, H, W] clean latents (pixels in [-1, 1] for a pixel model) that the UNet denoises;
    ``encoder_input`` [B, C, H, W] what the encoder sees (default x0 itself: an autoencoder; another
    view of the same images makes the tokens invariant to what differs between the views);
    ``token_noise`` the std of keyed Gaussian noise added to the tokens. keys [B] int64 key every
    draw (noise, timestep, dropout, token noise) with ``step``, so the loss is a pure function of its inputs.
    """
    shape = tuple(x0.shape[1:])
    noise = rng.keyed_normal(keys, step, rng.STREAM_NOISE, shape)
    t = rng.keyed_randint(keys, step, rng.STREAM_TIMESTEP, backbone.num_train_timesteps)
    keep = (rng.keyed_uniform(keys, step, rng.STREAM_DROPOUT, (1,))[:, 0] >= cond_dropout).to(x0.dtype)
    cond = encoder(x0 if encoder_input is None else encoder_input)
    if token_noise > 0:
        cond = cond + token_noise * rng.keyed_normal(keys, step, rng.STREAM_TOKEN_NOISE, tuple(cond.shape[1:])).to(cond.dtype)
    cond = cond * keep[:, None, None]
    a = backbone.alphas_cumprod[t]
    pred = backbone.predict_noise(q_sample(x0, noise, a), t, cond)
    return per_image_loss(pred, denoising_target(x0, noise, a, backbone.prediction_type)).mean()


def ema_weight(decay: float, updates: int) -> float:
    """Weight of the newest weights in a bias-corrected average after ``updates`` updates (1, 2, ...).

    A plain average started from the initial weights keeps decay^n of them: 22% of a run of 1,500
    steps at decay 0.999, whose samples were then pure noise. Correcting for that, as Adam corrects
    its moments, averages only the trained iterates: lerp weight (1 - d) / (1 - d^n), 1 at the first.
    """
    return 1.0 if decay == 0 else (1.0 - decay) / (1.0 - decay**updates)


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float, updates: int = 10**9) -> None:
    """Bias-corrected moving average: average <- lerp(average, model, :func:`ema_weight`) (buffers copied).

    ``updates`` counts this update (1 for the first); the default is the uncorrected average.
    """
    # One fused call rather than a kernel per parameter: on a GPU a small base's step is launch-bound.
    torch._foreach_lerp_(list(average.parameters()), [p.detach() for p in model.parameters()], ema_weight(decay, updates))
    for ba, bm in zip(average.buffers(), model.buffers()):
        ba.copy_(bm)


def warmup_lr(step: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


def pretrain_autoencoder(backbone: Backbone, pixels: torch.Tensor, *, steps: int, tokens: int = 5, batch_size: int = 32,
                         lr: float = 1e-3, cond_dropout: float = 0.1, seed: int = 0) -> tuple[TokenEncoder, list[float]]:
    """Train ``backbone.unet`` (in place) and a new :class:`TokenEncoder` on images [N, 3, R, R], in memory.

    The quick form used by tests and benchmarks (no EMA, no files). Returns the encoder and the
    per-step losses; draws are keyed by (seed, step), so a run is reproducible.
    """
    device = backbone.device
    latents = backbone.encode(pixels).mean
    encoder = TokenEncoder(latents.shape[1], tokens, backbone.cond_dim).to(device)
    unet = backbone.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(encoder.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=gen).to(device)
        loss = autoencoder_loss(backbone, encoder, latents[idx], idx + seed * 1_000_003, step, cond_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unet.eval().requires_grad_(False)
    return encoder.eval(), losses


# ----------------------------------------------------------------------------- the run


def pretrain_base(config: PretrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Pretrain a base model and write it to ``out`` as a diffusers folder that ``load_backbone`` reads.

    ``out`` also gets ``config.yaml``, ``losses.jsonl`` (mean loss per ``log_every`` steps),
    ``loss.png``, ``samples.png`` (real images, their reconstructions from the encoder's tokens,
    unconditional samples), ``encoder.safetensors`` and ``pretrain.json``. A checkpoint is
    written every ``checkpoint_every`` steps; ``resume`` continues it to the same weights as an
    uninterrupted run (batches and draws are keyed by (seed, step)).
    """
    from tqdm import tqdm

    out = Path(out)
    device = resolve_device(config.device)
    autocast = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if autocast and (warning := slow_bf16_warning(torch.bfloat16, device)):
        log(f"warning: {warning}")

    # 1. The output folder: fresh, resumed (same settings only) or already done.
    state = open_output(out, MARKER, config, noun="base", resume=resume, overwrite=overwrite)
    if state == "done":
        log(f"{out} is already complete")
        return out
    write_yaml(out / "config.yaml", config_to_dict(config))
    write_json(out / MARKER, {"status": "running", "steps_total": config.steps})

    # 2. Unlabeled training images as pixels in [-1, 1] on the device, one channel for grey data.
    pixels = _training_pixels(config, progress)
    channels = config.image_channels or (1 if is_grey(pixels) else 3)
    pixels = (pixels[:, :1] if channels == 1 else pixels).to(device)

    # 3. Model, encoder, their average and the optimiser; everything seeded.
    torch.manual_seed(config.seed)
    unet = build_base_unet(config, channels).to(device).train()
    scheduler_config = base_scheduler_config(config)
    backbone = Backbone(unet, None, scheduler_config, str(out))
    encoder = TokenEncoder(channels, config.tokens, config.cross_attention_dim).to(device).train()
    averaged = nn.ModuleDict({"unet": copy.deepcopy(unet), "encoder": copy.deepcopy(encoder)}).requires_grad_(False)
    trained = nn.ModuleDict({"unet": unet, "encoder": encoder})
    opt = torch.optim.AdamW(trained.parameters(), lr=config.lr, weight_decay=0.0)

    # 4. Resume: weights, average, Adam moments, the loss history.
    ckpt = out / "checkpoint.safetensors"
    start, history = 0, []
    if state == "resume" and ckpt.is_file():
        start, history = _load_checkpoint(ckpt, trained, averaged, opt)
        log(f"resuming {out} at step {start}/{config.steps}")

    # 5. The loop: keyed batch, loss, step, average; sync with the host only every log_every steps.
    bar = tqdm(total=config.steps, initial=start, desc="pretrain", unit="step", disable=not progress)
    window = torch.zeros((), device=device)
    began = time.time() - (history[-1]["seconds"] if history else 0.0)  # seconds count across resumes
    # Draws are keyed by (batch position, step): an image drawn twice in one batch still gets two noises.
    keys = torch.arange(config.batch_size, dtype=torch.int64, device=device) + config.seed * 1_000_003
    steps, done = config.steps, start
    for step in range(start, config.steps):
        # 5a. The step's images: what the UNet denoises, and what the encoder sees (the same, or another view).
        idx = _batch(config, step, len(pixels)).to(device)
        x0 = denoiser_view(pixels[idx], keys, step, rng.STREAM_LATENT, config.hflip)
        seen = None
        if config.views == "invariant":
            seen = random_views(pixels[idx], keys, step, rng.STREAM_VIEW, strong(config.view_min_area), config.hflip)
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, config.warmup, config.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = autoencoder_loss(backbone, encoder, x0, keys, step, config.cond_dropout, seen, config.token_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(averaged, trained, config.ema, step + 1)
        window += loss.detach()
        done = step + 1
        out_of_time = bool(config.max_seconds) and time.time() - began >= config.max_seconds
        if out_of_time:
            steps = done  # the run ends here; it is then exactly a run of `done` steps
        if done % config.log_every == 0 or done == steps:
            n = done - (history[-1]["step"] if history else 0)
            mean = float(window) / n
            if not math.isfinite(mean):
                raise PretrainError(f"the loss became {mean} before step {done}; lower --lr (now {config.lr}) or use "
                                    f"--precision fp32; the last checkpoint in {out} is kept")
            history.append({"step": done, "loss": mean, "seconds": round(time.time() - began, 2)})
            window.zero_()
            bar.set_postfix(loss=f"{mean:.4f}")
        if done % config.checkpoint_every == 0 and done < steps:
            _save_checkpoint(ckpt, trained, averaged, opt, done, history)
        bar.update(1)
        if out_of_time:
            log(f"stopping after {done} steps: --max-seconds {config.max_seconds:g} reached")
            break
    bar.close()
    if steps != config.steps:
        write_yaml(out / "config.yaml", {**config_to_dict(config), "steps": steps})

    # 6. Save the averaged weights as a diffusers folder, the curves and the preview grid, then mark done.
    final = Backbone(averaged["unet"].eval(), None, scheduler_config, str(out))
    save_folder(final, out)
    write_safetensors(out / "encoder.safetensors", averaged["encoder"].state_dict(),
                      {"tokens": str(config.tokens), "dim": str(config.cross_attention_dim), "in_channels": str(channels)})
    write_text(out / "losses.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    _plot_losses(history, out / "loss.png")
    _preview(final, averaged["encoder"].eval(), pixels, config, out / "samples.png")
    n_params = sum(p.numel() for p in final.unet.parameters())
    write_json(out / MARKER, {
        "status": "complete", "steps": steps, "steps_asked": config.steps, "images": len(pixels), "image_channels": channels,
        "unet_parameters": n_params,
        "final_loss": history[-1]["loss"] if history else None, "device": str(device),
        "train_seconds": history[-1]["seconds"] if history else None,
    })
    ckpt.unlink(missing_ok=True)
    return out


def _training_pixels(config: PretrainConfig, progress: bool) -> torch.Tensor:
    """[N, 3, R, R] float in [-1, 1]: every training image of ``data`` and ``extra_data``, labels ignored."""
    from diffinv.data.real import load_uint8, open_images, select

    parts = []
    for spec, fmt in [(config.data, config.format)] + [(extra, "auto") for extra in config.extra_data]:
        images = select(open_images(spec, fmt, config.split), None, 0, config.bad_images)
        if len(images) == 0:
            raise PretrainError(f"{spec} ({config.split} split) holds no readable images to pretrain on")
        parts.append(load_uint8(images, config.resolution, progress=progress, desc=f"loading {Path(spec).name}"))
    return torch.cat(parts).float().div(127.5).sub(1.0)


def is_grey(pixels: torch.Tensor) -> bool:
    """Whether every image of pixels [N, 3, H, W] has R = G = B everywhere."""
    return bool((pixels[:, 0] == pixels[:, 1]).all() and (pixels[:, 1] == pixels[:, 2]).all())


def _batch(config: PretrainConfig, step: int, n: int) -> torch.Tensor:
    """[B] image indices of a step: a pure function of (seed, step), so a resumed run sees the same batches."""
    gen = torch.Generator().manual_seed(rng.key_of(config.seed, f"pretrain-step/{step}"))
    return torch.randint(n, (config.batch_size,), generator=gen)


def _save_checkpoint(path: Path, trained: nn.Module, averaged: nn.Module, opt: torch.optim.Optimizer, step: int,
                     history: list[dict[str, Any]]) -> None:
    """One atomic file: weights, their average, Adam's moments, the step and the loss history."""
    tensors = {f"model.{k}": v for k, v in trained.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in averaged.state_dict().items()})
    for i, p in enumerate(trained.parameters()):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                tensors[f"adam.{i}.{name}"] = st[name]
    adam_step = next((float(s["step"]) for s in opt.state.values() if "step" in s), 0.0)
    write_safetensors(path, tensors, {"step": str(step), "adam_step": str(adam_step), "history": json.dumps(history)})


def _load_checkpoint(path: Path, trained: nn.Module, averaged: nn.Module,
                     opt: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    from safetensors import safe_open

    device = next(trained.parameters()).device
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        trained.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        averaged.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    except RuntimeError as exc:
        raise RunError(f"{path} does not match this configuration ({exc}); use --overwrite to start over") from exc
    for i, p in enumerate(trained.parameters()):
        if f"adam.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(float(meta["adam_step"])),
                            "exp_avg": tensors[f"adam.{i}.exp_avg"].to(device),
                            "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(device)}
    return int(meta["step"]), json.loads(meta["history"])


def _plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"denoising loss (mean of {history[0]['step'] if history else 0} steps)")
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

    from diffinv.diffusion.sampling import sample_latents, to_uint8
    from diffinv.runs import atomic_write

    n = min(n, len(pixels))
    real = pixels[torch.linspace(0, len(pixels) - 1, n).long()]
    keys = torch.arange(n, dtype=torch.int64, device=real.device) + 7_777_777
    noise = rng.keyed_normal(keys, 0, rng.STREAM_NOISE, tuple(real.shape[1:]))
    cond = encoder(real)
    recon = sample_latents(backbone, cond, None, noise, sampler="ddim", steps=25, guidance=1.0)
    uncond = sample_latents(backbone, torch.zeros_like(cond), None, noise, sampler="ddim", steps=25, guidance=1.0)
    rows = [to_uint8(x.expand(-1, 3, -1, -1), None) for x in (real, recon.clamp(-1, 1), uncond.clamp(-1, 1))]  # each [n, R, R, 3]
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).numpy()
    scale = max(1, 64 // config.resolution)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    atomic_write(path, lambda p: img.save(p, format="PNG"))
