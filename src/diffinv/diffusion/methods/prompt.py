"""Prompts: "a photo of a {class}" through the model's own text encoder; guidance against the empty prompt, as in SD."""

from __future__ import annotations

import torch

from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import Conditioning, GenerationSettings, Inputs, Method, Row, per_class_rows
from diffinv.diffusion.store import EmbeddingStore


class Prompt(Method):
    name = "prompt"
    text_encoder = True
    uses_embeddings = False

    def check(self, settings: GenerationSettings, store: EmbeddingStore) -> None:
        """Any store will do: it only gives the classes and how many real images each has."""

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        n = len(settings.templates)

        def fields(c: int, name: str, j: int, first: int | None) -> Row:
            template = j % n
            return {"source": None, "prompt": settings.templates[template].format(name), "_prompt": c * n + template}

        return per_class_rows(settings, store, {**common, "uncond": "empty-prompt"}, fields)

    def load(self, settings: GenerationSettings, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             inputs: Inputs) -> Conditioning:
        prompts = [t.format(c) for c in store.classes for t in settings.templates]
        return Conditioning(backbone.encode_prompts(prompts), backbone.encode_prompts([""])[0],
                            resolution=int(store.info["resolution"]))

    def conditioning(self, rows: list[Row], src: Conditioning, settings: GenerationSettings,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = src.embeddings[torch.tensor([r["_prompt"] for r in rows])]
        return cond, src.uncond.expand_as(cond)


METHOD = Prompt()
