"""The generator as a study axis: model: [A, B] runs every generating method with each, chosen and compared per generator."""

import json

import pytest
from conftest import run_cli

from diffinv.runs import read_json
from diffinv.study.plan import build_plan
from diffinv.study.spec import candidates, compare_pairs, generators, load_study


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from diffinv.cli import main

    root = tmp_path_factory.mktemp("generators")
    for kind in ("sd15-tiny", "sd3-tiny"):
        assert main(["tiny-model", "--kind", kind, "--out", str(root / kind)]) == 0
    return root / "sd15-tiny", root / "sd3-tiny"


def _study(tmp_path, models, methods="  di: {guidance: [1, 2]}\n  img2img: {}\n"):
    path = tmp_path / "study.yaml"
    path.write_text(f"name: generators\ndata: digits\nmodel: [{', '.join(map(str, models))}]\nper_class: [1]\nseeds: [0, 1]\n"
                    "val_per_class: 2\ninvert: {steps: 4}\ngenerate: {per_image: 1, steps: 2}\n"
                    "train: {arch: small-cnn, steps: 3, resolution: 16}\nreport: false\nprocesses: 1\n"
                    f"methods:\n{methods}")
    return path


def test_each_method_becomes_one_arm_per_generator_with_rows_within_and_between_generators(two_models, tmp_path):
    study = load_study(_study(tmp_path, two_models))
    assert study.model == str(two_models[0]) and generators(study) == {"sd15-tiny": str(two_models[0]),
                                                                       "sd3-tiny": str(two_models[1])}
    found = candidates(study)
    assert list(found) == ["real", "di@sd15-tiny", "di@sd3-tiny", "img2img@sd15-tiny", "img2img@sd3-tiny"]
    assert [c.label for c in found["di@sd3-tiny"]] == ["guidance=1", "guidance=2"]  # the grid, per generator
    assert {c.model for c in found["di@sd3-tiny"]} == {str(two_models[1])} and found["di@sd3-tiny"][0].method == "di"
    assert compare_pairs(study) == {"di@sd15-tiny": ["img2img@sd15-tiny", "di@sd3-tiny"], "di@sd3-tiny": ["img2img@sd3-tiny"],
                                    "img2img@sd15-tiny": ["img2img@sd3-tiny"]}
    plan = build_plan(study, tmp_path / "out")
    stores = [u for u in plan.units.values() if u.kind == "store"]
    assert sorted({u.config.model for u in stores}) == sorted(map(str, two_models)) and len(stores) == 4  # 2 models x 2 replicates
    assert {u.config.resolution for u in stores} == {64}


def test_a_method_may_name_its_own_generator(two_models, tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(f"data: digits\nmodel: {two_models[0]}\nval_per_class: 2\n"
                    f"methods:\n  di: {{}}\n  di-sd3: {{method: di, model: {two_models[1]}}}\n")
    study = load_study(path)
    found = candidates(study)
    assert found["di"][0].model == "" and found["di-sd3"][0].model == str(two_models[1])
    assert compare_pairs(study) == {"di": ["di-sd3"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: digits\nmodel: [{two_models[0]}, {two_models[0]}]\nval_per_class: 2\n")
    with pytest.raises(ValueError, match="two or more different models"):
        load_study(bad)


def test_a_two_generator_study_runs_from_one_command_and_says_which_generator_won(two_models, tmp_path, capsys):
    out = tmp_path / "out"
    code, text = run_cli(capsys, "experiment", _study(tmp_path, two_models, "  di: {}\n  img2img: {}\n"), "--out", out,
                         "--quiet", "--yes")
    assert code == 0, text
    results = (out / "results.md").read_text()
    for row in ("real + di@sd15-tiny", "real + di@sd3-tiny", "di@sd15-tiny minus di@sd3-tiny",
                "img2img@sd15-tiny minus img2img@sd3-tiny", "di@sd3-tiny minus img2img@sd3-tiny"):
        assert row in results
    assert "Which generator:\n- di at 1 per class, sd15-tiny minus sd3-tiny:" in results
    summary = read_json(out / "summary.json")
    gap = next(r for r in summary if r["method"] == "di@sd15-tiny")["versus"]["di@sd3-tiny"]
    assert {"mean", "low", "high"} <= set(gap[summary[0]["headline"]])
    sets = [p.parent for p in (out / "sets").glob("*/generate.json")]
    models = {json.loads((s / "generate.json").read_text())["model"] for s in sets}
    assert len(sets) == 8 and len(models) == 2  # 2 methods x 2 generators x 2 replicates
    sd3_set = next(s for s in sets if "sd3" in json.loads((s / "generate.json").read_text())["model"])
    assert run_cli(capsys, "verify", sd3_set)[0] == 0
    assert run_cli(capsys, "report", out)[0] == 0
    assert "## Which generator\n\n- di at 1 per class, sd15-tiny minus sd3-tiny:" in (out / "report" / "report.md").read_text()
    code, text = run_cli(capsys, "experiment", _study(tmp_path, two_models, "  di: {}\n  img2img: {}\n"), "--out", out, "--yes")
    assert code == 0 and "2 of 2 jobs finished" in text  # resumed: every unit of both generators reused


def test_the_plan_times_each_generator_on_its_own_work_and_flags_name_the_generators(two_models, tmp_path, capsys):
    code, text = run_cli(capsys, "experiment", "--data", "digits", "--models", *two_models, "--per-class", "1", "--seeds", "0,1",
                         "--val-per-class", "2", "--train-arch", "small-cnn", "--out", tmp_path / "out", "--plan")
    line = next(x for x in text.splitlines() if x.startswith("estimate:"))
    assert code == 0 and "sd15-tiny: " in line and "sd3-tiny: " in line and "ms per inversion image-step" in line


def test_a_methods_own_generator_changed_under_the_folder_is_refused(two_models, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    own = tmp_path / "own-sd3"
    shutil.copytree(two_models[1], own)
    path = tmp_path / "s.yaml"
    path.write_text(f"data: digits\nmodel: {two_models[0]}\nper_class: [1]\nseeds: [0]\nval_per_class: 2\nreport: false\n"
                    "invert: {steps: 2}\ngenerate: {per_image: 1, steps: 2}\ntrain: {arch: small-cnn, steps: 1, resolution: 16}\n"
                    f"processes: 1\nmethods:\n  di-own: {{method: di, model: {own}}}\n")
    assert run_cli(capsys, "experiment", path, "--out", tmp_path / "out", "--quiet")[0] == 0
    weights = own / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(str(weights)).items()}, str(weights))
    code, text = run_cli(capsys, "experiment", path, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and str(own) in text and "changed since" in text  # before: its old sets were reused as the new model's
