"""Results people can trust: replicates that vary the data, paired t-intervals, balanced metrics, degenerate runs, validation."""

import math

import numpy as np
import pytest
import torch

from diffinv.classify.metrics import confusion_matrix, metrics_of
from diffinv.config import ConfigError
from diffinv.data.real import open_images, select, validation_ids
from diffinv.report.stats import headline_metric, paired_gain, t_interval
from diffinv.report.summary import summarise_study
from diffinv.study.plan import build_plan
from diffinv.study.spec import load_study


def _study(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return load_study(path)


def test_replicates_draw_their_own_subset_and_repeats_their_own_seed(tmp_path):
    study = _study(tmp_path, "data: digits\nper_class: [3]\nseeds: [0, 1, 2]\nsubset_seed: 10\nrepeats: 2\nmethods: {}\n"
                             "train: {steps: 2}\n")
    plan = build_plan(study, tmp_path / "s")
    by = {(t.replicate, t.repeat): plan.units[t.run].config for t in plan.trials}
    assert len(by) == 6 and [by[(s, 0)].subset_seed for s in (0, 1, 2)] == [10, 11, 12]
    for s in (0, 1, 2):  # both classifiers of a replicate see its subset; they differ in their own seed
        assert by[(s, 0)].subset_seed == by[(s, 1)].subset_seed and by[(s, 0)].seed != by[(s, 1)].seed
    images = open_images("digits")
    subsets = [set(select(images, 3, by[(s, 0)].subset_seed).ids) for s in (0, 1, 2)]
    assert subsets[0] != subsets[1] != subsets[2]


def test_repeats_are_averaged_before_the_interval(tmp_path):
    def row(method, seed, repeat, acc):
        return {"dataset": "d", "method": method, "per_class": 3, "arch": "a", "aug": "x", "seed": seed, "repeat": repeat,
                "top1": acc, "balanced_accuracy": acc, "macro_f1": acc, "auc": None, "degenerate": False, "n_real": 30,
                "n_synthetic": 0 if method == "real" else 150, "classes": ["a", "b"], "per_class_acc": [acc, acc],
                "class_counts": [15, 15], "validation": None}

    # The classifier noise (+-0.04 between a replicate's two runs) cancels in each replicate's mean.
    real = [row("real", s, c, 0.70 + 0.01 * s + (0.04 if c else -0.04)) for s in range(3) for c in range(2)]
    di = [row("di", s, c, 0.72 + 0.01 * s + (-0.04 if c else 0.04)) for s in range(3) for c in range(2)]
    summary = {r["method"]: r for r in summarise_study(real + di)}
    assert summary["real"]["n_seeds"] == 3 and summary["real"]["top1_mean"] == pytest.approx(0.71)
    gain = summary["di"]["gain"]["top1"]
    assert gain["n"] == 3 and gain["mean"] == pytest.approx(0.02) and gain["std"] == pytest.approx(0.0, abs=1e-9)
    # Unpaired by repeat it would have been noise: per run the gains are +0.10 and -0.06.
    with pytest.raises(ConfigError, match="repeats"):
        _study(tmp_path, "data: digits\nmethods: {}\nrepeats: 0\n")


def test_head_to_head_is_paired_by_replicate_and_reported(tmp_path):
    from diffinv.report.build import verdict

    def row(method, seed, acc):
        return {"dataset": "d", "method": method, "per_class": 5, "arch": "a", "aug": "x", "seed": seed, "top1": acc,
                "balanced_accuracy": acc, "macro_f1": acc, "auc": None, "degenerate": False, "n_real": 50,
                "n_synthetic": 0 if method == "real" else 250, "classes": ["a", "b"], "per_class_acc": [acc, acc],
                "class_counts": [25, 25], "validation": None}

    # Replicates differ a lot (0.60 ... 0.80), di leads img2img by 0.02 on every one: beyond noise only when paired.
    level = [0.60, 0.80, 0.70, 0.65]
    rows = ([row("real", s, v) for s, v in enumerate(level)] + [row("img2img", s, v + 0.01) for s, v in enumerate(level)]
            + [row("di", s, v + 0.03 + 0.001 * s) for s, v in enumerate(level)])
    summary = {r["method"]: r for r in summarise_study(rows, {"di": ["img2img"]})}
    versus = summary["di"]["versus"]["img2img"]["top1"]
    assert versus["mean"] == pytest.approx(0.0215) and versus["n"] == 4 and versus["beyond_noise"]
    assert "versus" not in summary["img2img"]
    assert "**di** beats **img2img**" in verdict(list(summary.values()))
    from diffinv.report.build import _markdown_table_to_html

    text = verdict(list(summary.values()))  # a list to scan, one bullet per method and per head-to-head, not a paragraph
    bullets = [line for line in text.splitlines() if line.startswith("- **") or line.startswith("- Head to head")]
    assert len(bullets) == 3 and "4 replicates" in text
    shown = _markdown_table_to_html(text)
    assert shown.count("<ul>") == 1 and shown.count("<li>") == 3
    from diffinv.report.table import verdict_lines

    lines = verdict_lines(list(summary.values())).splitlines()
    ahead = f"ahead of img2img ({100 * versus['mean']:+.2f} [{100 * versus['low']:+.2f}, {100 * versus['high']:+.2f}])"
    assert lines[0].startswith("- di at 5 per class: +") and lines[0].endswith(ahead)
    assert "level with" not in lines[0] and lines[1].startswith("- img2img at 5 per class:")
    level_rows = rows[:8] + [row("di", s, v + 0.01 + (0.02 if s % 2 else -0.02)) for s, v in enumerate(level)]
    tied = {r["method"]: r for r in summarise_study(level_rows, {"di": ["img2img"]})}
    assert not tied["di"]["versus"]["img2img"]["top1"]["beyond_noise"]
    assert "is level with" in verdict(list(tied.values()))
    assert "; level with img2img (" in verdict_lines(list(tied.values()))
    with pytest.raises(ConfigError, match="compare"):
        _study(tmp_path, "data: digits\nmethods: {}\ncompare: {di: real}\n")


def test_validation_never_overlaps_a_subset_or_the_test_split():
    images = open_images("digits")
    held = validation_ids(images, 20)
    assert len(held) == 200 and held == validation_ids(images, 20)  # the same hold-out for every run
    for seed in range(5):
        assert not held & set(select(images, 30, seed, exclude=held).ids)
    assert not held & set(open_images("digits", split="test").ids)
    with pytest.raises(Exception, match="val-per-class"):
        validation_ids(images, 10_000)


def test_the_interval_and_the_beyond_noise_rule_match_scipy():
    from scipy import stats

    diffs = [0.021, 0.034, -0.005, 0.018, 0.027]
    mean, low, high = t_interval(diffs)
    ref = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert mean == pytest.approx(np.mean(diffs)) and (low, high) == pytest.approx(ref)
    gain = paired_gain([0.5 + d for d in diffs], [0.5] * 5)
    assert gain["beyond_noise"] == (ref[0] > 0) and gain["low"] == pytest.approx(ref[0])
    # Two replicates never count, however consistent; an interval across 0 never counts.
    assert not paired_gain([0.9, 0.91], [0.5, 0.5])["beyond_noise"]
    assert not paired_gain([0.6, 0.4, 0.55], [0.5, 0.5, 0.5])["beyond_noise"]
    assert math.isinf(t_interval([0.3])[1])


def test_a_constant_predictor_is_flagged_and_never_a_gain():
    # Two classes, 27% / 73% like the medical set of the issue: predicting the majority scores 73% top-1.
    labels = torch.tensor([0] * 27 + [1] * 73)
    preds = torch.ones(100, dtype=torch.long)
    m = metrics_of(confusion_matrix(preds, labels, 2), 0.0, torch.stack([torch.zeros(100), torch.ones(100)], 1), labels)
    assert m["top1"] == pytest.approx(0.73) and m["balanced_accuracy"] == pytest.approx(0.5) and m["degenerate"]
    assert m["auc"] == pytest.approx(0.5) and m["macro_f1"] < 0.5
    assert headline_metric([27, 73]) == "balanced_accuracy" and headline_metric([50, 55]) == "top1"

    def row(method, seed, top1, degenerate):
        return {"dataset": "d", "method": method, "per_class": 5, "arch": "a", "aug": "x", "seed": seed, "top1": top1,
                "balanced_accuracy": 0.5 if degenerate else top1, "macro_f1": 0.4, "auc": 0.5, "degenerate": degenerate,
                "n_real": 10, "n_synthetic": 0 if method == "real" else 50, "classes": ["n", "p"], "per_class_acc": [0.5, 0.5],
                "class_counts": [27, 73]}

    # real only is weak on every replicate; "di" predicts one class and scores the majority share every time.
    rows = [row("real", s, 0.55 + 0.01 * s, False) for s in range(3)] + [row("di", s, 0.73, True) for s in range(3)]
    di = next(r for r in summarise_study(rows) if r["method"] == "di")
    assert di["headline"] == "balanced_accuracy" and di["degenerate_runs"] == 3
    assert di["gain"]["top1"]["low"] > 0 and not di["gain"]["top1"]["beyond_noise"]  # a big top-1 "gain", not counted
    assert di["gain"]["top1"]["degenerate"]


@pytest.mark.slow
def test_selection_reads_validation_only_and_the_test_metrics_after(tmp_path, monkeypatch):
    import diffinv.study.engine as engine

    study = _study(tmp_path, """
data: digits
per_class: [2]
seeds: [0, 1]
val_per_class: 5
methods: {}
train: {arch: mobilenetv2, steps: 3, batch_size: 10, eval_every: 3, resolution: 32, lr: [0.0001, 0.05]}
report: false
""")
    assert len(build_plan(study, tmp_path / "s").trials) == 4
    opened = []
    real_read = engine.read_json
    monkeypatch.setattr(engine, "read_json", lambda path: opened.append(path.name) or real_read(path))
    engine.run_study(study, tmp_path / "s", progress=False, log=lambda m: None)
    selection = real_read(tmp_path / "s" / "selection.json")["real"]["2"]
    means = {c["label"]: c["validation_mean"] for c in selection["candidates"]}
    assert set(means) == {"train.lr=0.0001", "train.lr=0.05"} and selection["chosen"] == max(means, key=means.get)
    # Every validation file is read before the first test metrics file, and only the chosen setting's runs are reported.
    assert opened.index("final.json") > max(i for i, n in enumerate(opened) if n == "validation.json")
    results = real_read(tmp_path / "s" / "results.json")
    assert {r["setting"] for r in results} == {selection["chosen"]} and len(results) == 2
    # The summary carries the validation means too.
    summary = real_read(tmp_path / "s" / "summary.json")[0]
    assert summary["val_balanced_accuracy_mean"] == pytest.approx(
        sum(r["validation"]["balanced_accuracy"] for r in results) / 2)
    # Without validation data there is nothing to choose on: refused before anything is trained.
    with pytest.raises(ConfigError, match="validation"):
        _study(tmp_path, "data: digits\nmethods: {}\nval_per_class: 0\n")


def test_gains_are_plain_json():
    import json

    json.dumps(paired_gain([0.61, 0.64, 0.66], [0.5, 0.52, 0.55]))  # numpy scalars would not serialise


def test_the_diversity_measure_ranks_copies_below_varied_variants():
    from diffinv.classify.models import build_model
    from diffinv.quality.measures import synthetic_quality

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    net = build_model("shufflenetv2", 2, 32).eval()
    meta = {"classes": ["a", "b"], "mean": torch.zeros(3), "std": torch.ones(3)}
    copies = real.repeat_interleave(5, 0)  # five "variants" of each real image, all identical to it
    shifted = torch.cat([(real.int() + torch.randint(-60, 60, real.shape, generator=g)).clamp(0, 255).to(torch.uint8)
                         for _ in range(5)])  # five different variants of each
    varied_labels = labels.repeat(5)
    q_copies = synthetic_quality(net, meta, copies, labels.repeat_interleave(5), real, labels, real)
    q_varied = synthetic_quality(net, meta, shifted, varied_labels, real, labels, real)
    assert q_copies["diversity_ratio"] < q_varied["diversity_ratio"]
    assert q_copies["near_copies"] == 40 and q_varied["near_copies"] < 40


def test_quality_reads_the_test_features_it_is_given():
    """A study computes the judge's features of its test split once and passes them to every kept set's quality."""
    from diffinv.classify.models import build_model
    from diffinv.quality.measures import judge_features, synthetic_quality

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    real = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    net = build_model("shufflenetv2", 2, 32).eval()
    meta = {"classes": ["a", "b"], "mean": torch.zeros(3), "std": torch.ones(3)}
    features = judge_features(net, test, meta["mean"], meta["std"])[0]
    computed = synthetic_quality(net, meta, real, labels, real, labels, test)
    given = synthetic_quality(net, meta, real, labels, real, labels, test, test_features=features)
    assert given["fd_judge"] == pytest.approx(computed["fd_judge"]) and given["kd_judge"] == pytest.approx(computed["kd_judge"])
    other = synthetic_quality(net, meta, real, labels, real, labels, test, test_features=features + 1.0)
    assert other["fd_judge"] != pytest.approx(computed["fd_judge"])  # the given features are the ones used
