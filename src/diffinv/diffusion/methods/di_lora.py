"""DI through the class's LoRA: DI's perturbed per-image embeddings, denoised by each class's adapter.

A combination no published method offers: the conditioning is Diffusion Inversion's (c_i moved
towards a same-class partner, plus sigma noise), the UNet is the one ``diffinv finetune`` adapted
to the image's class (``--adapters DIR``, fitted on the same real images).
"""

from __future__ import annotations

from diffinv.diffusion.methods.base import GenerationSettings, Row, add_partners, per_image_rows
from diffinv.diffusion.methods.lora import WithAdapters, tag_adapters
from diffinv.diffusion.store import EmbeddingStore


class DiLora(WithAdapters):
    name = "di+lora"

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        rows = per_image_rows(settings, store, common)
        add_partners(rows, store, settings)
        return tag_adapters(rows, settings)


METHOD = DiLora()
