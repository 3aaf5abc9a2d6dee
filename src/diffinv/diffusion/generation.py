"""Stage 2: a synthetic dataset from an embedding store, by Diffusion Inversion or a rival method.

Methods (``GenerateConfig.method``), all through the same sampler, guidance and output code:

* ``di``: c = c_i + s (c_j - c_i) + sigma * eps around each image's learned embedding, partner j
  of the same class; guidance's unconditional input is the mean learned embedding.
* ``class-inversion``: one learned embedding per class (``diffinv invert --target class``),
  with the same noise and guidance.
* ``prompt``: "a photo of a {class}" through the model's own text encoder; the unconditional
  input is the empty prompt, as in Stable Diffusion.
* ``img2img``: SDEdit / DA-Fusion: each real image noised to ``strength`` and denoised with its
  own (or its class's) embedding.

Every sample's randomness (partner, conditioning noise, initial latent, sampler noise) is keyed
by its identity, so batches, resumes and single-sample regeneration all give the same image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from diffinv.config import GenerateConfig, config_to_dict, load_config
from diffinv.data.real import DataError, LabelledImages, load_pixels, open_images
from diffinv.data.synthetic import MARKER, SyntheticWriter, slug
from diffinv.diffusion import rng
from diffinv.diffusion.backbone import Backbone, load_backbone, resolve_device, resolve_dtype
from diffinv.diffusion.inversion import CLASS_PREFIX, OUT_OF_MEMORY
from diffinv.diffusion.perturb import perturb, pick_partners
from diffinv.diffusion.sampling import sample_latents, to_uint8, unit_rms
from diffinv.diffusion.store import EmbeddingStore, StoreError
from diffinv.runs import RunError, check_free_space, open_output, read_yaml, remove_temporaries, write_yaml
from diffinv.shards import Shard, missing_message


@dataclass
class Conditioning:
    """What a batch draws its conditioning from, loaded once per run.

    ``embeddings`` [N, K, D]: the store's rows (per image, or per class for class-inversion);
    ``uncond`` [K, D] or, per class, [C, K, D]; ``class_embeddings`` [C, K, D]
    for img2img with class embeddings; ``prompts`` [P, L, D] and ``empty_prompt`` [L, D] for the
    prompt method; ``real`` the real images for img2img.
    """

    embeddings: torch.Tensor
    uncond: torch.Tensor
    class_embeddings: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    empty_prompt: torch.Tensor | None = None
    real: LabelledImages | None = None
    resolution: int = 32


# ----------------------------------------------------------------------------- the plan


def plan_samples(config: GenerateConfig, store: EmbeddingStore, model: str) -> list[dict[str, Any]]:
    """One provenance row per sample, in a fixed order. Keys starting with ``_`` are internal.

    Per-image methods (di, img2img) make ``per_image`` samples of every store row; per-class
    methods (class-inversion, prompt) make as many per class as the per-image methods would,
    so methods are compared at equal dataset sizes.
    """
    common = {"method": config.method, "seed": config.seed, "sampler": config.sampler, "steps": config.steps,
              "eta": config.eta if config.sampler == "ddim" else None, "clip_x0": config.clip_x0,
              "unit_noise": config.unit_noise, "guidance": config.guidance,
              "uncond": "empty-prompt" if config.method == "prompt" else config.uncond, "model": model,
              "resolution": store.info["resolution"], "save_size": config.save_size or store.info["resolution"]}
    rows: list[dict[str, Any]] = []
    if config.method in ("di", "img2img"):
        for r, store_row in enumerate(store.rows):
            for k in range(config.per_image):
                rows.append(_row(common, store_row["class"], store_row["label"], f"{slug(store_row['id'])}-{k:02d}",
                                 f"{store_row['id']}|{k}", k, config.seed, source=store_row["id"], _src=r))
        _add_partners(rows, store, config)
    else:
        # Real images per class: a class store records them, an image store has a row for each.
        per_class_store = _target(store) == "class"
        counts = [0] * len(store.classes)
        first_row: dict[int, int] = {}
        for r, row in enumerate(store.rows):
            counts[row["label"]] += row["n_images"] if per_class_store else 1
            first_row.setdefault(row["label"], r)
        for c, name in enumerate(store.classes):
            src = first_row.get(c)
            for j in range(counts[c] * config.per_image):
                extra: dict[str, Any] = {"source": CLASS_PREFIX + name, "noise": config.noise, "_src": src}
                if config.method == "prompt":
                    template = j % len(config.templates)
                    extra = {"source": None, "prompt": config.templates[template].format(name), "_prompt": c * len(config.templates) + template}
                rows.append(_row(common, name, c, f"{slug(name)}-{j:05d}", f"{name}|{j}", j, config.seed, **extra))
    if config.method == "img2img":
        for row in rows:
            row.update(strength=config.strength, embedding=config.img2img_embedding)
    return rows


def _row(common: dict[str, Any], cls: str, label: int, sample_id: str, identity: str, index: int, seed: int,
         **extra: Any) -> dict[str, Any]:
    return {"id": sample_id, "file": f"{slug(cls)}/{sample_id}.png", "class": cls, "label": int(label), "index": index,
            **common, "source": None, "partner": None, "partner_fallback": None, "interp": None, "interp_mode": None,
            "noise": None, **extra, "_key": rng.key_of(seed, identity)}


def _add_partners(rows: list[dict[str, Any]], store: EmbeddingStore, config: GenerateConfig) -> None:
    """Partner j of each sample (same class, keyed by the sample), and the s / sigma it used."""
    if config.method == "img2img" and config.img2img_embedding == "class":
        for row in rows:
            row.update(noise=config.noise)
        return
    keys = torch.tensor([r["_key"] for r in rows], dtype=torch.int64)
    sources = torch.tensor([r["_src"] for r in rows], dtype=torch.int64)
    partners, fallback = pick_partners(keys, sources, store.labels)
    ids = store.ids
    for row, j, fb in zip(rows, partners.tolist(), fallback.tolist()):
        row.update(partner=ids[j], partner_fallback=bool(fb), interp=config.interp, interp_mode=config.interp_mode,
                   noise=config.noise, _partner=j)


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A plan row without its internal fields: what the manifest records."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- the hot loop


def generate_batch(backbone: Backbone, rows: list[dict[str, Any]], cond_source: Conditioning, config: GenerateConfig) -> torch.Tensor:
    """Make the samples of ``rows``: pixels [B, 3, R, R] in [-1, 1] at the store's resolution."""
    device = backbone.device
    keys = torch.tensor([r["_key"] for r in rows], dtype=torch.int64, device=device)

    # 1. Conditioning and the unconditional input of guidance, per sample.
    cond, uncond = conditioning_for(rows, cond_source, config, keys)

    # 2. Starting noise keyed by the sample; for img2img also the real image's clean latent.
    shape = backbone.latent_shape(cond_source.resolution)
    noise = rng.keyed_normal(keys, 0, rng.STREAM_NOISE, shape)
    if config.unit_noise:
        noise = unit_rms(noise)
    start = None
    if config.method == "img2img":
        real = cond_source.real.subset([r["_real"] for r in rows])
        start = backbone.encode(load_pixels(real, cond_source.resolution)).mean

    # 3. Denoise with guidance.
    latents = sample_latents(backbone, cond, uncond, noise, sampler=config.sampler, steps=config.steps, guidance=config.guidance,
                             keys=keys, eta=config.eta, start=start, strength=config.strength, clip_x0=config.clip_x0)

    # 4. Back to pixels.
    return backbone.decode(latents)


def conditioning_for(rows: list[dict[str, Any]], src: Conditioning, config: GenerateConfig,
                     keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cond, uncond [B, L, D] for a batch of plan rows; keys [B] the rows' sample keys."""
    if config.method == "prompt":
        cond = src.prompts[torch.tensor([r["_prompt"] for r in rows])]
        return cond, src.empty_prompt.expand_as(cond)
    labels = torch.tensor([r["label"] for r in rows])
    if config.method == "img2img" and config.img2img_embedding == "class":
        own = src.class_embeddings[labels]
    else:
        own = src.embeddings[torch.tensor([r["_src"] for r in rows])]
    # The plan gave partners to DI and own-embedding img2img rows; the others only get the noise.
    with_partner = "_partner" in rows[0]
    partner = src.embeddings[torch.tensor([r["_partner"] for r in rows])] if with_partner else own
    cond = perturb(own.to(keys.device), partner.to(keys.device), keys, config.interp if with_partner else 0.0, config.noise,
                   config.interp_mode)
    uncond = src.uncond[labels] if src.uncond.dim() == 3 else src.uncond.expand(len(rows), -1, -1)
    return cond, uncond


# ----------------------------------------------------------------------------- orchestration


def generate_dataset(config: GenerateConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                     on_batch: Callable[[int], None] | None = None, log: Callable[[str], None] = print,
                     shard: Shard | None = None) -> Path | None:
    """Write the synthetic dataset of ``config`` to ``out``; re-running completes an unfinished set.

    Samples are made in fixed chunks of ``batch_size`` in plan order; a chunk whose images all
    exist is skipped, so a re-run after a kill only makes what is missing, with the same images.
    With ``shard`` (I of N) only chunks b with b % N == I are made, into the folder all shards
    share; the last shard to finish writes the manifest. Returns ``out``, or None while other
    shards' chunks are still missing.
    """
    out = Path(out)
    shard = shard or Shard()

    # 1. Stores, checked before anything slow happens.
    store = _open_store(config.store, "store")
    _check_method_fits(config, store)
    class_store = _open_store(config.class_store, "class store") if config.img2img_embedding == "class" and config.method == "img2img" else None
    model = config.model or store.info.get("model_path", store.info["model"])

    # 2. Output folder: fresh, or the same settings continued (idempotent re-run).
    mode = open_output(out, MARKER, config, noun="folder", resume=True, overwrite=overwrite, shared=not shard.whole)
    if mode == "done":
        log(f"{out} is already complete; nothing to do")
        return out

    # 3. Model on the device, and the check that the stores were made with it.
    device = resolve_device(config.device)
    backbone = load_backbone(model, with_text_encoder=config.method == "prompt")
    backbone = backbone.to(device, resolve_dtype(config.precision, device))
    fingerprint = backbone.fingerprint()
    for s in (store, class_store):
        if s is not None and config.method != "prompt" and s.info["model_fingerprint"] != fingerprint:
            raise StoreError(f"{s.root} was made with another model ({s.info['model']}), not {model}; "
                             f"generate with the store's model or invert again with this one")

    # 4. The plan and what its conditionings are drawn from.
    rows = plan_samples(config, store, model)
    cond_source = _load_conditioning(config, store, class_store, backbone, rows)
    writer = SyntheticWriter(out)
    if not (out / MARKER).is_file():
        write_yaml(out / "config.yaml", config_to_dict(config))
        writer.start({"method": config.method, "classes": store.classes, "n_samples": len(rows), "store": str(store.root),
                      "model": model, "model_fingerprint": fingerprint, "shards": shard.count})

    # 5. This shard's chunks with missing images, generated and written.
    chunks = [rows[i : i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    todo = [c for b, c in enumerate(chunks) if shard.owns(b) and not all(writer.exists(r) for r in c)]
    save_size = config.save_size or store.info["resolution"]
    # Worst case: incompressible PNGs of the missing images.
    check_free_space(out, sum(len(c) for c in todo) * (3 * save_size**2 + 1024), "the generated images")
    mine = sum(len(c) for b, c in enumerate(chunks) if shard.owns(b))
    bar = tqdm(total=mine, initial=mine - sum(len(c) for c in todo), unit="img", disable=not progress, dynamic_ncols=True,
               desc=f"generate ({config.method}, {config.sampler} {config.steps} steps)" + ("" if shard.whole else f" shard {shard}"))
    for b, chunk in enumerate(todo):
        for part in _generate_halving(backbone, chunk, cond_source, config, log):
            images = to_uint8(part[1], save_size)
            for row, image in zip(part[0], images):
                if not writer.exists(row):
                    writer.write_image(row, image)
        bar.update(len(chunk))
        if on_batch is not None:
            on_batch(b)
    bar.close()

    # 6. The manifest, once every shard's images exist.
    return _finish(out, writer, rows, log, strict=shard.whole, chunk_size=config.batch_size)


def _generate_halving(backbone: Backbone, chunk: list[dict[str, Any]], cond_source: Conditioning, config: GenerateConfig,
                      log: Callable[[str], None]) -> list[tuple[list[dict[str, Any]], torch.Tensor]]:
    """Generate a chunk; out of GPU memory, in halves (each sample is keyed, so the images are the same)."""
    try:
        return [(chunk, generate_batch(backbone, chunk, cond_source, config))]
    except OUT_OF_MEMORY as exc:
        if len(chunk) == 1:
            raise RunError(f"out of memory generating a single sample ({exc}); lower the resolution or use a smaller model") from exc
        half = len(chunk) // 2
        log(f"out of memory on a batch of {len(chunk)}; continuing in batches of {half} (pass a smaller --batch-size)")
        if backbone.device.type == "cuda":
            torch.cuda.empty_cache()
        return (_generate_halving(backbone, chunk[:half], cond_source, config, log)
                + _generate_halving(backbone, chunk[half:], cond_source, config, log))


def _finish(out: Path, writer: SyntheticWriter, rows: list[dict[str, Any]], log: Callable[[str], None], *, strict: bool,
            chunk_size: int) -> Path | None:
    missing = [i for i, r in enumerate(rows) if not writer.exists(r)]
    if missing:
        chunks = sorted({i // chunk_size for i in missing})
        message = f"{out}: {len(missing)} images in " + missing_message(chunks, int(writer.info().get("shards", 1)), "chunk")
        if strict:
            raise RunError(message)
        log(message)
        return None
    writer.finish([public(r) for r in rows])
    remove_temporaries(out)
    return out


def finish_dataset(out: str | Path, log: Callable[[str], None] = print) -> Path:
    """``diffinv merge`` for a generated set: its plan is rebuilt from the saved config and store."""
    out = Path(out)
    config = load_config(GenerateConfig, str(out / "config.yaml"), {})
    writer = SyntheticWriter(out)
    store = _open_store(config.store, "store")
    rows = plan_samples(config, store, writer.info()["model"])
    return _finish(out, writer, rows, log, strict=True, chunk_size=config.batch_size)


def _open_store(path: str, what: str) -> EmbeddingStore:
    if not path:
        raise StoreError(f"a {what} is required (--{what.replace(' ', '-')} DIR, made by `diffinv invert`)")
    if not Path(path).is_dir():
        raise StoreError(f"--{what.replace(' ', '-')} {path} does not exist; give the --out folder of `diffinv invert`")
    return EmbeddingStore.open(path)


def _target(store: EmbeddingStore) -> str:
    return store.info.get("target", "image")


def _check_method_fits(config: GenerateConfig, store: EmbeddingStore) -> None:
    target = _target(store)
    if config.method in ("di", "img2img") and target != "image":
        raise StoreError(f"{store.root} holds one embedding per class; --method {config.method} needs a per-image store "
                         f"(`diffinv invert` without --target class)")
    if config.method == "class-inversion" and target != "class":
        raise StoreError(f"--method class-inversion needs a per-class store: run `diffinv invert --target class` on the same "
                         f"data and pass it as --store ({store.root} holds one embedding per image)")
    if config.method == "class-inversion" and config.uncond == "class-mean":
        raise StoreError("--uncond class-mean with class-inversion would guide a class against itself; use --uncond mean")
    if config.method == "img2img" and config.img2img_embedding == "class" and not config.class_store:
        raise StoreError("--img2img-embedding class needs --class-store DIR (from `diffinv invert --target class`)")


def _load_conditioning(config: GenerateConfig, store: EmbeddingStore, class_store: EmbeddingStore | None,
                       backbone: Backbone, rows: list[dict[str, Any]]) -> Conditioning:
    device = backbone.device
    embeddings = store.embeddings.to(device)
    if config.uncond == "class-mean":
        labels = store.labels
        uncond = torch.stack([embeddings[labels == c].mean(0) for c in range(len(store.classes))])
    else:
        uncond = store.mean_embedding().to(device)
    source = Conditioning(embeddings, uncond, resolution=int(store.info["resolution"]))
    if config.method == "prompt":
        prompts = [t.format(c) for c in store.classes for t in config.templates]
        source.prompts = backbone.encode_prompts(prompts)
        source.empty_prompt = backbone.encode_prompts([""])[0]
    if class_store is not None:
        if class_store.classes != store.classes:
            raise StoreError(f"{class_store.root} has classes {class_store.classes}, the store {store.classes}; invert both from the same data")
        if tuple(class_store.info["cond_shape"]) != tuple(store.info["cond_shape"]):
            raise StoreError(f"{class_store.root} has conditioning {class_store.info['cond_shape']}, the store {store.info['cond_shape']}")
        by_label = {row["label"]: i for i, row in enumerate(class_store.rows)}
        source.class_embeddings = class_store.embeddings[[by_label[c] for c in range(len(store.classes))]].to(device)
    if config.method == "img2img":
        source.real = _real_images(store, rows)
    return source


def _real_images(store: EmbeddingStore, rows: list[dict[str, Any]]) -> LabelledImages:
    """The real images a store was inverted from, reopened from its config; sets each row's ``_real`` index."""
    data = read_yaml(store.root / "config.yaml")
    try:
        real = open_images(data["data"], data.get("format", "auto"), data.get("split", "train"))
    except DataError as exc:
        raise DataError(f"img2img re-reads the store's real images from {data['data']}: {exc}") from exc
    index = {image_id: i for i, image_id in enumerate(real.ids)}
    missing = sorted({r["source"] for r in rows} - set(index))
    if missing:
        raise DataError(f"img2img needs the store's real images, but {len(missing)} are no longer in {data['data']}, e.g. {missing[:3]}")
    for r in rows:
        r["_real"] = index[r["source"]]
    return real
