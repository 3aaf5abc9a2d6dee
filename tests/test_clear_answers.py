"""Inputs that used to work but mislead, or end in a traceback: each now gets an answer that says what to do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli, write_image_tree

from diffinv.runs import read_json

INVERT = ["--resolution", "16", "--steps", "2", "--batch-size", "4", "--quiet"]
TRAIN = ["--arch", "small-cnn", "--steps", "1", "--batch-size", "4", "--resolution", "16", "--quiet"]


@pytest.fixture
def split_tree(tmp_path):
    root = tmp_path / "data"
    write_image_tree(root / "train", per_class=4)
    write_image_tree(root / "test", per_class=3, seed=1)
    return root


@pytest.fixture
def small_set(tiny_latent, split_tree, tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "set"
    assert run_cli(capsys, "invert", "--model", tiny_latent, "--data", split_tree, "--out", store, *INVERT)[0] == 0
    assert run_cli(capsys, "generate", "--store", store, "--per-image", "2", "--steps", "2", "--quiet", "--out", out)[0] == 0
    return out


# ----------------------------------------------------------------------------- filter and weights files


def test_filter_names_a_judge_of_other_data_and_a_judge_that_is_no_run(small_set, split_tree, tmp_path, capsys):
    other = write_image_tree(tmp_path / "other" / "train", per_class=4, seed=5).parent
    write_image_tree(other / "test", per_class=2, seed=6)
    assert run_cli(capsys, "train", "--data", other, *TRAIN, "--out", tmp_path / "judge")[0] == 0
    code, text = run_cli(capsys, "filter", "--set", small_set, "--judge", tmp_path / "judge", "--keep-top", "0.5",
                         "--out", tmp_path / "f")
    assert code == 0 and "warning" in text and "was trained on" in text and str(split_tree) in text
    code, text = run_cli(capsys, "filter", "--set", small_set, "--judge", small_set, "--keep-top", "0.5", "--out", tmp_path / "g")
    assert code == 2 and "is a synthetic set" in text and "--resume" not in text


def _evil_pickle(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    torch.save({"weight": torch.zeros(2), "evil": Evil()}, path)


def test_a_pickle_with_code_is_refused_with_how_to_convert_it(split_tree, tmp_path, capsys, tiny_latent):
    evil = tmp_path / "evil.pth"
    _evil_pickle(evil)
    code, text = run_cli(capsys, "train", "--data", split_tree, *TRAIN, "--pretrained", evil, "--out", tmp_path / "r")
    assert code == 2 and "convert it to .safetensors" in text and "weights_only=False" not in text
    store = tmp_path / "s"
    assert run_cli(capsys, "invert", "--model", tiny_latent, "--data", split_tree, "--out", store, *INVERT)[0] == 0
    code, text = run_cli(capsys, "generate", "--store", store, "--method", "retrieval", "--space", "model", "--image-model",
                         evil, "--image-arch", "small-cnn", "--pool", split_tree, "--quiet", "--out", tmp_path / "g")
    assert code == 2 and "--image-model" in text and "--pretrained" not in text


def test_a_study_reads_every_weights_file_it_names_before_it_starts(split_tree, tmp_path, capsys):
    evil = tmp_path / "inception.pth"
    _evil_pickle(evil)
    study = tmp_path / "s.yaml"
    study.write_text(f"data: {split_tree}\nper_class: [2]\nseeds: [0]\nval_per_class: 1\nmethods: {{}}\nreport: false\n"
                     f"quality: {{inception_weights: {evil}}}\ntrain: {{arch: small-cnn, steps: 1, resolution: 16}}\n")
    code, text = run_cli(capsys, "experiment", study, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "quality.inception_weights" in text and not (tmp_path / "out" / "runs").exists()


# ----------------------------------------------------------------------------- studies


def _study(tmp_path, data, body: str, name: str = "s") -> str:
    path = tmp_path / f"{name}.yaml"
    base = f"data: {data}\nper_class: [2]\nseeds: [0]\nval_per_class: 1\nreport: false\nprocesses: 1\n" \
           f"train: {{arch: small-cnn, steps: 1, resolution: 16}}\n"
    own = {line.split(":")[0] for line in body.splitlines()}  # the body's keys replace the defaults (a key twice is refused)
    path.write_text("".join(line + "\n" for line in base.splitlines() if line.split(":")[0] not in own) + body)
    return str(path)


def test_equal_candidates_are_one_and_a_method_is_not_compared_with_itself(tmp_path, split_tree, capsys):
    from diffinv.study.spec import candidates, load_study

    study = load_study(_study(tmp_path, split_tree, "methods: {img2img: {strength: [0.5, 0.50, 1, 1.0]}}\n"))
    assert [c.label for c in candidates(study)["img2img"]] == ["strength=0.5", "strength=1"]
    code, text = run_cli(capsys, "experiment", _study(tmp_path, split_tree, "methods: {di: {}, img2img: {}}\n"
                                                      "compare: {di: [di, img2img]}\n"), "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "with itself" in text


def test_another_study_into_the_same_folder_is_refused(tmp_path, split_tree, capsys):
    first = _study(tmp_path, split_tree, "methods: {}\n", "first")
    assert run_cli(capsys, "experiment", first, "--out", tmp_path / "o", "--quiet")[0] == 0
    before = (tmp_path / "o" / "results.md").read_text()
    second = _study(tmp_path, split_tree, "methods: {}\nsubset_seed: 5\n", "second")
    code, text = run_cli(capsys, "experiment", second, "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "holds study 'first'" in text and "changed since" not in text
    assert (tmp_path / "o" / "results.md").read_text() == before


def test_a_missing_validation_split_names_the_studys_own_field(tmp_path, split_tree, capsys):
    code, text = run_cli(capsys, "experiment", _study(tmp_path, split_tree, "methods: {}\nval_split: val\nval_per_class: 0\n"),
                         "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "val_split" in text and "pass --split" not in text


def test_a_study_re_makes_a_set_an_image_was_deleted_from(tmp_path, split_tree, tiny_latent, capsys):
    study = _study(tmp_path, split_tree, f"model: {tiny_latent}\ninvert: {{steps: 2, resolution: 16}}\n"
                                         "generate: {per_image: 1, steps: 2}\nmethods: {di: {}}\n")
    assert run_cli(capsys, "experiment", study, "--out", tmp_path / "o", "--quiet")[0] == 0
    sets = tmp_path / "o" / "sets"
    victim = next(p for p in sets.rglob("*.png"))
    victim.unlink()
    shutil.rmtree(next((tmp_path / "o" / "runs").iterdir()))  # a run still to do reads that set
    code, text = run_cli(capsys, "experiment", study, "--out", tmp_path / "o", "--quiet", "--seeds", "0")
    assert code == 0 and victim.is_file()  # before: "run the `diffinv generate` command again", one the user never ran


# ----------------------------------------------------------------------------- data


def test_a_test_split_without_some_classes_is_scored_on_those_it_has(tmp_path, capsys):
    root = tmp_path / "d"
    write_image_tree(root / "train", per_class=4, classes=("cat", "dog", "fox"))
    write_image_tree(root / "test", per_class=3, classes=("cat", "fox"), seed=1)
    code, text = run_cli(capsys, "train", "--data", root, *TRAIN, "--out", tmp_path / "r")
    assert code == 0 and "no images of ['dog']" in text
    final = read_json(tmp_path / "r" / "final.json")
    assert final["n_test"] == 6 and final["per_class"][1] is None and final["classes"] == ["cat", "dog", "fox"]


def test_a_channels_first_npz_is_read(tmp_path):
    from diffinv.data.real import load_pixels, open_images

    rs = np.random.RandomState(0)
    images = rs.randint(0, 256, (6, 3, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.array([0, 1] * 3))
    data = open_images(tmp_path / "d.npz")
    x = load_pixels(data.subset([0]), 12)
    assert torch.allclose((x[0] + 1) * 127.5, torch.from_numpy(images[0]).float(), atol=0.6)


def test_one_picture_under_two_labels_is_named(tmp_path, capsys):
    root = tmp_path / "d"
    write_image_tree(root / "train", per_class=4)
    write_image_tree(root / "test", per_class=2, seed=1)
    shutil.copy(root / "train" / "cat" / "000.png", root / "train" / "dog" / "copy.png")
    code, text = run_cli(capsys, "train", "--data", root, *TRAIN, "--out", tmp_path / "r")
    assert code == 0 and "appear under two labels" in text and "cat/000.png" in text


def test_train_refuses_a_set_whose_images_were_swapped(small_set, split_tree, tmp_path, capsys):
    from diffinv.data.synthetic import read_manifest

    rows = read_manifest(small_set)
    a, b = next(r for r in rows if r["class"] == "cat"), next(r for r in rows if r["class"] == "dog")
    pa, pb = small_set / a["file"], small_set / b["file"]
    da, db = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(db[: len(da)] if len(db) >= len(da) else db + b"\0" * (len(da) - len(db)))  # same sizes, swapped content
    pb.write_bytes(da[: len(db)] if len(da) >= len(db) else da + b"\0" * (len(db) - len(da)))
    code, text = run_cli(capsys, "train", "--data", split_tree, "--synthetic", small_set, *TRAIN, "--out", tmp_path / "r")
    assert code == 2 and "checksum" in text


# ----------------------------------------------------------------------------- paths and disks


def test_paths_a_user_can_get_wrong(split_tree, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    code, text = run_cli(capsys, "train", "--data", split_tree, *TRAIN, "--out", link)
    assert code == 2 and "symbolic link" in text and "File exists" not in text
    code, text = run_cli(capsys, "train", "--data", split_tree, *TRAIN, "--out", tmp_path / ("x" * 300))
    assert code == 2 and "too long" in text


def test_the_free_space_check_is_close_and_its_sizes_read_apart(tiny_latent, split_tree, tmp_path, capsys, monkeypatch):
    import shutil as sh

    seen = {}
    real = sh.disk_usage

    def fake(path):
        seen["asked"] = True
        return real(path)._replace(free=1)

    import diffinv.runs as runs

    monkeypatch.setattr(runs.shutil, "disk_usage", fake)
    code, text = run_cli(capsys, "invert", "--model", tiny_latent, "--data", split_tree, "--out", tmp_path / "s", *INVERT)
    assert code == 2 and "needs about" in text
    need = text.split("needs about ")[1].split(" but")[0]
    assert need.endswith("KiB") and float(need.split()[0]) < 200  # 8 images x 5 x 32 floats: ~65 KiB with margins
    from diffinv.runs import human_bytes

    assert human_bytes(1.31 * 2**20) != human_bytes(1.0 * 2**20)


# ----------------------------------------------------------------------------- retrieval pools


def test_a_bases_pool_is_found_beside_the_base_not_where_we_stand(tmp_path, monkeypatch):
    from diffinv.errors import UserError
    from diffinv.stages.generate_inputs import base_pool

    repo = tmp_path / "repo"
    write_image_tree(repo / "data" / "pool", per_class=2)
    base = repo / "bases" / "b"
    base.mkdir(parents=True)
    (base / "config.yaml").write_text("data: data/pool\nsplit: train\n")
    elsewhere = tmp_path / "elsewhere"
    write_image_tree(elsewhere / "data" / "pool", per_class=1, seed=3)  # the same relative path, other images
    monkeypatch.chdir(elsewhere)
    assert base_pool(str(base)) == [str(repo / "data" / "pool")]
    (base / "pretrain.json").write_text(json.dumps({"made_in": "../../../elsewhere"}))  # recorded: wins
    assert base_pool(str(base)) == [os.path.normpath(str(base / "../../../elsewhere/data/pool"))]
    (base / "config.yaml").write_text("data: data/none\nsplit: train\n")
    with pytest.raises(UserError, match="--pool"):
        base_pool(str(base))


def test_an_unreadable_pool_image_is_skipped_and_counted(tiny_pixel, split_tree, tmp_path, capsys):
    pool = write_image_tree(tmp_path / "pool" / "made", per_class=6, classes=("a", "b"), size=16, seed=7).parent
    (pool / "broken.png").write_bytes(b"not a png")
    assert run_cli(capsys, "invert", "--model", tiny_pixel, "--data", split_tree, "--out", tmp_path / "s", *INVERT)[0] == 0
    args = ["generate", "--store", tmp_path / "s", "--method", "retrieval", "--space", "pixels", "--pool", pool, "--per-image",
            "2", "--pool-cache", tmp_path / "cache", "--quiet"]
    code, text = run_cli(capsys, *args, "--bad-images", "error", "--out", tmp_path / "r1")
    assert code == 2 and "broken.png" in text and "--bad-images skip" in text
    code, text = run_cli(capsys, *args, "--out", tmp_path / "r2")
    assert code == 0 and "skipped 1 unreadable pool image" in text


# ----------------------------------------------------------------------------- processes


def test_study_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, time\n"
        "from diffinv.study.workers import process_pool\n"
        "if __name__ == '__main__':\n"
        "    pool = process_pool(2)\n"
        "    futures = [pool.submit(time.sleep, 600) for _ in range(2)]  # two jobs running when the parent dies\n"
        "    time.sleep(1)\n"
        "    print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "    time.sleep(600)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO / "src")}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [w for w in workers if _alive(w)]
    for w in alive:  # before: both slept on, orphans, until their jobs ended; never leave them behind
        os.kill(w, signal.SIGKILL)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_worth_reads_the_studys_own_real_only_curve_in_the_table_and_the_report():
    from diffinv.report.build import _efficiency_table
    from diffinv.report.efficiency import worth_text
    from diffinv.report.table import result_table

    def row(method, k, acc, n_syn=0, baseline="real", gain=None):
        g = {"top1": {"mean": gain, "low": gain - 0.02, "high": gain + 0.02, "beyond_noise": True, "degenerate": False,
                      "n": 5}} if gain is not None else None
        return {"method": method, "per_class": k, "n_real": 2 * k, "n_synthetic": n_syn, "classes": ["a", "b"],
                "top1_mean": acc, "top1_std": 0.01, "gain": g, "baseline": baseline, "n_seeds": 5, "headline": "top1"}

    rows = [row("real", 5, 0.70), row("real-ft", 5, 0.80), row("real", 20, 0.79), row("real", 40, 0.82),
            row("lora", 5, 0.78, 50, gain=0.08), row("lora-ft", 5, 0.83, 50, baseline="real-ft", gain=0.03)]
    worth, factor = worth_text([(5, 0.70), (20, 0.79), (40, 0.82)], 5, 0.78)
    assert f"| lora | 5 | 78.00 | {worth} | {factor} |" in _efficiency_table(rows)  # before: real-ft's 0.80 bent the curve
    assert f"{worth} ({factor})" in result_table(rows)
    assert "| lora-ft |" not in _efficiency_table(rows)  # its baseline is another classifier: not on this curve
