"""A latent base made here as Stable Diffusion is made: `pretrain-vae`, then `pretrain-base --vae`, then the pipeline on it."""

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

import diffinv.stages.pretrain as pretrain
import diffinv.stages.pretrain_vae as pretrain_vae
from diffinv.config import ConfigError, PretrainConfig, VaeConfig
from diffinv.diffusion.model_io import load_backbone, load_vae
from diffinv.diffusion.pretrain import latent_scale, psnr, vae_loss
from diffinv.runs import read_json

VAE = ["--data", "digits", "--resolution", "16", "--channels", "16,32,32", "--batch-size", "32", "--lr", "3e-3",
       "--warmup", "5", "--ema", "0.9", "--log-every", "10", "--checkpoint-every", "20", "--device", "cpu", "--quiet"]
UNET = ["--data", "digits", "--resolution", "16", "--channels", "32,64", "--layers-per-block", "1", "--cross-attention-dim",
        "16", "--tokens", "2", "--batch-size", "16", "--lr", "3e-3", "--warmup", "5", "--ema", "0.9", "--log-every", "5",
        "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffinv.cli import main

    out = tmp_path_factory.mktemp("vae") / "vae"
    assert main(["pretrain-vae", *VAE, "--steps", "80", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def latent_base(tiny_vae, tmp_path_factory):
    from diffinv.cli import main

    out = tmp_path_factory.mktemp("base") / "latent-base"
    assert main(["pretrain-base", *UNET, "--vae", str(tiny_vae), "--views", "invariant", "--steps", "30",
                 "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_the_autoencoder_learns_and_its_scale_gives_unit_variance_latents(tiny_vae):
    info = read_json(tiny_vae / "pretrain-vae.json")
    assert info["status"] == "complete" and info["factor"] == 4 and info["latent_shape"] == [4, 4, 4]
    losses = [json.loads(line)["loss"] for line in (tiny_vae / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0]
    assert info["train_psnr_db"] > 14  # at 80 steps; an untrained decoder gives ~8 dB on digits
    assert "# pretraining mix, 1,437 training images" in (tiny_vae / "config.yaml").read_text()
    # The saved scaling factor is measured: scaled latent means of the training images have unit std.
    vae = load_vae(tiny_vae)
    from diffinv.data.real import load_pixels, open_images

    images = open_images("digits", "auto", "train")
    x = load_pixels(images.subset(list(range(len(images)))), 16)
    means = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert abs(float(means.std()) - 1.0) < 0.01
    assert vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    for name in ("loss.png", "reconstructions.png"):
        assert (tiny_vae / name).stat().st_size > 0


def test_vae_maths():
    # PSNR of a uniform error e on [-1, 1] images is 10 log10(4 / e^2); the scale is 1 / std.
    x = torch.zeros(2, 3, 4, 4)
    assert psnr(x, x + 0.2).tolist() == pytest.approx([10 * torch.log10(torch.tensor(4 / 0.04)).item()] * 2, rel=1e-5)
    assert latent_scale(torch.tensor([-2.0, 2.0, -2.0, 2.0])) == pytest.approx(1 / float(torch.tensor([-2.0, 2, -2, 2]).std()))
    # The loss is a pure function of its keys: the same keys give the same loss, others another one.
    from diffinv.diffusion.pretrain import build_vae

    torch.manual_seed(0)
    vae = build_vae((16, 32), 1, 4, 8)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    keys = torch.tensor([1, 2])
    a, b, c = (vae_loss(vae, x, k, 0, 1e-6)[0] for k in (keys, keys, keys + 5))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.slow
def test_a_latent_base_is_inspected_inverted_generated_and_decoded_like_sd(latent_base, tmp_path, capsys):
    info = read_json(latent_base / "pretrain.json")
    assert info["space"] == "latent" and info["status"] == "complete"
    backbone = load_backbone(latent_base)
    assert backbone.vae is not None and backbone.vae_factor == 4 and backbone.latent_shape(16) == (4, 4, 4)
    assert backbone.family == "latent" and backbone.native_resolution == 16
    code, text = run_cli(capsys, "inspect", latent_base)
    assert code == 0 and "family: latent" in text and "VAE factor 4" in text and "latent 4x4x4" in text
    store, sets = tmp_path / "store", tmp_path / "set"
    code, _ = run_cli(capsys, "invert", "--model", latent_base, "--data", "digits", "--per-class", "1", "--steps", "5",
                      "--resolution", "16",
                      "--init", "encoder", "--tokens", "2", "--device", "cpu", "--quiet", "--out", store)
    assert code == 0
    code, _ = run_cli(capsys, "generate", "--store", store, "--method", "di", "--per-image", "2", "--steps", "3",
                      "--device", "cpu", "--quiet", "--out", sets)
    assert code == 0
    code, text = run_cli(capsys, "verify", sets)
    assert code == 0 and "ok" in text
    manifest = [json.loads(line) for line in (sets / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 20
    from PIL import Image

    assert {m["resolution"] for m in manifest} == {16}
    img = Image.open(sets / manifest[0]["file"])
    assert img.size == (16, 16) and img.mode == "RGB"  # decoded from a 4 x 4 x 4 latent


def test_the_unet_denoises_posterior_draws_of_the_mirror_images_latents():
    mean, std = torch.zeros(3, 1, 1, 1), torch.ones(3, 1, 1, 1)
    flipped = pretrain._Latents(torch.full((3, 1, 1, 1), 10.0), torch.zeros(3, 1, 1, 1))
    latents = pretrain._Latents(mean, std * 0, flipped)
    x = latents.sample(torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]), 3, torch.tensor([True, False, True]))
    assert x.flatten().tolist() == [10.0, 0.0, 10.0]
    # The draw: mean + std * keyed noise, the same for the same keys and step.
    drawn = pretrain._Latents(mean, std)
    a = drawn.sample(torch.tensor([0, 1]), torch.tensor([5, 6]), 3, None)
    assert torch.equal(a, drawn.sample(torch.tensor([0, 1]), torch.tensor([5, 6]), 3, None)) and a.abs().sum() > 0


def test_pretrain_vae_resumes_after_a_kill_to_the_same_weights(tmp_path, monkeypatch):
    config = VaeConfig(data="digits", resolution=16, channels=(16, 32, 32), batch_size=8, steps=12, warmup=2,
                       log_every=3, checkpoint_every=5, device="cpu")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    pretrain_vae.pretrain_vae(config, whole, progress=False, log=lambda m: None)
    calls = {"n": 0}
    real = pretrain.ema_update

    def dying(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 8:  # after the checkpoint at step 5
            raise KeyboardInterrupt
        real(*args, **kw)

    monkeypatch.setattr(pretrain, "ema_update", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain_vae.pretrain_vae(config, killed, progress=False, log=lambda m: None)
    monkeypatch.setattr(pretrain, "ema_update", real)
    assert (killed / "checkpoint.safetensors").is_file()
    pretrain_vae.pretrain_vae(config, killed, resume=True, progress=False, log=lambda m: None)
    a = load_file(str(whole / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(killed / "vae" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "losses.jsonl").read_text() .count("\n") == 4


def test_bad_vae_and_sizes_are_refused_with_what_to_do(tiny_vae, tmp_path, capsys):
    code, text = run_cli(capsys, "pretrain-base", *UNET, "--vae", tmp_path / "nope", "--steps", "1", "--out", tmp_path / "a")
    assert code == 2 and "pretrain-vae" in text
    # 16 px under a factor-4 VAE is a 4 px latent: three UNet blocks cannot halve it twice evenly... 4 -> 2 -> 1 is fine,
    # but 12 px (a 3 px latent) cannot be halved at all.
    code, text = run_cli(capsys, "pretrain-base", *UNET, "--resolution", "12", "--vae", tiny_vae, "--steps", "1",
                         "--out", tmp_path / "b")
    assert code == 2 and "multiple of 8" in text
    with pytest.raises(ConfigError, match="multiple of the latent factor 4"):
        VaeConfig(resolution=18, channels=(16, 32, 32))
    with pytest.raises(ConfigError, match="never reads a test split"):
        VaeConfig(split="test")
    assert PretrainConfig(vae="x", resolution=12).vae == "x"  # checked against the VAE when it is read


def test_a_generalist_base_on_an_unseen_domain_gets_a_note_not_a_warning(tmp_path):
    from diffinv.data.real import open_images
    from diffinv.stages.invert import warn_base_mismatch

    images = open_images("digits")
    said = []
    for name, sources in (("specialist", "data: ../cifar10\n"), ("generalist", "data: ../cifar10\nextra_data: [../mnist]\n")):
        base = tmp_path / name
        base.mkdir()
        (base / "config.yaml").write_text(sources)
        (base / "pretrain.json").write_text('{"image_channels": 3}')
        warn_base_mismatch(str(base), "digits", images, said.append)
    specialist, generalist = said
    assert specialist.startswith("warning:") and "--model" in specialist and "--base" not in specialist
    assert generalist.startswith("note:") and "generalist" in generalist and "paper's setting" in generalist
    assert "says little" not in generalist
