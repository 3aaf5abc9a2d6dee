"""--pretrained hub: the published weights of a timm: or torchvision: architecture, fetched as the hubs do (network mocked)."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from conftest import run_cli, write_image_tree

from diffinv.classify.pretrained import PretrainedError, hub_state_dict


@pytest.fixture
def split_data(tmp_path):
    write_image_tree(tmp_path / "data" / "train", per_class=4, size=16)
    write_image_tree(tmp_path / "data" / "test", per_class=2, size=16, seed=1)
    return tmp_path / "data"


def _published_resnet18():
    import torchvision

    torch.manual_seed(123)
    return torchvision.models.resnet18(num_classes=1000).state_dict()


def test_torchvision_hub_weights_are_loaded_into_all_but_the_head(split_data, tmp_path, capsys, monkeypatch):
    import torchvision

    asked = []
    published = _published_resnet18()

    def download(self, progress=True, **kw):
        asked.append(self.name)
        return published
    monkeypatch.setattr(type(torchvision.models.ResNet18_Weights.DEFAULT), "get_state_dict", download)
    code, text = run_cli(capsys, "train", "--data", split_data, "--arch", "torchvision:resnet18", "--pretrained", "hub",
                         "--steps", "1", "--backbone-lr", "0", "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, text
    assert asked == ["IMAGENET1K_V1"] and "fine-tuning from hub: 2 tensors left fresh (the head)" in text
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    key = next(k for k in trained if k.endswith("layer1.0.conv1.weight"))
    torch.testing.assert_close(trained[key], published["layer1.0.conv1.weight"])  # backbone lr 0: the published tensor, unchanged


def test_offline_hub_is_one_line_with_the_command_to_fetch(monkeypatch):
    import torchvision

    def offline(self, progress=True, **kw):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(type(torchvision.models.ResNet18_Weights.DEFAULT), "get_state_dict", offline)
    with pytest.raises(PretrainedError, match=r"cannot be downloaded here \(URLError\).*torchvision.models.resnet18\("
                                              r"weights='IMAGENET1K_V1'\)"):
        hub_state_dict("torchvision:resnet18")
    with pytest.raises(PretrainedError, match="no such weights"):
        hub_state_dict("torchvision:resnet18", "NOPE")
    with pytest.raises(PretrainedError, match="trained here only"):
        hub_state_dict("small-cnn")


def test_timm_hub_uses_timms_own_pretrained_path(monkeypatch):
    timm = pytest.importorskip("timm")
    seen = []
    real = timm.create_model

    def create(name, pretrained=False, **kw):
        seen.append((name, pretrained))
        return real(name.split(".")[0], pretrained=False, **kw)
    monkeypatch.setattr(timm, "create_model", create)
    state = hub_state_dict("timm:resnet18", "a1_in1k")
    assert seen == [("resnet18.a1_in1k", True)] and "fc.weight" in state

    def offline(name, pretrained=False, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedError, match="timm.create_model\\('resnet18', pretrained=True\\)"):
        hub_state_dict("timm:resnet18")


def test_few_shot_preset_probes_then_fine_tunes_and_needs_a_backbone():
    from diffinv.config import ConfigError, TrainConfig, load_config

    config = load_config(TrainConfig, None, {"preset": "few-shot", "pretrained": "hub", "arch": "torchvision:resnet18"})
    assert (config.probe_steps, config.backbone_lr) == (100, 0.1)
    assert load_config(TrainConfig, None, {"preset": "few-shot", "pretrained": "w.safetensors", "probe_steps": 5}).probe_steps == 5
    with pytest.raises(ConfigError, match="give --pretrained"):
        load_config(TrainConfig, None, {"preset": "few-shot"})
