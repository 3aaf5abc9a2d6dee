"""Stage 2's engine: plan the samples of a method and make a batch of them.

Methods (:mod:`diffinv.diffusion.methods`) differ only in how samples are planned and
conditioned; all go through the same sampler, guidance and decoding here, so they stay
comparable. Every sample's randomness (partner, conditioning noise, initial latent, sampler
noise) is keyed by its identity, so batches, resumes and single-sample regeneration all give
the same image. Files and resume live in :mod:`diffinv.stages.generate`.
"""

from __future__ import annotations

from typing import Any

import torch

from diffinv import rng
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods import Conditioning, get_method
from diffinv.diffusion.methods.base import GenerationSettings, common_fields
from diffinv.diffusion.sampling import sample_latents, unit_rms
from diffinv.diffusion.store import EmbeddingStore


def plan_samples(settings: GenerationSettings, store: EmbeddingStore, model: str) -> list[dict[str, Any]]:
    """One provenance row per sample, in a fixed order. Keys starting with ``_`` are internal.

    Per-image methods (di, img2img) make ``per_image`` samples of every store row; per-class
    methods (class-inversion, prompt) make as many per class as the per-image methods would,
    so methods are compared at equal dataset sizes.
    """
    return get_method(settings.method).plan(settings, store, common_fields(settings, store, model, settings.uncond))


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A plan row without its internal fields: what the manifest records."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def generate_batch(backbone: Backbone, rows: list[dict[str, Any]], source: Conditioning, settings: GenerationSettings) -> torch.Tensor:
    """Make the samples of ``rows``: pixels [B, 3, R, R] in [-1, 1] at the store's resolution."""
    method = get_method(settings.method)
    copied = method.pixels(backbone, rows, source)  # retrieval: images found, not sampled
    if copied is not None:
        return copied
    adapters = list(dict.fromkeys(r.get("_adapter") for r in rows))
    if len(adapters) > 1:  # one UNet per call: each adapter's rows apart (keyed noise: the same images), back in order
        parts = {a: [i for i, r in enumerate(rows) if r.get("_adapter") == a] for a in adapters}
        made = {a: generate_batch(backbone, [rows[i] for i in idx], source, settings) for a, idx in parts.items()}
        where = torch.tensor([i for idx in parts.values() for i in idx], device=made[adapters[0]].device).argsort()
        return torch.cat([made[a] for a in parts])[where]
    if method.uses_adapters:
        backbone.use_lora(adapters[0])
    keys = torch.tensor([r["_key"] for r in rows], dtype=torch.int64, device=backbone.device)

    # 1. Conditioning and the unconditional input of guidance, per sample.
    cond, uncond = method.conditioning(rows, source, settings, keys)

    # 2. Starting noise keyed by the sample; img2img also starts from the real image's clean latent.
    noise = rng.keyed_normal(keys, 0, rng.STREAM_NOISE, backbone.latent_shape(source.resolution))
    if settings.unit_noise:
        noise = unit_rms(noise)
    noise = method.start_noise(rows, source, noise)  # ddim-inversion: the blend of two images' inverted noises
    start = method.start(backbone, rows, source)

    # 3. Denoise with guidance.
    latents = sample_latents(backbone, cond, uncond, noise, sampler=settings.sampler, steps=settings.steps, guidance=settings.guidance,
                             keys=keys, eta=settings.eta, start=start, strength=settings.strength, clip_x0=settings.clip_x0)

    # 4. Back to pixels.
    return backbone.decode(latents)
