"""Per-class LoRA (DataDream's rival): each class sampled through its own adapter of the UNet.

The adapters come from ``diffinv finetune`` (``--adapters DIR``). Fitted under the class's
learned embedding, a sample is conditioned as class-inversion's is (the class embedding plus
sigma noise, guided by the mean), but the UNet that denoises it is its class's. Fitted under a
class prompt (``finetune --prompt``), a sample is conditioned as DataDream's are: the class's
prompt, guided against the empty prompt, both through the class's text encoder adapter if it has one.
"""

from __future__ import annotations

import torch

from diffinv.data.synthetic import slug
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import Conditioning, GenerationSettings, Inputs, Method, Row, per_class_rows
from diffinv.diffusion.methods.class_inversion import METHOD as CLASS_INVERSION
from diffinv.diffusion.store import EmbeddingStore, StoreError
from diffinv.errors import UserError


class WithAdapters(Method):
    """A method that samples through ``diffinv finetune``'s adapters: refuses to run without them, loads them."""

    needs = frozenset({"adapters"})

    def check_settings(self, settings: GenerationSettings) -> None:
        needs_adapters(settings)

    def load(self, settings: GenerationSettings, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             inputs: Inputs) -> Conditioning:
        source = super().load(settings, store, backbone, rows, inputs)
        source.extra["info"] = {"lora": load_adapters(inputs, store, backbone, len(rows))}
        return source


class Lora(WithAdapters):
    name = "lora"
    store_target = "class"

    def wrong_store_message(self, store: EmbeddingStore) -> str:
        return (f"--method lora samples each class from its class embedding: pass the per-class store the adapters were "
                f"fitted with (`diffinv invert --target class`); {store.root} holds one embedding per image")

    def check_settings(self, settings: GenerationSettings) -> None:
        super().check_settings(settings)
        CLASS_INVERSION.check_settings(settings)

    def check(self, settings: GenerationSettings, store: EmbeddingStore) -> None:
        if settings.adapter_prompt:  # any store: it gives the classes and how many real images each has
            self.check_settings(settings)
        else:
            super().check(settings, store)

    def wants_text_encoder(self, settings: GenerationSettings) -> bool:
        return bool(settings.adapter_prompt)

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        if not settings.adapter_prompt:  # class-inversion's rows, each through its adapter
            return tag_adapters(CLASS_INVERSION.plan(settings, store, common), settings)
        rows = per_class_rows(settings, store, {**common, "uncond": "empty-prompt"},
                              lambda c, name, j, first: {"source": None, "prompt": settings.adapter_prompt.format(name)})
        return tag_adapters(rows, settings)

    def load(self, settings: GenerationSettings, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             inputs: Inputs) -> Conditioning:
        if not settings.adapter_prompt:
            return super().load(settings, store, backbone, rows, inputs)
        info = load_adapters(inputs, store, backbone, len(rows))
        cond, uncond = [], []
        for c, name in enumerate(store.classes):  # each class's prompt and the empty one through its text encoder adapter
            backbone.use_lora(f"class{c}")
            both = backbone.encode_prompts([settings.adapter_prompt.format(name), ""])
            cond.append(both[0])
            uncond.append(both[1])
        backbone.use_lora(None)
        return Conditioning(torch.stack(cond), torch.stack(uncond), resolution=int(store.info["resolution"]),
                            extra={"info": {"lora": info}})

    def conditioning(self, rows: list[Row], src: Conditioning, settings: GenerationSettings,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not settings.adapter_prompt:
            return super().conditioning(rows, src, settings, keys)
        labels = torch.tensor([r["label"] for r in rows])
        return src.embeddings[labels], src.uncond[labels]


def needs_adapters(settings: GenerationSettings) -> None:
    if not settings.adapters:
        raise UserError(f"--method {settings.method} samples through per-class LoRA adapters: give --adapters DIR "
                        f"(`diffinv finetune --store CLASS_STORE --out DIR` fits them)")


def tag_adapters(rows: list[Row], settings: GenerationSettings) -> list[Row]:
    """Each row's adapter (its class's file, recorded in the manifest) and the name it is loaded under."""
    for r in rows:
        r.update(adapter=f"adapters/{slug(r['class'])}.safetensors", _adapter=f"class{r['label']}")
    return rows


def load_adapters(inputs: Inputs, store: EmbeddingStore, backbone: Backbone, n_samples: int) -> dict:
    """Every class's adapter onto the UNet (loaded under ``class<c>``); what they are and what fitting them cost per sample."""
    if len(inputs.adapters) != len(store.classes):
        raise StoreError(f"{len(inputs.adapters)} adapters for the {len(store.classes)} classes of {store.root}")
    for c, adapter in enumerate(inputs.adapters):
        # A text encoder's adapter matters only to prompts: without the encoder (di+lora) the UNet's is loaded alone.
        state = {k: v.to(backbone.device) for k, v in adapter.state.items()
                 if backbone.text_encoder is not None or not k.startswith("text_encoder.")}
        backbone.load_lora(f"class{c}", state, adapter.rank, adapter.alpha)
    backbone.use_lora(None)
    info = dict(inputs.adapters_info)
    sha = info.pop("adapters_sha256")
    return {**info, "fit_seconds_per_image": round(info["fit_seconds"] / max(n_samples, 1), 6), "adapters_sha256": sha}


METHOD = Lora()
