"""Diffusion Inversion (the paper): c = c_i + s (c_j - c_i) + sigma * eps around each image's learned embedding.

Partner j is another image of the same class; guidance's unconditional input is the mean
learned embedding (or its class's, ``--uncond class-mean``).
"""

from __future__ import annotations

from diffinv.diffusion.methods.base import GenerationSettings, Method, Row, add_partners, per_image_rows
from diffinv.diffusion.store import EmbeddingStore


class DiffusionInversion(Method):
    name = "di"

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        rows = per_image_rows(settings, store, common)
        add_partners(rows, store, settings)
        return rows


METHOD = DiffusionInversion()
