"""What the CLI says about itself: help that matches what a flag does, names, messages cut at words."""

from __future__ import annotations

import pytest
from conftest import run_cli


def _help(capsys, *argv) -> str:
    from diffinv.cli import main

    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_help_says_what_each_flag_does_and_lists_each_stage_once(capsys):
    top = _help(capsys)
    assert top.count("pretrain-vae") == 1 and top.count("  invert ") == 1
    experiment = " ".join(_help(capsys, "experiment").split())
    assert "--no-report skips OUT/report/report.html" in experiment
    assert "%%" not in _help(capsys, "pretrain-base")


def test_a_mistyped_local_folder_is_not_taken_for_a_hub_id(tmp_path, capsys, monkeypatch):
    (tmp_path / "bases" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code, text = run_cli(capsys, "inspect", "bases/nope")
    assert code == 2 and "bases/ holds mine" in text and "hub" not in text


@pytest.mark.slow
def test_a_study_of_flags_alone_is_named_by_its_folder(tmp_path, capsys):
    data = tmp_path / "d"
    from conftest import write_image_tree

    write_image_tree(data / "train", per_class=4)
    write_image_tree(data / "test", per_class=2, seed=1)
    code, text = run_cli(capsys, "experiment", "--data", data, "--per-class", "2", "--seeds", "0", "--val-per-class", "1",
                         "--train-arch", "small-cnn", "--train-steps", "1", "--train-resolution", "16",
                         "--fast", "--no-report", "--quiet", "--out", tmp_path / "my-first-study")
    assert code == 0 and "study my-first-study:" in text and "study :" not in text


def test_one_size_is_drawn_as_bars_not_a_column_of_dots():
    from diffinv.report.build import _accuracy_plot

    rows = [{"method": m, "n_real": 10, "classes": ["a", "b"], "n_seeds": 3, "top1_mean": acc, "top1_std": 0.02}
            for m, acc in (("real", 0.6), ("di", 0.7))]
    fig = _accuracy_plot(rows, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["real", "di"] and len(ax.patches) == 2
    assert "5 real images per class" in ax.get_title()


@pytest.mark.slow
def test_a_slow_pretraining_checkpoints_on_time_not_only_every_n_steps(tmp_path, monkeypatch):
    import diffinv.stages.pretrain as pretrain
    from diffinv.config import PretrainConfig

    monkeypatch.setattr(pretrain, "CHECKPOINT_SECONDS", 0.0)
    saved = []
    real = pretrain.save_checkpoint
    monkeypatch.setattr(pretrain, "save_checkpoint", lambda path, state, opt, meta: (saved.append(meta["step"]),
                                                                                    real(path, state, opt, meta)))
    config = PretrainConfig(resolution=8, channels=(16, 32), layers_per_block=1, cross_attention_dim=16, tokens=2,
                            batch_size=8, steps=9, log_every=3, checkpoint_every=250, device="cpu")
    pretrain.pretrain_base(config, tmp_path / "b", progress=False, log=lambda m: None)
    assert saved == [3, 6]  # at the logged steps (not at 9: the run ends there), long before step 250
