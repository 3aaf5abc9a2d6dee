"""Retrieval: the exact nearest pool images of each real image, never one of the real data's, as a set like a generated one."""

import shutil

import numpy as np
import torch
from conftest import run_cli as _run
from conftest import write_image_tree
from PIL import Image

from diffinv.data.pool import content_hash, nearest
from diffinv.data.synthetic import read_manifest
from diffinv.runs import read_json, write_yaml

QUIET = ["--quiet"]


def test_nearest_is_exact_in_chunks_and_never_returns_a_banned_row():
    g = torch.Generator().manual_seed(0)
    queries, pool = torch.randn(7, 5, generator=g), torch.randn(50, 5, generator=g)
    truth = torch.cdist(queries.double(), pool.double())
    d, i = nearest(queries, pool, 4, chunk=6)  # 9 chunks, the last a partial one
    assert torch.equal(i, truth.argsort(1)[:, :4]) and torch.allclose(d, truth.sort(1).values[:, :4])
    banned = torch.zeros(50, dtype=torch.bool)
    banned[i[:, 0]] = True  # every query's nearest row
    d2, i2 = nearest(queries, pool, 4, banned, chunk=6)
    assert not banned[i2].any()
    masked = truth.masked_fill(banned[None], float("inf"))
    assert torch.equal(i2, masked.argsort(1)[:, :4])
    # Ties go to the lower index.
    same = torch.zeros(3, 2)
    assert nearest(torch.zeros(1, 2), same, 2)[1].tolist() == [[0, 1]]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1) / 255.0


def test_retrieval_returns_the_nearest_pool_images_and_none_of_the_real_data(tiny_pixel, tmp_path, capsys, monkeypatch):
    import time

    import diffinv.diffusion.methods.retrieval as retrieval

    real_nearest = retrieval.nearest
    monkeypatch.setattr(retrieval, "nearest", lambda *a, **k: time.sleep(0.5) or real_nearest(*a, **k))  # a slow search
    data = tmp_path / "d"
    write_image_tree(data / "train", per_class=4, size=16)
    write_image_tree(data / "test", per_class=2, size=16, seed=3)
    pool = write_image_tree(tmp_path / "pool" / "made", per_class=15, classes=("a", "b"), size=16, seed=7).parent
    # Into the pool: a real training image and a test image, under other names; each is its own nearest neighbour.
    shutil.copy(data / "train" / "cat" / "000.png", pool / "copy-of-train.png")
    shutil.copy(data / "test" / "dog" / "001.png", pool / "copy-of-test.png")
    assert _run(capsys, "invert", "--model", tiny_pixel, "--data", data, "--out", tmp_path / "s", "--resolution", "16",
                "--steps", "2", *QUIET)[0] == 0
    retrieve = ["generate", "--store", tmp_path / "s", "--method", "retrieval", "--space", "pixels", "--pool", pool,
                "--per-image", "3", "--pool-cache", tmp_path / "cache", "--out"]
    code, text = _run(capsys, *retrieve, tmp_path / "r")
    assert code == 0 and "2 of 32 pool images dropped, 2 equal in pixels and 0 near-duplicates of the 8 real images, 4 test images" in text

    rows = read_manifest(tmp_path / "r")
    assert len(rows) == 24 and {r["pool_id"] for r in rows}.isdisjoint({"copy-of-train.png", "copy-of-test.png"})
    candidates = {p.relative_to(pool).as_posix(): _pixels(p) for p in pool.rglob("*.png") if "copy" not in p.name}
    for source in {r["source"] for r in rows}:
        query = _pixels(data / "train" / source)
        ranked = sorted(candidates, key=lambda name: np.linalg.norm(candidates[name] - query))[:3]
        mine = sorted((r for r in rows if r["source"] == source), key=lambda r: r["index"])
        assert [r["pool_id"] for r in mine] == ranked
        assert np.isclose(mine[0]["distance"], np.linalg.norm(candidates[ranked[0]] - query), atol=1e-5)
        # The image written is the pool image (equal size here), labelled with the query's class.
        assert np.array_equal(_pixels(tmp_path / "r" / mine[0]["file"]), candidates[ranked[0]])
        assert mine[0]["class"] == source.split("/")[0]
    assert _run(capsys, "verify", tmp_path / "r")[0] == 0
    # Its cost counts the search (and the pool's first feature pass), not just the copying of 24 files.
    searched = read_json(tmp_path / "r" / "generate.json")["retrieval"]["seconds"]
    cost = read_json(tmp_path / "r" / "cost.json")
    assert cost["seconds"] >= cost["load_seconds"] >= searched >= 0.5
    train = ["--arch", "small-cnn", "--steps", "2", "--batch-size", "4", "--resolution", "16", *QUIET]
    assert _run(capsys, "train", "--data", data, "--synthetic", tmp_path / "r", *train, "--out", tmp_path / "t")[0] == 0

    # The pool's features were cached: a second set reads them back and finds the same neighbours.
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 3  # the features, the hashes and the near-duplicate signatures
    stamp = [p.stat().st_mtime_ns for p in cached]
    assert _run(capsys, *retrieve, tmp_path / "r2")[0] == 0
    assert [p.stat().st_mtime_ns for p in cached] == stamp
    assert [r["pool_id"] for r in read_manifest(tmp_path / "r2")] == [r["pool_id"] for r in rows]


def test_retrieval_spaces_and_the_base_pool(tiny_pixel, tmp_path, capsys):
    data = tmp_path / "d"
    write_image_tree(data / "train", per_class=3, size=16)
    write_image_tree(data / "test", per_class=2, size=16, seed=3)
    # A base that records what it was pretrained on (as `diffinv pretrain-base` does): its pool by default.
    base = tmp_path / "base"
    shutil.copytree(tiny_pixel, base)
    pool = write_image_tree(tmp_path / "pool", per_class=6, size=16, seed=9)  # labelled cat / dog: label precision
    write_yaml(base / "config.yaml", {"data": str(pool), "split": "train", "extra_data": []})
    assert _run(capsys, "invert", "--model", base, "--data", data, "--out", tmp_path / "s", "--resolution", "16",
                "--steps", "2", *QUIET)[0] == 0
    assert _run(capsys, "train", "--data", data, "--arch", "small-cnn", "--steps", "2", "--batch-size", "4", "--resolution",
                "16", "--out", tmp_path / "judge", *QUIET)[0] == 0
    found = {}
    for space, extra in (("encoder", []), ("judge", ["--judge", tmp_path / "judge"]), ("pixels", [])):
        code, text = _run(capsys, "generate", "--store", tmp_path / "s", "--method", "retrieval", "--space", space, *extra,
                          "--per-image", "2", "--pool-cache", tmp_path / "cache", "--out", tmp_path / f"set-{space}")
        assert code == 0, text
        info = read_json(tmp_path / f"set-{space}" / "generate.json")["retrieval"]
        assert info["pools"] == [str(pool)] and info["space"] == space and 0 <= info["label_precision"] <= 1
        rows = read_manifest(tmp_path / f"set-{space}")
        found[space] = [r["pool_id"] for r in rows]
        # Label precision: the share of retrieved images whose own (pool) class is the query's.
        assert info["label_precision"] == round(sum(r["pool_class"] == r["class"] for r in rows) / len(rows), 4)
        assert {r["pool_class"] for r in rows} <= {"cat", "dog"}
    assert len({tuple(v) for v in found.values()}) > 1  # the spaces rank the pool differently

    code, text = _run(capsys, "generate", "--store", tmp_path / "s", "--method", "retrieval", "--space", "judge",
                      "--out", tmp_path / "x")
    assert code == 2 and "--judge RUN" in text
    code, text = _run(capsys, "generate", "--store", tmp_path / "s", "--method", "retrieval", "--model", tiny_pixel,
                      "--out", tmp_path / "y")
    assert code == 2 and "--pool PATH" in text


def test_content_hash_sees_pixels_not_files(tmp_path):
    a = Image.fromarray(np.full((4, 4, 3), 7, dtype=np.uint8))
    a.save(tmp_path / "a.png")
    a.save(tmp_path / "b.bmp")
    assert content_hash(Image.open(tmp_path / "a.png").convert("RGB")) == content_hash(Image.open(tmp_path / "b.bmp").convert("RGB"))
    assert content_hash(a) != content_hash(Image.fromarray(np.full((4, 4, 3), 8, dtype=np.uint8)))


def test_retrieval_in_a_local_image_models_space(tiny_pixel, tmp_path, capsys):
    from diffinv.classify.models import build_model

    data = tmp_path / "d"
    write_image_tree(data / "train", per_class=3, size=16)
    pool = write_image_tree(tmp_path / "pool", per_class=8, classes=("a", "b"), size=16, seed=5)
    torch.manual_seed(0)
    net = build_model("small-cnn", 7, 16).eval()  # any checkpoint: its head's classes do not matter
    torch.save(net.state_dict(), tmp_path / "net.pth")
    assert _run(capsys, "invert", "--model", tiny_pixel, "--data", data, "--out", tmp_path / "s", "--resolution", "16",
                "--steps", "2", *QUIET)[0] == 0
    retrieve = ["generate", "--store", tmp_path / "s", "--method", "retrieval", "--space", "model", "--pool", pool,
                "--per-image", "3", "--pool-cache", tmp_path / "cache"]
    code, text = _run(capsys, *retrieve, "--image-model", tmp_path / "net.pth", "--image-arch", "small-cnn", "--out", tmp_path / "r")
    assert code == 0, text

    # The neighbours are those of the checkpoint's penultimate features on ImageNet-normalised pixels, as cosine.
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def features(paths):
        x = torch.tensor(np.stack([_pixels(p).reshape(16, 16, 3) for p in paths])).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            f = net.features((x - mean) / std)
        return f / f.norm(dim=1, keepdim=True)

    names = sorted(p.relative_to(pool).as_posix() for p in pool.rglob("*.png"))
    pool_f = features([pool / n for n in names])
    rows = read_manifest(tmp_path / "r")
    for source in {r["source"] for r in rows}:
        d = (pool_f - features([data / "train" / source])).norm(dim=1)
        mine = sorted((r for r in rows if r["source"] == source), key=lambda r: r["index"])
        assert [r["pool_id"] for r in mine] == [names[i] for i in d.argsort()[:3]]
        assert np.isclose(mine[0]["distance"], float(d.min()), atol=1e-5)
    assert read_json(tmp_path / "r" / "generate.json")["retrieval"]["space"] == "model"

    code, text = _run(capsys, *retrieve, "--out", tmp_path / "x")
    assert code == 2 and "--image-model PATH" in text
    code, text = _run(capsys, *retrieve, "--image-model", tmp_path / "net.pth", "--out", tmp_path / "x")
    assert code == 2 and "does not say its architecture" in text
    code, text = _run(capsys, *retrieve, "--image-model", tmp_path / "net.pth", "--image-arch", "resnet18", "--out", tmp_path / "x")
    assert code == 2 and "another architecture" in text
