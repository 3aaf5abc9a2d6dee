"""DDIM inversion (Diff-II-style): an image's inverted start noise samples it back; slerp blends two images' noises."""

import numpy as np
import pytest
import torch
from conftest import run_cli as _run
from PIL import Image

from diffinv.data.real import load_pixels, open_images
from diffinv.data.synthetic import read_manifest
from diffinv.diffusion.sampling import invert_to_noise, sample_latents, slerp_noise
from diffinv.runs import read_yaml
from diffinv.study.plan import embedded_base

QUIET = ["--quiet"]


@pytest.mark.slow
def test_inverted_noise_samples_the_image_back_and_better_with_more_steps():
    from diffinv.diffusion.encoder import load_encoder
    from diffinv.diffusion.model_io import load_backbone

    base = load_backbone(embedded_base())  # a trained model: a random one has no smooth path to invert
    latents = base.encode(load_pixels(open_images("digits").subset(range(6)), 8)).mean
    cond = load_encoder(embedded_base())(latents).detach()
    g = torch.Generator().manual_seed(0)
    errors = {}
    for steps in (10, 25):
        z = invert_to_noise(base, latents, cond, steps)
        back = sample_latents(base, cond, None, z, sampler="ddim", steps=steps, guidance=1.0)
        other = sample_latents(base, cond, None, torch.randn(z.shape, generator=g), sampler="ddim", steps=steps, guidance=1.0)
        errors[steps] = float((back - latents).pow(2).mean().sqrt())
        assert errors[steps] < 0.3 * float((other - latents).pow(2).mean().sqrt())  # far closer than a random start's
        assert 0.8 < float(z.std()) < 1.2  # the inverted noise is Gaussian-sized
    assert errors[25] < errors[10]  # the approximation shrinks with the step


def test_slerp_gives_the_sources_at_0_and_1_and_keeps_the_size_of_orthogonal_noises():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    assert torch.allclose(slerp_noise(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp_noise(a, b, 1.0), b, atol=1e-5)
    mid = slerp_noise(a, b, torch.tensor([0.5, 0.5, 0.5]))
    assert torch.allclose(mid.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), rtol=0.1)  # a lerp would shrink it ~30%
    assert torch.allclose(slerp_noise(a, a, 0.3), a, atol=1e-5)  # parallel rows: no division by zero


def _pixels(path):
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0


@pytest.mark.slow
@pytest.mark.parametrize("interp", [0.0, 1.0])
def test_ddim_inversion_sets_sample_the_image_at_0_and_its_partner_at_1(tmp_path, capsys, interp):
    base = str(embedded_base())
    assert _run(capsys, "invert", "--model", base, "--data", "digits", "--per-class", "2", "--steps", "5", "--init", "encoder",
                "--out", tmp_path / "s", *QUIET)[0] == 0
    code, text = _run(capsys, "generate", "--store", tmp_path / "s", "--method", "ddim-inversion",  # DDIM unasked
                      "--steps", "25", "--guidance", "1", "--noise", "0", "--interp", str(interp), "--per-image", "1",
                      "--out", tmp_path / "g", *QUIET)
    assert code == 0, text
    digits = open_images("digits")
    real = {i: np.asarray(digits.image(n).convert("L"), dtype=np.float64) / 255.0 for n, i in enumerate(digits.ids)}
    rows = read_manifest(tmp_path / "g")
    assert len(rows) == 20
    closer = 0
    for r in rows:
        made = _pixels(tmp_path / "g" / r["file"])
        own, partner = np.sqrt(((made - real[r["source"]]) ** 2).mean()), np.sqrt(((made - real[r["partner"]]) ** 2).mean())
        closer += (own < partner) if interp == 0 else (partner < own)
    assert closer >= 18  # nearly every sample is the image it should be
    assert read_yaml(tmp_path / "g" / "config.yaml")["sampler"] == "ddim"
    code, text = _run(capsys, "generate", "--store", tmp_path / "s", "--method", "ddim-inversion", "--sampler", "euler",
                      "--out", tmp_path / "x", *QUIET)
    assert code == 2 and "not --sampler euler" in text and "leave both out" in text
