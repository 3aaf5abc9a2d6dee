"""The denoising objective as pure tensor functions: forward noising, targets, losses, keyed draws.

Shared by inversion (which optimises the conditioning) and pretraining (which optimises the
UNet); nothing here knows about files, configs or stages.
"""

from __future__ import annotations

import torch

from diffinv import rng
from diffinv.diffusion.backbone import Backbone, LatentMoments
from diffinv.errors import UserError


class ObjectiveError(UserError, ValueError):
    """The model asks for something the objective does not support (e.g. an unknown prediction type)."""


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion x_t = sqrt(a) x0 + sqrt(1 - a) noise; x0, noise [B, ...], alpha_bar [B]."""
    a = alpha_bar.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def denoising_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet is trained to output: epsilon, or v = sqrt(a) noise - sqrt(1 - a) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alpha_bar.view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ObjectiveError(f"prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")


def per_image_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image: [B, ...] x2 -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def init_embeddings(keys: torch.Tensor, tokens: int, dim: int, std: float) -> torch.Tensor:
    """Keyed N(0, std^2) starting point [B, K, D] for each image's conditioning."""
    return rng.keyed_normal(keys, 0, rng.STREAM_INIT, (tokens, dim)) * std


def training_draws(keys: torch.Tensor, step: int, moments: LatentMoments, num_timesteps: int,
                   sample_latent: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's random draws for each image: clean latent x0, noise [B, C, h, w], timestep t [B]."""
    shape = tuple(moments.mean.shape[1:])
    x0 = moments.mean
    if sample_latent:
        x0 = x0 + moments.std * rng.keyed_normal(keys, step, rng.STREAM_LATENT, shape)
    noise = rng.keyed_normal(keys, step, rng.STREAM_NOISE, shape)
    t = rng.keyed_randint(keys, step, rng.STREAM_TIMESTEP, num_timesteps)
    return x0, noise, t


@torch.no_grad()
def evaluation_loss(backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, keys: torch.Tensor,
                    n_timesteps: int = 8) -> torch.Tensor:
    """Deterministic denoising loss [B] of conditioning cond [B, K, D] on clean latents [B, C, h, w].

    Averaged over ``n_timesteps`` evenly spaced timesteps with keyed noise, so two
    conditionings of the same images are compared on identical draws.
    """
    T = backbone.num_train_timesteps
    total = torch.zeros(latents.shape[0], device=latents.device)
    for j in range(n_timesteps):
        t = torch.full((latents.shape[0],), int((j + 0.5) * T / n_timesteps), device=latents.device, dtype=torch.long)
        noise = rng.keyed_normal(keys, j, rng.STREAM_EVAL, tuple(latents.shape[1:]))
        a = backbone.alphas_cumprod[t]
        pred = backbone.predict_noise(q_sample(latents, noise, a), t, cond)
        total += per_image_loss(pred, denoising_target(latents, noise, a, backbone.prediction_type))
    return total / n_timesteps
