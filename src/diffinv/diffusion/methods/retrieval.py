"""Retrieval (the paper's and Burg et al.'s rival): the k nearest pool images of every real image, with its label.

The pool is unlabelled images (``--pool PATH``, several allowed), by default the data the base was
pretrained on (its ``config.yaml``: ``data`` and ``extra_data``), as the official code queries
LAION, Stable Diffusion's own training data. Pool images equal in pixels to one of the real data's
(the real subset, its validation hold-out, any other split such as test) are never returned.
Distances are Euclidean in the ``--space``: the base's token encoder (the analog of the CLIP
image space SD comes with; the VAE's latents for a model without one), a trained classifier's
penultimate features (``--judge RUN``), any image model's given by its local weights
(``--image-model PATH``: a timm / torchvision checkpoint, or a ``diffinv train`` model), or raw pixels. Pool features are cached (see
:mod:`diffinv.data.pool`), so a study's replicates compute them once.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from diffinv.config import GenerateConfig
from diffinv.data.pool import cached, content_hashes, default_cache, nearest, open_pool, signature
from diffinv.data.real import DataError, LabelledImages, load_pixels, load_uint8, open_images, validation_ids
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.methods.base import Conditioning, Method, Row, per_image_rows, real_images
from diffinv.diffusion.store import EmbeddingStore
from diffinv.errors import UserError
from diffinv.runs import file_sha256, read_yaml

OTHER_SPLITS = ("test", "val", "validation", "valid")


class Retrieval(Method):
    name = "retrieval"
    uses_embeddings = False
    samples = False  # images are found (once the space's model is loaded), not sampled

    def check_settings(self, config: GenerateConfig) -> None:
        if config.space == "judge" and not config.judge:
            raise UserError("--space judge needs --judge RUN (a `diffinv train` run, e.g. one on the real images alone)")
        if config.judge and config.space != "judge":
            raise UserError(f"--judge is read by --space judge only; drop it, or pass --space judge (not {config.space})")
        if config.space == "model" and not config.image_model:
            raise UserError("--space model needs --image-model PATH (local weights, e.g. a timm or torchvision checkpoint, "
                            "with --image-arch NAME)")
        if (config.image_model or config.image_arch or config.image_size) and config.space != "model":
            raise UserError(f"--image-model, --image-arch and --image-size are read by --space model only (not {config.space})")

    def plan(self, config: GenerateConfig, store: EmbeddingStore, common: Row) -> list[Row]:
        common = {k: common[k] for k in ("method", "seed", "model", "resolution", "save_size")}
        rows = per_image_rows(config, store, {**common, "space": config.space})
        for r in rows:  # found by load(): the k-th nearest pool image of the row's real image
            r.update(pool=None, pool_id=None, pool_index=None, pool_class=None, distance=None)
        return rows

    def load(self, config: GenerateConfig, store: EmbeddingStore, backbone: Backbone, rows: list[Row],
             extra: dict[str, EmbeddingStore] | None = None) -> Conditioning:
        started = time.perf_counter()
        resolution = int(store.info["resolution"])
        real = real_images(store, rows)
        pools = [open_pool(p) for p in pool_paths(config, store, backbone)]
        features = space_features(config, backbone, resolution)
        notes: list[str] = []

        # 1. Pool features and content hashes, cached; the queries' features computed afresh.
        cache = Path(config.pool_cache) if config.pool_cache else default_cache()
        space_key = space_identity(config, backbone, resolution)
        signatures = [signature(p) for p in pools]
        pool_features = torch.cat([cached(cache, f"{config.space}-{space_key}-{sig}",
                                          lambda p=p: {"features": features(p.images, f"features of {p.path}")})["features"]
                                   for p, sig in zip(pools, signatures)])
        pool_hashes = torch.cat([cached(cache, f"hashes-{sig}", lambda p=p: {"hashes": content_hashes(p.images, _bar(f"hashing {p.path}"))})["hashes"]
                                 for p, sig in zip(pools, signatures)])
        queries = real.subset(sorted({r["_real"] for r in rows}))
        query_at = {i: j for j, i in enumerate(sorted({r["_real"] for r in rows}))}

        # 2. Everything of the real data banned by pixel content: the queries, validation, other splits.
        banned_hashes, what = excluded_hashes(store, real, queries)
        banned = torch.isin(pool_hashes, banned_hashes)
        notes.append(f"retrieval: {int(banned.sum())} of {len(banned):,} pool images dropped as equal in pixels to {what}")
        if int((~banned).sum()) < config.per_image:
            raise DataError(f"the pool has {int((~banned).sum())} images left after dropping the real data's, fewer than "
                            f"--per-image {config.per_image}; give a larger --pool")

        # 3. Exact search: row k of a real image is its k-th nearest pool image.
        bar = _bar(f"retrieval ({config.space}): {len(queries)} queries")(total=len(pool_features))
        dist, index = nearest(features(queries, None), pool_features, config.per_image, banned, progress=bar.update)
        bar.close()
        owners = [(p, i) for p in pools for i in range(len(p.images))]
        for r in rows:
            j = int(index[query_at[r["_real"]], r["index"]])
            pool, i = owners[j]
            own = pool.images.classes[int(pool.images.labels[i])] if pool.labelled else None  # for the report only
            r.update(pool=_shown(pool.path), pool_id=pool.images.ids[i], pool_index=i, pool_class=own,
                     distance=round(float(dist[query_at[r["_real"]], r["index"]]), 6), _pool=(pool, i))
        info = {"retrieval": {"pools": [_shown(p.path) for p in pools], "pool_size": len(banned), "dropped": int(banned.sum()),
                              "space": config.space, "seconds": round(time.perf_counter() - started, 3),
                              **label_precision(rows, store.classes)}}
        return Conditioning(torch.zeros(0), torch.zeros(0), resolution=resolution, extra={"notes": notes, "info": info})

    def pixels(self, backbone: Backbone, rows: list[Row], src: Conditioning) -> torch.Tensor:
        """The retrieved pool images of ``rows`` at the store's resolution, in [-1, 1]."""
        out = torch.empty(len(rows), 3, src.resolution, src.resolution)
        for n, r in enumerate(rows):
            pool, i = r["_pool"]
            out[n] = load_pixels(pool.images.subset([i]), src.resolution)[0]
        return out


def pool_paths(config: GenerateConfig, store: EmbeddingStore, backbone: Backbone) -> list[str]:
    """``--pool`` paths, or the train data of the base, read from its ``config.yaml`` (``diffinv pretrain-base``)."""
    if config.pool:
        return list(config.pool)
    base = Path(config.model or store.info.get("model_path", store.info["model"]))
    made = read_yaml(base / "config.yaml") if (base / "config.yaml").is_file() else None
    if not made or not made.get("data"):
        raise UserError(f"{base} records no training data (no config.yaml of `diffinv pretrain-base`); give the pool "
                        f"to retrieve from with --pool PATH (any image folder or dataset; several allowed)")
    if made.get("split", "train") != "train":
        raise UserError(f"{base} was pretrained on the {made['split']!r} split; give --pool PATH explicitly")
    found = []
    for path in [made["data"], *(made.get("extra_data") or [])]:
        beside = base / path
        found.append(path if path == "digits" or Path(path).exists() or not beside.exists() else str(beside))
    return found


def excluded_hashes(store: EmbeddingStore, real: LabelledImages, queries: LabelledImages) -> tuple[torch.Tensor, str]:
    """Content hashes no retrieved image may have, and what they are of, in words."""
    made = read_yaml(Path(store.root) / "config.yaml") or {}
    banned = [queries]
    what = [f"the {len(queries)} real images"]
    held = validation_ids(real, int(made.get("val_per_class") or 0)) if made.get("val_per_class") else set()
    if held:
        banned.append(real.subset([i for i, image_id in enumerate(real.ids) if image_id in held]))
        what.append(f"{len(held)} validation images")
    for split in OTHER_SPLITS:
        if split == made.get("split", "train"):
            continue
        try:
            other = open_images(made["data"], made.get("format", "auto"), split)
        except DataError:
            continue
        banned.append(other)
        what.append(f"{len(other):,} {split} images")
    hashes = torch.cat([content_hashes(b, _bar("hashing the real data")) for b in banned])
    return hashes, ", ".join(what)


def space_features(config: GenerateConfig, backbone: Backbone, resolution: int) -> Callable[[LabelledImages, str | None], torch.Tensor]:
    """A function: images -> features [N, F] in ``config.space``, computed in batches with a progress bar."""
    if config.space == "judge":
        from diffinv.classify.models import load_trained
        from diffinv.quality.measures import judge_features

        weights = Path(config.judge) / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"--judge {config.judge} has no model.safetensors; give a finished `diffinv train` run")
        model, meta = load_trained(weights, backbone.device)

        def embed(uint8: torch.Tensor) -> torch.Tensor:
            return unit(judge_features(model, uint8, meta["mean"], meta["std"])[0])

        size = meta["resolution"]
    elif config.space == "model":
        from diffinv.classify.pretrained import feature_model
        from diffinv.quality.measures import judge_features

        size = config.image_size or resolution
        model, mean, std, _ = feature_model(config.image_model, config.image_arch, size, backbone.device)

        def embed(uint8: torch.Tensor) -> torch.Tensor:
            return unit(judge_features(model, uint8, mean, std)[0])

    elif config.space == "encoder":
        encoder = token_encoder(config, backbone)

        @torch.no_grad()
        def embed(uint8: torch.Tensor) -> torch.Tensor:
            latents = backbone.encode(uint8.float().div(127.5).sub(1.0)).mean
            return unit((encoder(latents.float()) if encoder is not None else latents).flatten(1).float().cpu())

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


def token_encoder(config: GenerateConfig, backbone: Backbone) -> Any:
    """The base's token encoder (``diffinv pretrain-base``), or None: its latents are the space."""
    from diffinv.diffusion.encoder import encoder_tokens, load_encoder

    model = config.model or backbone.source
    if encoder_tokens(model) is None:
        return None
    return load_encoder(model).to(backbone.device)


def space_identity(config: GenerateConfig, backbone: Backbone, resolution: int) -> str:
    """What the features depend on besides the pool: the model behind the space, and the resolution."""
    if config.space == "judge":
        model = file_sha256(Path(config.judge) / "model.safetensors")
    elif config.space == "model":
        model = f"{file_sha256(config.image_model)}\x1f{config.image_arch}"
        resolution = config.image_size or resolution
    elif config.space == "encoder":
        encoder = Path(config.model or backbone.source) / "encoder.safetensors"
        model = backbone.fingerprint() + (file_sha256(encoder) if encoder.is_file() else "")
    else:
        model = ""
    return hashlib.sha256(f"{model}\x1f{resolution}".encode()).hexdigest()[:16]


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


def _bar(desc: str | None) -> Callable:
    return lambda it=None, **kw: tqdm(it, desc=desc, unit="img", leave=False, dynamic_ncols=True, mininterval=1.0, disable=None, **kw)


METHOD = Retrieval()
