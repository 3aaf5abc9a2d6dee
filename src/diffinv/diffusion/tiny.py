"""Small models for tests and benchmarks: random ones with Stable Diffusion's architecture, saved in diffusers format.

They exercise exactly the loading and inference code used for real checkpoints, at sizes that
run in seconds on a CPU. ``sd1_sized`` builds an SD 1.x-sized UNet + VAE (random weights) for
speed measurements; :func:`memorise` trains one in memory on a few images so its conditioning matters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffinv.diffusion.backbone import SCHEDULER_DEFAULTS, Backbone
from diffinv.diffusion.encoder import TokenEncoder
from diffinv.diffusion.pretrain import autoencoder_loss
from diffinv.errors import UserError

KINDS = ("latent", "pixel", "sd1", "sd15-tiny", "sd21-tiny", "sdxl-tiny", "sd3-tiny")
# Stable Diffusion's own scheduler configs (as their model folders ship them), for the SD-structured tiny models.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1,
                  "prediction_type": "epsilon", "clip_sample": False, "trained_betas": None}
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1,
                  "prediction_type": "v_prediction", "clip_sample": False, "trained_betas": None}


# SD3's scheduler config as its model folders ship it: a rectified flow with a fixed shift.
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def build_sd3_transformer():
    """SD3's structure at toy widths: a joint-attention transformer on 16-channel latents in 2x2 patches, reading a
    token sequence (width 32, SD3's is 4096) and a pooled vector (16, SD3's 2048)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)


def build_unet(kind: str = "latent", cross_attention_dim: int = 32, sample_size: int = 16):
    from diffusers import UNet2DConditionModel

    if kind == "sd1":
        return UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=768)
    if kind in ("sd15-tiny", "sd21-tiny", "sdxl-tiny"):
        # SD's structure (4 latent channels, its cross-attention width, text-time conditioning for SDXL) at toy widths.
        width = {"sd15-tiny": 768, "sd21-tiny": 1024, "sdxl-tiny": 2048}[kind]
        extra = {}
        if kind == "sdxl-tiny":
            extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=width, attention_head_dim=8, norm_num_groups=8, **extra)
    channels = 4 if kind == "latent" else 3
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8,
    )


def build_vae(kind: str = "latent"):
    from diffusers import AutoencoderKL

    if kind == "sd1":
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
        )
    if kind == "sd3-tiny":
        # SD3's VAE shape: four blocks (a factor-8 latent), 16 channels, no quant convs, its scaling and shift factors.
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    if kind in ("sd15-tiny", "sd21-tiny", "sdxl-tiny"):
        # SD's VAE shape: four blocks (a factor-8 latent), 4 channels, its scaling factor (SDXL's is 0.13025).
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
            scaling_factor=0.13025 if kind == "sdxl-tiny" else 0.18215)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, sample_size=32,
    )


def build_text_encoder(out: Path, cross_attention_dim: int) -> None:
    """A tiny CLIP text encoder + a word-level tokenizer made from a small vocabulary."""
    import transformers

    transformers.utils.logging.disable_progress_bar()

    words = ["a", "photo", "of", "the", "an", "image", "picture", "small", "digit", "number"]
    words += [str(i) for i in range(10)] + ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    words += ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", "x-ray", "normal", "pneumonia"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    # With no BPE merges every word falls apart into characters, so the vocabulary needs them too.
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789-{}":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for w in words:
        vocab.setdefault(w + "</w>", len(vocab))
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(out / "tokenizer" / "vocab.json"), str(out / "tokenizer" / "merges.txt"),
                                           model_max_length=16)
    tokenizer.save_pretrained(out / "tokenizer")
    config = transformers.CLIPTextConfig(vocab_size=len(vocab) + 8, hidden_size=cross_attention_dim, intermediate_size=64,
                                         num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    transformers.CLIPTextModel(config).save_pretrained(out / "text_encoder")


def save_tiny_model(out: str | Path, kind: str = "latent", seed: int = 0, prediction_type: str = "epsilon",
                    with_text_encoder: bool = False, sample_size: int = 16) -> Path:
    """Build a random model of ``kind`` (latent | pixel | sd1) and save it as a diffusers folder."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    out = Path(out)
    torch.manual_seed(seed)
    if kind == "sd3-tiny":
        if with_text_encoder:
            raise UserError("sd3-tiny is built without SD3's three text encoders; leave --text-encoder out")
        return _save_tiny_sd3(out)
    unet = build_unet(kind, sample_size=sample_size)
    unet.save_pretrained(out / "unet")
    if kind != "pixel":
        build_vae(kind).save_pretrained(out / "vae")
    from diffusers import DDPMScheduler

    if kind in ("sd15-tiny", "sdxl-tiny", "sd21-tiny"):
        (out / "scheduler").mkdir(parents=True, exist_ok=True)
        config = SD21_SCHEDULER if kind == "sd21-tiny" else SD15_SCHEDULER
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    else:
        scheduler: Any = DDPMScheduler(**{**SCHEDULER_DEFAULTS, "prediction_type": prediction_type})  # ConfigMixin's save_pretrained
        scheduler.save_pretrained(out / "scheduler")
    if with_text_encoder:
        build_text_encoder(out, unet.config.cross_attention_dim)
    (out / "model_index.json").write_text(json.dumps({"_class_name": "DiffinvModel", "kind": kind}, indent=2))
    return out


def _save_tiny_sd3(out: Path) -> Path:
    """An SD3-structured folder as diffusers lays SD3 out (transformer/, vae/, scheduler/), without its text encoders."""
    build_sd3_transformer().save_pretrained(out / "transformer")
    build_vae("sd3-tiny").save_pretrained(out / "vae")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD3_SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps({"_class_name": "DiffinvModel", "kind": "sd3-tiny"}, indent=2))
    return out


def memorise(backbone: Backbone, pixels: torch.Tensor, *, steps: int, tokens: int = 5, batch_size: int = 32,
                         lr: float = 1e-3, cond_dropout: float = 0.1, seed: int = 0) -> tuple[TokenEncoder, list[float]]:
    """Train ``backbone.unet`` (in place) with a new :class:`TokenEncoder` as a diffusion autoencoder of images
    [N, 3, R, R], in memory, so that a tiny model's conditioning matters (what inversion tests need).

    The loss is the base pretraining's (:func:`~diffinv.diffusion.pretrain.autoencoder_loss`), without EMA,
    views or files. Returns the encoder and the per-step losses; draws are keyed by (seed, step).
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
