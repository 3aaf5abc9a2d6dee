"""Hostile or malformed files a user may be handed: YAML bombs, oversized configs, pickles with code in them."""

import pytest
from conftest import run_cli

from diffinv.config import ConfigError, InvertConfig, load_config

# "Billion laughs": each level lists the previous one nine times; six levels are 531,441 strings once expanded,
# nine (418 bytes) are 387 million.
BOMB = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(5))


def test_a_yaml_bomb_study_is_refused_before_it_is_expanded(tmp_path, capsys):
    study = tmp_path / "bomb.yaml"
    study.write_text("data: digits\nmethods: {di: {}}\n" + BOMB + "per_class: *f\n")
    code, text = run_cli(capsys, "experiment", study, "--out", tmp_path / "out")
    assert code == 2 and "aliases" in text and len(text) < 600
    assert not (tmp_path / "out").exists()


def test_every_yaml_reader_refuses_alias_bombs_and_oversized_text_and_keeps_plain_anchors(tmp_path):
    from diffinv import safe_yaml

    config = tmp_path / "invert.yaml"
    config.write_text(BOMB + "tokens: 3\n")
    with pytest.raises(ConfigError, match="aliases"):
        load_config(InvertConfig, config)
    with pytest.raises(safe_yaml.YamlError, match="at most"):
        safe_yaml.load("x: 1\n" * 300_000, "big.yaml")
    with pytest.raises(safe_yaml.YamlError, match="levels deep"):
        safe_yaml.load("[" * 200 + "]" * 200, "deep.yaml")
    assert safe_yaml.load("a: [1, 2]\nb: {c: x}\n") == {"a": [1, 2], "b": {"c": "x"}}
    # An anchor that repeats a block, as the committed studies use one, is read as before.
    assert safe_yaml.load("a: &ft {lr: 0.1}\nb: [{x: 1, train: *ft}, *ft]\n") == {"a": {"lr": 0.1},
                                                                              "b": [{"x": 1, "train": {"lr": 0.1}}, {"lr": 0.1}]}


def test_a_huge_value_is_never_formatted_whole_into_a_message(tmp_path):
    config = tmp_path / "invert.yaml"
    config.write_text("tokens: [" + ", ".join(["123456789"] * 50_000) + "]\n")
    with pytest.raises(ConfigError) as info:
        load_config(InvertConfig, config)
    assert "tokens must be int" in str(info.value) and len(str(info.value)) < 300
