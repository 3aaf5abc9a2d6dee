import pytest
import yaml

from diffinv.cli import main
from diffinv.config import ConfigError, InvertConfig, load_config
from diffinv.diffusion.store import EmbeddingStore


def test_help_lists_stages(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "invert" in out and "tiny-model" in out


def test_invert_end_to_end_with_yaml_and_flag_override(tiny_latent, image_tree, tmp_path, capsys):
    cfg = tmp_path / "invert.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_latent), "resolution": 16, "steps": 4, "tokens": 3}))
    out = tmp_path / "store"
    code = main(["invert", "--config", str(cfg), "--data", str(image_tree), "--out", str(out), "--steps", "5", "--quiet"])
    assert code == 0
    assert "6 images, 2 classes, conditioning (3, 32)" in capsys.readouterr().out
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["steps"] == 5 and resolved["tokens"] == 3 and resolved["lr"] == 0.3  # the default, untouched by YAML or flags
    assert EmbeddingStore.open(out).embeddings.shape == (6, 3, 32)
    # A second run on a finished store refuses, with advice, and exit code 2.
    assert main(["invert", "--config", str(cfg), "--data", str(image_tree), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/folder"], "does not exist"),
    (["--data", "IMAGES", "--per-class", "9"], "fewer than --per-class 9"),
    (["--data", "IMAGES", "--resolution", "4"], "resolution must be"),
    (["--data", "IMAGES", "--resolution", "17"], "multiple of the VAE"),
])
def test_bad_input_is_one_clear_line(argv, message, tiny_latent, image_tree, tmp_path, capsys):
    argv = [a.replace("IMAGES", str(image_tree)) for a in argv]
    assert main(["invert", "--model", str(tiny_latent), "--out", str(tmp_path / "o"), "--steps", "2", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_config_rejects_unknown_and_mistyped_keys(tmp_path):
    (tmp_path / "a.yaml").write_text("stesp: 10\n")
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(InvertConfig, tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("steps: ten\n")
    with pytest.raises(ConfigError, match="steps must be int"):
        load_config(InvertConfig, tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("lr: 1\nper-class: 4\n")
    config = load_config(InvertConfig, tmp_path / "c.yaml", {"steps": 9, "seed": None})
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.per_class == 4 and config.steps == 9
    with pytest.raises(ConfigError, match="latent must be one of"):
        InvertConfig(latent="median")


def test_every_sub_command_is_a_stage_built_the_same_way(tmp_path, capsys):
    import argparse

    from diffinv.cli import build_parser
    from diffinv.launch import STAGES, get_stage
    from diffinv.runs import RunError

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(action.choices) == list(STAGES)  # nothing added beside the registry
    for spec in STAGES.values():
        assert spec.cli in ("config", "study", "folder")
        assert (spec.run is None) == (spec.cli == "folder") and (spec.command is not None) == (spec.cli == "folder")
    with pytest.raises(RunError, match="unknown stage 'verify'"):  # a tool reads a folder; it is not launched into one
        get_stage("verify")
    assert main(["verify", str(tmp_path)]) == 2
    assert "neither an embedding store" in capsys.readouterr().err
