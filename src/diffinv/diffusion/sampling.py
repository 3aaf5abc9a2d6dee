"""The denoising loop shared by every generation method: guidance, samplers, img2img starts.

A sampler is a diffusers scheduler made by the model's noise process; this module only drives it
(the process says how to start, noise an img2img start and scale the network's input). All
randomness comes in as tensors keyed by sample identity (initial noise, DDIM's eta noise), so a
batch of samples equals the same samples made one at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffinv import rng
from diffinv.diffusion.backbone import Backbone, ModelError
from diffinv.diffusion.perturb import cfg_combine


def guided_prediction(backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                      uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Classifier-free guided UNet output [B, C, h, w].

    x [B, C, h, w]; t a scalar timestep; cond, uncond [B, L, D]. Conditional and unconditional
    halves go through the UNet as one batch. ``uncond=None`` or ``guidance == 1`` skips guidance.
    """
    t = t.reshape(1).expand(len(x)).to(x.device)
    if uncond is None or guidance == 1.0:
        return backbone.predict(x, t, cond)
    both = backbone.predict(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
    cond_out, uncond_out = both.chunk(2)
    return cfg_combine(uncond_out, cond_out, guidance)


def img2img_steps(steps: int, strength: float) -> int:
    """Denoising steps img2img runs at ``strength`` of a ``steps``-step schedule (diffusers' rule: rounded down).

    So the strength acts in multiples of 1 / steps: at 4 steps, 0.5 and 0.7 both run 2.
    """
    return min(int(steps * strength), steps)


@torch.no_grad()
def sample_latents(backbone: Backbone, cond: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor, *,
                   sampler: str, steps: int, guidance: float, keys: torch.Tensor | None = None, eta: float = 0.0,
                   start: torch.Tensor | None = None, strength: float = 1.0, clip_x0: bool = False) -> torch.Tensor:
    """Denoise a batch: clean latents [B, C, h, w].

    cond, uncond [B, L, D]; noise [B, C, h, w] standard normal, keyed by sample. Without ``start``
    sampling begins from pure noise (text-to-image). With ``start`` (clean latents [B, C, h, w])
    it is SDEdit / img2img: ``start`` is noised to the ``strength`` fraction of the schedule
    and only the remaining steps run. ``keys`` [B] feed DDIM's per-step noise when ``eta > 0``.
    ``clip_x0`` clips each step's clean-image prediction to [-1, 1] (pixel models only).
    """
    device = backbone.device
    noise = noise.to(device)
    cond = cond.to(device)
    uncond = uncond.to(device) if uncond is not None else None

    # 1. A fresh scheduler and its timesteps (schedulers keep per-run state, so never share one).
    process = backbone.process
    scheduler = backbone.make_scheduler(sampler, clip_x0)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps

    # 2. Starting latents: pure noise, or a real latent noised to `strength` (diffusers' img2img rule).
    if start is None:
        x = process.initial(scheduler, noise)
    else:
        t_start = steps - img2img_steps(steps, strength)
        timesteps = timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        x = process.partial(scheduler, start.to(device), noise, timesteps[:1].repeat(len(noise)))

    # 3. The loop: guided prediction, then one scheduler step. No host synchronisation here.
    stochastic = eta > 0 and process.stochastic(sampler)
    if eta > 0 and not stochastic:
        raise ModelError(f"--eta {eta:g} is DDIM's per-step noise; the {sampler} sampler of this {process.name} model has none: "
                         f"leave --eta out")
    for i, t in enumerate(timesteps):
        out = guided_prediction(backbone, process.model_input(scheduler, x, t), t, cond, uncond, guidance)
        extra = {}
        if stochastic:
            assert keys is not None, "a stochastic sampler draws its noise from the images' keys"
            extra = {"eta": eta, "variance_noise": rng.keyed_normal(keys.to(device), 1 + i, rng.STREAM_SAMPLER, tuple(x.shape[1:]))}
        x = scheduler.step(out, t, x, return_dict=False, **extra)[0]
    return x


def unit_rms(noise: torch.Tensor) -> torch.Tensor:
    """noise [B, ...] rescaled so that each sample's root mean square is exactly 1.

    A Gaussian draw in d dimensions has RMS 1 +- 1/sqrt(2d); this keeps its direction and
    removes only that spread, which small pixel models' first denoising steps amplify.
    """
    rms = noise.flatten(1).pow(2).mean(1).sqrt()
    return noise / rms.view(-1, *([1] * (noise.dim() - 1)))


def grey_of(pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, H, W] -> the same with R = G = B = their mean (variants of grey data carry no colour)."""
    return pixels.float().mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)


def pixels_to_uint8(pixels: torch.Tensor, size: int | None) -> torch.Tensor:
    """pixels [B, 3, H, W] in [-1, 1] -> uint8 [B, H', W', 3] on the CPU, resized to ``size`` (bicubic, antialiased)."""
    if size is not None and size != pixels.shape[-1]:
        pixels = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def invert_to_noise(backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
    """The start noise [B, C, h, w] from which ``steps`` deterministic sampler steps (DDIM at eta 0; a flow's Euler
    steps), unguided, under ``cond`` return ``latents``: the model's noise process runs its sampler backwards."""
    cond = cond.to(backbone.device)

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_prediction(backbone, x, t, cond, None, 1.0)

    return backbone.process.invert(predict, latents.to(backbone.device), steps)


def slerp_noise(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation of whole rows of a and b [B, ...] at weight w (scalar or [B]; 0: a, 1: b): noises keep their
    size. (:func:`~diffinv.diffusion.perturb.slerp` is the per-token one for embeddings, their norms interpolated.)"""
    fa, fb = a.flatten(1), b.flatten(1)
    w = torch.as_tensor(w, dtype=fa.dtype, device=fa.device).reshape(-1, 1).expand(len(fa), 1)
    cos = (fa * fb).sum(1, keepdim=True) / (fa.norm(dim=1, keepdim=True) * fb.norm(dim=1, keepdim=True)).clamp_min(1e-12)
    theta = cos.clamp(-1, 1).acos()
    straight = theta < 1e-4  # nearly parallel: the arc is the chord
    sin = torch.where(straight, torch.ones_like(theta), theta.sin())
    arc = ((1 - w) * theta).sin() / sin * fa + (w * theta).sin() / sin * fb
    return torch.where(straight, (1 - w) * fa + w * fb, arc).reshape(a.shape)
