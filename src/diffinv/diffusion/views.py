"""Keyed random views of a batch of images, for pretraining a base whose conditioning is lossy.

Stable Diffusion's conditioning (a text embedding) cannot pin a 64x64x4 latent: it says what is
in the picture, and the model fills in pose, framing and colour from what it learnt elsewhere.
A base trained as a plain diffusion autoencoder (the encoder sees the very image the UNet
denoises) learns the opposite, tokens that hold the whole image. With :func:`encoder_view` the
encoder sees a strongly augmented view while the UNet denoises :func:`denoiser_view`, an
independently drawn mild view of the same image, so the tokens can only carry what survives
the augmentation (content) and the UNet must learn to supply the rest.

Every draw is a pure function of (key, step, stream), like the rest of the project's randomness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffinv import rng


@dataclass(frozen=True)
class ViewStrength:
    """Ranges of one kind of view. ``min_area``: smallest crop (fraction of the image's area)."""

    min_area: float = 1.0
    max_aspect: float = 1.0  # crops' aspect ratio in [1/max_aspect, max_aspect]
    rotate_deg: float = 0.0
    brightness: float = 0.0  # added, in [-1, 1] pixel units
    contrast: float = 0.0  # factor in [1 - c, 1 + c] around each image's mean
    saturation: float = 0.0  # factor in [1 - s, 1 + s] away from the image's grey (RGB only)


def strong(min_area: float) -> ViewStrength:
    """The encoder's view: crop, small rotation, colour jitter (SimCLR-like but milder, for small images)."""
    return ViewStrength(min_area=min_area, max_aspect=4 / 3, rotate_deg=12.0, brightness=0.2, contrast=0.3, saturation=0.4)


def random_views(x: torch.Tensor, keys: torch.Tensor, step: int, stream: int, strength: ViewStrength,
                 hflip: bool) -> torch.Tensor:
    """One random view per image: x [B, C, H, W] in [-1, 1] -> [B, C, H, W] in [-1, 1].

    Geometry is one affine resampling (crop + flip + rotation, bilinear, border-padded); then
    brightness, contrast and saturation. keys [B] int64 with ``step`` and ``stream`` key every draw.
    """
    u = rng.keyed_uniform(keys.to(x.device), step, stream, (8,)).to(x.dtype)  # [B, 8]

    # 1. Geometry: crop of area a and aspect r at a random place, flipped and rotated, as one affine map
    #    from output coordinates to input coordinates (affine_grid's [-1, 1] convention).
    area = strength.min_area + (1 - strength.min_area) * u[:, 0]
    log_r = math.log(strength.max_aspect) * (2 * u[:, 1] - 1)
    sx = (area * log_r.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (1 - sx) * (2 * u[:, 2] - 1)
    cy = (1 - sy) * (2 * u[:, 3] - 1)
    flip = torch.where((u[:, 4] < 0.5) & hflip, -1.0, 1.0).to(x.dtype)
    angle = math.radians(strength.rotate_deg) * (2 * u[:, 5] - 1)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([sx * flip * cos, -sy * sin, cx], 1),
                         torch.stack([sx * flip * sin, sy * cos, cy], 1)], 1)  # [B, 2, 3]
    identity = (area == 1) & (flip == 1) & (angle == 0)
    if not bool(identity.all()):
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = torch.where(identity[:, None, None, None], x, moved)

    # 2. Colour: brightness shift, contrast around the image's mean, saturation away from its grey.
    if strength.brightness or strength.contrast or strength.saturation:
        x = x + (strength.brightness * (2 * u[:, 6] - 1))[:, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * (1 + strength.contrast * (2 * u[:, 7] - 1))[:, None, None, None]
        if x.shape[1] == 3 and strength.saturation:
            sat = 1 + strength.saturation * (2 * rng.keyed_uniform(keys.to(x.device), step, stream + 100, (1,))[:, 0] - 1)
            grey = x.mean(dim=1, keepdim=True)
            x = grey + (x - grey) * sat.to(x.dtype)[:, None, None, None]
    return x.clamp(-1, 1)


def denoiser_view(x: torch.Tensor, keys: torch.Tensor, step: int, stream: int, hflip: bool) -> torch.Tensor:
    """The image the UNet learns to denoise: the image itself, flipped at random when ``hflip``.

    Kept natural on purpose (no resampling blur, no colour shifts): it is what samples will look like.
    """
    if not hflip:
        return x
    return torch.where(flips(keys.to(x.device), step, stream)[:, None, None, None], x.flip(-1), x)


def flips(keys: torch.Tensor, step: int, stream: int) -> torch.Tensor:
    """[B] bool: which images :func:`denoiser_view` flips (a latent base picks its flipped images' latents with it)."""
    return rng.keyed_uniform(keys, step, stream, (1,))[:, 0] < 0.5
