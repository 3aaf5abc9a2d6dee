"""SDEdit from a class prompt (He et al. 2023's "real guidance"): each real image noised to ``strength`` and denoised
with its class's prompt (the first of ``--template``) through the model's text encoder, guided against the empty prompt.

img2img's start and strength with prompt's conditioning: the rival that needs no inversion at all.
"""

from __future__ import annotations

import torch

from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import Conditioning, GenerationSettings, Inputs, Row, index_real, per_image_rows
from diffinv.diffusion.methods.img2img import Img2Img
from diffinv.diffusion.store import EmbeddingStore
from diffinv.errors import UserError


class SdeditPrompt(Img2Img):
    name = "sdedit-prompt"
    text_encoder = True
    uses_embeddings = False  # the store gives the real images and their classes, not conditionings

    def check_settings(self, settings: GenerationSettings) -> None:
        if settings.img2img_embedding == "class":
            raise UserError("--method sdedit-prompt conditions on the class prompt; drop --img2img-embedding class")
        super().check_settings(settings)

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        rows = per_image_rows(settings, store, {**common, "uncond": "empty-prompt"})
        for r in rows:
            r.update(strength=settings.strength, prompt=settings.templates[0].format(r["class"]))
        return rows

    def extra_stores(self, settings: GenerationSettings) -> dict[str, str]:
        return {}

    def load(self, settings: GenerationSettings, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             inputs: Inputs) -> Conditioning:
        prompts = [settings.templates[0].format(c) for c in store.classes]
        source = Conditioning(backbone.encode_prompts(prompts), backbone.encode_prompts([""])[0],
                              resolution=int(store.info["resolution"]))
        source.extra["real"] = index_real(inputs.real, rows)
        return source

    def conditioning(self, rows: list[Row], src: Conditioning, settings: GenerationSettings,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = src.embeddings[torch.tensor([r["label"] for r in rows])]
        return cond, src.uncond.expand_as(cond)


METHOD = SdeditPrompt()
