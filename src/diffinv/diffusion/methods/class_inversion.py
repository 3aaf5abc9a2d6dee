"""Class inversion (textual inversion / DA-Fusion's rival): one learned embedding per class, with DI's noise and guidance.

Needs a store from ``diffinv invert --target class``; makes as many samples per class as the
per-image methods make from that class's real images.
"""

from __future__ import annotations

from diffinv.config import GenerateConfig
from diffinv.diffusion.methods.base import Method, Row, per_class_rows
from diffinv.diffusion.store import CLASS_PREFIX, EmbeddingStore, StoreError


class ClassInversion(Method):
    name = "class-inversion"
    store_target = "class"

    def wrong_store_message(self, store: EmbeddingStore) -> str:
        return (f"--method class-inversion needs a per-class store: run `diffinv invert --target class` on the same "
                f"data and pass it as --store ({store.root} holds one embedding per image)")

    def check_settings(self, config: GenerateConfig) -> None:
        if config.uncond == "class-mean":
            raise StoreError("--uncond class-mean with class-inversion would guide a class against itself; use --uncond mean")

    def plan(self, config: GenerateConfig, store: EmbeddingStore, common: Row) -> list[Row]:
        return per_class_rows(config, store, common,
                              lambda c, name, j, first: {"source": CLASS_PREFIX + name, "noise": config.noise, "_src": first})


METHOD = ClassInversion()
