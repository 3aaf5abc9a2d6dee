"""The token encoder of the project's own bases: pixels -> K conditioning tokens of width D.

``diffinv pretrain-base`` trains it beside the UNet and saves it as ``encoder.safetensors``;
``invert --init encoder`` starts each image's conditioning from its tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from diffinv.runs import RunError


class EncoderError(RunError):
    """The model has no encoder to load; the message says what to use instead."""


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


def _header(model: str | Path) -> dict[str, str] | None:
    """The metadata of a ``pretrain-base`` folder's ``encoder.safetensors`` (no weights read); None without one."""
    from safetensors import safe_open

    path = Path(model) / "encoder.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def encoder_tokens(model: str | Path) -> int | None:
    """K of the token encoder a ``pretrain-base`` folder saved; None without one."""
    meta = _header(model)
    return None if meta is None else int(meta["tokens"])


def load_encoder(model: str | Path) -> TokenEncoder:
    """The token encoder a ``pretrain-base`` folder saved beside its UNet (for ``invert --init encoder``)."""
    meta = _header(model)
    if meta is None:
        raise EncoderError(f"--init encoder needs the encoder that `diffinv pretrain-base` saves "
                           f"({Path(model) / 'encoder.safetensors'} does not exist); use --init random with other models")
    encoder = TokenEncoder(int(meta.get("in_channels", 3)), int(meta["tokens"]), int(meta["dim"]))
    encoder.load_state_dict(load_file(str(Path(model) / "encoder.safetensors")))
    return encoder.eval().requires_grad_(False)
