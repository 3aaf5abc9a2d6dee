"""Labelled real images from common on-disk layouts, with stable ids and clean RGB conversion.

Sources (picked from the path, or forced with ``format``):

* ``folder``: ``ROOT/<class>/<image>`` (or ``ROOT/<split>/<class>/<image>``)
* ``npz``:    MedMNIST-style ``{split}_images`` / ``{split}_labels``
* ``idx``:    a folder with gzipped idx files (MNIST, Fashion-MNIST): ``train-*`` / ``t10k-*``
* ``csv``:    a file of ``path,label`` rows, paths relative to the CSV
* ``digits``: the UCI 8x8 digits scikit-learn ships, packaged here (a fixed 80/20 train/test split)
* ``hf``:     a Hugging Face ``datasets`` name or folder (``hf:NAME``), when installed

Every image gets an id that survives re-runs (relative path for files, ``split/index`` for
arrays), so stores, manifests and resumes can refer to it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffinv.errors import UserError
from diffinv.registry import Registry

if TYPE_CHECKING:  # imported where tensors are made, so that opening a folder (verify, report) needs no torch
    import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_NAMES = {"train", "test", "val", "valid", "validation"}


class DataError(UserError, ValueError):
    """The dataset cannot be read as asked; the message says what to change."""


# The readable layouts by --format name: opener(spec, split) -> LabelledImages ("auto" picks one from the path).
OPENERS: Registry[Callable[[str, str], LabelledImages]] = Registry("--format", DataError)


class BadImageError(DataError):
    """One image file is corrupt, truncated or unreadable."""


@dataclass
class LabelledImages:
    """A labelled image collection whose pixels are read on demand.

    ``ids[i]`` is stable across runs, ``labels[i]`` indexes ``classes``, and ``sources[i]`` says
    where the image came from (a path, or ``file#split/index``).
    """

    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    sources: list[str]
    _read: Callable[[int], Image.Image] = field(repr=False)
    _index: np.ndarray | None = field(default=None, repr=False)
    top: float | None = None  # the white level of >8-bit images, one for the whole source (see :func:`bit_depth_top`)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> Image.Image:
        """The i-th image as 8-bit RGB. Raises :class:`BadImageError` naming its source."""
        raw_index = int(self._index[i]) if self._index is not None else i
        try:
            img = self._read(raw_index)
            img.load()
            return to_rgb(img, self.top)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise BadImageError(f"cannot read image {self.sources[i]}: {exc}") from exc

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        picked = np.asarray(indices, dtype=np.int64)
        base = self._index if self._index is not None else np.arange(len(self.ids))
        return LabelledImages(
            ids=[self.ids[i] for i in picked],
            labels=self.labels[picked],
            classes=self.classes,
            sources=[self.sources[i] for i in picked],
            _read=self._read,
            _index=base[picked],
            top=self.top,
        )


# ----------------------------------------------------------------------------- pixels


GREY_SAMPLE = 64  # images looked at to call a set grey (a colour set has colour in nearly every image)


def all_grey(images: LabelledImages, indices: list[int] | None = None) -> bool:
    """Whether the images (the first GREY_SAMPLE of ``indices``, default all) have R = G = B."""
    indices = list(range(len(images))) if indices is None else indices
    sample = indices[:GREY_SAMPLE]
    return bool(sample) and all(_grey(images.image(i)) for i in sample)


def _grey(image: Image.Image) -> bool:
    r, g, b = image.convert("RGB").split()
    return r.tobytes() == g.tobytes() == b.tobytes()


def to_rgb(img: Image.Image, top: float | None = None) -> Image.Image:
    """8-bit RGB from grey, palette, RGBA (composited on white), 16-bit and float images.

    ``top`` is the white level of integer images above 8 bits, one value for a whole source (a
    per-image maximum would make one image's 250 and another's 256 read as different greys);
    without it, the container's own range (65,535 for 16-bit files).
    """
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        # PIL's own I;16 -> RGB conversion clips at 255; scale by the source's white level instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        else:
            scale = top or 65535.0  # 16-bit files open as I;16 or (older Pillow) I
        arr = np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def bit_depth_top(read: Callable[[int], Image.Image], n: int) -> float | None:
    """The white level of a file source whose images are integers above 8 bits (16-bit PNG / TIFF), else None.

    The smallest 2^b - 1 (b = 8, 10, 12, 14, 16) at or above the largest value over every image, so 12-bit
    data in 16-bit files (medical scanners) keeps its contrast and every image is read on one scale.
    """
    first = None
    for i in range(n):  # the first readable image says whether the source is above 8 bits
        try:
            first = read(i)
            break
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            continue
    if first is None or not first.mode.startswith("I"):
        return None
    peak = 0
    for i in range(n):
        try:
            peak = max(peak, int(np.asarray(read(i)).max(initial=0)))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            continue  # an unreadable file is reported where it is read
    return float(next(2**b - 1 for b in (8, 10, 12, 14, 16, 32) if peak <= 2**b - 1))


def _oriented(path: Path) -> Image.Image:
    """An image file as a camera meant it: its EXIF orientation applied (phones store portraits rotated)."""
    img = Image.open(path)
    return ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img


def image_to_uint8(img: Image.Image, resolution: int) -> torch.Tensor:
    """RGB image -> uint8 tensor [3, R, R]: centre square crop, bicubic resize."""
    import torch

    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_pixels(images: LabelledImages, resolution: int) -> torch.Tensor:
    """All images of ``images`` as one tensor [N, 3, R, R] in [-1, 1]."""
    return load_uint8(images, resolution).float().div(127.5).sub(1.0)


def load_uint8(images: LabelledImages, resolution: int, progress: bool = False, desc: str = "loading") -> torch.Tensor:
    """All images of ``images`` as one uint8 tensor [N, 3, R, R] (4x smaller in memory than floats)."""
    import torch

    out = torch.empty(len(images), 3, resolution, resolution, dtype=torch.uint8)
    indices = range(len(images))
    if progress and len(images) > 1000:
        from diffinv.progress import bar

        indices = bar(indices, desc=desc, unit="img", leave=False)
    for i in indices:
        out[i] = image_to_uint8(images.image(i), resolution)
    return out


# ----------------------------------------------------------------------------- opening


def open_images(path: str | Path, format: str = "auto", split: str = "train", flag: str = "--split") -> LabelledImages:
    """Open a labelled image source. See the module docstring for the supported layouts.

    ``flag`` is what asked for ``split`` (e.g. ``--val-split``): a missing split's message names it.
    """
    spec = str(path)
    opener = OPENERS.get(_detect_format(spec) if format == "auto" else format)
    try:
        images = opener(spec, split)
    except DataError as exc:
        if flag == "--split" or "--split" not in str(exc):
            raise
        raise DataError(str(exc).replace("pass --split / --eval-split", f"fix {flag}").replace("--split", flag)) from None
    _check_labels(images, spec)
    return images


def _detect_format(spec: str) -> str:
    if spec == "digits":
        return "digits"
    if spec.startswith("hf:"):
        return "hf"
    p = Path(spec)
    if not p.exists():
        raise DataError(f"--data {spec} does not exist; give an image folder, .npz, .csv, idx folder, 'digits' or 'hf:NAME'")
    if p.is_file():
        if p.suffix == ".npz":
            return "npz"
        if p.suffix == ".csv":
            return "csv"
        raise DataError(f"--data {spec}: cannot tell the format of a {p.suffix or 'suffix-less'} file; pass --format")
    if any(p.glob("*-idx3-ubyte*")):
        return "idx"
    return "folder"


def _check_labels(images: LabelledImages, spec: str) -> None:
    if len(images) == 0:
        raise DataError(f"{spec} holds no images")
    counts = np.bincount(images.labels, minlength=len(images.classes))
    empty = [images.classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{spec}: class(es) {empty} have no images; add images or remove the class")
    if len(set(images.ids)) != len(images.ids):
        raise DataError(f"{spec}: image ids are not unique")


@OPENERS.register("folder", "ROOT/<class>/<image> (or ROOT/<split>/<class>/<image>)")
def _open_folder(spec: str, split: str) -> LabelledImages:
    root = Path(spec)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs and all(d.name.lower() in SPLIT_NAMES for d in subdirs):
        if not (root / split).is_dir():
            raise DataError(f"{spec} holds splits {[d.name for d in subdirs]} but no {split!r}; pass --split")
        root = root / split
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    elif split != "train":
        # A folder of class folders is one split; calling it the test (or validation) split would evaluate on the images
        # a classifier was trained on.
        raise DataError(f"{spec} has no split folders (train/, test/ ...), so it has no {split!r} split; make one "
                        f"({spec}/train/<class>/..., {spec}/{split}/<class>/...) or give the --eval-split data apart")
    if not subdirs:
        raise DataError(f"{root} has no class sub-folders; expected {root}/<class>/<image files>")
    loose = [f.name for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DataError(f"{root} mixes loose images ({loose[:3]}...) with class folders; move each image into its class folder")
    classes = [d.name for d in subdirs]
    paths: list[Path] = []
    labels: list[int] = []
    for label, d in enumerate(subdirs):
        entries = [f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".")]  # ._x.png: macOS metadata
        _refuse_outputs_inside(d, entries)
        files = sorted(f for f in entries if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    rel = [p.relative_to(root).as_posix() for p in paths]
    top = bit_depth_top(lambda i: Image.open(paths[i]), len(paths)) if paths else None
    return LabelledImages(rel, np.asarray(labels, dtype=np.int64), classes, [str(p) for p in paths],
                          lambda i: _oriented(paths[i]), top=top)


OUTPUT_MARKERS = ("generate.json", "store.json", "train.json", "study.yaml")  # what diffinv's own folders hold


def _refuse_outputs_inside(class_dir: Path, entries: list[Path]) -> None:
    """A diffinv output (e.g. a synthetic set) inside a class folder would be read as real images of that class."""
    found = next((f for f in entries if f.name in OUTPUT_MARKERS), None)
    if found is not None:
        raise DataError(f"{found.parent} is a diffinv output ({found.name}) inside the real data's class folder {class_dir}: "
                        f"its images would be read as real images of class {class_dir.name!r}. Move it out of the data")


def _array_images(arr: np.ndarray, labels: np.ndarray, prefix: str, source: str, classes: list[str] | None = None,
                  ids: list[str] | None = None) -> LabelledImages:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{source}: labels must be one per image (shape (N,) or (N, 1)); got {labels.shape} "
                        f"(multi-label data is not supported)")
    if len(arr) != len(labels):
        raise DataError(f"{source}: {len(arr)} images but {len(labels)} labels; they must match")
    if arr.ndim not in (3, 4):
        raise DataError(f"{source}: images must be (N, H, W) or (N, H, W, C); got {arr.shape}")
    if arr.ndim == 4 and arr.shape[1] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 1, -1)  # channels first (PyTorch's layout): (N, C, H, W) -> (N, H, W, C)
    if arr.ndim == 4 and arr.shape[-1] not in (1, 3, 4):
        raise DataError(f"{source}: images of shape {arr.shape[1:]} have no channel axis of 1, 3 or 4; store them as "
                        f"(N, H, W, C) or (N, C, H, W)")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            odd = [float(v) for v in np.unique(labels[~np.isfinite(labels) | (labels != np.round(labels))])[:3]]
            raise DataError(f"{source}: labels must be class numbers; found {odd} (soft or regression targets are not class "
                            f"labels). Store integer labels")
        labels = labels.astype(np.int64)  # 0.0, 1.0 ... are the classes 0, 1 ...
    arr = _as_uint8(arr, source)
    values = np.unique(labels)
    if classes is None:
        classes = [str(v) for v in values]
        lookup = {v: i for i, v in enumerate(values)}
        labels = np.asarray([lookup[v] for v in labels], dtype=np.int64)
    ids = ids or [f"{prefix}/{i:06d}" for i in range(len(arr))]

    def read(i: int) -> Image.Image:
        a = arr[i]
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return Image.fromarray(a)

    return LabelledImages(ids, labels.astype(np.int64), classes, [f"{source}#{i}" for i in ids], read)


def _as_uint8(arr: np.ndarray, source: str) -> np.ndarray:
    """Image arrays as uint8, by one rule for the whole array (never image by image).

    uint8 stays; other integers are scaled by their type's range when they exceed 255 (16-bit);
    floats must be finite and in [0, 1] (scaled by 255), [-1, 1] (a common normalisation: (x + 1) / 2)
    or [0, 255]; any other range is refused with the range seen. Constant images after the
    conversion are refused too: they are what a wrong rule produces.
    """
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        top = 255 if arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0 else np.iinfo(arr.dtype).max
        out = np.clip(arr.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            images = np.unique(np.nonzero(bad)[0])
            raise DataError(f"{source}: {int(bad.sum())} pixel value(s) are NaN or infinite, in image(s) {images[:5].tolist()}"
                            f"{' ...' if len(images) > 5 else ''}; fix or drop those images")
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo >= 0 and hi <= 1:
            scaled = arr * 255.0
        elif lo >= -1 and hi <= 1:
            scaled = (arr + 1.0) * 127.5
        elif lo >= 0 and hi <= 255:
            scaled = arr
        else:
            raise DataError(f"{source}: float pixels range over [{lo:g}, {hi:g}]; diffinv reads floats in [0, 1], [-1, 1] "
                            f"or [0, 255]. Rescale the array (or store it as uint8)")
        out = np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    else:
        raise DataError(f"{source}: images of type {arr.dtype} cannot be read; use uint8, uint16 or float arrays")
    flat = out.reshape(len(out), -1)
    constant = np.flatnonzero(flat.min(axis=1) == flat.max(axis=1))
    if len(out) and len(constant) == len(out):
        raise DataError(f"{source}: every image is one flat colour after converting {arr.dtype} pixels; check their range")
    return out


@OPENERS.register("npz", "MedMNIST-style {split}_images / {split}_labels")
def _open_npz(spec: str, split: str) -> LabelledImages:
    try:
        data = np.load(spec, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {spec} as .npz ({type(exc).__name__}: {exc}); check the file is a complete numpy .npz") from exc
    key_i, key_l = f"{split}_images", f"{split}_labels"
    if key_i not in data or key_l not in data:
        raise DataError(f"{spec} has no {key_i}/{key_l}; its arrays are {sorted(data.files)} (pass --split)")
    return _array_images(data[key_i], data[key_l], split, spec)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise DataError(f"cannot read idx file {path}: {exc}") from exc


@OPENERS.register("idx", "a folder of gzipped idx files (MNIST, Fashion-MNIST)")
def _open_idx(spec: str, split: str) -> LabelledImages:
    root = Path(spec)
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"idx data has splits 'train' and 'test'; got --split {split}")
    found = {}
    for kind in ("images-idx3", "labels-idx1"):
        matches = sorted(root.glob(f"{prefix}-{kind}-ubyte*"))
        if not matches:
            raise DataError(f"{root} has no {prefix}-{kind}-ubyte[.gz] file")
        found[kind] = matches[0]
    return _array_images(_read_idx(found["images-idx3"]), _read_idx(found["labels-idx1"]), split, spec)


@OPENERS.register("csv", "a file of path,label rows, paths relative to it")
def _open_csv(spec: str, split: str) -> LabelledImages:
    """``path,label[,split]`` rows (paths relative to the CSV). Without a ``split`` column the file is one split."""
    path = Path(spec)
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: the byte-order mark Excel writes
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(fh)]
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{spec} must be a CSV with a header row containing 'path' and 'label'")
    for line, r in enumerate(rows, start=2):
        if not r.get("path") or not r.get("label"):
            raise DataError(f"{spec}, line {line}: no {'path' if not r.get('path') else 'label'} "
                            f"({','.join(r.values())!r}); every row needs a path and a label")
    if "split" in rows[0]:
        present = sorted({r["split"] for r in rows})
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise DataError(f"{spec} has no rows of split {split!r}; its splits are {present} (pass --split / --eval-split)")
    elif split != "train":
        # One split only: calling it the test split would evaluate on the images a classifier was trained on.
        raise DataError(f"{spec} has no 'split' column, so it has no {split!r} split; add a split column (train / test "
                        f"per row) or give the --eval-split data in another file")
    classes = sorted({r["label"] for r in rows})
    lookup = {c: i for i, c in enumerate(classes)}
    files = [(path.parent / r["path"]).resolve() if not Path(r["path"]).is_absolute() else Path(r["path"]) for r in rows]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(f"{spec}: {len(missing)} listed file(s) do not exist, e.g. {missing[:3]}")
    ids = [r["path"] for r in rows]
    top = bit_depth_top(lambda i: Image.open(files[i]), len(files))
    return LabelledImages(ids, np.asarray([lookup[r["label"]] for r in rows], dtype=np.int64), classes,
                          [str(f) for f in files], lambda i: _oriented(files[i]), top=top)


@OPENERS.register("digits", "the UCI 8x8 digits, packaged")
def _open_digits(spec: str, split: str) -> LabelledImages:
    digits = _load_digits()
    # A fixed permutation (not the caller's seed) so train and test never overlap across runs.
    order = np.random.RandomState(0).permutation(len(digits.images))
    cut = int(0.8 * len(order))
    if split not in ("train", "test"):
        raise DataError(f"digits has splits 'train' and 'test'; got --split {split}")
    keep = np.sort(order[:cut] if split == "train" else order[cut:])
    pixels = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)
    return _array_images(pixels, digits.target[keep], split, "digits", classes=[str(c) for c in range(10)],
                         ids=[f"digits/{i:04d}" for i in keep])


DIGITS = Path(__file__).resolve().parents[1] / "assets" / "digits" / "digits.npz"


@functools.cache
def _load_digits() -> Any:
    """The UCI digits scikit-learn ships (assets/digits), read once per process: images 0..16 as floats, as sklearn's."""
    from types import SimpleNamespace

    with np.load(DIGITS) as data:
        return SimpleNamespace(images=data["images"].astype(np.float64), target=data["target"].astype(np.int64))


@OPENERS.register("hf", "a Hugging Face datasets name or folder (hf:NAME)")
def _open_hf(spec: str, split: str) -> LabelledImages:
    try:
        import datasets
    except ImportError as exc:
        raise DataError("Hugging Face datasets are read with the 'datasets' package: pip install 'diffusion-inversion[hf]'") from exc
    name = spec[3:] if spec.startswith("hf:") else spec
    local = Path(name)
    try:
        if (local / "dataset_dict.json").is_file():  # a DatasetDict saved with save_to_disk
            ds = datasets.load_from_disk(name)[split]
        elif (local / "dataset_info.json").is_file():  # a single saved split
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, KeyError, ValueError, ConnectionError) as exc:
        raise DataError(f"cannot open Hugging Face dataset {name!r} split {split!r} offline: {exc}") from exc
    image_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(f"{name}: need an image column and a label column; found {ds.column_names}")
    feature = ds.features[label_col]
    classes = list(getattr(feature, "names", None) or [str(v) for v in sorted(set(ds[label_col]))])
    labels = np.asarray(ds[label_col], dtype=np.int64)
    ids = [f"{split}/{i:07d}" for i in range(len(ds))]
    return LabelledImages(ids, labels, classes, [f"hf:{name}#{i}" for i in ids], lambda i: ds[i][image_col])


# ----------------------------------------------------------------------------- selection


def _warn_tiny(images: LabelledImages, sides: dict[int, int], warn: Callable[[str], None]) -> None:
    """Name the images far smaller than the rest: each is upscaled to the common size, which is rarely meant."""
    if not sides:
        return
    typical = float(np.median(list(sides.values())))
    tiny = [images.sources[i] for i, side in sides.items() if side * 4 <= typical]
    if tiny:
        warn(f"warning: {len(tiny)} image(s) are a quarter of the typical size ({typical:g} px) or less and will be "
             f"upscaled: {', '.join(tiny[:3])}{' ...' if len(tiny) > 3 else ''}; check them")


def validation_ids(images: LabelledImages, per_class: int) -> set[str]:
    """The ids of a validation hold-out: ``per_class`` images per class, the same for every seed and run.

    Chosen by a hash of each id (not by a seed), so every real subset of every replicate can be
    drawn from the rest and never overlaps it.
    """
    if per_class <= 0:
        return set()
    held: set[str] = set()
    for label in range(len(images.classes)):
        members = sorted((images.ids[i] for i in np.flatnonzero(images.labels == label)),
                         key=lambda i: hashlib.blake2b(f"validation\x1f{i}".encode(), digest_size=8).digest())
        if len(members) <= per_class:
            raise DataError(f"class {images.classes[label]!r} has {len(members)} images; holding {per_class} out for "
                            f"validation would leave none to train on (lower --val-per-class)")
        held.update(members[:per_class])
    return held


def real_subset(source: LabelledImages, per_class: int | None, seed: int, bad_images: str = "skip", val_per_class: int = 0,
                warn: Callable[[str], None] = print) -> LabelledImages:
    """The real images a store, run or study trains on: ``per_class`` per class drawn by ``seed`` from what the
    validation hold-out of ``val_per_class`` per class leaves (the one rule every stage and the study share)."""
    return select(source, per_class, seed, bad_images, warn=warn, exclude=validation_ids(source, val_per_class))


def select(images: LabelledImages, per_class: int | None, seed: int, bad_images: str = "skip",
           warn: Callable[[str], None] = print, exclude: set[str] | frozenset[str] = frozenset()) -> LabelledImages:
    """Readable images, optionally a seeded subset of ``per_class`` per class, never one of ``exclude``.

    Every candidate is decoded once; unreadable ones are reported by path and skipped
    (``bad_images="skip"``) or stop the run (``"error"``). The subset is chosen from a
    permutation of the class's ids sorted by name, so it depends on the seed and the set of
    files, not on the order the file system lists them in. ``exclude`` (a validation
    hold-out, :func:`validation_ids`) is removed before anything is drawn.
    """
    rng = np.random.RandomState(seed)
    chosen: list[int] = []
    skipped: list[str] = []
    sides: dict[int, int] = {}
    for label, name in enumerate(images.classes):
        members = sorted((int(i) for i in np.flatnonzero(images.labels == label) if images.ids[i] not in exclude),
                         key=lambda i: images.ids[i])
        order = [members[j] for j in rng.permutation(len(members))] if per_class else members
        got = 0
        for i in order:
            if per_class and got == per_class:
                break
            try:
                sides[i] = min(images.image(i).size)
            except BadImageError as exc:
                if bad_images == "error":
                    raise BadImageError(f"{exc}. Remove or fix the file, or pass --bad-images skip") from exc
                skipped.append(images.sources[i])
                continue
            chosen.append(i)
            got += 1
        held = int(np.sum(images.labels == label)) - len(members)
        where = f" outside the {held} held out for validation (--val-per-class)" if held else ""
        if got == 0:
            raise DataError(f"class {name!r} has no readable images{where}")
        if per_class and got < per_class:
            raise DataError(f"class {name!r} has only {got} readable image(s){where}, fewer than --per-class {per_class}; "
                            f"lower --per-class{' or --val-per-class' if held else ''}")
    _warn_tiny(images, sides, warn)
    if skipped:
        warn(f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    return images.subset(sorted(chosen))
