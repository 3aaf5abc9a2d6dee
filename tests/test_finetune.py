"""Fine-tuning a pretrained classifier: local weights load exactly, the head is fresh, a linear probe keeps the backbone."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffinv.classify.models import build_model
from diffinv.classify.pretrained import PretrainedError, load_pretrained, read_state_dict
from diffinv.cli import main


def _saved(tmp_path, classes=10, name="w.safetensors"):
    torch.manual_seed(3)
    model = build_model("small-cnn", classes, 8)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / name))
    return tmp_path / name, state


def test_pretrained_weights_load_equal_and_leave_the_head_fresh(tmp_path):
    path, state = _saved(tmp_path)
    model = build_model("small-cnn", 2, 8)
    fresh = load_pretrained(model, read_state_dict(path))
    assert fresh == ["fc.weight", "fc.bias"]
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in state.items() if not k.startswith("fc."))
    # A torch checkpoint as trainers write them (wrapped, DataParallel prefixes) loads the same.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    again = build_model("small-cnn", 2, 8)
    assert load_pretrained(again, read_state_dict(tmp_path / "w.pth")) == fresh
    assert all(torch.equal(again.state_dict()[k], mine[k]) for k in mine if not k.startswith("fc."))


class NotATensor:
    pass


def test_wrong_or_unsafe_weights_are_refused(tmp_path):
    path, _ = _saved(tmp_path)
    with pytest.raises(PretrainedError, match="another architecture"):
        load_pretrained(build_model("resnet18", 2, 32), read_state_dict(path))
    torch.save({"x": NotATensor()}, tmp_path / "code.pth")  # weights_only refuses anything but tensors
    with pytest.raises(PretrainedError, match="holds more than tensors"):
        read_state_dict(tmp_path / "code.pth")
    with pytest.raises(PretrainedError, match="does not exist.*nothing is downloaded"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_torchvision_models_build_by_name(capsys):
    assert build_model("torchvision:resnet18", 3, 32).fc.out_features == 3
    with pytest.raises(Exception, match="torchvision has no model"):
        build_model("torchvision:no_such_net", 3, 32)


@pytest.mark.slow
def test_train_fine_tunes_with_a_linear_probe_from_the_cli(tmp_path, capsys):
    path, state = _saved(tmp_path)
    argv = ["train", "--data", "digits", "--arch", "small-cnn", "--resolution", "8", "--quiet", "--pretrained", str(path)]
    assert main([*argv, "--steps", "3", "--probe-steps", "3", "--out", str(tmp_path / "probe")]) == 0
    assert "2 tensors left fresh" in capsys.readouterr().out
    probed = load_file(str(tmp_path / "probe" / "model.safetensors"))
    weights = [k for k in state if k.endswith((".weight", ".bias")) and not k.startswith("fc.")]
    assert all(torch.equal(probed[k], state[k]) for k in weights)  # the backbone as loaded
    assert probed["fc.weight"].shape == (10, 128)  # digits has 10 classes too: the head is fitted, not loaded
    assert not torch.equal(probed["fc.weight"], state["fc.weight"])
    assert main([*argv, "--steps", "2", "--backbone-lr", "0.5", "--out", str(tmp_path / "full")]) == 0
    tuned = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert not torch.equal(tuned["features.0.weight"], state["features.0.weight"])
    code = main(["train", "--data", "digits", "--probe-steps", "2", "--out", str(tmp_path / "x")])
    assert code == 2 and "give --pretrained PATH" in capsys.readouterr().err
