"""Original-format (CompVis) single-file checkpoints: --original-config, and the SD 2.x ambiguity refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ldm_checkpoint import write_ldm_checkpoint

from diffinv.diffusion.backbone import ModelError
from diffinv.diffusion.model_io import ldm_family, load_backbone
from diffinv.diffusion.store import EmbeddingStore

# SD v1-inference.yaml's structure, shrunk: 2 levels of 32/64 channels, 32-wide text, a 2-level VAE.
ORIGINAL = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1, 2],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True, "transformer_depth": 1,
        "context_dim": 32}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2],
        "num_res_blocks": 1, "attn_resolutions": []}}}}}}


def _variant(v: bool = False, sd2: bool = False) -> dict:
    config = yaml.safe_load(yaml.safe_dump(ORIGINAL))
    params = config["model"]["params"]
    if v:
        params["parameterization"] = "v"
    if sd2:  # SD 2.x's transformers: linear projections, heads of fixed width
        unet = params["unet_config"]["params"]
        del unet["num_heads"]
        unet.update(num_head_channels=16, use_linear_in_transformer=True)
    return config


def _checkpoint(tmp_path: Path, name: str, **variant) -> tuple[Path, Path, torch.nn.Module, torch.nn.Module]:
    """A random tiny model written in the original layout, its YAML, and the diffusers modules it came from."""
    import diffusers
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm

    config = _variant(**variant)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(config, {}))
    vae = diffusers.AutoencoderKL(**create_vae_diffusers_config_from_ldm(config, {}))
    with torch.no_grad():  # diffusers zero-initialises some output layers; every weight must matter
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    yaml_path = tmp_path / f"{name}.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    return write_ldm_checkpoint(unet, vae, tmp_path / f"{name}.safetensors"), yaml_path, unet.eval(), vae.eval()


def test_original_config_loads_the_exact_model_and_its_schedule(tmp_path):
    path, config, unet, vae = _checkpoint(tmp_path, "sd1")
    backbone = load_backbone(path, original_config=str(config))
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.unet(x, t, cond).sample, unet(x, t, cond).sample)
        image = torch.rand(1, 3, 16, 16) * 2 - 1
        torch.testing.assert_close(backbone.vae.encode(image).latent_dist.mean, vae.encode(image).latent_dist.mean)
    assert backbone.prediction_type == "epsilon" and backbone.scheduler_config["beta_end"] == 0.012
    assert backbone.vae.config.scaling_factor == pytest.approx(0.18215)
    path_v, config_v, _, _ = _checkpoint(tmp_path, "sd1v", v=True)
    assert load_backbone(path_v, original_config=str(config_v)).prediction_type == "v_prediction"


def test_sd2_file_without_yaml_or_override_is_refused_naming_both(tmp_path):
    path, config, _, _ = _checkpoint(tmp_path, "sd2", sd2=True)
    with pytest.raises(ModelError, match=r"SD 2\.x.*--original-config.*--prediction-type"):
        load_backbone(path)
    # With the override the ambiguity is settled; offline, diffusers then lacks the configs, and says what to pass.
    with pytest.raises(ModelError, match="--original-config"):
        load_backbone(path, prediction_type="epsilon")
    assert load_backbone(path, original_config=str(config)).unet.config.use_linear_projection
    assert ldm_family({"model.diffusion_model.input_blocks.1.1.proj_in.weight": [32, 32, 1, 1]}) == "sd1"
    assert ldm_family({"model.diffusion_model.input_blocks.1.1.proj_in.weight": [32, 32]}) == "sd2"
    assert ldm_family({"model.diffusion_model.label_emb.0.0.weight": [1280, 2816]}) == "sdxl"
    assert ldm_family({"unet.conv_in.weight": [4]}) is None


def test_bad_yaml_and_misplaced_flag_are_clear(tmp_path, tiny_latent):
    path, _, _, _ = _checkpoint(tmp_path, "sd1")
    (tmp_path / "bad.yaml").write_text("model: {params: {}}\n")
    with pytest.raises(ModelError, match="not a Stable Diffusion inference YAML"):
        load_backbone(path, original_config=str(tmp_path / "bad.yaml"))
    _, sd2_yaml, _, _ = _checkpoint(tmp_path, "other", sd2=True)
    with pytest.raises(ModelError, match="does not fit --original-config"):
        load_backbone(path, original_config=str(sd2_yaml))
    with pytest.raises(ModelError, match="single-file checkpoints"):
        load_backbone(tiny_latent, original_config=str(sd2_yaml))


@pytest.mark.slow
def test_invert_and_generate_from_a_single_file_with_its_yaml(tmp_path, image_tree):
    path, config, _, _ = _checkpoint(tmp_path, "sd1v", v=True)
    cli = [sys.executable, "-m", "diffinv.cli"]
    done = subprocess.run(cli + ["invert", "--model", str(path), "--original-config", str(config), "--data", str(image_tree),
                                 "--resolution", "16", "--steps", "3", "--quiet", "--out", str(tmp_path / "store")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    store = EmbeddingStore.open(tmp_path / "store")
    assert store.info["prediction_type"] == "v_prediction" and store.info["original_config"] == str(config.resolve())
    assert store.embeddings.shape == (6, 5, 32)
    done = subprocess.run(cli + ["generate", "--store", str(tmp_path / "store"), "--per-image", "1", "--steps", "2", "--quiet",
                                 "--out", str(tmp_path / "syn")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "syn").rglob("*.png"))) == 6
