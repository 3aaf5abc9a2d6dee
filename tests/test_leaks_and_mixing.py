"""Results that would be silently wrong: test images leaking back through a pool, a study mixing two models."""

from __future__ import annotations

import json
import shutil

from conftest import run_cli, write_image_tree
from safetensors.torch import load_file, save_file

from diffinv.runs import file_sha256


def test_a_model_changed_under_a_study_folder_is_refused(tiny_latent, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_latent, model)
    data = tmp_path / "d"
    write_image_tree(data / "train", per_class=6)
    write_image_tree(data / "test", per_class=2, seed=9)
    study = tmp_path / "s.yaml"
    study.write_text(f"data: {data}\nmodel: {model}\nper_class: [2]\nseeds: [0]\nval_per_class: 2\nreport: false\n"
                     "invert: {steps: 2, resolution: 16}\ngenerate: {per_image: 1, steps: 2}\nmethods: {di: {}}\n"
                     "train: {arch: small-cnn, steps: 1, resolution: 16}\nprocesses: 1\n")
    argv = ["experiment", study, "--out", tmp_path / "out", "--quiet"]
    assert run_cli(capsys, *argv)[0] == 0
    # The UNet's weights replaced in place (a fine-tune saved over the folder), then a replicate added.
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v + 0.01 for k, v in tensors.items()}, str(weights))
    code, text = run_cli(capsys, *argv, "--seeds", "0,1")
    assert code == 2 and "model" in text and "changed since" in text  # before: replicates of both models in one table


def _natural_tree(root, per_class: int, seed: int, size: int = 32):
    """ROOT/<class>/<i>.png of smooth random images (blobs, not noise): what JPEG re-encoding leaves recognisable."""
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((size, size, 3))
            for _ in range(4):
                cy, cx, r = rs.rand(3) * [1, 1, 0.3] + [0, 0, 0.1]
                img += rs.rand(3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2)[..., None]
            Image.fromarray((255 * img / img.max()).astype(np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def test_retrieval_never_returns_re_encoded_copies_of_test_images_and_train_says_so(tiny_pixel, tmp_path, capsys):
    from PIL import Image

    from diffinv.data.synthetic import read_manifest

    data = tmp_path / "d"
    _natural_tree(data / "train", 4, 0)
    _natural_tree(data / "test", 6, 1)
    pool = _natural_tree(tmp_path / "pool", 10, 2)
    # The test images re-saved as JPEG q90 under other names, in the pool (a web pool that holds the benchmark).
    for c in ("cat", "dog"):
        for i, f in enumerate(sorted((data / "test" / c).glob("*.png"))):
            Image.open(f).save(pool / c / f"zz-reupload-{c}-{i}.jpg", quality=90)
    assert run_cli(capsys, "invert", "--model", tiny_pixel, "--data", data, "--out", tmp_path / "s", "--resolution", "16",
                   "--steps", "2", "--quiet")[0] == 0
    code, text = run_cli(capsys, "generate", "--store", tmp_path / "s", "--method", "retrieval", "--space", "pixels",
                         "--pool", pool, "--per-image", "4", "--pool-cache", tmp_path / "cache", "--quiet", "--out",
                         tmp_path / "r")
    assert code == 0 and "12 near-duplicates" in text
    rows = read_manifest(tmp_path / "r")
    assert len(rows) == 32 and not any("reupload" in r["pool_id"] for r in rows)  # before: test images came back

    # A set that does carry them (made by hand here) is named by train, as an overlap of the test split.
    leaky = tmp_path / "leaky"
    shutil.copytree(tmp_path / "r", leaky)
    rows = read_manifest(leaky)
    for n, r in enumerate(rows[:3]):  # three images swapped for JPEG copies of test images, the manifest kept true
        Image.open(data / "test" / r["class"] / f"{n:03d}.png").convert("RGB").save(leaky / r["file"], format="JPEG", quality=90)
        r.update(bytes=(leaky / r["file"]).stat().st_size, sha256=file_sha256(leaky / r["file"]))
    (leaky / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, text = run_cli(capsys, "train", "--data", data, "--synthetic", leaky, "--arch", "small-cnn", "--steps", "1",
                         "--resolution", "16", "--quiet", "--out", tmp_path / "run")
    assert code == 0 and "synthetic image(s) look like copies" in text and "'test' split" in text  # before: no note at all


def test_a_study_whose_test_split_holds_copies_of_its_training_images_shows_the_pairs(tmp_path, capsys):
    import csv

    from PIL import Image

    data = tmp_path / "d"
    _natural_tree(data / "train", 6, 0)
    _natural_tree(data / "test", 4, 1)
    for c in ("cat", "dog"):  # every training image also in the test split, re-saved as JPEG under another name
        for f in sorted((data / "train" / c).glob("*.png")):
            Image.open(f).convert("RGB").save(data / "test" / c / f"copy-{f.stem}.jpg", quality=90)
    study = tmp_path / "s.yaml"
    study.write_text(f"data: {data}\nper_class: [2]\nseeds: [0]\nval_per_class: 2\nreport: false\nmethods: {{}}\n"
                     "train: {arch: small-cnn, steps: 1, resolution: 16}\nprocesses: 1\n")
    code, text = run_cli(capsys, "experiment", study, "--out", tmp_path / "out", "--quiet")
    assert code == 0 and "look like copies" in text and "overlap.csv" in text and "overlap.png" in text
    rows = list(csv.DictReader((tmp_path / "out" / "overlap.csv").open()))

    def stem(image_id: str) -> str:
        return image_id.split("/")[-1].rsplit(".", 1)[0]

    assert len(rows) == 4 and all(stem(r["test_image"]) == "copy-" + stem(r["training_image"]) for r in rows)
    assert Image.open(tmp_path / "out" / "overlap.png").size[1] > 32  # the pairs drawn, not an empty sheet
