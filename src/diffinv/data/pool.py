"""Unlabelled image pools for retrieval: opening, content hashes, cached features, exact nearest neighbours.

A pool is any readable image source (:func:`diffinv.data.real.open_images`, its train split) or a
folder of images without class folders. Images are compared by the hash of their decoded 8-bit
RGB pixels, so the same picture found in a pool and in the real data is recognised whatever its
file name. Features of a pool are cached under a key of the space and of the pool's files (names,
sizes, modification times), so a second query of the same pool reads them back instead of
recomputing them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffinv.data.real import IMAGE_SUFFIXES, BadImageError, DataError, LabelledImages, open_images


@dataclass
class Pool:
    """The images of one pool path; ``labelled`` says whether ``images.labels`` are the pool's own classes."""

    path: str
    images: LabelledImages
    labelled: bool


def open_pool(path: str | Path) -> Pool:
    """A pool: the train split of a readable dataset, else every image file under a folder."""
    path = str(path)
    try:
        return Pool(path, open_images(path, "auto", "train"), True)
    except DataError as exc:
        folder = Path(path)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise DataError(f"--pool {path} cannot be read as a dataset ({exc}) nor holds image files") from exc
    ids = [p.relative_to(folder).as_posix() for p in files]
    images = LabelledImages(ids=ids, labels=np.zeros(len(ids), dtype=np.int64), classes=["unlabelled"],
                            sources=[str(p) for p in files], _read=lambda i: Image.open(files[i]))
    return Pool(path, images, False)


def content_hash(image: Image.Image) -> int:
    """A 63-bit hash of an image's decoded RGB pixels and size (equal pixels, equal hash; the file's name does not count)."""
    digest = hashlib.blake2b(f"{image.size}".encode() + image.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def content_hashes(images: LabelledImages, progress: Callable | None = None, bad_images: str = "error") -> torch.Tensor:
    """[N] int64 content hashes of every image of ``images``; with ``bad_images="skip"`` an unreadable one gets -1
    (content hashes are never negative)."""
    indices = range(len(images)) if progress is None else progress(range(len(images)))
    hashes = []
    for i in indices:
        try:
            hashes.append(content_hash(images.image(i)))
        except BadImageError as exc:
            if bad_images != "skip":
                raise BadImageError(f"{exc}; remove or fix it, or pass --bad-images skip") from exc
            hashes.append(-1)
    return torch.tensor(hashes, dtype=torch.int64)


def readable(pool: Pool, hashes: torch.Tensor) -> tuple[Pool, torch.Tensor, list[str]]:
    """The pool without the images :func:`content_hashes` could not read (-1), their hashes, and their sources."""
    bad = (hashes < 0).nonzero()[:, 0].tolist()
    if not bad:
        return pool, hashes, []
    keep = (hashes >= 0).nonzero()[:, 0].tolist()
    return Pool(pool.path, pool.images.subset(keep), pool.labelled), hashes[keep], [pool.images.sources[i] for i in bad]


def near_signatures(images: LabelledImages, progress: Callable | None = None, chunk: int = 2048) -> torch.Tensor:
    """[N, 3, 32, 32] uint8 near-duplicate signatures (:mod:`diffinv.data.near_duplicates`) of every image, in chunks."""
    from diffinv.data.near_duplicates import SIDE, signatures
    from diffinv.data.real import load_uint8

    starts = range(0, len(images), chunk)
    parts = [signatures(load_uint8(images.subset(list(range(s, min(s + chunk, len(images))))), SIDE))
             for s in (starts if progress is None else progress(starts))]
    return torch.cat(parts) if parts else torch.empty(0, 3, SIDE, SIDE, dtype=torch.uint8)


def signature(pool: Pool) -> str:
    """What identifies a pool's contents cheaply: its ids and each underlying file's size and modification time."""
    files = sorted({s.split("#", 1)[0] for s in pool.images.sources})
    h = hashlib.sha256(json.dumps([str(Path(pool.path).resolve()) if Path(pool.path).exists() else pool.path,
                                   pool.images.ids]).encode())
    for name in files:
        try:
            st = os.stat(name)
        except OSError:  # a built-in dataset: no file behind it
            continue
        h.update(f"{name}\x1f{st.st_size}\x1f{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def cached(cache_dir: str | Path, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors cached under ``key``, or ``compute()``'s, written atomically for the next call."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception:  # a damaged cache entry is computed again
            path.unlink(missing_ok=True)
    tensors = {k: v.contiguous() for k, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial))
    os.replace(partial, path)
    return tensors


def default_cache() -> Path:
    """Where pool features are cached: $DIFFINV_CACHE, else ~/.cache/diffinv."""
    return Path(os.environ.get("DIFFINV_CACHE") or Path.home() / ".cache" / "diffinv") / "pools"


@torch.no_grad()
def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int, banned: torch.Tensor | None = None,
            chunk: int = 8192, progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest pool rows of every query by Euclidean distance: (distances [Q, k], indices [Q, k]).

    queries [Q, F], pool [N, F]; ``banned`` [N] bool rows never returned. The pool is scanned in
    chunks of ``chunk`` rows (one matmul each), keeping a running top-k; ties go to the lower index.
    """
    queries = queries.double()
    q2 = queries.pow(2).sum(1, keepdim=True)
    best_d = torch.full((len(queries), 0), float("inf"), dtype=torch.float64)
    best_i = torch.zeros((len(queries), 0), dtype=torch.int64)
    for start in range(0, len(pool), chunk):
        part = pool[start : start + chunk].double()
        d2 = (q2 + part.pow(2).sum(1)[None] - 2 * queries @ part.T).clamp_min(0)
        if banned is not None:
            d2[:, banned[start : start + chunk]] = float("inf")
        take = min(k, d2.shape[1])
        d, i = d2.topk(take, dim=1, largest=False, sorted=True)
        cand_d, cand_i = torch.cat([best_d, d], 1), torch.cat([best_i, i + start], 1)
        # Sort by (distance, index): a stable sort by distance of candidates ordered by index.
        by_index = cand_i.argsort(1)
        cand_d, cand_i = cand_d.gather(1, by_index), cand_i.gather(1, by_index)
        order = cand_d.argsort(dim=1, stable=True)[:, :k]
        best_d, best_i = cand_d.gather(1, order), cand_i.gather(1, order)
        if progress is not None:
            progress(len(part))
    return best_d.sqrt(), best_i
