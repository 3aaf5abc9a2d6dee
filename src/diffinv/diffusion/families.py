"""Model families: how each kind of denoising network is recognised and called with a learned conditioning.

A conditioning is always [B, K + extra, D]: K learned tokens of the network's attention width D and, for families
whose network also reads a pooled text vector (SDXL, SD3), one more row whose first P values are that vector,
learned per image like the tokens. A family says what D and P are and how to call its network; the noise process
(:mod:`~diffinv.diffusion.process`) says what the output means. A new family is one class here plus its test.
"""

from __future__ import annotations

from typing import Any

import torch

from diffinv.registry import Registry


class UNetFamily:
    """Cross-attention UNets (``UNet2DConditionModel``): SD 1.x (D = 768), SD 2.x (1024), our bases (pixel or latent)."""

    extra_tokens = 0

    def matches(self, net: Any) -> bool:
        return getattr(net.config, "addition_embed_type", None) != "text_time"

    def label(self, net: Any, latent: bool) -> str:
        if not latent:
            return "pixel"
        return {768: "sd1", 1024: "sd2"}.get(self.cond_dim(net), "latent")

    def cond_dim(self, net: Any) -> int:
        dim = net.config.cross_attention_dim
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    def pooled_dim(self, net: Any) -> int:
        return 0

    def call(self, net: Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, side: int, dtype: torch.dtype) -> torch.Tensor:
        """The network's output for x_t [B, C, h, w] at time input t under cond [B, K + extra, D] (``side``: the image's px)."""
        return net(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]


class SDXLFamily(UNetFamily):
    """SDXL's UNet: besides the tokens, a pooled text vector and six size/crop time ids (added embedding "text_time")."""

    extra_tokens = 1

    def matches(self, net: Any) -> bool:
        return getattr(net.config, "addition_embed_type", None) == "text_time"

    def label(self, net: Any, latent: bool) -> str:
        return "sdxl"

    def pooled_dim(self, net: Any) -> int:
        """The added embedding's input minus its six time ids (1,280 for SDXL)."""
        return int(net.config.projection_class_embeddings_input_dim) - 6 * int(net.config.addition_time_embed_dim)

    def call(self, net: Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, side: int, dtype: torch.dtype) -> torch.Tensor:
        # The last row carries the pooled vector; time ids say "a full, uncropped image at this size".
        time_ids = torch.tensor([side, side, 0, 0, side, side], device=x_t.device, dtype=dtype).expand(len(x_t), 6)
        extra = {"added_cond_kwargs": {"text_embeds": cond[:, -1, : self.pooled_dim(net)], "time_ids": time_ids}}
        return net(x_t, t, encoder_hidden_states=cond[:, :-1], return_dict=False, **extra)[0]


class SD3Family:
    """SD3's joint-attention transformer (``SD3Transformer2DModel``): tokens of the joint-attention width (4,096 for
    SD3) and a pooled projection (2,048); its time input is the flow's noise level times 1,000."""

    extra_tokens = 1

    def matches(self, net: Any) -> bool:
        return type(net).__name__ == "SD3Transformer2DModel"

    def label(self, net: Any, latent: bool) -> str:
        return "sd3"

    def cond_dim(self, net: Any) -> int:
        return int(net.config.joint_attention_dim)

    def pooled_dim(self, net: Any) -> int:
        return int(net.config.pooled_projection_dim)

    def call(self, net: Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, side: int, dtype: torch.dtype) -> torch.Tensor:
        return net(hidden_states=x_t, encoder_hidden_states=cond[:, :-1], pooled_projections=cond[:, -1, : self.pooled_dim(net)],
                   timestep=t.to(x_t.device, dtype).expand(len(x_t)), return_dict=False)[0]


Family = UNetFamily | SD3Family

# Tried in this order: the first family whose network matches drives it.
FAMILIES: Registry[Family] = Registry("model family")
FAMILIES.add("sd3", SD3Family(), "SD3.x: joint-attention transformer, 16-channel latents, rectified flow")
FAMILIES.add("sdxl", SDXLFamily(), "SDXL: a UNet with a pooled text vector and size time ids")
FAMILIES.add("unet", UNetFamily(), "SD 1.x / 2.x and the project's bases: a cross-attention UNet")


def family_of(net: Any) -> Family:
    """The family that drives ``net``."""
    return next(FAMILIES.get(name) for name in FAMILIES.names() if FAMILIES.get(name).matches(net))
