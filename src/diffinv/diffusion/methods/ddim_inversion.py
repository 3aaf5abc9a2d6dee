"""DDIM inversion (Diff-II's rival): sample from a spherical blend of two same-class images' inverted start noises.

Each real image's latent is DDIM-inverted to the start noise from which ``--steps`` DDIM steps
under its own learned embedding return it; a sample starts from slerp(z_i, z_j, s) of the image
and a same-class partner (``--interp`` s: 0 gives the image back, 1 its partner) and is
conditioned by the matching blend of their embeddings, c_i + s (c_j - c_i), plus sigma noise.
Samples with DDIM at eta 0 (the generate stage's config makes it the method's default sampler): the inversion runs that
sampler's deterministic path backwards (on a rectified-flow model, DDIM is the flow's Euler step and the inversion its ODE).
"""

from __future__ import annotations

import torch

from diffinv.data.real import load_pixels
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import Conditioning, GenerationSettings, Inputs, Method, Row, add_partners, index_real, per_image_rows
from diffinv.diffusion.sampling import invert_to_noise, slerp_noise
from diffinv.diffusion.store import EmbeddingStore
from diffinv.errors import UserError


class DdimInversion(Method):
    name = "ddim-inversion"
    needs = frozenset({"real"})

    def check_settings(self, settings: GenerationSettings) -> None:
        if settings.sampler != "ddim" or settings.eta != 0:
            raise UserError(f"--method ddim-inversion runs DDIM's deterministic path backwards, so it samples with DDIM at "
                            f"eta 0, not --sampler {settings.sampler} --eta {settings.eta:g}: leave both out")

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        rows = per_image_rows(settings, store, common)
        add_partners(rows, store, settings)
        return rows

    def load(self, settings: GenerationSettings, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             inputs: Inputs) -> Conditioning:
        source = super().load(settings, store, backbone, rows, inputs)
        # Every store row's start noise: each image's own, and each is some row's partner.
        every: list[Row] = [{"source": image_id} for image_id in store.ids]
        real = index_real(inputs.real, every)
        starts = []
        for first in range(0, len(every), settings.batch_size):
            part = every[first:first + settings.batch_size]
            latents = backbone.encode(load_pixels(real.subset([r["_real"] for r in part]), source.resolution)).mean
            own = source.embeddings[first:first + len(part)]
            starts.append(invert_to_noise(backbone, latents, own, settings.steps))
        source.extra["starts"] = torch.cat(starts)
        return source

    def start_noise(self, rows: list[Row], src: Conditioning, noise: torch.Tensor) -> torch.Tensor:
        starts = src.extra["starts"]
        own = starts[torch.tensor([r["_src"] for r in rows])]
        partner = starts[torch.tensor([r["_partner"] for r in rows])]
        return slerp_noise(own, partner, torch.tensor([float(r["interp"]) for r in rows]))


METHOD = DdimInversion()
