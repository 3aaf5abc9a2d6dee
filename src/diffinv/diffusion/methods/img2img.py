"""img2img / SDEdit (DA-Fusion's rival): each real image noised to ``strength`` and denoised with its own embedding.

With ``--img2img-embedding class`` it is denoised with its class's embedding instead (a store from
``diffinv invert --target class`` given as ``--class-store``).
"""

from __future__ import annotations

import math

import torch

from diffinv.config import GenerateConfig
from diffinv.data.real import load_pixels
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import Conditioning, Method, Row, add_partners, per_image_rows, perturbed, real_images, uncond_for
from diffinv.diffusion.sampling import img2img_steps
from diffinv.diffusion.store import EmbeddingStore, StoreError
from diffinv.errors import UserError


class Img2Img(Method):
    name = "img2img"

    def check_settings(self, config: GenerateConfig) -> None:
        if config.img2img_embedding == "class" and not config.class_store:
            raise StoreError("--img2img-embedding class needs --class-store DIR (from `diffinv invert --target class`)")
        if img2img_steps(config.steps, config.strength) == 0:
            raise UserError(f"--strength {config.strength} at --steps {config.steps} runs no denoising step (the real image "
                            f"would come back noised); raise --steps to at least {math.ceil(1 / config.strength)} or --strength")

    def notes(self, config: GenerateConfig) -> list[str]:
        # The schedule is cut at whole steps, so a strength between two of them silently acts as the lower one.
        n = img2img_steps(config.steps, config.strength)
        if abs(n / config.steps - config.strength) < 1e-9:
            return []
        note = (f"img2img runs {n} of {config.steps} steps: --strength {config.strength} acts as {n / config.steps:g} "
                f"(strengths act in multiples of 1 / --steps; more --steps give finer ones)")
        return [note]

    def plan(self, config: GenerateConfig, store: EmbeddingStore, common: Row) -> list[Row]:
        rows = per_image_rows(config, store, common)
        if config.img2img_embedding == "class":
            for r in rows:
                r.update(noise=config.noise)
        else:
            add_partners(rows, store, config)
        for r in rows:
            r.update(strength=config.strength, embedding=config.img2img_embedding)
        return rows

    def extra_stores(self, config: GenerateConfig) -> dict[str, str]:
        return {"class store": config.class_store} if config.img2img_embedding == "class" else {}

    def load(self, config: GenerateConfig, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             extra: dict[str, EmbeddingStore] | None = None) -> Conditioning:
        source = super().load(config, store, backbone, rows)
        if config.img2img_embedding == "class":
            class_store = (extra or {})["class store"]
            if class_store.classes != store.classes:
                raise StoreError(f"{class_store.root} has classes {class_store.classes}, the store {store.classes}; "
                                 f"invert both from the same data")
            if tuple(class_store.info["cond_shape"]) != tuple(store.info["cond_shape"]):
                raise StoreError(f"{class_store.root} has conditioning {class_store.info['cond_shape']}, "
                                 f"the store {store.info['cond_shape']}")
            by_label = {r["label"]: i for i, r in enumerate(class_store.rows)}
            source.extra["class_embeddings"] = class_store.embeddings[[by_label[c] for c in range(len(store.classes))]].to(backbone.device)
        source.extra["real"] = real_images(store, rows)
        return source

    def conditioning(self, rows: list[Row], src: Conditioning, config: GenerateConfig,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if config.img2img_embedding == "class":
            own = src.extra["class_embeddings"][torch.tensor([r["label"] for r in rows])]
        else:
            own = src.embeddings[torch.tensor([r["_src"] for r in rows])]
        return perturbed(rows, own, src, config, keys), uncond_for(rows, src)

    def start(self, backbone: Backbone, rows: list[Row], src: Conditioning) -> torch.Tensor:
        real = src.extra["real"].subset([r["_real"] for r in rows])
        return backbone.encode(load_pixels(real, src.resolution)).mean


METHOD = Img2Img()
