"""Retrieval (the paper's and Burg et al.'s rival): the k nearest pool images of every real image, with its label.

The pool is unlabelled images (``--pool PATH``, several allowed; the generate stage defaults it to the
data the base was pretrained on, as the official code queries LAION, Stable Diffusion's own training
data). Pool images equal in pixels to one of the real data's (the real subset, and what the stage
hands over as held out: its validation hold-out, any other split such as test), or near-duplicates of
one (re-encoded, resized or shifted copies: :mod:`diffinv.data.near_duplicates`), are never returned.
Distances are Euclidean in the ``--space``: the base's token encoder (the analog of the CLIP
image space SD comes with; the VAE's latents for a model without one), a trained classifier's
penultimate features (``--judge RUN``), any image model's given by its local weights
(``--image-model PATH``: a timm / torchvision checkpoint, or a ``diffinv train`` model), or raw pixels. Pool features are cached (see
:mod:`diffinv.data.pool`), so a study's replicates compute them once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from diffinv.data.near_duplicates import near_duplicates
from diffinv.data.pool import Pool, cached, content_hashes, default_cache, near_signatures, nearest, open_pool, readable, signature
from diffinv.data.real import DataError, LabelledImages, load_pixels, load_uint8
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import Conditioning, GenerationSettings, Inputs, Method, Row, index_real, per_image_rows
from diffinv.diffusion.store import EmbeddingStore
from diffinv.errors import UserError
from diffinv.progress import bar
from diffinv.runs import file_sha256


class Retrieval(Method):
    name = "retrieval"
    uses_embeddings = False
    samples = False  # images are found (once the space's model is loaded), not sampled
    needs = frozenset({"real", "held_out", "pool", "judge"})

    def check_settings(self, settings: GenerationSettings) -> None:
        if settings.space == "judge" and not settings.judge:
            raise UserError("--space judge needs --judge RUN (a `diffinv train` run, e.g. one on the real images alone)")
        if settings.judge and settings.space != "judge":
            raise UserError(f"--judge is read by --space judge only; drop it, or pass --space judge (not {settings.space})")
        if settings.space == "model" and not settings.image_model:
            raise UserError("--space model needs --image-model PATH (local weights, e.g. a timm or torchvision checkpoint, "
                            "with --image-arch NAME)")
        if (settings.image_model or settings.image_arch or settings.image_size) and settings.space != "model":
            raise UserError(f"--image-model, --image-arch and --image-size are read by --space model only (not {settings.space})")

    def plan(self, settings: GenerationSettings, store: EmbeddingStore, common: Row) -> list[Row]:
        common = {k: common[k] for k in ("method", "seed", "model", "resolution", "save_size")}
        rows = per_image_rows(settings, store, {**common, "space": settings.space})
        for r in rows:  # found by load(): the k-th nearest pool image of the row's real image
            r.update(pool=None, pool_id=None, pool_index=None, pool_class=None, distance=None)
        return rows

    def load(self, settings: GenerationSettings, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             inputs: Inputs) -> Conditioning:
        started = time.perf_counter()
        resolution = int(store.info["resolution"])
        real = index_real(inputs.real, rows)
        pools = [open_pool(p) for p in inputs.pool]
        space: dict[str, Any] = dict(model=inputs.model, judge=inputs.judge, image_model=settings.image_model,
                                     image_arch=settings.image_arch, image_size=settings.image_size)
        features = space_features(settings.space, backbone, resolution, **space)
        notes: list[str] = []

        # 1. Content hashes (which also find the unreadable images), then features, of each pool, cached; the queries'
        #    features computed afresh.
        cache = Path(settings.pool_cache) if settings.pool_cache else default_cache()
        space_key = space_identity(settings.space, backbone, resolution, **space)
        hashed = []
        for p in pools:
            hashes = cached(cache, f"hashes-{settings.bad_images}-{signature(p)}", partial(_hashes, p, settings.bad_images))["hashes"]
            p, hashes, unreadable = readable(p, hashes)
            if unreadable:
                notes.append(f"retrieval: skipped {len(unreadable)} unreadable pool image(s) of {p.path}: "
                             f"{', '.join(unreadable[:3])}{' ...' if len(unreadable) > 3 else ''}")
            hashed.append((p, hashes))
        pools = [p for p, _ in hashed]
        pool_hashes = torch.cat([h for _, h in hashed])
        signatures = [signature(p) for p in pools]
        pool_features = torch.cat([cached(cache, f"{settings.space}-{space_key}-{sig}", partial(_features, features, p))["features"]
                                   for p, sig in zip(pools, signatures)])
        queries = real.subset(sorted({r["_real"] for r in rows}))
        query_at = {i: j for j, i in enumerate(sorted({r["_real"] for r in rows}))}

        # 2. Everything of the real data banned by content: the queries, validation, other splits, equal in pixels or
        #    near-duplicates (the same picture re-encoded, resized or shifted a little).
        banned_hashes, what = excluded_hashes(queries, inputs.held_out)
        equal = torch.isin(pool_hashes, banned_hashes)
        pool_near = torch.cat([cached(cache, f"near-{sig}", partial(_signatures, p))["signatures"] for p, sig in zip(pools, signatures)])
        near = near_duplicates(pool_near, excluded_signatures(queries, inputs.held_out)) & ~equal
        banned = equal | near
        notes.append(f"retrieval: {int(banned.sum())} of {len(banned):,} pool images dropped, {int(equal.sum())} equal in "
                     f"pixels and {int(near.sum())} near-duplicates of {what}")
        if int((~banned).sum()) < settings.per_image:
            raise DataError(f"the pool has {int((~banned).sum())} images left after dropping the real data's, fewer than "
                            f"--per-image {settings.per_image}; give a larger --pool")

        # 3. Exact search: row k of a real image is its k-th nearest pool image.
        bar = _bar(f"retrieval ({settings.space}): {len(queries)} queries")(total=len(pool_features))
        dist, index = nearest(features(queries, None), pool_features, settings.per_image, banned, progress=bar.update)
        bar.close()
        owners = [(p, i) for p in pools for i in range(len(p.images))]
        for r in rows:
            j = int(index[query_at[r["_real"]], r["index"]])
            pool, i = owners[j]
            own = pool.images.classes[int(pool.images.labels[i])] if pool.labelled else None  # for the report only
            r.update(pool=_shown(pool.path), pool_id=pool.images.ids[i], pool_index=i, pool_class=own,
                     distance=round(float(dist[query_at[r["_real"]], r["index"]]), 6), _pool=(pool, i))
        info = {"retrieval": {"pools": [_shown(p.path) for p in pools], "pool_size": len(banned), "dropped": int(banned.sum()),
                              "dropped_near_duplicates": int(near.sum()),
                              "space": settings.space, "seconds": round(time.perf_counter() - started, 3),
                              **label_precision(rows, store.classes)}}
        return Conditioning(torch.zeros(0), torch.zeros(0), resolution=resolution, extra={"notes": notes, "info": info})

    def pixels(self, backbone: Backbone, rows: list[Row], src: Conditioning) -> torch.Tensor:
        """The retrieved pool images of ``rows`` at the store's resolution, in [-1, 1]."""
        out = torch.empty(len(rows), 3, src.resolution, src.resolution)
        for n, r in enumerate(rows):
            pool, i = r["_pool"]
            out[n] = load_pixels(pool.images.subset([i]), src.resolution)[0]
        return out


def excluded_signatures(queries: LabelledImages, held_out: list[tuple[LabelledImages, str]]) -> torch.Tensor:
    """Near-duplicate signatures of the queries and the held-out images (no retrieved image may be a copy of one)."""
    return torch.cat([near_signatures(images) for images in [queries, *(images for images, _ in held_out)]])


def excluded_hashes(queries: LabelledImages, held_out: list[tuple[LabelledImages, str]]) -> tuple[torch.Tensor, str]:
    """Content hashes no retrieved image may have (the queries' and the held-out images'), and what they are, in words."""
    banned = [queries, *(images for images, _ in held_out)]
    what = [f"the {len(queries)} real images", *(f"{len(images):,} {name} images" for images, name in held_out)]
    hashes = torch.cat([content_hashes(b, _bar("hashing the real data")) for b in banned])
    return hashes, ", ".join(what)


def space_features(space: str, backbone: Backbone, resolution: int, *, model: str = "", judge: str = "", image_model: str = "",
                   image_arch: str = "", image_size: int = 0) -> Callable[[LabelledImages, str | None], torch.Tensor]:
    """A function: images -> features [N, F] in ``space``, computed in batches with a progress bar.

    ``model``: the backbone's path (its token encoder, for "encoder"); ``judge``: a trained classifier's weights file;
    ``image_model`` / ``image_arch`` / ``image_size``: an image model's weights, architecture and input size.
    """
    if space == "judge":
        from diffinv.classify.models import load_trained
        from diffinv.quality.measures import judge_features

        net, meta = load_trained(judge, backbone.device)

        def embed(uint8: torch.Tensor) -> torch.Tensor:
            return unit(judge_features(net, uint8, meta["mean"], meta["std"])[0])

        size = meta["resolution"]
    elif space == "model":
        from diffinv.classify.pretrained import feature_model
        from diffinv.quality.measures import judge_features

        size = image_size or resolution
        net, mean, std, _ = feature_model(image_model, image_arch, size, backbone.device)

        def embed(uint8: torch.Tensor) -> torch.Tensor:
            return unit(judge_features(net, uint8, mean, std)[0])

    elif space == "encoder":
        encoder = token_encoder(model or backbone.source, backbone)

        @torch.no_grad()
        def embed(uint8: torch.Tensor) -> torch.Tensor:
            pixels = uint8.float().div(127.5).sub(1.0)
            if encoder is not None:  # a base's token encoder reads pixels, in a pixel or a latent base alike
                return unit(encoder(pixels.to(backbone.device)).flatten(1).float().cpu())
            return unit(backbone.encode(pixels).mean.flatten(1).float().cpu())

        size = resolution
    else:  # pixels, in [0, 1]

        def embed(uint8: torch.Tensor) -> torch.Tensor:
            return uint8.flatten(1).float().div(255.0)

        size = resolution

    def features(images: LabelledImages, desc: str | None, batch: int = 512) -> torch.Tensor:
        bar = _bar(desc)(total=len(images)) if desc else None
        out = []
        for start in range(0, len(images), batch):
            part = images.subset(range(start, min(start + batch, len(images))))
            out.append(embed(load_uint8(part, size)))
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        return torch.cat(out)

    return features


def token_encoder(model: str, backbone: Backbone) -> Any:
    """The base's token encoder (``diffinv pretrain-base``), or None: its latents are the space."""
    from diffinv.diffusion.encoder import encoder_tokens, load_encoder

    if encoder_tokens(model) is None:
        return None
    return load_encoder(model).to(backbone.device)


def space_identity(space: str, backbone: Backbone, resolution: int, *, model: str = "", judge: str = "", image_model: str = "",
                   image_arch: str = "", image_size: int = 0) -> str:
    """What the features depend on besides the pool: the model behind the space, and the resolution."""
    if space == "judge":
        weights = file_sha256(judge)
    elif space == "model":
        weights = f"{file_sha256(image_model)}\x1f{image_arch}"
        resolution = image_size or resolution
    elif space == "encoder":
        encoder = Path(model or backbone.source) / "encoder.safetensors"
        weights = backbone.fingerprint() + (file_sha256(encoder) if encoder.is_file() else "")
    else:
        weights = ""
    return hashlib.sha256(f"{weights}\x1f{resolution}".encode()).hexdigest()[:16]


def label_precision(rows: list[Row], classes: list[str]) -> dict[str, Any]:
    """Where the pool has the same classes: the share of retrieved images whose own pool label is their query's.

    For the report only: a study never chooses by it (the pool's labels are what retrieval does not have).
    """
    scored = [r for r in rows if r.get("pool_class") is not None and r["pool_class"] in classes]
    if not scored or not {r["pool_class"] for r in scored} <= set(classes):
        return {}
    return {"label_precision": round(sum(r["pool_class"] == r["class"] for r in scored) / len(scored), 4),
            "label_precision_of": len(scored)}


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1: Euclidean distance then orders as cosine similarity does."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _shown(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def _hashes(pool: Pool, bad_images: str) -> dict[str, torch.Tensor]:
    return {"hashes": content_hashes(pool.images, _bar(f"hashing {pool.path}"), bad_images)}


def _features(features: Callable[[LabelledImages, str | None], torch.Tensor], pool: Pool) -> dict[str, torch.Tensor]:
    return {"features": features(pool.images, f"features of {pool.path}")}


def _signatures(pool: Pool) -> dict[str, torch.Tensor]:
    return {"signatures": near_signatures(pool.images, _bar(f"near-duplicate signatures of {pool.path}"))}


def _bar(desc: str | None) -> Callable:
    return lambda it=None, **kw: bar(it, desc=desc or "", unit="img", leave=False, dynamic_ncols=True, mininterval=1.0, **kw)


METHOD = Retrieval()
