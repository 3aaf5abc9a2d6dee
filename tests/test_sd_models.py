"""Stable Diffusion's structure, at toy sizes: factor-8 VAE with SD's scaling, SD 1.5 / 2.1 scheduler configs, SDXL refused."""

import pytest
import torch

from diffinv.cli import main
from diffinv.diffusion import inversion
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.process import DDPM
from diffinv.diffusion.tiny import save_tiny_model
from diffinv.runs import read_json


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {kind: save_tiny_model(root / kind, kind) for kind in ("sd15-tiny", "sd21-tiny", "sdxl-tiny")}


def test_sd15_structure_loads_with_its_scaling_and_scheduler(models):
    backbone = load_backbone(models["sd15-tiny"])
    assert backbone.family == "sd1" and backbone.cond_dim == 768 and backbone.latent_shape(64) == (4, 8, 8)
    assert backbone.scheduler_config["steps_offset"] == 1 and backbone.prediction_type == "epsilon"
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    moments = backbone.encode(pixels)
    raw = backbone.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(moments.mean, raw * 0.18215)  # SD's scaling factor applied once, on the way in


def test_v_prediction_models_are_inverted_against_v(models, monkeypatch):
    backbone = load_backbone(models["sd21-tiny"])
    assert backbone.family == "sd2" and backbone.prediction_type == "v_prediction"
    seen = []
    real = DDPM.target

    def spy(self, x0, noise, t):
        seen.append(self.prediction)
        return real(self, x0, noise, t)

    monkeypatch.setattr(DDPM, "target", spy)
    settings = inversion.InversionSettings(steps=3, log_every=1, eval_timesteps=1)
    emb, before, after, _ = inversion.invert_batch(backbone, torch.rand(2, 3, 64, 64) * 2 - 1, torch.tensor([1, 2]), settings)
    assert seen and set(seen) == {"v_prediction"} and emb.shape == (2, 5, 1024)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "euler", "pndm"])
def test_every_sampler_runs_on_sd15s_scheduler_config(models, tmp_path, sampler, capsys):
    store = tmp_path / "store"
    assert main(["invert", "--model", str(models["sd15-tiny"]), "--data", "digits", "--per-class", "1", "--steps", "8",
                 "--out", str(store), "--quiet"]) == 0
    text = capsys.readouterr().out
    # No --resolution: chosen from the model and the 8 px data (128 px wanted, capped at the model's native 64).
    assert "inverting at 64 px" in text and read_json(store / "store.json")["latent_shape"] == [4, 8, 8]
    rows = [r for r in (store / "parts").glob("*.json")]
    losses = [(r["loss_init"], r["loss"]) for p in rows for r in read_json(p)]
    assert sum(a for a, _ in losses) > sum(b for _, b in losses)  # inversion lowers the loss
    assert main(["generate", "--store", str(store), "--out", str(tmp_path / "syn"), "--per-image", "1", "--steps", "3",
                 "--sampler", sampler, "--quiet"]) == 0
    assert len(list((tmp_path / "syn").rglob("*.png"))) == 10


def test_sdxl_inverts_and_generates_with_a_learned_pooled_vector_and_time_ids(models, tmp_path, capsys, monkeypatch):
    backbone = load_backbone(models["sdxl-tiny"])
    assert backbone.family == "sdxl" and backbone.extra_tokens == 1 and backbone.pooled_dim == 32
    seen = {}
    forward = backbone.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kw):
        seen.update(tokens=encoder_hidden_states.shape, **kw.get("added_cond_kwargs", {}))
        return forward(sample, timestep, encoder_hidden_states, **kw)

    monkeypatch.setattr(backbone.unet, "forward", spy)
    cond = torch.randn(2, 6, 2048)  # K = 5 tokens + the pooled row
    backbone.predict(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), cond)
    assert seen["tokens"] == (2, 5, 2048)  # the tokens go to cross-attention ...
    torch.testing.assert_close(seen["text_embeds"], cond[:, 5, :32])  # ... the last row's first P values are the pooled vector
    assert seen["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # a full uncropped 64 px image
    monkeypatch.undo()

    store = tmp_path / "s"
    assert main(["invert", "--model", str(models["sdxl-tiny"]), "--data", "digits", "--per-class", "1", "--steps", "8",
                 "--out", str(store), "--quiet"]) == 0
    assert read_json(store / "store.json")["cond_shape"] == [6, 2048]
    rows = [r for p in (store / "parts").glob("*.json") for r in read_json(p)]
    assert sum(r["loss"] for r in rows) < sum(r["loss_init"] for r in rows)  # the tokens and the pooled vector are learned
    assert main(["generate", "--store", str(store), "--out", str(tmp_path / "syn"), "--per-image", "1", "--steps", "3",
                 "--quiet"]) == 0
    assert len(list((tmp_path / "syn").rglob("*.png"))) == 10
    # The prompt rival would need SDXL's two text encoders: refused up front, saying what to use instead.
    capsys.readouterr()
    assert main(["generate", "--store", str(store), "--method", "prompt", "--out", str(tmp_path / "p"), "--quiet"]) == 2
    assert "both of its text encoders" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main(["inspect", str(models["sdxl-tiny"])]) == 0
    assert "pooled vector of 32" in capsys.readouterr().out


def test_fp16_inversion_is_refused_with_the_reason(models, tmp_path, capsys):
    assert main(["invert", "--model", str(models["sd15-tiny"]), "--data", "digits", "--per-class", "1", "--precision", "fp16",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "loss scaler" in capsys.readouterr().err


def test_inspect_tells_what_a_run_would_do(models, capsys):
    assert main(["inspect", str(models["sd21-tiny"]), "--data", "digits"]) == 0
    out = capsys.readouterr().out
    assert "sd2" in out and "v_prediction" in out and "64 px -> latent 4x8x8" in out and "GFLOP" in out


def test_the_prediction_type_can_be_overridden_and_generation_follows_the_store(models, tmp_path, monkeypatch, capsys):
    # An SD 2.x checkpoint whose scheduler config says v_prediction for a model trained on epsilon: --prediction-type.
    seen = []
    real = DDPM.target
    monkeypatch.setattr(DDPM, "target", lambda self, x0, n, t: seen.append(self.prediction) or real(self, x0, n, t))
    store = tmp_path / "store"
    assert main(["invert", "--model", str(models["sd21-tiny"]), "--data", "digits", "--per-class", "1", "--steps", "2",
                 "--prediction-type", "epsilon", "--out", str(store), "--quiet"]) == 0
    assert set(seen) == {"epsilon"} and read_json(store / "store.json")["prediction_type"] == "epsilon"
    import diffinv.stages.generate as generate

    used = []
    real_sample = generate.generate_batch
    monkeypatch.setattr(generate, "generate_batch", lambda backbone, *a: used.append(backbone.prediction_type) or real_sample(backbone, *a))
    assert main(["generate", "--store", str(store), "--out", str(tmp_path / "syn"), "--per-image", "1", "--steps", "2",
                 "--quiet"]) == 0
    assert used and set(used) == {"epsilon"}  # the model's own config says v_prediction
    assert load_backbone(models["sd21-tiny"]).prediction_type == "v_prediction"
