"""Pretraining the project's own base generator: the parts and the maths (the run is :mod:`diffinv.stages.pretrain`).

A diffusion autoencoder (Preechakul et al. 2022): a small convolutional encoder turns each
training image into K tokens that the UNet reads through cross-attention, trained jointly on
the denoising loss; with probability ``cond_dropout`` the tokens are zeroed so that the model
also learns an unconditional mode (needed for classifier-free guidance). Only the UNet is what
inversion uses: each real image's tokens are then learned directly, as for Stable Diffusion.
The encoder is saved beside it (``encoder.safetensors``); ``invert --init encoder`` starts from its tokens.

A base is in pixel space, or, as Stable Diffusion, in the latent space of an autoencoder
(:func:`build_vae`, trained first on :func:`vae_loss`): the UNet then denoises latents while the
token encoder still reads pixels. Labels are never read; the configs refuse a test split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffinv import rng
from diffinv.config import BETA_SCHEDULES
from diffinv.diffusion.backbone import SCHEDULER_DEFAULTS, Backbone
from diffinv.diffusion.encoder import TokenEncoder
from diffinv.diffusion.objective import denoising_losses
from diffinv.errors import UserError


class PretrainError(UserError, RuntimeError):
    """Pretraining cannot go on (NaN loss, nothing to train on); the message says what to change."""


# ----------------------------------------------------------------------------- parts and pure maths


def build_base_unet(channels: list[int] | tuple[int, ...], resolution: int, layers_per_block: int, cross_attention_dim: int,
                    image_channels: int = 3):
    """A diffusers ``UNet2DConditionModel`` in pixel space with cross-attention at every level (``channels`` per level)."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=image_channels, out_channels=image_channels,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(channels), down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=min(32, channels[0] // 2),
    )


def build_vae(channels: list[int] | tuple[int, ...], layers_per_block: int, latent_channels: int, resolution: int,
              image_channels: int = 3):
    """A diffusers ``AutoencoderKL``: one halving per block after the first (factor 2^(n-1)), mid-block attention as SD's."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=image_channels, out_channels=image_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=min(32, channels[0] // 2), sample_size=resolution,
    )


def vae_loss(vae, x: torch.Tensor, keys: torch.Tensor, step: int, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean |x - reconstruction|): Stable Diffusion's VAE objective without its perceptual and adversarial terms.

    x [B, C, H, W] pixels in [-1, 1]; the latent is drawn from the posterior with keyed noise (keys [B]
    with ``step``). Per image, the summed L1 pixel error plus ``kl_weight`` times the summed KL to N(0, I),
    divided by the pixel count so the loss reads as a mean pixel error.
    """
    posterior = vae.encode(x).latent_dist
    eps = rng.keyed_normal(keys, step, rng.STREAM_POSTERIOR, tuple(posterior.mean.shape[1:])).to(posterior.mean.dtype)
    recon = vae.decode(posterior.mean + posterior.std * eps, return_dict=False)[0]
    l1 = (recon.float() - x.float()).abs().flatten(1).sum(1)
    kl = posterior.kl().float()  # [B], summed over the latent
    pixels = x[0].numel()
    return ((l1 + kl_weight * kl) / pixels).mean(), l1.mean().detach() / pixels


@torch.no_grad()
def latent_scale(means: torch.Tensor) -> float:
    """The scaling factor that gives latents unit variance: 1 / std of latent means [N, C, h, w] (SD's 0.18215 rule)."""
    return float(1.0 / means.float().std().clamp_min(1e-8))


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


def base_scheduler_config(beta_schedule: str, prediction_type: str) -> dict[str, Any]:
    """The diffusers scheduler settings a base is trained with and saved with (SD's unless asked otherwise)."""
    start, end = BETA_SCHEDULES[beta_schedule]
    return {**SCHEDULER_DEFAULTS, "beta_schedule": beta_schedule, "beta_start": start, "beta_end": end,
            "prediction_type": prediction_type}


def autoencoder_loss(backbone: Backbone, encoder: TokenEncoder, x0: torch.Tensor, keys: torch.Tensor, step: int,
                     cond_dropout: float, encoder_input: torch.Tensor | None = None, token_noise: float = 0.0) -> torch.Tensor:
    """Mean denoising loss (scalar) of the UNet conditioned on the encoder's tokens.

    x0 [B, C, h, w] clean latents (pixels in [-1, 1] for a pixel model) that the UNet denoises;
    ``encoder_input`` [B, C, H, W] what the encoder sees (default x0 itself: an autoencoder; another
    view of the same images makes the tokens invariant to what differs between the views);
    ``token_noise`` the std of keyed Gaussian noise added to the tokens. keys [B] int64 key every
    draw (noise, timestep, dropout, token noise) with ``step``, so the loss is a pure function of its inputs.
    """
    shape = tuple(x0.shape[1:])
    noise = rng.keyed_normal(keys, step, rng.STREAM_NOISE, shape)
    t = rng.keyed_randint(keys, step, rng.STREAM_TIMESTEP, backbone.num_train_timesteps)
    keep = (rng.keyed_uniform(keys, step, rng.STREAM_DROPOUT, (1,))[:, 0] >= cond_dropout).to(x0.dtype)
    cond = encoder(x0 if encoder_input is None else encoder_input)  # a latent base's encoder reads pixels: always given
    if token_noise > 0:
        cond = cond + token_noise * rng.keyed_normal(keys, step, rng.STREAM_TOKEN_NOISE, tuple(cond.shape[1:])).to(cond.dtype)
    cond = cond * keep[:, None, None]
    return denoising_losses(backbone, x0, noise, t, cond).mean()


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


def is_grey(pixels: torch.Tensor) -> bool:
    """Whether every image of pixels [N, 3, H, W] has R = G = B everywhere."""
    return bool((pixels[:, 0] == pixels[:, 1]).all() and (pixels[:, 1] == pixels[:, 2]).all())
