"""One way to open what a store was made from: its model (as the store used it) and its real subset."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, write_image_tree

from diffinv.data.real import open_images, real_subset, select, validation_ids
from diffinv.diffusion.model_io import load_store_model
from diffinv.diffusion.store import EmbeddingStore, StoreError


def test_the_store_model_is_the_stores_with_its_prediction_type_and_another_is_refused(tiny_latent, tiny_pixel, tmp_path,
                                                                                      capsys):
    data = write_image_tree(tmp_path / "data", per_class=2)
    assert run_cli(capsys, "invert", "--model", tiny_latent, "--data", data, "--out", tmp_path / "s", "--resolution", "16",
                   "--steps", "1", "--prediction-type", "v_prediction", "--quiet")[0] == 0
    store = EmbeddingStore.open(tmp_path / "s")
    backbone = load_store_model(store)
    assert backbone.fingerprint() == store.info["model_fingerprint"] and backbone.prediction_type == "v_prediction"
    with pytest.raises(StoreError, match="was made with another model"):
        load_store_model(store, str(tiny_pixel))
    assert load_store_model(store, str(tiny_pixel), check=False).vae is None  # a method that reads no embeddings


def test_the_real_subset_never_draws_the_validation_hold_out(tmp_path):
    images = open_images(write_image_tree(tmp_path / "d", per_class=6), "auto", "train")
    held = validation_ids(images, 2)
    for seed in range(5):
        subset = real_subset(images, 3, seed, val_per_class=2, warn=lambda m: None)
        assert len(subset) == 6 and not set(subset.ids) & held
        assert subset.ids == select(images, 3, seed, exclude=held, warn=lambda m: None).ids
    assert json.dumps(sorted(real_subset(images, None, 0, warn=lambda m: None).ids)) == json.dumps(sorted(images.ids))
