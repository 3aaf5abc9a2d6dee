import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffinv import rng
from diffinv.cli import main
from diffinv.config import ConfigError, GenerateConfig, InvertConfig, load_config
from diffinv.data.synthetic import open_synthetic, read_manifest
from diffinv.diffusion.generation import Conditioning, generate_batch, plan_samples
from diffinv.diffusion.inversion import InversionSettings, invert_batch
from diffinv.diffusion.methods.base import GenerationSettings
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.perturb import lerp, perturb, pick_partners, slerp
from diffinv.diffusion.sampling import sample_latents, unit_rms
from diffinv.diffusion.store import EmbeddingStore
from diffinv.runs import RunError, read_json
from diffinv.stages.generate import generate_dataset
from diffinv.stages.invert import invert_dataset


def _invert(model, data, out, **kw):
    config = InvertConfig(model=str(model), data=str(data), resolution=16, steps=3, log_every=1, **kw)
    return invert_dataset(config, out, progress=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A per-image and a per-class store of 2 classes x 3 random images, on the tiny latent model."""
    from conftest import write_image_tree

    from diffinv.diffusion.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("gen")
    model = save_tiny_model(root / "model", "latent", with_text_encoder=True)
    data = write_image_tree(root / "images")
    return model, data, _invert(model, data, root / "store"), _invert(model, data, root / "class-store", target="class")


def _gen(store, **kw):
    base = dict(store=str(store), per_image=2, steps=3, batch_size=4)
    return GenerateConfig(**{**base, **kw})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


# ----------------------------------------------------------------------------- maths


def test_interpolation_endpoints_and_noise():
    a, b = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    keys = torch.arange(3)
    torch.testing.assert_close(lerp(a, b, 0.0), a)
    torch.testing.assert_close(lerp(a, b, 1.0), b)
    torch.testing.assert_close(slerp(a, b, 0.0), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-5, rtol=1e-5)
    # Halfway on the sphere the norm is the mean of the norms (lerp would shrink it).
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), (a.norm(dim=-1) + b.norm(dim=-1)) / 2, atol=1e-4, rtol=1e-4)
    assert (lerp(a, b, 0.5).norm(dim=-1) < mid.norm(dim=-1) + 1e-6).all()
    assert torch.equal(perturb(a, b, keys, 0.0, 0.0), a)
    noisy = perturb(a, b, keys, 0.0, 0.1)
    assert 0.07 < (noisy - a).std() < 0.13
    assert torch.equal(noisy, perturb(a, b, keys, 0.0, 0.1))  # keyed: the same sample gets the same noise


def test_partners_same_class_never_self_and_fallback_recorded():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])  # class 2 has a single image
    sources = torch.arange(6).repeat(40)
    keys = rng.keys_tensor(0, [str(i) for i in range(len(sources))])
    partners, fallback = pick_partners(keys, sources, labels)
    assert not (partners == sources).any()
    assert torch.equal(fallback, sources == 3)
    ok = ~fallback
    assert torch.equal(labels[partners[ok]], labels[sources[ok]])
    assert (labels[partners[fallback]] != 2).all()
    assert set(partners[sources == 0].tolist()) == {2, 5}  # both other members of class 0 get drawn
    # Keyed by the sample: drawing one sample alone gives the same partner.
    assert pick_partners(keys[7:8], sources[7:8], labels)[0].item() == partners[7].item()


def test_shared_class_conditioning_path_equals_per_image_path_when_each_class_has_one_image(tiny_latent):
    backbone = load_backbone(tiny_latent)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    keys = rng.keys_tensor(0, ["a", "b", "c"])
    config = InversionSettings(steps=4, log_every=2)
    alone = invert_batch(backbone, pixels, keys, config)
    grouped = invert_batch(backbone, pixels, keys, config, owners=torch.arange(3))
    for x, y in zip(alone, grouped):
        torch.testing.assert_close(x, y)
    # Two images sharing one conditioning: it ends up between their per-image optima.
    shared = invert_batch(backbone, pixels[:2], keys[:1], config, owners=torch.tensor([0, 0])).embeddings
    assert shared.shape == (1, 5, 32) and not torch.equal(shared[0], alone[0][0])


# ----------------------------------------------------------------------------- sampling


def test_batch_equals_samples_made_one_by_one(stores):
    model, _, store_dir, _ = stores
    backbone = load_backbone(model)
    store = EmbeddingStore.open(store_dir)
    for sampler in ("dpm++2m", "ddim", "euler", "pndm"):
        config = GenerationSettings.of(_gen(store_dir, sampler=sampler, eta=0.5 if sampler == "ddim" else 0.0))
        rows = plan_samples(config, store, str(model))[:4]
        source = Conditioning(store.embeddings, store.mean_embedding(), resolution=16)
        together = generate_batch(backbone, rows, source, config)
        alone = torch.cat([generate_batch(backbone, [r], source, config) for r in rows])
        torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(together[0], together[1], atol=1e-3)  # different samples do differ


def test_zero_interp_and_noise_reproduce_the_deterministic_sample_of_c_i(stores):
    model, _, store_dir, _ = stores
    backbone = load_backbone(model)
    store = EmbeddingStore.open(store_dir)
    config = GenerationSettings.of(_gen(store_dir, interp=0.0, noise=0.0, sampler="ddim", guidance=3.0))
    rows = plan_samples(config, store, str(model))[:2]  # two samples of image 0
    source = Conditioning(store.embeddings, store.mean_embedding(), resolution=16)
    made = generate_batch(backbone, rows, source, config)
    keys = torch.tensor([r["_key"] for r in rows])
    c_i = store.embeddings[[0, 0]]
    direct = sample_latents(backbone, c_i, store.mean_embedding().expand_as(c_i),
                            rng.keyed_normal(keys, 0, rng.STREAM_NOISE, backbone.latent_shape(16)),
                            sampler="ddim", steps=3, guidance=3.0)
    torch.testing.assert_close(made, backbone.decode(direct))
    # Guidance is really applied: without it the same noise gives another image.
    plain = sample_latents(backbone, c_i, None, rng.keyed_normal(keys, 0, rng.STREAM_NOISE, backbone.latent_shape(16)),
                           sampler="ddim", steps=3, guidance=1.0)
    assert not torch.allclose(plain, direct, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_clip_x0_keeps_a_pixel_models_samples_in_range(tiny_pixel, tiny_latent, sampler):
    # A random tiny pixel UNet predicts clean images far outside [-1, 1]; clipped, each step's
    # prediction (and so the final sample, where alpha_bar is 1) stays inside.
    backbone = load_backbone(tiny_pixel)
    keys = torch.arange(4, dtype=torch.int64)
    noise = 3.0 * rng.keyed_normal(keys, 0, rng.STREAM_NOISE, backbone.latent_shape(16))
    cond = torch.randn(4, 2, backbone.cond_dim, generator=torch.Generator().manual_seed(0))
    free = sample_latents(backbone, cond, None, noise, sampler=sampler, steps=4, guidance=1.0)
    clipped = sample_latents(backbone, cond, None, noise, sampler=sampler, steps=4, guidance=1.0, clip_x0=True)
    assert free.abs().max() > 1.5 and clipped.abs().max() <= 1.0 + 1e-4
    # Latents have no such range, and euler / pndm cannot clip: both are refused with the reason.
    with pytest.raises(ValueError, match="pixel-space models"):
        load_backbone(tiny_latent).make_scheduler(sampler, clip_x0=True)
    with pytest.raises(ConfigError, match="clip-x0 needs --sampler"):
        GenerateConfig(store="s", sampler="euler", clip_x0=True)


def test_unit_noise_rescales_only_the_starting_noise_of_each_sample(stores):
    z = rng.keyed_normal(torch.arange(3), 0, rng.STREAM_NOISE, (3, 4, 4))
    u = unit_rms(z)
    torch.testing.assert_close(u.flatten(1).pow(2).mean(1), torch.ones(3))
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(u.flatten(1), z.flatten(1)), torch.ones(3))
    # Generation with unit_noise is the same sampler started from the rescaled noise, per sample.
    model, _, store_dir, _ = stores
    backbone = load_backbone(model)
    store = EmbeddingStore.open(store_dir)
    config = GenerationSettings.of(_gen(store_dir, interp=0.0, noise=0.0, sampler="ddim", guidance=1.0, unit_noise=True))
    rows = plan_samples(config, store, str(model))[:2]
    assert all(r["unit_noise"] is True for r in rows)
    made = generate_batch(backbone, rows, Conditioning(store.embeddings, store.mean_embedding(), resolution=16), config)
    noise = rng.keyed_normal(torch.tensor([r["_key"] for r in rows]), 0, rng.STREAM_NOISE, backbone.latent_shape(16))
    c_i = store.embeddings[[0, 0]]
    direct = sample_latents(backbone, c_i, None, unit_rms(noise), sampler="ddim", steps=3, guidance=1.0)
    torch.testing.assert_close(made, backbone.decode(direct))
    raw = sample_latents(backbone, c_i, None, noise, sampler="ddim", steps=3, guidance=1.0)
    assert not torch.allclose(direct, raw, atol=1e-4)


def test_img2img_small_strength_stays_near_the_real_image(stores):
    model, _, store_dir, _ = stores
    backbone = load_backbone(model)
    start = torch.randn(2, 4, 4, 4)
    cond = torch.randn(2, 5, 32)
    noise = torch.randn(2, 4, 4, 4)
    near = sample_latents(backbone, cond, None, noise, sampler="ddim", steps=20, guidance=1.0, start=start, strength=0.05)
    far = sample_latents(backbone, cond, None, noise, sampler="ddim", steps=20, guidance=1.0, start=start, strength=1.0)
    assert (near - start).abs().mean() < 0.5 * (far - start).abs().mean()


# ----------------------------------------------------------------------------- datasets on disk


def test_manifest_complete_and_consistent_with_files(stores, tmp_path):
    model, data, store_dir, _ = stores
    out = generate_dataset(_gen(store_dir, save_size=12), tmp_path / "syn", progress=False)
    rows = read_manifest(out)
    assert len(rows) == 6 * 2 and read_json(out / "generate.json")["status"] == "complete"
    assert sorted(r["file"] for r in rows) == sorted(_files(out))
    store = EmbeddingStore.open(store_dir)
    by_id = {r["id"]: r for r in store.rows}
    for r in rows:
        src, partner = by_id[r["source"]], by_id[r["partner"]]
        assert r["class"] == src["class"] == partner["class"] and r["file"].startswith(r["class"] + "/")
        assert r["partner"] != r["source"] and r["partner_fallback"] is False
        assert (r["interp"], r["noise"], r["guidance"], r["sampler"], r["steps"], r["seed"]) == (0.1, 0.1, 2.0, "dpm++2m", 3, 0)
        assert Image.open(out / r["file"]).size == (12, 12)
    synthetic = open_synthetic(out, classes=["cat", "dog"])
    assert len(synthetic) == 12 and sorted(set(synthetic.labels.tolist())) == [0, 1]
    assert synthetic.image(0).mode == "RGB"
    # Re-running with the same settings is a no-op; different settings are refused.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    generate_dataset(_gen(store_dir, save_size=12), out, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    with pytest.raises(RunError, match="noise: folder has 0.1, asked 0.3"):
        generate_dataset(_gen(store_dir, save_size=12, noise=0.3), out, progress=False)


def test_interrupt_then_rerun_completes_with_identical_images(stores, tmp_path):
    _, _, store_dir, _ = stores
    generate_dataset(_gen(store_dir), tmp_path / "ref", progress=False)

    def stop(batch):
        if batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(_gen(store_dir), tmp_path / "run", progress=False, on_batch=stop)
    assert len(_files(tmp_path / "run")) == 8 and not (tmp_path / "run" / "manifest.jsonl").exists()
    made = []
    generate_dataset(_gen(store_dir), tmp_path / "run", progress=False, on_batch=made.append)
    assert made == [0]  # only the one missing chunk was made
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")
    assert (tmp_path / "run" / "manifest.jsonl").read_text() == (tmp_path / "ref" / "manifest.jsonl").read_text()


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_images(stores, tmp_path):
    _, _, store_dir, _ = stores
    args = ["--store", str(store_dir), "--per-image", "8", "--steps", "6", "--batch-size", "2", "--quiet"]
    cli = [sys.executable, "-m", "diffinv.cli", "generate"]
    subprocess.run(cli + args + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)
    proc = subprocess.Popen(cli + args + ["--out", str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list((tmp_path / "run").rglob("*.png"))) < 4 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_json(tmp_path / "run" / "generate.json")["status"] == "in-progress"
    done = subprocess.run(cli + args + ["--out", str(tmp_path / "run"), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "run").rglob("*.tmp"))  # a temporary left by the kill is cleaned up
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


# ----------------------------------------------------------------------------- every method from the CLI


def test_every_method_runs_end_to_end_from_the_cli(stores, tmp_path, capsys):
    model, _, store_dir, class_dir = stores
    runs = {
        "di": ["--store", str(store_dir), "--interp-mode", "spherical", "--uncond", "class-mean"],
        "class-inversion": ["--store", str(class_dir), "--method", "class-inversion"],
        "prompt": ["--store", str(store_dir), "--method", "prompt", "--template", "a photo of a {}", "--template", "a {} image"],
        "img2img": ["--store", str(store_dir), "--method", "img2img", "--strength", "0.6"],
        "img2img-class": ["--store", str(store_dir), "--method", "img2img", "--img2img-embedding", "class",
                          "--class-store", str(class_dir)],
    }
    for name, argv in runs.items():
        out = tmp_path / name
        code = main(["generate", *argv, "--out", str(out), "--per-image", "2", "--steps", "2", "--sampler", "ddim", "--quiet"])
        assert code == 0, capsys.readouterr().err
        rows = read_manifest(out)
        assert len(rows) == 12 and len(_files(out)) == 12, name  # 6 real images x 2, for every method
        assert {r["class"] for r in rows} == {"cat", "dog"}
    prompts = {r["prompt"] for r in read_manifest(tmp_path / "prompt")}
    assert prompts == {"a photo of a cat", "a cat image", "a photo of a dog", "a dog image"}
    assert {r["source"] for r in read_manifest(tmp_path / "class-inversion")} == {"class:cat", "class:dog"}
    assert all(r["strength"] == 0.6 and r["partner"] for r in read_manifest(tmp_path / "img2img"))
    # Prompt samples really depend on the text: the two classes' first images differ.
    files = _files(tmp_path / "prompt")
    assert files["cat/cat-00000.png"] != files["dog/dog-00000.png"]


def test_img2img_strength_between_whole_steps_is_named_and_acts_as_the_lower_one(stores, tmp_path, capsys):
    _, _, store_dir, _ = stores
    argv = ["generate", "--store", str(store_dir), "--method", "img2img", "--per-image", "1", "--steps", "4", "--quiet"]
    for strength in ("0.5", "0.7"):
        assert main([*argv, "--strength", strength, "--out", str(tmp_path / strength)]) == 0
    assert "--strength 0.7 acts as 0.5" in capsys.readouterr().out
    assert _files(tmp_path / "0.7") == _files(tmp_path / "0.5")  # what the note says: the same 2 of 4 steps
    assert main([*argv, "--strength", "0.75", "--out", str(tmp_path / "0.75")]) == 0
    assert "acts as" not in capsys.readouterr().out
    assert _files(tmp_path / "0.75") != _files(tmp_path / "0.5")


def test_class_store_has_one_row_per_class(stores):
    _, _, _, class_dir = stores
    store = EmbeddingStore.open(class_dir)
    assert store.ids == ["class:cat", "class:dog"] and store.embeddings.shape == (2, 5, 32)
    assert [r["n_images"] for r in store.rows] == [3, 3]


@pytest.mark.parametrize("argv, message", [
    (["--method", "class-inversion"], "needs a per-class store"),
    (["--interp", "2"], "interp must be in [0, 1]"),
    (["--template", "a photo"], "must contain {}"),
    (["--method", "img2img", "--img2img-embedding", "class"], "needs --class-store"),
    (["--method", "prompt", "--model", "NOMODEL"], "does not exist"),
    (["--method", "img2img", "--steps", "4", "--strength", "0.2"], "runs no denoising step"),
])
def test_bad_generate_options_are_clear_errors(stores, tmp_path, capsys, argv, message):
    _, _, store_dir, _ = stores
    argv = [a.replace("NOMODEL", str(tmp_path / "nope")) for a in argv]
    assert main(["generate", "--store", str(store_dir), "--out", str(tmp_path / "o"), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_store_from_another_model_or_without_text_encoder_is_refused(stores, tiny_pixel, tiny_latent, tmp_path, capsys):
    _, _, store_dir, _ = stores
    assert main(["generate", "--store", str(store_dir), "--model", str(tiny_pixel), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "made with another model" in capsys.readouterr().err
    assert main(["generate", "--store", str(store_dir), "--model", str(tiny_latent), "--method", "prompt",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "text_encoder" in capsys.readouterr().err
    assert main(["generate", "--store", str(tmp_path / "missing"), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_yaml_templates_and_flags(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text("templates: ['a photo of a {}', 'a drawing of a {}']\nsteps: 7\nsave-size: 32\n")
    config = load_config(GenerateConfig, cfg, {"steps": 9})
    assert config.templates == ("a photo of a {}", "a drawing of a {}") and config.steps == 9 and config.save_size == 32
    cfg.write_text("templates: 3\n")
    with pytest.raises(ConfigError, match="list of strings"):
        load_config(GenerateConfig, cfg)


def test_single_image_class_falls_back_to_another_class_and_says_so(tmp_path, tiny_latent, capsys):
    from conftest import write_image_tree

    data = write_image_tree(tmp_path / "d", per_class=2, classes=("a", "b"))
    for extra in (data / "b").iterdir():
        if extra.name != "000.png":
            extra.unlink()
    _invert(tiny_latent, data, tmp_path / "s")
    assert main(["generate", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "g"), "--per-image", "2",
                 "--steps", "2", "--quiet"]) == 0
    assert "2 partners from another class" in capsys.readouterr().out
    rows = [r for r in read_manifest(tmp_path / "g") if r["class"] == "b"]
    assert all(r["partner_fallback"] and r["partner"].startswith("a/") for r in rows)
    assert len(rows) == 2


def test_variants_of_grey_data_are_saved_grey(tmp_path, tiny_latent):
    import numpy as np
    from conftest import write_image_tree

    data = write_image_tree(tmp_path / "d", per_class=2, classes=("a", "b"))
    for png in data.rglob("*.png"):  # R = G = B, as MedMNIST's grey images load
        Image.open(png).convert("L").convert("RGB").save(png)
    _invert(tiny_latent, data, tmp_path / "s")
    assert EmbeddingStore.open(tmp_path / "s").info["grey"] is True
    assert main(["generate", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "g"), "--per-image", "2",
                 "--steps", "2", "--quiet"]) == 0
    images = [np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (tmp_path / "g").rglob("*.png")]
    assert len(images) == 8 and all((im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all() for im in images)
    assert max(im.std() for im in images) > 0  # not blank: grey images with content
    from diffinv.data.synthetic import MARKER as SET_MARKER

    assert read_json(tmp_path / "g" / SET_MARKER)["grey"] is True  # recorded with the set
    # A store made before invert recorded it: generate reads its real images to tell.
    info = read_json(tmp_path / "s" / "store.json")
    del info["grey"]
    (tmp_path / "s" / "store.json").write_text(json.dumps(info))
    assert main(["generate", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "g2"), "--per-image", "1",
                 "--steps", "2", "--quiet"]) == 0
    assert read_json(tmp_path / "g2" / SET_MARKER)["grey"] is True
    _invert(tiny_latent, write_image_tree(tmp_path / "colour"), tmp_path / "sc")  # colour data keeps its colour
    assert EmbeddingStore.open(tmp_path / "sc").info["grey"] is False
