"""What a generation method reads beyond its store, opened from the run folders that hold it (the generate stage's inputs).

The library's methods take these as :class:`~diffinv.diffusion.methods.base.Inputs`; only this
module reads the folders: the store's ``config.yaml`` (which real data it was inverted from), the
base's ``config.yaml`` (the data it was pretrained on: retrieval's default pool), a ``diffinv
train`` run (retrieval's judge) and a ``diffinv finetune`` folder (the LoRA adapters).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffinv.data.real import DataError, LabelledImages, open_images, validation_ids
from diffinv.diffusion.methods.base import GenerationSettings, Inputs, Method
from diffinv.diffusion.store import EmbeddingStore
from diffinv.errors import UserError
from diffinv.runs import cost_seconds, read_json, read_yaml
from diffinv.stages.finetune import read_adapters

OTHER_SPLITS = ("test", "val", "validation", "valid")


def open_inputs(method: Method, settings: GenerationSettings, store: EmbeddingStore, model: str, backbone: Any,
                stores: dict[str, EmbeddingStore]) -> Inputs:
    """The fields of :class:`Inputs` that ``method.needs``, read for ``store`` sampled with ``model``."""
    inputs = Inputs(stores=stores, model=model)
    if "real" in method.needs or "held_out" in method.needs:
        made = read_yaml(Path(store.root) / "config.yaml") or {}
        inputs.real = real = store_images(made)
        if "held_out" in method.needs:
            inputs.held_out = held_out(made, real)
    if "pool" in method.needs:
        inputs.pool = list(settings.pool) or base_pool(model)
    if "judge" in method.needs and settings.judge:
        inputs.judge = judge_weights(settings.judge)
    if "adapters" in method.needs:
        inputs.adapters, inputs.adapters_info = read_adapters(settings.adapters, store.classes, backbone.fingerprints())
    return inputs


def inversion_seconds(method: Method, store: EmbeddingStore, stores: dict[str, EmbeddingStore], inputs: Inputs) -> float | None:
    """What inverting the stores a set's conditionings come from took (each store once: a LoRA method's adapters were
    fitted under a class store that may also be its own store); None where one of them has no record of it."""
    used = [Path(s.root) for s in (store, *stores.values())] if method.uses_embeddings else []
    if inputs.adapters_info.get("store"):
        used.append(Path(inputs.adapters_info["store"]))
    seconds = [cost_seconds(root) for root in {root.resolve() for root in used}]
    return None if None in seconds else round(sum(s or 0.0 for s in seconds), 3)


def store_images(made: dict[str, Any]) -> LabelledImages:
    """The real images a store was inverted from, reopened from its config."""
    try:
        return open_images(made["data"], made.get("format", "auto"), made.get("split", "train"))
    except DataError as exc:
        raise DataError(f"the method re-reads the store's real images from {made['data']}: {exc}") from exc


def held_out(made: dict[str, Any], real: LabelledImages) -> list[tuple[LabelledImages, str]]:
    """The real data's images besides the store's: its validation hold-out and every other split that exists."""
    found = []
    held = validation_ids(real, int(made.get("val_per_class") or 0)) if made.get("val_per_class") else set()
    if held:
        found.append((real.subset([i for i, image_id in enumerate(real.ids) if image_id in held]), "validation"))
    for split in OTHER_SPLITS:
        if split == made.get("split", "train"):
            continue
        try:
            found.append((open_images(made["data"], made.get("format", "auto"), split), split))
        except DataError:
            continue
    return found


def base_pool(model: str) -> list[str]:
    """The train data a base was pretrained on, read from its ``config.yaml`` (``diffinv pretrain-base``)."""
    base = Path(model)
    made = read_yaml(base / "config.yaml") if (base / "config.yaml").is_file() else None
    if not made or not made.get("data"):
        raise UserError(f"{base} records no training data (no config.yaml of `diffinv pretrain-base`); give the pool "
                        f"to retrieve from with --pool PATH (any image folder or dataset; several allowed)")
    if made.get("split", "train") != "train":
        raise UserError(f"{base} was pretrained on the {made['split']!r} split; give --pool PATH explicitly")
    # A relative path is of the folder pretraining ran in, which pretrain.json records relative to the base; older bases
    # of this repository's layout (bases/NAME, run from the root) are read from two folders up. Never from where we are.
    info = read_json(base / "pretrain.json") if (base / "pretrain.json").is_file() else {}
    roots = [base / info["made_in"]] if info.get("made_in") else []
    roots += [base, base.parent.parent]
    found = []
    for path in [made["data"], *(made.get("extra_data") or [])]:
        if path == "digits" or ":" in path or Path(path).is_absolute():
            found.append(path)
            continue
        where = next((root / path for root in roots if (root / path).exists()), None)
        if where is None:
            raise UserError(f"{base} was pretrained on {path}, which is not found beside it (looked in "
                            f"{', '.join(str(r / path) for r in roots)}); give the pool to retrieve from with --pool PATH")
        found.append(os.path.normpath(str(where)))
    return found


def judge_weights(run: str) -> str:
    """The weights file of a finished ``diffinv train`` run."""
    weights = Path(run) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"--judge {run} has no model.safetensors; give a finished `diffinv train` run")
    return str(weights)
