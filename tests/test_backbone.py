import json

import pytest
import torch

from diffinv.diffusion.backbone import ModelError
from diffinv.diffusion.model_io import load_backbone, save_packed


def _outputs(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    moments = bb.encode(pixels)
    x = torch.randn(moments.mean.shape, generator=g)
    cond = torch.randn(2, 5, bb.cond_dim, generator=g)
    with torch.no_grad():
        eps = bb.predict(x, torch.tensor([10, 900]), cond)
    return moments, eps, bb.decode(moments.mean)


def test_latent_folder_roundtrip(tiny_latent):
    bb = load_backbone(tiny_latent)
    assert bb.vae is not None and bb.text_encoder is None  # the text encoder is not loaded unless asked
    assert bb.cond_dim == 32 and bb.latent_shape(16) == (4, 8, 8)
    moments, eps, pixels = _outputs(bb)
    assert moments.mean.shape == (2, 4, 8, 8) and (moments.std > 0).all()
    assert eps.shape == (2, 4, 8, 8) and pixels.shape == (2, 3, 16, 16)
    assert not any(p.requires_grad for p in bb.unet.parameters())
    with pytest.raises(ModelError, match="multiple"):
        bb.latent_shape(15)


def test_pixel_space_model_same_interface(tiny_pixel, tmp_path):
    bb = load_backbone(tiny_pixel)
    assert bb.vae is None and bb.latent_shape(16) == (3, 16, 16)
    moments, eps, pixels = _outputs(bb)
    assert torch.equal(moments.std, torch.zeros_like(moments.std))
    assert eps.shape == (2, 3, 16, 16) and torch.allclose(pixels, moments.mean.clamp(-1, 1))
    # A bare UNet folder (config.json + weights) loads as a pixel-space model too.
    bb.unet.save_pretrained(tmp_path / "bare")
    assert load_backbone(tmp_path / "bare").vae is None


def test_packed_single_file_gives_identical_outputs(tiny_latent, tmp_path):
    bb = load_backbone(tiny_latent)
    save_packed(bb, tmp_path / "model.safetensors")
    packed = load_backbone(tmp_path / "model.safetensors")
    for a, b in zip(_outputs(bb)[1:], _outputs(packed)[1:]):
        assert torch.equal(a, b)
    assert packed.fingerprint() == bb.fingerprint()


def test_v_prediction_is_read_from_scheduler(tiny_v):
    assert load_backbone(tiny_v).prediction_type == "v_prediction"


def test_text_encoder_on_request(tiny_text):
    bb = load_backbone(tiny_text, with_text_encoder=True)
    cond = bb.encode_prompts(["a photo of a cat", "a photo of a dog"])
    assert cond.shape[0] == 2 and cond.shape[-1] == bb.cond_dim
    assert not torch.equal(cond[0], cond[1])
    with pytest.raises(ModelError, match="text encoder"):
        load_backbone(tiny_text).encode_prompts(["a cat"])


def test_bad_model_specs_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickle"):
        load_backbone(tmp_path / "model.ckpt")
    with pytest.raises(ModelError, match="does not exist"):
        load_backbone(tmp_path / "missing")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_backbone("nobody/not-a-cached-model")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ModelError, match="not a UNet2DConditionModel"):
        load_backbone(tmp_path / "other")


def test_a_hub_id_is_downloaded_into_the_cache_when_online_and_never_when_offline(tiny_latent, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def snapshot_download(repo_id, local_files_only=False, allow_patterns=None):
        calls.append((repo_id, local_files_only, tuple(allow_patterns)))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(tiny_latent)  # what the download would leave in the cache: a diffusers pipeline folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    bb = load_backbone("someone/tiny-sd")
    assert bb.source == "someone/tiny-sd" and [c[1] for c in calls] == [True, False]
    assert all(not p.endswith((".bin", ".ckpt", "*")) or p == "tokenizer/*" for p in calls[-1][2])  # safetensors only
    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        load_backbone("someone/tiny-sd")
    assert [c[1] for c in calls] == [True]

    def no_network(repo_id, local_files_only=False, allow_patterns=None):
        raise LocalEntryNotFoundError("not cached") if local_files_only else OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelError, match="could not be downloaded .*OSError: Name or service"):
        load_backbone("someone/tiny-sd")
