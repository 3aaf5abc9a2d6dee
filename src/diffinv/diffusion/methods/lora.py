"""Per-class LoRA (DataDream's rival): each class sampled through its own adapter of the UNet.

The adapters come from ``diffinv finetune`` (``--adapters DIR``), fitted under the class's
learned embedding; a sample is conditioned as class-inversion's is (the class embedding plus
sigma noise, guided by the mean), but the UNet that denoises it is its class's.
"""

from __future__ import annotations

from pathlib import Path

from diffinv.config import GenerateConfig
from diffinv.data.synthetic import slug
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import Conditioning, Method, Row
from diffinv.diffusion.methods.class_inversion import METHOD as CLASS_INVERSION
from diffinv.diffusion.store import EmbeddingStore, StoreError
from diffinv.errors import UserError
from diffinv.runs import file_sha256, read_json


class WithAdapters(Method):
    """A method that samples through ``diffinv finetune``'s adapters: refuses to run without them, loads them."""

    uses_adapters = True

    def check_settings(self, config: GenerateConfig) -> None:
        needs_adapters(config)

    def load(self, config: GenerateConfig, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             extra: dict[str, EmbeddingStore] | None = None) -> Conditioning:
        source = super().load(config, store, backbone, rows, extra)
        source.extra["info"] = {"lora": load_adapters(config, store, backbone, len(rows))}
        return source


class Lora(WithAdapters):
    name = "lora"
    store_target = "class"

    def wrong_store_message(self, store: EmbeddingStore) -> str:
        return (f"--method lora samples each class from its class embedding: pass the per-class store the adapters were "
                f"fitted with (`diffinv invert --target class`); {store.root} holds one embedding per image")

    def check_settings(self, config: GenerateConfig) -> None:
        super().check_settings(config)
        CLASS_INVERSION.check_settings(config)

    def plan(self, config: GenerateConfig, store: EmbeddingStore, common: Row) -> list[Row]:
        return tag_adapters(CLASS_INVERSION.plan(config, store, common), config)  # class-inversion's rows, each through its adapter


def needs_adapters(config: GenerateConfig) -> None:
    if not config.adapters:
        raise UserError(f"--method {config.method} samples through per-class LoRA adapters: give --adapters DIR "
                        f"(`diffinv finetune --store CLASS_STORE --out DIR` fits them)")


def tag_adapters(rows: list[Row], config: GenerateConfig) -> list[Row]:
    """Each row's adapter (its class's file, recorded in the manifest) and the name it is loaded under."""
    for r in rows:
        r.update(adapter=f"adapters/{slug(r['class'])}.safetensors", _adapter=f"class{r['label']}")
    return rows


def load_adapters(config: GenerateConfig, store: EmbeddingStore, backbone: Backbone, n_samples: int) -> dict:
    """Every class's adapter of ``config.adapters`` onto the UNet, checked to be of this model and these classes;
    what they are and what fitting them cost per sample of this set."""
    from safetensors import safe_open

    folder = Path(config.adapters)
    marker = folder / "finetune.json"
    if not marker.is_file() or read_json(marker).get("status") != "complete":
        raise StoreError(f"--adapters {folder} is not a finished `diffinv finetune` folder (no complete finetune.json)")
    info = read_json(marker)
    if info["model_fingerprint"] not in backbone.fingerprints():
        raise StoreError(f"--adapters {folder} were fitted on another model ({info['model']}); fit them on this one")
    if list(info["classes"]) != list(store.classes):
        raise StoreError(f"--adapters {folder} are of the classes {info['classes']}, the store of {store.classes}")
    for c, name in enumerate(store.classes):
        path = folder / "adapters" / f"{slug(name)}.safetensors"
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        backbone.load_lora(f"class{c}", {k: v.to(backbone.device) for k, v in state.items()}, int(meta["rank"]),
                           float(meta["alpha"]))
    backbone.use_lora(None)
    return {"adapters": str(folder.resolve()), "rank": info["rank"], "fit_seconds": info["seconds"], "fit_device": info["device"],
            "fit_seconds_per_image": round(info["seconds"] / max(n_samples, 1), 6),
            "adapters_sha256": {name: file_sha256(folder / "adapters" / f"{slug(name)}.safetensors") for name in store.classes}}


METHOD = Lora()
