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


def test_a_gain_within_noise_says_how_many_replicates_would_decide():
    from diffinv.report.stats import paired_gain, replicates_to_decide
    from diffinv.report.table import verdict_lines

    # 5 replicates, gains of 3 points +- 4: the interval spans 0; about 9-10 would exclude it if the mean held.
    real = [0.50, 0.52, 0.48, 0.51, 0.49]
    gain = paired_gain([r + d for r, d in zip(real, [0.07, -0.01, 0.03, 0.08, -0.02])], real)
    assert not gain["beyond_noise"]
    need = replicates_to_decide(gain["mean"], gain["std"])
    assert 5 < need < 30
    row = {"method": "di", "per_class": 5, "setting": "as given", "gain": {"top1": {**gain, "degenerate": False}}}
    text = verdict_lines([row])
    assert f"about {need} replicates would decide if the gain is the +3.00 seen here" in text
    flat = paired_gain([r + d for r, d in zip(real, [0.04, -0.04, 0.001, 0.03, -0.03])], real)
    assert replicates_to_decide(flat["mean"], flat["std"]) is None
    assert "would need more than 200 replicates" in verdict_lines([{**row, "gain": {"top1": {**flat, "degenerate": False}}}])


def test_a_per_class_methods_class_sources_are_not_called_outside_the_subset(tmp_path):
    import json

    from diffinv.config import TrainConfig
    from diffinv.stages.train_data import _provenance_notes

    (tmp_path / "data").mkdir()
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "generate.json").write_text(json.dumps({"data": str((tmp_path / "data").resolve())}))

    def notes(sources):
        rows = [{"file": f"0/{i}.png", "class": "0", "source": s} for i, s in enumerate(sources)]
        (tmp_path / "set" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = TrainConfig(data=str(tmp_path / "data"), synthetic=(str(tmp_path / "set"),), per_class=2)
        return _provenance_notes(config, {"0/a.png"})

    assert notes(["class:0", "class:1", "0/a.png"]) == []  # a LoRA set's rows name their class: no false alarm
    assert "1 synthetic source image(s)" in notes(["class:0", "0/b.png"])[0]  # a real image outside the subset still is
