"""SD3-structured models (a joint-attention transformer, 16-channel VAE, rectified flow): loaded, inverted, sampled."""

import json

import pytest
import torch
from conftest import run_cli

from diffinv.data.synthetic import read_manifest
from diffinv.diffusion.backbone import ModelError
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.process import RectifiedFlow
from diffinv.diffusion.sampling import invert_to_noise, sample_latents
from diffinv.runs import read_json


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from diffinv.cli import main

    out = tmp_path_factory.mktemp("sd3") / "model"
    assert main(["tiny-model", "--kind", "sd3-tiny", "--out", str(out)]) == 0
    return out


def test_an_sd3_folder_is_read_as_a_flow_transformer_and_inspect_says_so(sd3, capsys):
    backbone = load_backbone(sd3)
    assert backbone.family == "sd3" and isinstance(backbone.process, RectifiedFlow) and backbone.process.shift == 3.0
    assert (backbone.cond_dim, backbone.pooled_dim, backbone.extra_tokens) == (32, 16, 1)
    assert backbone.latent_shape(64) == (16, 8, 8) and backbone.native_resolution == 64
    code, text = run_cli(capsys, "inspect", sd3, "--data", "digits")
    assert code == 0 and "family: sd3" in text and "rectified flow: shift 3" in text and "latent 16x8x8" in text
    assert "joint-attention width" in text and "pooled vector of 16" in text


def test_the_last_row_is_the_pooled_vector_and_only_its_first_p_values_count(sd3):
    backbone = load_backbone(sd3)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
    t = backbone.process.model_time(torch.tensor([500]))
    base = backbone.predict(x, t, cond)
    beyond, pooled = cond.clone(), cond.clone()
    beyond[:, -1, 16:] += 1.0  # past P = 16: not read
    pooled[:, -1, :16] += 1.0
    assert torch.equal(backbone.predict(x, t, beyond), base)
    assert not torch.allclose(backbone.predict(x, t, pooled), base)


def test_inversion_loss_falls_and_di_img2img_class_inversion_lora_and_ddim_inversion_sample(sd3, tmp_path, capsys):
    store = tmp_path / "store"
    code, text = run_cli(capsys, "invert", "--model", sd3, "--data", "digits", "--per-class", "1", "--steps", "30",
                         "--out", store, "--quiet")
    assert code == 0
    rows = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in rows) < sum(r["loss_init"] for r in rows)  # the flow's loss falls under the tokens
    assert read_json(store / "store.json")["prediction_type"] == "flow_prediction"
    for method, extra in (("di", []), ("img2img", ["--strength", "0.5"]), ("ddim-inversion", [])):
        out = tmp_path / method
        code, text = run_cli(capsys, "generate", "--store", store, "--method", method, *extra, "--per-image", "1",
                             "--steps", "3", "--out", out, "--quiet")
        assert code == 0, text
        assert len(read_manifest(out)) == 10
        assert run_cli(capsys, "verify", out)[0] == 0
    classes = tmp_path / "classes"
    assert run_cli(capsys, "invert", "--model", sd3, "--data", "digits", "--per-class", "1", "--steps", "3", "--target",
                   "class", "--out", classes, "--quiet")[0] == 0
    assert run_cli(capsys, "finetune", "--store", classes, "--steps", "2", "--batch-size", "2", "--out", tmp_path / "lora",
                   "--quiet")[0] == 0
    for method, extra in (("class-inversion", []), ("lora", ["--adapters", tmp_path / "lora"])):
        code, text = run_cli(capsys, "generate", "--store", classes, "--method", method, *extra, "--per-image", "1",
                             "--steps", "2", "--out", tmp_path / f"g-{method}", "--quiet")
        assert code == 0, text


def test_what_a_flow_model_cannot_do_is_refused_with_why(sd3, tmp_path, capsys):
    store = tmp_path / "store"
    assert run_cli(capsys, "invert", "--model", sd3, "--data", "digits", "--per-class", "1", "--steps", "1", "--out", store,
                   "--quiet")[0] == 0
    for argv, why in ((["--sampler", "pndm"], "no rectified-flow form"), (["--sampler", "ddim", "--eta", "0.5"], "leave --eta out"),
                      (["--method", "prompt"], "three text encoders")):
        code, text = run_cli(capsys, "generate", "--store", store, *argv, "--per-image", "1", "--steps", "2",
                             "--out", tmp_path / "g", "--quiet")
        assert code == 2 and why in text, text
    code, text = run_cli(capsys, "invert", "--model", sd3, "--data", "digits", "--prediction-type", "epsilon", "--steps", "1",
                         "--out", tmp_path / "s2", "--quiet")
    assert code == 2 and "rectified-flow model" in text


def test_flow_inversion_samples_the_latent_back_closer_with_more_steps(sd3):
    backbone = load_backbone(sd3)
    g = torch.Generator().manual_seed(0)
    latents, cond = 0.5 * torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    errors = {}
    for steps in (5, 20):
        z = invert_to_noise(backbone, latents, cond, steps)
        back = sample_latents(backbone, cond, None, z, sampler="euler", steps=steps, guidance=1.0)
        other = sample_latents(backbone, cond, None, torch.randn(z.shape, generator=g), sampler="euler", steps=steps, guidance=1.0)
        errors[steps] = float((back - latents).pow(2).mean().sqrt())
        assert errors[steps] < 0.2 * float((other - latents).pow(2).mean().sqrt())
    assert errors[20] < 0.5 * errors[5]  # Euler's error: first order in the step


def test_an_sd3_hub_id_fetches_no_text_encoder_and_flux_is_refused(sd3, tmp_path, monkeypatch):
    import fnmatch
    import shutil

    import huggingface_hub

    patterns = []

    def snapshot_download(repo_id, local_files_only=False, allow_patterns=None):
        patterns.extend(allow_patterns)
        return str(sd3)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert load_backbone("someone/tiny-sd3").family == "sd3"
    wanted = ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "transformer/diffusion_pytorch_model.safetensors.index.json", "scheduler/scheduler_config.json"]
    unwanted = ["text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_2/model.safetensors",
                "transformer/diffusion_pytorch_model.bin"]
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in patterns)  # SD3's T5 alone is ~9.5 GB
    flux = tmp_path / "flux"
    shutil.copytree(sd3, flux)
    config = json.loads((flux / "transformer" / "config.json").read_text())
    (flux / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ModelError, match="FLUX-class transformers"):
        load_backbone(flux)
