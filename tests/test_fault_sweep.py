"""Found by the second fault sweep: each answer was silent or misleading before."""

from __future__ import annotations

import pytest
from PIL import Image

from diffinv.config import ConfigError
from diffinv.data.synthetic import damage
from diffinv.safe_yaml import YamlError, load
from diffinv.study.spec import load_study


def test_a_key_written_twice_is_refused_but_a_merge_may_be_overridden():
    with pytest.raises(YamlError, match="'data' is written twice.*line 2"):
        load("data: mine\ndata: digits\n", "s.yaml")
    assert load("base: &b {steps: 1, lr: 2}\nrun: {<<: *b, steps: 5}\n")["run"] == {"steps": 5, "lr": 2}


def test_a_study_file_that_is_a_folder_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give a study YAML .* --data"):
        load_study(tmp_path)


def test_a_manifest_row_moved_to_another_class_is_damage(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cat" / "a.png")
    row = {"file": "cat/a.png", "class": "cat", "bytes": (tmp_path / "cat" / "a.png").stat().st_size}
    assert damage(tmp_path, [row]) == []
    assert "lies in another class's folder" in damage(tmp_path, [{**row, "class": "dog"}])[0]
