"""sdedit-prompt (SDEdit from a class prompt): the change scenario of CONTRIBUTING.md's method recipe, one module."""

from __future__ import annotations

import numpy as np
from conftest import run_cli, write_image_tree
from PIL import Image

from diffinv.data.synthetic import read_manifest

GENERATE = ["--per-image", "2", "--steps", "4", "--sampler", "ddim", "--quiet"]


def _pixels(root, row) -> np.ndarray:
    return np.asarray(Image.open(root / row["file"]).convert("RGB"), dtype=np.float64)


def test_sdedit_prompt_starts_from_the_real_image_and_follows_the_class_prompt(tiny_text, tmp_path, capsys):
    data = write_image_tree(tmp_path / "data", per_class=3, size=16)
    assert run_cli(capsys, "invert", "--model", tiny_text, "--data", data, "--resolution", "16", "--steps", "1",
                   "--out", tmp_path / "store", "--quiet")[0] == 0
    argv = ["generate", "--store", tmp_path / "store", "--method", "sdedit-prompt", *GENERATE]
    assert run_cli(capsys, *argv, "--strength", "0.25", "--out", tmp_path / "a")[0] == 0
    assert run_cli(capsys, *argv, "--strength", "0.25", "--template", "a drawing of a {}", "--out", tmp_path / "b")[0] == 0
    rows = read_manifest(tmp_path / "a")
    assert len(rows) == 12 and {r["prompt"] for r in rows} == {"a photo of a cat", "a photo of a dog"}
    assert all(r["strength"] == 0.25 and r["uncond"] == "empty-prompt" and r["source"] for r in rows)
    assert sorted(r["source"] for r in rows) == sorted(2 * [p.relative_to(data).as_posix() for p in data.rglob("*.png")])
    # Sampling starts from each row's own real image, encoded: what the method hands the sampler.
    from diffinv.config import GenerateConfig
    from diffinv.data.real import load_pixels, open_images
    from diffinv.diffusion.methods import METHODS
    from diffinv.diffusion.methods.base import Inputs
    from diffinv.diffusion.model_io import load_store_model
    from diffinv.diffusion.store import EmbeddingStore
    from diffinv.stages.generate import settings_of

    store = EmbeddingStore.open(tmp_path / "store")
    backbone = load_store_model(store, with_text_encoder=True, check=False)
    method, settings = METHODS.get("sdedit-prompt"), settings_of(GenerateConfig(store=str(tmp_path / "store"),
                                                                                 method="sdedit-prompt", strength=0.25))
    images = open_images(data)
    plan = [dict(r) for r in rows[:4]]
    source = method.load(settings, store, backbone, plan, Inputs(real=images))
    want = backbone.encode(load_pixels(images.subset([images.ids.index(r["source"]) for r in plan]), 16)).mean
    assert (method.start(backbone, plan, source) - want).abs().max() < 1e-5
    cond, uncond = method.conditioning(plan, source, settings, None)
    assert (cond[0] - backbone.encode_prompts([rows[0]["prompt"]])[0]).abs().max() < 1e-5
    assert (uncond[0] - backbone.encode_prompts([""])[0]).abs().max() < 1e-5
    # The prompt conditions the denoising: another template, other pixels from the same draws.
    others = {r["id"]: r for r in read_manifest(tmp_path / "b")}
    assert any(not np.array_equal(_pixels(tmp_path / "a", r), _pixels(tmp_path / "b", others[r["id"]])) for r in rows)


def test_sdedit_prompt_refuses_a_class_embedding(tiny_text, tmp_path, capsys):
    data = write_image_tree(tmp_path / "data", per_class=2, size=16)
    assert run_cli(capsys, "invert", "--model", tiny_text, "--data", data, "--resolution", "16", "--steps", "1",
                   "--out", tmp_path / "store", "--quiet")[0] == 0
    code, text = run_cli(capsys, "generate", "--store", tmp_path / "store", "--method", "sdedit-prompt",
                         "--img2img-embedding", "class", "--class-store", tmp_path / "store", *GENERATE, "--out", tmp_path / "x")
    assert code == 2 and "conditions on the class prompt" in text
