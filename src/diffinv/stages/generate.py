"""``diffinv generate``: an embedding store -> a synthetic dataset (PNGs + provenance), by DI or a rival method.

Samples are made in fixed chunks of ``batch_size`` in plan order; a chunk whose images all exist
is skipped, so a re-run after a kill only makes what is missing, with the same images. Shard I
of N makes the chunks b with b % N == I, into the folder all shards share; the last shard to
finish writes the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffinv.config import GenerateConfig, config_to_dict, load_config
from diffinv.data.real import DataError, all_grey, open_images
from diffinv.data.synthetic import MARKER, SyntheticWriter, damage, read_manifest
from diffinv.device import compile_wanted, halving_on_oom, resolve_device, resolve_dtype
from diffinv.diffusion.generation import generate_batch, plan_samples, public
from diffinv.diffusion.methods import get_method
from diffinv.diffusion.methods.base import GenerationSettings
from diffinv.diffusion.model_io import load_store_model
from diffinv.diffusion.sampling import grey_of, pixels_to_uint8
from diffinv.diffusion.store import EmbeddingStore, StoreError
from diffinv.errors import UserError
from diffinv.progress import bar as progress_bar
from diffinv.runs import (
    Units,
    check_free_space,
    file_sha256,
    open_output,
    read_json,
    read_yaml,
    refuse_inside,
    remove_temporaries,
    write_yaml,
)
from diffinv.shards import Shard
from diffinv.stages import Stage
from diffinv.stages.finetune import adapter_prompt
from diffinv.stages.generate_inputs import inversion_seconds, open_inputs


def generate_dataset(config: GenerateConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                     on_batch: Callable[[int], None] | None = None, log: Callable[[str], None] = print,
                     shard: Shard | None = None) -> Path | None:
    """Write the synthetic dataset of ``config`` to ``out``; re-running completes an unfinished set.

    Returns ``out``, or None while other shards' chunks are still missing.
    """
    out = Path(out)
    shard = shard or Shard()
    method = get_method(config.method)
    settings = settings_of(config)
    if not method.samples and not shard.whole:
        raise UserError(f"--method {config.method} finds its images in one pass (no sampling to share out); run it "
                        f"without --shard / --launcher")

    # 1. Stores, checked before anything slow happens.
    store = _open_store(config.store, "store")
    method.check(settings, store)
    for note in method.notes(settings):
        log(note)
    extra = {name: _open_store(path, name) for name, path in method.extra_stores(settings).items()}
    # Before the plan, whose rows alone would not fit in memory for an absurd count: the worst-case PNG bytes.
    planned = config.per_image * sum(int(r.get("n_images", 1)) for r in store.rows)
    check_free_space(out, planned * (3 * (config.save_size or store.info["resolution"]) ** 2 + 1024),
                     f"{planned:,} generated images")
    model = config.model or store.info.get("model_path", store.info["model"])
    # Inside the real data's folder the synthetic images would later be read as a class of real ones.
    refuse_inside(out, {"the real data": (read_yaml(store.root / "config.yaml") or {}).get("data")})

    # 2. Output folder: fresh, or the same settings continued (idempotent re-run).
    mode = open_output(out, MARKER, config, noun="folder", resume=True, overwrite=overwrite, shared=not shard.whole)
    if mode == "done" and _intact(out, log):
        return out

    # 3. Model on the device, and the check that the stores were made with it.
    device = resolve_device(config.device)
    backbone = load_store_model(store, model, also=tuple(extra.values()), with_text_encoder=method.wants_text_encoder(settings),
                                device=device, dtype=resolve_dtype(config.precision, device), check=method.uses_embeddings)
    fingerprint = backbone.fingerprint()

    # 4. The plan and what its conditionings are drawn from.
    rows = plan_samples(settings, store, model)
    inputs = open_inputs(method, settings, store, model, backbone, extra)
    loading = time.perf_counter()
    source = method.load(settings, store, backbone, rows, inputs)  # retrieval's search, DDIM inversion's: part of the cost
    load_seconds = time.perf_counter() - loading
    for note in source.extra.get("notes", []):
        log(note)
    pad_to = None
    if config.channels_last:
        backbone.channels_last()
    if method.samples and compile_wanted(config.compile, backbone.device, len(rows) * config.steps):
        backbone.compile()
        pad_to = config.batch_size  # one shape through the run: a short chunk is padded with copies of its last row
    writer = SyntheticWriter(out)
    origin = store_origin(store)
    if not (out / MARKER).is_file():
        write_yaml(out / "config.yaml", config_to_dict(config))
        grey = store_is_grey(store)  # the store's real images are grey: so are the saved variants
        writer.start({"method": config.method, "classes": store.classes, "n_samples": len(rows), "store": str(store.root),
                      "model": model, "model_fingerprint": fingerprint, "shards": shard.count, "grey": grey, **origin,
                      **source.extra.get("info", {})})
    else:  # a continued set keeps the choice it was started with, so its images never mix
        made_from = writer.info().get("store_identity")
        if made_from and made_from != origin["store_identity"]:
            raise StoreError(f"{out} was made from another version of the store {store.root} (made again since?): "
                             f"continuing it would mix images of both. Generate into a new --out, or pass --overwrite")
        grey = bool(writer.info().get("grey", False))

    # 5. This shard's chunks with missing images, generated and written.
    _generate_chunks(config, settings, out, writer, rows, backbone, source, store, grey, shard, progress, on_batch, log, pad_to,
                     load_seconds)
    writer.add_preparation(inversion_seconds(method, store, extra, inputs))

    # 6. The manifest, once every shard's images exist.
    return _finish(out, writer, rows, log, strict=shard.whole, chunk_size=config.batch_size)


def settings_of(config: GenerateConfig) -> GenerationSettings:
    """The methods' settings: the config's, and the prompt the adapters it names were fitted under."""
    return GenerationSettings.of(config, adapter_prompt=adapter_prompt(config.adapters) if config.adapters else "")


def _intact(out: Path, log: Callable[[str], None]) -> bool:
    """Whether a finished set is whole; if not, its truncated images are removed so that they are made again."""
    try:
        rows_listed = read_manifest(out)
        problems = damage(out, rows_listed, checksums=True)
    except DataError as exc:  # a damaged manifest: the images are checked and the manifest written again
        rows_listed, problems = [], [str(exc)]
    if not problems:
        log(f"{out} is already complete; nothing to do")
        return True
    log(f"{out} is damaged ({'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}); making what is missing")
    for row in rows_listed:  # a truncated or replaced image is made again too
        path = out / row["file"]
        if path.is_file() and (row.get("bytes") not in (None, path.stat().st_size)
                               or (row.get("sha256") and file_sha256(path) != row["sha256"])):
            path.unlink()
    return False


def _generate_chunks(config: GenerateConfig, settings: GenerationSettings, out: Path, writer: SyntheticWriter,
                     rows: list[dict[str, Any]], backbone: Any,
                     source: Any, store: Any, grey: bool, shard: Shard, progress: bool,
                     on_batch: Callable[[int], None] | None, log: Callable[[str], None], pad_to: int | None = None,
                     load_seconds: float = 0.0) -> None:
    """Generate and write this shard's chunks that still miss images, halving a chunk that runs out of memory."""
    chunks = [rows[i : i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    units = Units(out, "chunk", len(chunks), lambda b: all(writer.exists(r) for r in chunks[b]), shard.count)
    todo = [chunks[b] for b in units.todo(shard)]
    save_size = config.save_size or store.info["resolution"]
    if grey and todo:
        log("the store's images are grey (R = G = B): the variants are saved grey too (the base's colour tints dropped)")
    # Worst case: incompressible PNGs of the missing images.
    check_free_space(out, sum(len(c) for c in todo) * (3 * save_size**2 + 1024), "the generated images")
    mine = sum(len(c) for b, c in enumerate(chunks) if shard.owns(b))
    bar = progress_bar(total=mine, initial=mine - sum(len(c) for c in todo), unit="img", disable=not progress, dynamic_ncols=True,
               desc=f"generate ({how(config)})" + ("" if shard.whole else f" shard {shard}"))
    started = time.perf_counter()
    for b, chunk in enumerate(todo):
        # Out of GPU memory, in halves: each sample is keyed, so the images are the same.
        def run(part: Sequence[dict[str, Any]], whole: int = len(chunk)) -> torch.Tensor:  # halves after an out-of-memory are not padded
            pad = max(0, pad_to - len(part)) if pad_to and len(part) == whole else 0
            return generate_batch(backbone, list(part) + [part[-1]] * pad, source, settings)[: len(part)]

        for part, pixels in halving_on_oom(run, chunk, what="generating", log=log, device=backbone.device):
            for row, image in zip(part, pixels_to_uint8(grey_of(pixels) if grey else pixels, save_size)):
                if not writer.exists(row):
                    writer.write_image(row, image)
        bar.update(len(chunk))
        if on_batch is not None:
            on_batch(b)
    bar.close()
    if shard.whole and todo:  # shards would race on the marker: their costs are not summed
        writer.add_cost(time.perf_counter() - started + load_seconds, sum(len(c) for c in todo), str(backbone.device),
                        load_seconds)


def _finish(out: Path, writer: SyntheticWriter, rows: list[dict[str, Any]], log: Callable[[str], None], *, strict: bool,
            chunk_size: int) -> Path | None:
    chunks = [rows[i : i + chunk_size] for i in range(0, len(rows), chunk_size)]
    units = Units(out, "chunk", len(chunks), lambda b: all(writer.exists(r) for r in chunks[b]), int(writer.info().get("shards", 1)))
    missing = sum(1 for r in rows if not writer.exists(r))
    if not units.complete(strict=strict, log=log, what=f"{missing} images in "):
        return None
    writer.finish([public(r) for r in rows])
    remove_temporaries(out)
    return out


def finish_dataset(out: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """``diffinv merge`` for a generated set: its plan is rebuilt from the saved config and store."""
    out = Path(out)
    config = load_config(GenerateConfig, str(out / "config.yaml"), {})
    writer = SyntheticWriter(out)
    store = _open_store(config.store, "store")
    rows = plan_samples(settings_of(config), store, writer.info()["model"])
    return _finish(out, writer, rows, log, strict=True, chunk_size=config.batch_size)


def store_origin(store: EmbeddingStore) -> dict[str, str]:
    """What a set records of the store it is made from: its identity, and the real data and split it inverted."""
    from diffinv.diffusion.store import identity

    data = read_yaml(store.root / "config.yaml") or {}
    source = str(data.get("data", ""))
    return {"store_identity": store.info.get("identity") or identity(store.root),
            "data": str(Path(source).resolve()) if source and Path(source).exists() else source,
            "split": str(data.get("split", "train"))}


def store_is_grey(store: EmbeddingStore) -> bool:
    """Whether a store's real images are grey: recorded by ``invert``; for a store made before it did, read from its data."""
    if "grey" in store.info:
        return bool(store.info["grey"])
    data = read_yaml(store.root / "config.yaml") or {}
    try:
        real = open_images(data["data"], data.get("format", "auto"), data.get("split", "train"))
    except (DataError, KeyError):
        return False  # the data is gone: keep the base's colours rather than guess
    index = {image_id: i for i, image_id in enumerate(real.ids)}
    return all_grey(real, [index[i] for i in store.ids if i in index])


def _open_store(path: str, what: str) -> EmbeddingStore:
    if not path:
        raise StoreError(f"a {what} is required (--{what.replace(' ', '-')} DIR, made by `diffinv invert`)")
    if not Path(path).is_dir():
        raise StoreError(f"--{what.replace(' ', '-')} {path} does not exist; give the --out folder of `diffinv invert`")
    return EmbeddingStore.open(path)


def _count_done(out: Path, seen: dict[str, int]) -> tuple[int, int | None]:
    import os

    done = sum(1 for d in out.iterdir() if d.is_dir() for f in os.scandir(d) if f.name.endswith(".png"))
    return done, read_json(out / MARKER).get("n_samples")


def _summary(config: GenerateConfig, out: Path) -> str:
    rows = read_manifest(out)
    per_class: dict[str, int] = {}
    for r in rows:
        per_class[r["class"]] = per_class.get(r["class"], 0) + 1
    fallbacks = sum(1 for r in rows if r.get("partner_fallback"))
    note = f"; {fallbacks} partners from another class (class had a single image)" if fallbacks else ""
    return (f"dataset {out}: {len(rows)} images ({how(config)}) in {len(per_class)} classes, "
            f"{min(per_class.values())}-{max(per_class.values())} per class{note}")


def how(config: GenerateConfig) -> str:
    """How a set's images were made, in a few words."""
    if not get_method(config.method).samples:
        return f"{config.method}, {config.space} space"
    return f"{config.method}, {config.sampler} {config.steps} steps, guidance {config.guidance}"


def _run(config: GenerateConfig, out: Path, *, shard: Shard, resume: bool, overwrite: bool, progress: bool,
         log: Callable[[str], None], hook: Any = None) -> Path | None:
    return generate_dataset(config, out, overwrite=overwrite, progress=progress, on_batch=hook, log=log, shard=shard)


STAGE = Stage(name="generate", config=GenerateConfig, marker=MARKER, run=_run, finish=finish_dataset, count_done=_count_done,
              summary=_summary, unit="img", shardable=True,
              path_fields=("model", "store", "class_store", "adapters", "pool", "judge", "image_model", "pool_cache"),
              description=("Diffusion Inversion stage 2: c = c_i + s (c_j - c_i) + sigma * eps, guided by the mean embedding; "
                          "or a rival method (prompt, class-inversion, img2img) through the same sampler, or retrieval of the "
                          "nearest pool images."),
              outputs=("dataset folder to write: OUT/<class>/<id>.png + manifest.jsonl",
                      "complete an unfinished set (re-running does the same)", "replace an existing generated set"))
