"""Class inversion (textual inversion / DA-Fusion's rival): one learned embedding per class, with DI's noise and guidance.

Needs a store from ``diffinv invert --target class``; makes as many samples per class as the
per-image methods make from that class's real images.
"""

from __future__ import annotations

from diffinv.diffusion.methods.base import GenerationSettings, Method, Row, per_class_rows
from diffinv.diffusion.store import CLASS_PREFIX, EmbeddingStore, StoreError


class ClassInversion(Method):
    name = "class-inversion"
    store_target = "class"

    def wrong_store_message(self, store: EmbeddingStore) -> str:
        return (f"--method class-inversion needs a per-class store: run `diffinv invert --target class` on the same "
                f"data and pass it as --store ({store.root} holds one embedding per image)")

    def check_settings(self, settings: GenerationSettings) -> None:
        if settings.uncond == "class-mean":
            raise StoreError("--uncond class-mean with class-inversion would guide a class against itself; use --uncond mean")

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        return per_class_rows(settings, store, common,
                              lambda c, name, j, first: {"source": CLASS_PREFIX + name, "noise": settings.noise, "_src": first})


METHOD = ClassInversion()
