"""Pretraining a small base generator whose conditioning space carries the image.

A diffusion autoencoder (Preechakul et al. 2022): a small convolutional encoder turns each
training image into K tokens that the UNet reads through cross-attention, trained jointly on
the denoising loss; with probability ``cond_dropout`` the tokens are zeroed so that the model
also learns an unconditional mode (needed for classifier-free guidance). Only the UNet is kept:
at inversion time each image's tokens are learned directly, as for Stable Diffusion.
"""

from __future__ import annotations

import torch
from torch import nn

from diffinv.diffusion import rng
from diffinv.diffusion.backbone import Backbone, LatentMoments
from diffinv.diffusion.inversion import denoising_target, per_image_loss, q_sample, training_draws


class TokenEncoder(nn.Module):
    """pixels/latents [B, C, H, W] -> conditioning tokens [B, K, D]."""

    def __init__(self, in_channels: int, tokens: int, dim: int, width: int = 64):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, tokens * dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, self.tokens, self.dim)


def pretrain_autoencoder(backbone: Backbone, pixels: torch.Tensor, *, steps: int, tokens: int = 5, batch_size: int = 32,
                         lr: float = 1e-3, cond_dropout: float = 0.1, seed: int = 0) -> tuple[TokenEncoder, list[float]]:
    """Train ``backbone.unet`` (in place) and a new :class:`TokenEncoder` on images [N, 3, R, R].

    Returns the encoder and the per-step training losses. Draws are keyed by (seed, step), so
    a run is reproducible.
    """
    device = backbone.device
    moments = backbone.encode(pixels)
    latents = moments.mean
    encoder = TokenEncoder(latents.shape[1], tokens, backbone.cond_dim).to(device)
    unet = backbone.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(encoder.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=gen).to(device)
        keys = idx + seed * 1_000_003
        x0, noise, t = training_draws(keys, step, LatentMoments(latents[idx], moments.std[idx]), backbone.num_train_timesteps,
                                      sample_latent=False)
        keep = (rng.keyed_uniform(keys, step, rng.STREAM_DROPOUT, (1,))[:, 0] >= cond_dropout).float()
        cond = encoder(x0) * keep[:, None, None]
        a = backbone.alphas_cumprod[t]
        loss = per_image_loss(backbone.predict_noise(q_sample(x0, noise, a), t, cond),
                              denoising_target(x0, noise, a, backbone.prediction_type)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unet.eval().requires_grad_(False)
    return encoder.eval(), losses
