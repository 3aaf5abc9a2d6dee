"""img2img / SDEdit (DA-Fusion's rival): each real image noised to ``strength`` and denoised with its own embedding.

With ``--img2img-embedding class`` it is denoised with its class's embedding instead (a store from
``diffinv invert --target class`` given as ``--class-store``).
"""

from __future__ import annotations

import math

import torch

from diffinv.data.real import load_pixels
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import (
    Conditioning,
    GenerationSettings,
    Inputs,
    Method,
    Row,
    add_partners,
    index_real,
    per_image_rows,
    perturbed,
    uncond_for,
)
from diffinv.diffusion.sampling import img2img_steps
from diffinv.diffusion.store import EmbeddingStore, StoreError
from diffinv.errors import UserError


class Img2Img(Method):
    name = "img2img"
    needs = frozenset({"real"})

    def check_settings(self, settings: GenerationSettings) -> None:
        if settings.img2img_embedding == "class" and not settings.class_store:
            raise StoreError("--img2img-embedding class needs --class-store DIR (from `diffinv invert --target class`)")
        if img2img_steps(settings.steps, settings.strength) == 0:
            raise UserError(f"--strength {settings.strength} at --steps {settings.steps} runs no denoising step (the real image "
                            f"would come back noised); raise --steps to at least {math.ceil(1 / settings.strength)} or --strength")

    def notes(self, settings: GenerationSettings) -> list[str]:
        # The schedule is cut at whole steps, so a strength between two of them silently acts as the lower one.
        n = img2img_steps(settings.steps, settings.strength)
        if abs(n / settings.steps - settings.strength) < 1e-9:
            return []
        note = (f"img2img runs {n} of {settings.steps} steps: --strength {settings.strength} acts as {n / settings.steps:g} "
                f"(strengths act in multiples of 1 / --steps; more --steps give finer ones)")
        return [note]

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        rows = per_image_rows(settings, store, common)
        if settings.img2img_embedding == "class":
            for r in rows:
                r.update(noise=settings.noise)
        else:
            add_partners(rows, store, settings)
        for r in rows:
            r.update(strength=settings.strength, embedding=settings.img2img_embedding)
        return rows

    def extra_stores(self, settings: GenerationSettings) -> dict[str, str]:
        return {"class store": settings.class_store} if settings.img2img_embedding == "class" else {}

    def load(self, settings: GenerationSettings, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             inputs: Inputs) -> Conditioning:
        source = super().load(settings, store, backbone, rows, inputs)
        if settings.img2img_embedding == "class":
            class_store = inputs.stores["class store"]
            if class_store.classes != store.classes:
                raise StoreError(f"{class_store.root} has classes {class_store.classes}, the store {store.classes}; "
                                 f"invert both from the same data")
            if tuple(class_store.info["cond_shape"]) != tuple(store.info["cond_shape"]):
                raise StoreError(f"{class_store.root} has conditioning {class_store.info['cond_shape']}, "
                                 f"the store {store.info['cond_shape']}")
            by_label = {r["label"]: i for i, r in enumerate(class_store.rows)}
            source.extra["class_embeddings"] = class_store.embeddings[[by_label[c] for c in range(len(store.classes))]].to(backbone.device)
        source.extra["real"] = index_real(inputs.real, rows)
        return source

    def conditioning(self, rows: list[Row], src: Conditioning, settings: GenerationSettings,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if settings.img2img_embedding == "class":
            own = src.extra["class_embeddings"][torch.tensor([r["label"] for r in rows])]
        else:
            own = src.embeddings[torch.tensor([r["_src"] for r in rows])]
        return perturbed(rows, own, src, settings, keys), uncond_for(rows, src)

    def start(self, backbone: Backbone, rows: list[Row], src: Conditioning) -> torch.Tensor:
        real = src.extra["real"].subset([r["_real"] for r in rows])
        return backbone.encode(load_pixels(real, src.resolution)).mean


METHOD = Img2Img()
