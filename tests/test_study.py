"""Studies from one command: candidates, units keyed by what makes them, choice on validation, test read last, resume."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffinv.cli import main
from diffinv.config import ConfigError
from diffinv.runs import read_json
from diffinv.study.plan import build_plan
from diffinv.study.spec import candidates, load_study

SMALL = """
data: digits
per_class: [2]
seeds: [0, 1, 2]
val_per_class: 3
invert: {{steps: 2, init: random, eval_timesteps: 1}}
generate: {{per_image: 2, steps: 4, batch_size: 64}}
train: {{arch: small-cnn, steps: 3, batch_size: 16, real_batch: 8, syn_batch: 8, resolution: 8, eval_every: 3}}
methods:
  di: {{guidance: [1, 2], noise: [0.1, 0.5]}}
  img2img: {{strength: [0.25, 0.75]}}
compare: {{di: img2img}}
model: {model}
processes: 1
device: cpu
"""


@pytest.fixture(scope="module")
def tiny_base_model(tmp_path_factory):
    from diffinv.config import PretrainConfig
    from diffinv.stages import pretrain

    out = tmp_path_factory.mktemp("base") / "b"
    # A small base of the demo's kind (8 px digits, 2 tokens): its units take a fraction of a second each.
    pretrain.pretrain_base(PretrainConfig(data="digits", resolution=8, channels=(16, 32), layers_per_block=1,
                                          cross_attention_dim=16, tokens=2, steps=10, batch_size=16, warmup=2, device="cpu"),
                           out, progress=False, log=lambda m: None)
    return out


def _write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_candidates_are_grids_unions_and_blocks_with_labels(tmp_path):
    study = load_study(_write(tmp_path, """
data: digits
generate: {guidance: [1, 2], steps: 4}
train: {lr: [0.05, 0.1]}
methods:
  di: {noise: [0.1, 0.5]}
  img2img: [{}, {strength: [0.25, 0.75]}]
  di-enc: {method: di, invert: {steps: 0, init: encoder}}
  prompt: {templates: [["a {}"], ["a photo of a {}", "an image of a {}"]]}
"""))
    found = candidates(study)
    assert [c.label for c in found["real"]] == ["train.lr=0.05", "train.lr=0.1"]
    di = found["di"]
    assert len(di) == 8 and di[0].label == "noise=0.1, guidance=1, train.lr=0.05" and di[0].generate["steps"] == 4
    assert {(c.generate["guidance"], c.generate["noise"], c.train["lr"]) for c in di} == \
        {(g, n, lr) for g in (1, 2) for n in (0.1, 0.5) for lr in (0.05, 0.1)}
    assert len(found["img2img"]) == 2 * 2 + 2 * 2 * 2  # the union: the block as given, then its two strengths
    assert found["di-enc"][0].method == "di" and found["di-enc"][0].invert == {"steps": 0, "init": "encoder"}
    assert "invert.steps=0" in found["di-enc"][0].label
    # A field whose value is a list takes a list of lists as candidates; a flat list is one value.
    assert [c.generate["templates"] for c in found["prompt"]][:4:2] == [["a {}"], ["a photo of a {}", "an image of a {}"]]


@pytest.mark.parametrize("text, message", [
    ("data: digits\ninvert: {per_class: 3}\n", "set by the study itself"),
    ("data: digits\ngenerate: {guidanse: 2}\n", "unknown GenerateConfig"),
    ("data: digits\nmethods: {dj: {}}\n", "method must be one of"),
    ("data: digits\nmethods: {di: {}}\ncompare: {di: img2img}\n", "not a method of the study"),
    ("data: digits\nval_per_class: 0\n", "chooses settings on validation"),
    ("data: digits\ngenerate: {guidance: []}\n", "empty list of candidates"),
    ("", "is empty"),
    ("data: digits\ngenerate: {steps: 2}\nmethods: {img2img: {strength: 0.25}}\n", "runs no denoising step"),
    ("data: digits\nmethods: {real-ft: {method: real, guidance: 2}}\n", "takes a train: block only"),
])
def test_a_wrong_study_is_refused_before_anything_runs(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_study(_write(tmp_path, text))


def test_units_are_shared_where_their_results_are_the_same(tiny_base_model, tmp_path):
    study = load_study(_write(tmp_path, SMALL.format(model=tiny_base_model)))
    plan = build_plan(study, tmp_path / "s")
    kinds = [u.kind for u in plan.units.values()]
    # One inversion per replicate and size, shared by the four DI and the two img2img candidates; real only once.
    assert kinds.count("store") == 3 and kinds.count("set") == 3 * 6 and kinds.count("run") == 3 * 7
    assert len(plan.trials) == 3 * 7
    subsets = {u.config.subset_seed for u in plan.units.values() if u.kind == "store"}
    assert subsets == {0, 1, 2}
    for r in range(3):  # every method of a replicate trains on its subset and is paired with its real-only run
        runs = [u.config for u in plan.runs() if u.config.subset_seed == r]
        assert len(runs) == 7 and {c.seed for c in runs} == {r}
    # A candidate and a replicate added later leave every finished unit's key (so its folder) as it was.
    more = load_study(_write(tmp_path, SMALL.format(model=tiny_base_model).replace("[1, 2]", "[1, 2, 3]")
                             .replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2, 3]"), "more.yaml"))
    bigger = build_plan(more, tmp_path / "s")
    assert set(plan.units) < set(bigger.units)
    assert [u.folder for u in plan.units.values()] == [bigger.units[k].folder for k in plan.units]
    assert sum(u.kind == "store" for u in bigger.units.values()) == 4


@pytest.mark.slow
def test_a_study_runs_every_stage_from_one_command_and_reads_test_last(tiny_base_model, tmp_path, monkeypatch, capsys):
    import diffinv.stages.invert as invert_stage
    import diffinv.stages.train as train_stage
    import diffinv.study.engine as engine

    events: list[tuple[str, str]] = []
    for module, name in ((invert_stage, "invert_dataset"), (train_stage, "test_classifier")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: (events.append((_n, str(a[1]))), _o(*a, **k))[1])
    real_read = engine.read_json
    monkeypatch.setattr(engine, "read_json", lambda p: (events.append(("read", str(p))), real_read(p))[1])

    study = _write(tmp_path, SMALL.format(model=tiny_base_model))
    out = tmp_path / "s"
    assert main(["experiment", str(study), "--out", str(out), "--quiet", "--no-report"]) == 0
    printed = capsys.readouterr().out
    assert "real + di" in printed and "di minus img2img" in printed and "Settings chosen on validation" in printed
    # The plan's estimate came first, from a probe; the measured time sits beside it at the end.
    assert printed.index("estimate: about") < printed.index("[job 1/3") and "ms per inversion image-step" in printed
    assert "measured in the units (cost.json); estimated" in printed and read_json(out / "estimate.json")["units"] > 0
    assert "cost: di at 2 per class:" in printed and "points per CPU-hour" in printed  # accuracy bought per hour
    assert printed.count("the store's images are grey") == 1 and not (out / ".said").exists()  # a note once, not per set
    inversions = [e for e in events if e[0] == "invert_dataset"]
    assert len(inversions) == 3 and len({p for _, p in inversions}) == 3  # exactly one per replicate and size
    # Selection reads every validation file before the first test; the test is read for the kept candidates only.
    validation = [i for i, e in enumerate(events) if e[0] == "read" and e[1].endswith("validation.json")]
    tests = [i for i, e in enumerate(events) if e[0] == "test_classifier"]
    assert len(validation) == 21 and tests and max(validation) < min(tests)
    selection = read_json(out / "selection.json")
    chosen = {arm: sizes["2"]["chosen"] for arm, sizes in selection.items()}
    di = selection["di"]["2"]
    assert len(di["candidates"]) == 4 and di["chosen"] == max(di["candidates"], key=lambda c: c["validation_mean"])["label"]
    assert all(c["validation_gain"]["n"] == 3 for c in di["candidates"])
    results = read_json(out / "results.json")
    assert len(results) == 9 and len(tests) == 9 and {(r["method"], r["setting"]) for r in results} == set(chosen.items())
    assert len(list(out.glob("runs/*/final.json"))) == 9  # no other run has a test score
    summary = {r["method"]: r for r in read_json(out / "summary.json")}
    assert summary["di"]["setting"] == chosen["di"] and "img2img" in summary["di"]["versus"]
    quality = read_json(out / "quality.json")
    assert len(quality) == 3 * 6 and sum(q["kept"] for q in quality.values()) == 6
    assert all((q["fd_judge"] is None) != q["kept"] for q in quality.values())  # no test distance for the others

    # The same command again does nothing; one more candidate reuses every inversion and every finished run.
    events.clear()
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/model.safetensors")}
    assert main(["experiment", str(study), "--out", str(out), "--quiet", "--no-report"]) == 0
    assert not [e for e in events if e[0] == "invert_dataset"] and (out / "results.md").read_text() in capsys.readouterr().out
    more = _write(tmp_path, SMALL.format(model=tiny_base_model).replace("[0.25, 0.75]", "[0.25, 0.5, 0.75]"), "more.yaml")
    assert main(["experiment", str(more), "--out", str(out), "--quiet", "--no-report"]) == 0
    assert not [e for e in events if e[0] == "invert_dataset"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert len(list(out.glob("runs/*/train.json"))) == 21 + 3  # img2img at strength 0.5, one run per replicate
    assert len(read_json(out / "selection.json")["img2img"]["2"]["candidates"]) == 3

    # The report: the study's name (its file's, unless it says) as its title, the shared table, every candidate on the
    # frontier, the kept sets' grids.
    from diffinv.report.build import frontier_points

    assert main(["report", str(out)]) == 0
    md = (out / "report" / "report.md").read_text()
    assert md.startswith("# Study: more") and "| real + di | 2 |" in md and "Settings chosen on validation" in md
    points = frontier_points(read_json(out / "quality.json"), read_json(out / "selection.json"))
    assert len(points) == 4 + 3 and sum(p["kept"] for p in points) == 2
    assert all(p["val_gain"] is not None for p in points)
    assert list((out / "report").glob("real-images-and-their-synthetic-variants-di-k2-r0*.png"))
    assert "## Every method side by side" in md and (out / "report" / "every-method-side-by-side.png").is_file()
    assert "## Gains, paired by replicate" in md and (out / "report" / "gains-paired-by-replicate.png").is_file()
    # What a browser shows of the HTML: rendered emphasis, no Markdown marks, no tag text.
    seen = _visible_text((out / "report" / "report.html").read_text())
    assert "Study: more" in seen and "Settings chosen on validation" in seen and "real + di" in seen
    assert [m for m in ("**", "`", "](", "<br", "&lt;", "&gt;", "<strong>", "|---") if m in seen] == []
    assert "<strong>di</strong>" in (out / "report" / "report.html").read_text()
    # What the data cost: the report's table is the log's cost lines, from costs.json; the gain is the summary's.
    costs = read_json(out / "costs.json")
    di_gain = next(g for g in costs["gains"] if g["method"] == "di")
    row = next(r for r in read_json(out / "summary.json") if r["method"] == "di" and r.get("baseline", "real") == "real")
    assert di_gain["gain_points"] == pytest.approx(row["gain"][row.get("headline", "top1")]["mean"] * 100)
    assert di_gain["seconds_per_replicate"] > 0 and di_gain["device"] == "CPU"
    per_hour = di_gain["gain_points"] / (di_gain["seconds_per_replicate"] / 3600)
    assert f"| di | 2 | {di_gain['gain_points']:+.2f} |" in md and f"| {per_hour:+.1f} |" in md
    assert "## Cost" in md and (out / "report" / "cost.png").is_file() and "points per device-hour" in seen


def _visible_text(page: str) -> str:
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts, self.hidden = [], 0

        def handle_starttag(self, tag, attrs):
            self.hidden += tag in ("style", "script", "title")

        def handle_endtag(self, tag):
            self.hidden -= tag in ("style", "script", "title")

        def handle_data(self, data):
            if not self.hidden:
                self.parts.append(data)

    parser = Text()
    parser.feed(page)
    return " ".join(parser.parts)


def _outputs(out: Path) -> dict[str, bytes]:
    """Every result file of a study folder (the study folder's own path written as OUT; configs and report left out).

    A safetensors file is read as its tensors and metadata: the format's header keeps the metadata in a hash map,
    whose order differs from process to process.
    """
    from safetensors import safe_open

    found = {}
    timings = ("cost.json", "estimate.json", "costs.json")
    for path in sorted(out.rglob("*")):
        wanted = path.suffix in (".safetensors", ".png", ".json", ".jsonl", ".md", ".csv") and path.name != "checkpoint.safetensors"
        if not path.is_file() or not wanted or "report" in path.parts or path.name in timings:
            continue
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as fh:
                data = json.dumps(sorted((fh.metadata() or {}).items())).encode() + b"".join(
                    k.encode() + fh.get_tensor(k).numpy().tobytes() for k in sorted(fh.keys()))
        else:
            data = path.read_bytes()
        found[str(path.relative_to(out))] = data.replace(str(out.resolve()).encode(), b"OUT")
    return found


@pytest.mark.slow
def test_kill_9_at_any_point_then_the_same_command_gives_identical_outputs(tiny_base_model, tmp_path):
    text = SMALL.format(model=tiny_base_model).replace("seeds: [0, 1, 2]", "seeds: [0, 1]")
    study = _write(tmp_path, text.replace("noise: [0.1, 0.5]", "noise: 0.1").replace("[0.25, 0.75]", "0.5"))
    argv = ["experiment", str(study), "--quiet", "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the threads this test process uses (conftest)
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    # Killed while inverting, while generating, while training, and while testing the kept runs.
    for ready in (lambda: any(out.glob("stores/*/config.yaml")), lambda: any(out.glob("sets/*/*/*.png")),
                  lambda: len(list(out.glob("runs/*/train.json"))) >= 3, lambda: (out / "selection.json").is_file()):
        proc = subprocess.Popen([sys.executable, "-m", "diffinv.cli", *argv, "--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not ready():
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert main([*argv, "--out", str(out)]) == 0
    whole, killed = _outputs(tmp_path / "whole"), _outputs(out)
    assert whole.keys() == killed.keys() and len(whole) > 40
    assert [k for k in whole if whole[k] != killed[k]] == []


@pytest.mark.slow
def test_a_study_from_flags_alone_and_the_demo_share_the_engine(tiny_base_model, tmp_path, capsys):
    out = tmp_path / "flags"
    argv = ["experiment", "--data", "digits", "--model", str(tiny_base_model), "--per-class", "1", "--seeds", "0,1",
            "--fast", "--out", str(out), "--quiet", "--no-report", "--device", "cpu", "--processes", "1",
            "--train-arch", "small-cnn", "--train-resolution", "8", "--val-per-class", "2"]
    assert main(argv) == 0
    summary = read_json(out / "summary.json")
    assert {r["method"] for r in summary} == {"real", "di", "img2img"}  # the default methods
    assert read_json(out / "summary.json")[1]["versus"]  # di against img2img by default
    assert main(["experiment", "--out", str(tmp_path / "x")]) == 2
    assert "give a study file" in capsys.readouterr().err


def test_plan_json_lists_every_unit_for_progress(tiny_base_model, tmp_path):
    from diffinv.shards import Shard
    from diffinv.study.engine import count_done, record

    study = load_study(_write(tmp_path, SMALL.format(model=tiny_base_model)))
    out = tmp_path / "s"
    plan = build_plan(study, out)
    record(study, plan, out, Shard())
    saved = read_json(out / "plan.json")
    assert len(saved["units"]) == len(plan.units) and count_done(out, {}) == (0, 21)
    json.dumps(saved)


STUDIES = sorted((Path(__file__).resolve().parents[1] / "configs" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_committed_study_is_one_command_and_plans(path, monkeypatch):
    # Its header gives exactly the command that runs it, and nothing else to do by hand.
    repo = Path(__file__).resolve().parents[1]
    commands = [line.strip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#   ")]
    command = f"diffinv experiment configs/studies/{path.name} --out runs/{path.stem}"
    assert commands in ([command], [command + " --yes"])  # --yes: a study beyond 500 units says it starts one
    monkeypatch.chdir(repo)  # its paths are the repository's (../shared/data, bases/)
    study = load_study(path)
    assert study.name == path.stem and (not study.model or (repo / study.model).is_dir())
    if study.data != "digits" and not (repo / study.data).exists():
        pytest.skip(f"{study.data} not found (the shared datasets are not beside this checkout)")
    plan = build_plan(study, repo / "runs" / path.stem)
    assert plan.trials and {u.kind for u in plan.units.values()} >= {"run"}
    referenced = (repo / "docs" / "studies.md").read_text()
    assert f"configs/studies/{path.name}" in referenced  # every study is listed with its command


@pytest.mark.slow
def test_retrieval_and_filtering_are_settings_of_a_study(tiny_base_model, tmp_path, capsys):
    from diffinv.data.real import open_images, validation_ids
    from diffinv.data.synthetic import read_manifest
    from diffinv.diffusion.store import EmbeddingStore

    study = _write(tmp_path, f"""
data: digits
per_class: [2]
seeds: [0, 1]
val_per_class: 3
invert: {{steps: 2, init: random, eval_timesteps: 1}}
generate: {{per_image: 2, steps: 4, batch_size: 64}}
train: {{arch: small-cnn, steps: 3, batch_size: 16, real_batch: 8, syn_batch: 8, resolution: 8, eval_every: 3}}
methods:
  di: [{{}}, {{filter: {{keep_top: 0.5}}}}]
  retrieval: [{{space: pixels}}, {{space: judge}}, {{space: encoder, filter: {{min_confidence: [0.05, 0.1]}}}}]
compare: {{di: retrieval}}
model: {tiny_base_model}
processes: 1
device: cpu
""")
    plan = build_plan(load_study(study), tmp_path / "s")
    filters = [u for u in plan.units.values() if u.kind == "filter"]
    assert len(filters) == 2 * 3  # per replicate: di's and retrieval's two thresholds
    for u in filters:  # each judged by its own replicate's real-only classifier, which runs before it
        judge = next(v for v in plan.units.values() if v.kind == "run" and str(tmp_path / "s" / v.folder) == u.config.judge)
        assert judge.job == u.job and not judge.config.synthetic
        units = plan.job_units(u.job)
        assert units.index(judge) < units.index(u)
    in_judge = [u for u in plan.units.values() if u.kind == "set" and u.config.space == "judge"]
    assert len(in_judge) == 2  # one per replicate, each in its own replicate's real-only classifier's features
    for u in in_judge:
        judge = next(v for v in plan.units.values() if v.kind == "run" and str(tmp_path / "s" / v.folder) == u.config.judge)
        assert judge.job == u.job and not judge.config.synthetic and judge.config.seed == plan.jobs[u.job][1]
    filtered_trials = [t for t in plan.trials if "filter." in t.label]
    assert filtered_trials and all(plan.units[t.sets[0]].kind == "filter" for t in filtered_trials)

    assert main(["experiment", str(study), "--out", str(tmp_path / "s"), "--quiet", "--no-report"]) == 0
    digits = open_images("digits")
    held = validation_ids(digits, 3)
    for u in plan.units.values():
        if u.kind == "set" and u.config.method == "retrieval":
            subset = set(EmbeddingStore.open(u.config.store).ids)  # the replicate's real images
            assert len(subset) == 20 and subset.isdisjoint(held)
            found = {row["pool_id"] for row in read_manifest(tmp_path / "s" / u.folder)}
            assert found and found.isdisjoint(held | subset)  # never a validation image nor the replicate's own
        if u.kind == "filter":
            rows = read_manifest(tmp_path / "s" / u.folder)
            assert rows and all("judge_score" in row for row in rows)
    summary = read_json(tmp_path / "s" / "summary.json")
    assert {r["method"] for r in summary} >= {"real", "di", "retrieval"}
    quality = read_json(tmp_path / "s" / "quality.json")
    retrieved = [q for q in quality.values() if q["method"] == "retrieval"]
    assert retrieved and all(0 <= q["label_precision"] <= 1 for q in retrieved)  # the pool (digits) is labelled
    assert all("label_precision" not in q for q in quality.values() if q["method"] == "di")


def test_a_real_only_arm_with_a_pretrained_classifier_is_compared_with_its_like(tmp_path, capsys):
    from safetensors.torch import save_file

    from diffinv.classify.models import build_model

    torch.manual_seed(0)
    save_file(build_model("small-cnn", 4, 8).state_dict(), str(tmp_path / "backbone.safetensors"))
    study = _write(tmp_path, f"""
data: digits
per_class: [3]
seeds: [0, 1]
val_per_class: 3
train: {{arch: small-cnn, steps: 3, batch_size: 16, resolution: 8, eval_every: 3}}
methods:
  real-ft: {{method: real, train: {{pretrained: {tmp_path / "backbone.safetensors"}, backbone_lr: 0.1}}}}
compare: {{real-ft: real}}
processes: 1
device: cpu
""")
    plan = build_plan(load_study(study), tmp_path / "s")
    ft = [plan.units[t.run] for t in plan.trials if t.arm == "real-ft"]
    assert len(ft) == 2 and all(u.config.pretrained.endswith("backbone.safetensors") and not u.config.synthetic for u in ft)
    assert all(u.config.backbone_lr == 0.1 and not plan.units[t.run].config.pretrained
               for t in plan.trials if t.arm == "real" for u in ft)
    assert main(["experiment", str(study), "--out", str(tmp_path / "s"), "--quiet", "--no-report"]) == 0
    summary = read_json(tmp_path / "s" / "summary.json")
    row = next(r for r in summary if r["method"] == "real-ft")
    assert row["n_synthetic"] == 0 and all(g["n"] == 2 for g in row["versus"]["real"].values())  # paired by replicate
    assert "| real only (real-ft) | 3 | 30 |" in (tmp_path / "s" / "results.md").read_text()


@pytest.mark.slow
def test_lora_methods_in_a_study_fit_one_adapter_set_per_replicate_shared_by_both(tiny_base_model, tmp_path):
    pytest.importorskip("peft")
    study = _write(tmp_path, f"""
data: digits
per_class: [2]
seeds: [0, 1]
val_per_class: 3
invert: {{steps: 2, init: random, eval_timesteps: 1}}
generate: {{per_image: 2, steps: 4, batch_size: 64}}
finetune: {{steps: 3, lr: 0.01, batch_size: 4}}
train: {{arch: small-cnn, steps: 3, batch_size: 16, real_batch: 8, syn_batch: 8, resolution: 8, eval_every: 3}}
methods:
  di: {{}}
  lora: {{}}
  di+lora: {{finetune: {{rank: [2, 4]}}}}
  ddim: {{method: ddim-inversion, sampler: ddim, interp: 0.5}}
compare: {{di+lora: [di, lora]}}
model: {tiny_base_model}
processes: 1
device: cpu
""")
    loaded = load_study(study)
    found = candidates(loaded)
    assert [c.label for c in found["di+lora"]] == ["finetune.rank=2", "finetune.rank=4"]
    assert found["di"][0].finetune is None and found["lora"][0].finetune["steps"] == 3
    plan = build_plan(loaded, tmp_path / "s")
    fitted = [u for u in plan.units.values() if u.kind == "adapters"]
    assert len(fitted) == 2 * 2  # per replicate: rank 4 (lora's default, shared with di+lora's rank 4) and rank 2
    class_stores = {u.config.store for u in fitted}
    assert len(class_stores) == 2  # one class store per replicate, shared by every adapter set of it
    for u in plan.units.values():
        if u.kind == "set" and u.config.method in ("lora", "di+lora"):
            ft = next(v for v in fitted if str(tmp_path / "s" / v.folder) == u.config.adapters)
            assert ft.job == u.job and plan.job_units(u.job).index(ft) < plan.job_units(u.job).index(u)
    assert main(["experiment", str(study), "--out", str(tmp_path / "s"), "--quiet", "--no-report"]) == 0
    summary = read_json(tmp_path / "s" / "summary.json")
    assert {r["method"] for r in summary} >= {"real", "di", "lora", "di+lora", "ddim"}
    row = next(r for r in summary if r["method"] == "di+lora")
    assert set(row["versus"]) == {"di", "lora"}
    # A LoRA set's cost counts its class store, its adapters' fitting and its own sampling (the fitting was left out).
    out = tmp_path / "s"

    def made_from(u):
        adapters = next(v for v in fitted if str(out / v.folder) == u.config.adapters)
        store = next(v for v in plan.units.values() if str(out / v.folder) == adapters.config.store)
        return [read_json(out / v.folder / "cost.json")["seconds"] for v in (u, adapters, store)]

    lora_sets = [u for u in plan.units.values() if u.kind == "set" and u.config.method == "lora"]
    parts = [made_from(u) for u in lora_sets]
    assert all(p > 0 for ps in parts for p in ps)
    expected = sum(sum(ps) for ps in parts) / len(parts)
    costs = read_json(out / "costs.json")
    assert costs["seconds_per_set"]["lora"] == pytest.approx(expected, rel=1e-6)
    assert costs["median_seconds_per_set"]["lora"] == pytest.approx(statistics.median(sum(ps) for ps in parts), rel=1e-6)


def test_a_method_fine_tuned_from_a_backbone_gains_over_the_real_only_arm_trained_the_same_way(tiny_base_model, tmp_path):
    from diffinv.report.summary import summarise_study
    from diffinv.study.engine import baselines_of

    study = _write(tmp_path, f"""
data: digits
model: {tiny_base_model}
train: {{arch: small-cnn}}
methods:
  di: {{}}
  real-ft: {{method: real, train: &ft {{pretrained: w.safetensors, backbone_lr: 0.1}}}}
  di-ft: {{method: di, train: *ft}}
  img2img-ft: [{{method: img2img, train: *ft}}, {{method: img2img, train: {{pretrained: w.safetensors}}}}]
""")
    assert baselines_of(build_plan(load_study(study), tmp_path / "s")) == {"di": "real", "di-ft": "real-ft", "img2img-ft": "real"}
    rows = [{"dataset": "d", "method": m, "per_class": 5, "seed": s, "top1": acc + 0.01 * s, "per_class_acc": [acc], "n_real": 10,
             "n_synthetic": 0 if m.startswith("real") else 50, "classes": ["a"], "degenerate": False}
            for m, acc in (("real", 0.5), ("real-ft", 0.7), ("di-ft", 0.75)) for s in range(3)]
    entry = next(e for e in summarise_study(rows, baselines={"di-ft": "real-ft"}) if e["method"] == "di-ft")
    assert entry["baseline"] == "real-ft" and entry["gain"]["top1"]["mean"] == pytest.approx(0.05)
