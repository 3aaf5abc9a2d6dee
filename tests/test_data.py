import gzip
import struct

import numpy as np
import pytest
from conftest import write_image_tree
from PIL import Image

from diffinv.data.real import BadImageError, DataError, load_pixels, open_images, select, to_rgb


def test_folder_ids_labels_and_pixels(image_tree):
    images = open_images(image_tree)
    assert images.classes == ["cat", "dog"]
    assert images.ids == ["cat/000.png", "cat/001.png", "cat/002.png", "dog/000.png", "dog/001.png", "dog/002.png"]
    assert list(images.labels) == [0, 0, 0, 1, 1, 1]
    px = load_pixels(images, 32)
    assert px.shape == (6, 3, 32, 32) and px.min() >= -1 and px.max() <= 1
    # Ids are stable across re-opening.
    assert open_images(image_tree).ids == images.ids


def test_split_root_is_detected_and_bad_split_explained(tmp_path):
    write_image_tree(tmp_path / "ds" / "train")
    write_image_tree(tmp_path / "ds" / "test", per_class=1)
    assert len(open_images(tmp_path / "ds", split="train")) == 6
    assert len(open_images(tmp_path / "ds", split="test")) == 2
    with pytest.raises(DataError, match="no 'val'"):
        open_images(tmp_path / "ds", split="val")


def test_conversions_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent -> white background
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (4, 4), 77)
    assert to_rgb(grey).getpixel((0, 0)) == (77, 77, 77)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))  # 16-bit white stays white
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))
    assert to_rgb(half).getpixel((0, 0))[0] == 128
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.paste(1, (0, 0, 4, 4))
    assert to_rgb(pal).getpixel((0, 0)) == (200, 100, 50)


def test_odd_modes_on_disk_are_read(tmp_path):
    root = write_image_tree(tmp_path / "im", per_class=1)
    Image.new("LA", (10, 6), (50, 255)).save(root / "cat" / "la.png")
    Image.fromarray(np.full((6, 6), 4000, dtype=np.uint16)).save(root / "dog" / "deep.png")
    px = load_pixels(open_images(root), 8)
    assert px.shape == (4, 3, 8, 8)


def test_corrupt_and_truncated_images_are_reported_by_path(image_tree):
    (image_tree / "cat" / "broken.png").write_bytes(b"not an image at all")
    good = image_tree / "dog" / "000.png"
    Image.open(good).convert("RGB").save(image_tree / "dog" / "trunc.jpg")
    data = (image_tree / "dog" / "trunc.jpg").read_bytes()
    (image_tree / "dog" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    images = open_images(image_tree)
    warnings = []
    kept = select(images, None, 0, "skip", warn=warnings.append)
    assert len(kept) == 6
    assert "broken.png" in warnings[0] and "trunc.jpg" in warnings[0]
    with pytest.raises(BadImageError, match="broken.png"):
        select(images, None, 0, "error")


def test_empty_class_and_missing_path_are_clear_errors(tmp_path, image_tree):
    (image_tree / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no images"):
        open_images(image_tree)
    with pytest.raises(DataError, match="does not exist"):
        open_images(tmp_path / "nope")


def test_per_class_subset_is_seeded_and_listing_order_free(tmp_path):
    root = write_image_tree(tmp_path / "im", per_class=10)
    images = open_images(root)
    a = select(images, 3, seed=1)
    b = select(open_images(root), 3, seed=1)
    c = select(images, 3, seed=2)
    assert a.ids == b.ids and a.ids != c.ids
    assert np.bincount(a.labels).tolist() == [3, 3]
    reversed_order = images.subset(list(range(len(images)))[::-1])
    assert sorted(select(reversed_order, 3, seed=1).ids) == sorted(a.ids)
    with pytest.raises(DataError, match="fewer than --per-class 20"):
        select(images, 20, seed=1)


def test_npz_labels_shapes_and_mismatch(tmp_path):
    imgs = np.random.RandomState(0).randint(0, 256, (6, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", train_images=imgs, train_labels=np.array([[0], [1], [0], [1], [2], [2]]))
    ds = open_images(tmp_path / "ok.npz")
    assert ds.classes == ["0", "1", "2"] and ds.ids[0] == "train/000000"
    np.savez(tmp_path / "bad.npz", train_images=imgs, train_labels=np.array([0, 1]))
    with pytest.raises(DataError, match="6 images but 2 labels"):
        open_images(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="no val_images"):
        open_images(tmp_path / "ok.npz", split="val")


def test_idx_files(tmp_path):
    imgs = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">HBB3I", 0, 8, 3, 3, 4, 4) + imgs.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">HBBI", 0, 8, 1, 3) + bytes([1, 0, 1]))
    ds = open_images(tmp_path)
    assert len(ds) == 3 and list(ds.labels) == [1, 0, 1]
    assert np.asarray(ds.image(2))[..., 0].tolist() == imgs[2].tolist()


def test_csv_and_missing_listed_file(tmp_path, image_tree):
    (tmp_path / "list.csv").write_text("path,label\nimages/cat/000.png,cat\nimages/dog/001.png,dog\n")
    ds = open_images(tmp_path / "list.csv")
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    (tmp_path / "bad.csv").write_text("path,label\nimages/cat/999.png,cat\n")
    with pytest.raises(DataError, match="do not exist"):
        open_images(tmp_path / "bad.csv")


def test_digits_split_is_disjoint():
    train, test = open_images("digits", split="train"), open_images("digits", split="test")
    assert len(train) + len(test) == 1797 and not set(train.ids) & set(test.ids)
    assert len(train.classes) == 10


def test_shared_cifar_folder_and_medmnist(data_root):
    cifar = open_images(data_root / "cifar10", split="train")
    assert len(cifar) == 50000 and len(cifar.classes) == 10
    few = select(cifar, 2, seed=0)
    assert load_pixels(few, 32).shape == (20, 3, 32, 32)
    pneu = open_images(data_root / "pneumoniamnist.npz")
    assert len(pneu) == 4708 and pneu.classes == ["0", "1"]
    mnist = open_images(data_root / "mnist", split="test")
    assert len(mnist) == 10000


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="pip install 'diffusion-inversion[hf]' to test the datasets source")
    rs = np.random.RandomState(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])})
    split = datasets.Dataset.from_dict({"img": [Image.fromarray(rs.randint(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(4)],
                                        "label": [0, 1, 1, 0]}, features=features)
    datasets.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "hfds"))
    ds = open_images(f"hf:{tmp_path / 'hfds'}")
    assert ds.classes == ["ant", "bee"] and list(ds.labels) == [0, 1, 1, 0]
    assert load_pixels(ds, 8).shape == (4, 3, 8, 8)
    with pytest.raises(DataError, match="offline"):
        open_images(f"hf:{tmp_path / 'hfds'}", split="test")


def test_the_shipped_digits_are_scikit_learns_and_need_no_scikit_learn(monkeypatch):
    import sys

    from diffinv.data import real

    sklearn = pytest.importorskip("sklearn.datasets")
    theirs = sklearn.load_digits()
    real._load_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # the loader must not import it
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    ours = real._load_digits()
    assert np.array_equal(ours.images, theirs.images) and ours.images.dtype == theirs.images.dtype
    assert np.array_equal(ours.target, theirs.target)
    train = real.open_images("digits", "digits", "train")
    assert len(train) + len(real.open_images("digits", "digits", "test")) == 1797 and len(train.classes) == 10
    real._load_digits.cache_clear()
