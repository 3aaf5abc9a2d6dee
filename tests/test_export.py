"""diffinv export: a set (and its real subset) read back by torchvision, Hugging Face datasets and WebDataset, pixel for pixel."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import run_cli, write_image_tree
from PIL import Image

from diffinv.data.real import open_images
from diffinv.data.synthetic import read_manifest

QUIET = ["--device", "cpu"]


@pytest.fixture(scope="module")
def made(tiny_latent, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = write_image_tree(root / "data", per_class=2, size=16)
    from diffinv.cli import main

    assert main(["invert", "--model", str(tiny_latent), "--data", str(data), "--resolution", "16", "--steps", "2",
                 "--out", str(root / "store"), *QUIET]) == 0
    assert main(["generate", "--store", str(root / "store"), "--per-image", "2", "--steps", "2", "--out", str(root / "set"),
                 *QUIET]) == 0
    return root


def _expected(root):
    """(id -> (pixels, class)) of every synthetic image and every real one the store holds."""
    out = {r["id"]: (np.asarray(Image.open(root / "set" / r["file"]).convert("RGB")), r["class"]) for r in read_manifest(root / "set")}
    real = open_images(root / "data")
    for i, image_id in enumerate(real.ids):
        out[image_id] = (np.asarray(real.image(i)), real.classes[real.labels[i]])
    return out


def _export(capsys, root, fmt, name, *extra):
    code, text = run_cli(capsys, "export", "--set", root / "set", "--to", fmt, "--with-real", *extra, "--out", root / name)
    assert code == 0, text
    return root / name, text


def test_imagefolder_reads_back_in_torchvision(made, capsys):
    from torchvision.datasets import ImageFolder

    out, text = _export(capsys, made, "imagefolder", "if")
    assert "ImageFolder" in text
    expected = _expected(made)
    folder = ImageFolder(str(out))
    meta = {json.loads(line)["file_name"]: json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()}
    assert len(folder) == len(expected) == len(meta) == 12
    for path, label in folder.samples:
        row = meta[str(path)[len(str(out)) + 1:]]
        pixels, cls = expected[row["id"]]
        assert folder.classes[label] == cls == row["class_name"]
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), pixels)
    assert sorted(r["origin"] for r in meta.values()).count("real") == 4


def test_hf_dataset_reads_back_with_load_from_disk(made, capsys):
    datasets = pytest.importorskip("datasets")
    out, _ = _export(capsys, made, "hf", "hf")
    ds = datasets.load_from_disk(str(out / "dataset"))
    expected = _expected(made)
    assert len(ds) == 12 and ds.features["label"].names == ["cat", "dog"]
    for row in ds:
        pixels, cls = expected[row["id"]]
        assert ds.features["label"].names[row["label"]] == cls
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), pixels)
        provenance = json.loads(row["provenance"])
        assert row["origin"] == "real" or (provenance["method"] == "di" and provenance["source"] == row["source"])


def test_webdataset_shards_read_back_with_webdataset(made, capsys):
    wds = pytest.importorskip("webdataset")
    out, _ = _export(capsys, made, "webdataset", "wds", "--shard-size", "5")
    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) == 3  # 12 images, 5 per shard
    expected = _expected(made)
    seen = set()
    for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False):
        meta = json.loads(sample["json"])
        pixels, cls = expected[meta["id"]]
        assert int(sample["cls"]) == ["cat", "dog"].index(cls)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")), pixels)
        seen.add(meta["id"])
    assert seen == set(expected)
    again, _ = _export(capsys, made, "webdataset", "wds-again", "--shard-size", "5")
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in sorted(again.glob("shard-*.tar"))]  # deterministic


def test_damaged_set_or_missing_real_data_is_refused_before_writing(made, capsys, tmp_path):
    import shutil

    shutil.copytree(made / "set", tmp_path / "set")
    victim = tmp_path / "set" / read_manifest(tmp_path / "set")[0]["file"]
    victim.write_bytes(victim.read_bytes()[:-10])
    code, text = run_cli(capsys, "export", "--set", tmp_path / "set", "--out", tmp_path / "out")
    assert code != 0 and "damaged" in text and not (tmp_path / "out" / "export.json").exists()
    shutil.copytree(made / "set", tmp_path / "set2")
    generate = json.loads((tmp_path / "set2" / "generate.json").read_text())
    (tmp_path / "set2" / "generate.json").write_text(json.dumps({**generate, "store": str(tmp_path / "gone")}))
    shutil.copytree(made / "data", tmp_path / "data")
    generate["data"] = str(tmp_path / "data")
    (tmp_path / "set2" / "generate.json").write_text(json.dumps({**generate, "store": str(tmp_path / "gone")}))
    shutil.rmtree(tmp_path / "data" / "dog")
    code, text = run_cli(capsys, "export", "--set", tmp_path / "set2", "--with-real", "--out", tmp_path / "out2")
    assert code != 0 and "--with-real" in text and "no longer in" in text


def test_push_to_hub_pushes_the_saved_dataset_or_says_how(made, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pushed = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: pushed.append((repo, len(self))))
    _export(capsys, made, "hf", "hf-push", "--push-to-hub", "me/my-synthetic")
    assert pushed == [("me/my-synthetic", 12)]

    def offline(self, repo, **kw):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", offline)
    code, text = run_cli(capsys, "export", "--set", made / "set", "--to", "hf", "--push-to-hub", "me/x", "--out",
                         made / "hf-offline")
    assert code != 0 and "huggingface-cli login" in text and "push_to_hub('me/x')" in text
