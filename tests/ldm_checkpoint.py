"""Test helper: write a diffusers UNet + VAE as an original-format (CompVis LDM) single-file checkpoint.

No original Stable Diffusion checkpoint can be downloaded here, so the single-file path is tested
on tiny models written in that layout: the UNet under ``model.diffusion_model.`` (openaimodel's
input/middle/output blocks), the VAE under ``first_stage_model.`` (encoder.down.i.block.j ...,
attention as 1x1 convolutions). Written from the LDM module layout for the configurations the
tests use (every level with cross-attention or none, any ``layers_per_block``); it is not a
general converter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


def _unet_prefixes(unet) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, for every block of ``unet``."""
    n_levels, per = len(unet.config.block_out_channels), unet.config.layers_per_block
    pairs = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
             "conv_norm_out": "out.0", "conv_out": "out.2", "mid_block.resnets.0": "middle_block.0",
             "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2"}
    for i, block in enumerate(unet.down_blocks):
        for j in range(per):
            slot = 1 + i * (per + 1) + j
            pairs[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{slot}.0"
            if getattr(block, "attentions", None):
                pairs[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{slot}.1"
        if i < n_levels - 1:
            pairs[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
    for i, block in enumerate(unet.up_blocks):
        attends = bool(getattr(block, "attentions", None))
        for j in range(per + 1):
            slot = i * (per + 1) + j
            pairs[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{slot}.0"
            if attends:
                pairs[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{slot}.1"
        if i < n_levels - 1:
            pairs[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (per + 1) + per}.{2 if attends else 1}.conv"
    return pairs


def _vae_prefixes(vae) -> dict[str, str]:
    n_levels, per = len(vae.config.block_out_channels), vae.config.layers_per_block
    pairs = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        pairs.update({f"{part}.mid_block.resnets.0": f"{part}.mid.block_1", f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
                      f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"})
    for i in range(n_levels):
        for j in range(per):
            pairs[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        pairs[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        up = n_levels - 1 - i  # LDM numbers the decoder's levels from the highest resolution
        for j in range(per + 1):
            pairs[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{up}.block.{j}"
        pairs[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    return pairs


def _rename(state: dict[str, torch.Tensor], prefixes: dict[str, str], leaves: dict[str, dict[str, str]]) -> dict[str, torch.Tensor]:
    """Keys renamed by their longest matching module prefix, then the last component by ``leaves[scope]``
    for modules under a diffusers ``scope`` (e.g. a resnet's ``norm1``, not a transformer block's)."""
    out = {}
    for key, value in state.items():
        module, _, name = key.rpartition(".")
        head = max((p for p in prefixes if module == p or module.startswith(p + ".")), key=len, default=None)
        new = module if head is None else prefixes[head] + module[len(head):]
        for scope, leaf in leaves.items():
            if f"{scope}." in module:
                for old, replacement in leaf.items():
                    if new.endswith("." + old):
                        new = new[: -len(old)] + replacement
        out[f"{new}.{name}"] = value
    return out


def write_ldm_checkpoint(unet, vae, path: str | Path) -> Path:
    """Save ``unet`` and ``vae`` (diffusers) in the CompVis layout as one ``.safetensors`` file."""
    unet_state = _rename(unet.state_dict(), _unet_prefixes(unet), {"resnets": dict(_RESNET)})
    vae_leaves = {"resnets": {"conv_shortcut": "nin_shortcut"},
                  "attentions": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}}
    vae_state = _rename(vae.state_dict(), _vae_prefixes(vae), vae_leaves)
    # The VAE's attention projections are 1x1 convolutions in LDM.
    vae_state = {k: v[:, :, None, None] if ".attn_1." in k and v.dim() == 2 else v for k, v in vae_state.items()}
    tensors = {**{f"model.diffusion_model.{k}": v for k, v in unet_state.items()},
               **{f"first_stage_model.{k}": v for k, v in vae_state.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)
