"""DI through the class's LoRA: DI's perturbed per-image embeddings, denoised by each class's adapter.

A combination no published method offers: the conditioning is Diffusion Inversion's (c_i moved
towards a same-class partner, plus sigma noise), the UNet is the one ``diffinv finetune`` adapted
to the image's class (``--adapters DIR``, fitted on the same real images).
"""

from __future__ import annotations

from diffinv.config import GenerateConfig
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import Conditioning, Method, Row, add_partners, per_image_rows
from diffinv.diffusion.methods.lora import load_adapters, needs_adapters, tag_adapters
from diffinv.diffusion.store import EmbeddingStore


class DiLora(Method):
    name = "di+lora"
    uses_adapters = True

    def check_settings(self, config: GenerateConfig) -> None:
        needs_adapters(config)

    def plan(self, config: GenerateConfig, store: EmbeddingStore, common: Row) -> list[Row]:
        rows = per_image_rows(config, store, common)
        add_partners(rows, store, config)
        return tag_adapters(rows, config)

    def load(self, config: GenerateConfig, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             extra: dict[str, EmbeddingStore] | None = None) -> Conditioning:
        source = super().load(config, store, backbone, rows, extra)
        source.extra["info"] = {"lora": load_adapters(config, store, backbone, len(rows))}
        return source


METHOD = DiLora()
