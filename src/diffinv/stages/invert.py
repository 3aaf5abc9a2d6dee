"""``diffinv invert``: real images -> an embedding store (one conditioning per image, or per class).

Items are planned in fixed batches of ``batch_size``; finished batches are written as atomic
parts, a batch in progress is checkpointed every ``checkpoint_every`` steps, so a resume after a
kill gives the same store as an uninterrupted run. Shard I of N inverts the batches b with
b % N == I into the one folder; whichever shard finishes last writes the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffinv import rng
from diffinv.config import InvertConfig, config_to_dict
from diffinv.data.real import LabelledImages, all_grey, load_pixels, open_images, real_subset
from diffinv.device import (
    OUT_OF_MEMORY,
    batch_that_fits,
    check_precision,
    compile_wanted,
    halving_on_oom,
    peak_cuda_bytes,
    resolve_device,
    resolve_dtype,
)
from diffinv.diffusion.backbone import Backbone, LatentMoments, ModelError
from diffinv.diffusion.encoder import EncoderError, encoder_tokens, load_encoder
from diffinv.diffusion.inversion import DONE, InversionError, InversionSettings, encode_images, invert_items, padded
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.store import CLASS_PREFIX, MARKER, EmbeddingStore, StoreError, StoreWriter, damage, part_name, read_rows
from diffinv.progress import bar as progress_bar
from diffinv.runs import RunError, Units, add_cost, check_free_space, open_output, read_json, read_yaml, remove_temporaries, write_yaml
from diffinv.shards import Shard
from diffinv.stages import Stage

StepHook = Callable[[int, int], None]  # (batch index, finished step) -> None; may raise to stop


def invert_dataset(config: InvertConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                   progress: bool = True, on_step: StepHook | None = None, log: Callable[[str], None] = print,
                   shard: Shard | None = None) -> Path | None:
    """Invert every selected image of ``config.data`` into the store at ``out``.

    Returns ``out``, or None while other shards' batches are still missing.
    """
    out = Path(out)
    shard = shard or Shard()
    if config.resolution is None:
        # Chosen before the folder is opened: config.yaml records the value, and a resume compares against it.
        size = min(open_images(config.data, config.format, config.split).image(0).size)
        backbone = load_backbone(config.model, original_config=config.original_config, prediction_type=config.prediction_type)
        config = replace(config, resolution=backbone.choose_resolution(size))
        log(f"inverting at {config.resolution} px (chosen from the model and the {size} px data; --resolution overrides)")
    if config.batch_size == AUTO_BATCH and (out / "config.yaml").is_file():
        # A resumed store keeps the batches it was planned in.
        config = replace(config, batch_size=int((read_yaml(out / "config.yaml") or {}).get("batch_size") or AUTO_BATCH))
    mode = open_output(out, MARKER, config, noun="store", resume=resume, overwrite=overwrite, shared=not shard.whole)
    if mode == "done":
        problems = damage(out, read_json(out / MARKER), read_rows(out, strict=False))
        if not problems:
            log(f"{out} is already complete; nothing to do")
            return out
        log(f"{out} is damaged ({'; '.join(problems[:3])}); redoing what is missing")
        StoreWriter(out).reopen()

    # 1. Data: the selected, readable images.
    source = open_images(config.data, config.format, config.split)
    images = real_subset(source, config.per_class, config.subset_seed, config.bad_images, config.val_per_class, warn=log)
    warn_base_mismatch(config.model, config.data, images, log)

    # 2. Model, frozen, on the device in the working precision, and where each row's inversion starts.
    backbone, encoder = _frozen_model(config, images, log)
    n_items = len(images) if config.target == "image" else len(images.classes)
    if config.batch_size == AUTO_BATCH:
        size = auto_batch(backbone, config.tokens, resolution_of(config), n_items, sharded=not shard.whole, log=log)
        config = replace(config, batch_size=size)
    pad_to = None
    if compile_wanted(config.compile, backbone.device, n_items * config.steps):
        backbone.compile()
        pad_to = config.batch_size  # one shape through the run: the last batch is padded

    # 3. Store: header and resolved config, or a check that the resumed store fits this model.
    #    A store holds one row per image, or one per class with --target class.
    item_ids = images.ids if config.target == "image" else [CLASS_PREFIX + name for name in images.classes]
    writer = StoreWriter(out)
    _start_store(config, out, writer, backbone, images, item_ids, shard)

    # 4. This shard's batches that are not finished yet.
    _invert_batches(config, out, writer, backbone, images, item_ids, encoder, shard, progress, on_step, log, pad_to)

    # 5. The manifest, once every shard's batches are in.
    return finish_store(out, log=log, strict=shard.whole)


AUTO_BATCH = 0  # --batch-size 0: the largest batch that fits the GPU's free memory
CPU_BATCH = 64  # what --batch-size 0 means off CUDA, where memory is not what limits a batch, and for shards
MAX_AUTO_BATCH = 4096


def auto_batch(backbone: Backbone, tokens: int, resolution: int, cap: int, *, sharded: bool = False,
               log: Callable[[str], None] = print) -> int:
    """``--batch-size 0`` resolved: on CUDA the largest batch (at most ``cap``) whose inversion step fits 80% of the
    free memory, from one step measured at 8 and at 16 rows; ``CPU_BATCH`` elsewhere, and for a shard (every shard
    must cut the work into the same batches, whatever memory its own GPU has free)."""
    if backbone.device.type != "cuda" or sharded:
        return CPU_BATCH

    def peak(rows: int) -> int:
        return peak_cuda_bytes(probe_step(backbone, tokens, resolution, rows), backbone.device)

    free = torch.cuda.mem_get_info(backbone.device)[0]
    try:
        size = batch_that_fits(peak, free, cap=max(1, min(MAX_AUTO_BATCH, cap)))
    except OUT_OF_MEMORY:  # not even 16 rows fit: start at 8, and halving on out-of-memory goes lower
        torch.cuda.empty_cache()
        log(f"--batch-size 0: 16 images do not fit the {free / 2**30:.1f} GiB free; starting at 8 a batch")
        return 8
    log(f"--batch-size 0: {size} images a batch (one step measured at 8 and 16 rows; {free / 2**30:.1f} GiB free)")
    return size


def probe_step(backbone: Backbone, tokens: int, resolution: int, rows: int) -> Callable[[], torch.Tensor]:
    """One inversion step's UNet pass on ``rows`` rows, forward and backward to the conditioning (which it returns)."""
    def step() -> torch.Tensor:
        cond = torch.zeros(rows, tokens + backbone.extra_tokens, backbone.cond_dim, device=backbone.device, requires_grad=True)
        x_t = torch.randn(rows, *backbone.latent_shape(resolution), device=backbone.device)
        t = torch.full((rows,), backbone.num_train_timesteps // 2, device=backbone.device, dtype=torch.long)
        backbone.predict(x_t, backbone.process.model_time(t), cond).square().mean().backward()
        return cond
    return step


def resolution_of(config: InvertConfig) -> int:
    """The inversion resolution, which the stage's start sets when the config leaves it to the model and data (None)."""
    if config.resolution is None:
        raise RuntimeError("the resolution is chosen at the stage's start, before any image is inverted")
    return config.resolution


def _frozen_model(config: InvertConfig, images: LabelledImages, log: Callable[[str], None]) -> tuple[Backbone, Any]:
    """The frozen generator on its device and precision, and the start of each row (an encoder, per-class starts, or None)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.precision, device)
    check_precision(dtype, optimising=True)
    backbone = load_backbone(config.model, with_text_encoder=config.init == "text", original_config=config.original_config,
                             prediction_type=config.prediction_type).to(device, dtype)
    backbone = backbone.with_prediction_type(config.prediction_type)
    if config.channels_last:
        backbone.channels_last()
    backbone.check_supported()
    backbone.check_resolution(resolution_of(config), log)
    if backbone.unfused_attention():
        log(f"warning: {config.model}'s UNet runs attention through {', '.join(backbone.unfused_attention())}, not a fused "
            f"kernel (PyTorch's scaled_dot_product_attention): inversion will be slower; load it without a custom processor")
    if backbone.extra_tokens and config.init == "encoder":
        raise ModelError("--init encoder is for pretrain-base models, not SDXL; use --init random or uniform")
    encoder: Any = None  # a TokenEncoder, per-class starts (_ByLabel) or None
    trained_tokens = encoder_tokens(config.model)  # pretrain-base models only; None for SD
    if config.init == "encoder":
        encoder = load_encoder(config.model).to(device)
        if encoder.tokens != config.tokens:
            # The start's shape would win over --tokens silently, and the store's header would say otherwise.
            raise EncoderError(f"{config.model}'s encoder makes {encoder.tokens} tokens, and --init encoder starts "
                               f"from them: pass --tokens {encoder.tokens} (or --init random to learn {config.tokens} "
                               f"tokens from noise)")
    elif trained_tokens is not None and trained_tokens != config.tokens:
        log(f"note: {config.model} was pretrained with {trained_tokens} conditioning tokens; inverting {config.tokens} "
            f"(--tokens {trained_tokens} matches it)")
    if config.init == "text":
        # One start per class, the same for each of its images: [C, K, D], indexed by label.
        starts = backbone.encode_prompt_tokens([config.init_template.format(c) for c in images.classes], config.tokens)
        encoder = _ByLabel(starts)
    elif config.init == "class":
        encoder = _ByLabel(class_starts(config.init_store, backbone, images.classes, config.tokens))
    return backbone, encoder


def _invert_batches(config: InvertConfig, out: Path, writer: StoreWriter, backbone: Backbone, images: LabelledImages,
                    item_ids: list[str], encoder: Any, shard: Shard, progress: bool, on_step: StepHook | None,
                    log: Callable[[str], None], pad_to: int | None = None) -> None:
    """Invert and write this shard's unfinished batches, halving a batch that runs out of memory."""
    finished = writer.finished_ids()
    batches = plan_batches(len(item_ids), planned_batch(config_to_dict(config)))
    units = Units(out, "batch", len(batches), lambda b: all(item_ids[i] in finished for i in batches[b]), shard.count)
    work = [(b, [i for i in batches[b] if item_ids[i] not in finished]) for b in units.todo(shard)]
    unit = "image" if config.target == "image" else "class"
    n_todo = sum(len(todo) for _, todo in work)
    bar = progress_bar(total=n_todo * config.steps, unit=f"{unit}-step", disable=not progress, dynamic_ncols=True,
               desc=f"invert {n_todo} {unit}{'es' if unit == 'class' else 's'}" + ("" if shard.whole else f" (shard {shard})"))
    failed, started = 0, time.perf_counter()
    for b, todo in work:
        # Out of GPU memory, a batch is split in two and each half written as its own part; a group of
        # the official update pattern cannot be (its images share an optimiser), so lower --group-batch;
        # nor is an early-stopping pool (its images move through --batch-size slots), so lower --batch-size.
        whole = len(todo)

        def run(part, b=b, whole=whole):  # halves after an out-of-memory are not padded back to the size that failed
            pad = pad_to if len(part) == whole else None
            return _invert_and_write(backbone, images, list(part), config, writer, bar, b, on_step, log, encoder, pad)
        if config.update == "group" or config.early_stop:
            failed += run(todo)
        else:
            failed += sum(n for _, n in halving_on_oom(run, todo, what="inverting", log=log, device=backbone.device))
    bar.close()
    if shard.whole and work:  # what a set sampled from this store spends on it (shards would race on the file)
        add_cost(out, time.perf_counter() - started, n_todo, str(backbone.device), "items")
    if work and failed == n_todo:
        raise InversionError(f"the inversion loss was not finite for every image, even after {config.nan_retries} retries at "
                             f"lower learning rates; lower --lr or use --precision fp32")


def _start_store(config: InvertConfig, out: Path, writer: StoreWriter, backbone: Backbone, images: LabelledImages,
                 item_ids: list[str], shard: Shard) -> None:
    # The absolute path lets `generate` find the model from any working directory.
    model_path = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    info = {"model": config.model, "model_path": model_path, "model_fingerprint": backbone.fingerprint(),
            "cond_shape": [config.tokens + backbone.extra_tokens, backbone.cond_dim], "classes": images.classes,
            "resolution": config.resolution,
            "latent_shape": list(backbone.latent_shape(resolution_of(config))), "n_images": len(item_ids), "n_items": len(item_ids),
            "target": config.target, "shards": shard.count, "dtype": str(backbone.dtype).replace("torch.", ""),
            "prediction_type": backbone.prediction_type,
            "original_config": str(Path(config.original_config).resolve()) if config.original_config else "",
            "data": str(Path(config.data).resolve()) if Path(config.data).exists() else config.data, "split": config.split}
    if (out / MARKER).is_file():
        old = writer.info()
        if old.get("model_fingerprint") not in backbone.fingerprints():
            raise RunError(f"{out} was made with another model ({old.get('model')}); use --overwrite or a new --out")
    else:
        write_yaml(out / "config.yaml", config_to_dict(config))
        # Grey data (R = G = B) stays grey: generate saves equal-RGB variants, whatever tint an RGB base adds.
        # Looked at once, when the store is started (it reads up to 64 images).
        writer.start({**info, "grey": all_grey(images)})
    # The whole store's embeddings, plus one batch's checkpoint (the embeddings and AdamW's two moments) and its files.
    cond_bytes = 4 * (config.tokens + backbone.extra_tokens) * backbone.cond_dim
    batch = min(config.batch_size or 64, len(item_ids))
    check_free_space(out, len(item_ids) * cond_bytes + 3 * batch * cond_bytes + (64 << 10), "the store")


_WARNED: set[tuple[str, str]] = set()  # once per (base, data) in a process: a demo inverts several subsets


def warn_base_mismatch(base: str, data: str, images: LabelledImages, log: Callable[[str], None]) -> None:
    """Say so when a ``pretrain-base`` model was trained on other data than the images it is asked to invert."""
    marker = Path(base) / "config.yaml"
    if (base, data) in _WARNED or not marker.is_file() or not (Path(base) / "pretrain.json").is_file():
        return
    _WARNED.add((base, data))
    trained = read_yaml(marker) or {}
    grey_base = read_json(Path(base) / "pretrain.json").get("image_channels") == 1
    if grey_base and not all_grey(images, [0]):
        log(f"warning: the base {base} is a one-channel (grey) model and {data} is in colour: its variants will be grey")
    sources = [trained.get("data")] + list(trained.get("extra_data") or [])
    if data in sources or any(str(Path(data).resolve()) == str(Path(s).resolve()) for s in sources if s):
        return
    if len(sources) > 1:  # a generalist, pretrained on a mix: the paper's setting (SD has seen few chest X-rays)
        log(f"note: the base {base} is a generalist pretrained on {', '.join(map(str, sources))}, never on {data}: the "
            f"paper's setting, as Stable Diffusion's is for most domains. If its variants look unlike your images (the "
            f"set's images, the report's grids), a base pretrained on your data may serve better (diffinv pretrain-base "
            f"--data {data} ..., then --model that folder)")
        return
    log(f"warning: the base {base} was pretrained on {sources[0]} alone, not on {data}: a base trained on one other "
        f"dataset may make variants unlike these images. Pretrain a base on your data's training images (diffinv "
        f"pretrain-base --data {data} ...) and pass it as --model, or use a generalist base (bases/README.md)")


# With --early-stop a planned batch is a pool of this many times --batch-size images: --batch-size of
# them are optimised at once, and an image that finishes early hands its slot to the next.
REFILL_POOL = 8


def planned_batch(config: dict[str, Any]) -> int:
    """Items per planned batch of a store's config: --batch-size, a whole group under --update group, a pool with --early-stop."""
    if config.get("update", "own") == "group":
        return int(config["group_size"])
    return int(config["batch_size"]) * (REFILL_POOL if config.get("early_stop") else 1)


def plan_batches(n_items: int, batch_size: int) -> list[list[int]]:
    """The fixed batches of item indices [0, n_items): batch b is what shard b % N inverts."""
    return [list(range(i, min(i + batch_size, n_items))) for i in range(0, n_items, batch_size)]


def finish_store(out: str | Path, log: Callable[[str], None] = print, strict: bool = True) -> Path | None:
    """Write the store's manifest if every item is finished; else raise (``strict``) or log what is missing and return None."""
    out = Path(out)
    writer = StoreWriter(out)
    info = writer.info()
    total = info.get("n_items", info["n_images"])
    done = {r["index"] for r in read_rows(out, strict=False)} | {r["index"] for r in read_rows(out, "failed")}
    batches = plan_batches(total, planned_batch(read_yaml(out / "config.yaml")))
    units = Units(out, "batch", len(batches), lambda b: all(i in done for i in batches[b]), int(info.get("shards", 1)))
    missing = len(set(range(total)) - done)
    if not units.complete(strict=strict, log=log, what=f"{missing} images in "):
        return None
    writer.finish(total)
    remove_temporaries(out)
    failed = read_rows(out, "failed")
    if failed:
        log(f"warning: {len(failed)} image(s) left out of {out}, their loss stayed non-finite: "
            f"{', '.join(r['id'] for r in failed[:5])}{' ...' if len(failed) > 5 else ''} (listed in store.json)")
    return out


def _invert_and_write(backbone: Backbone, images: LabelledImages, indices: list[int], config: InvertConfig,
                      writer: StoreWriter, bar, batch_index: int, on_step: StepHook | None,
                      log: Callable[[str], None], encoder: torch.nn.Module | _ByLabel | None, pad_to: int | None = None) -> int:
    """Invert one batch of items (images, or classes with ``target == "class"``) and write its part.

    Returns how many items were given up on (non-finite loss after every retry).
    """
    # 1. Inputs: pixels per image, or latents of every image of each class with its owner.
    inputs: torch.Tensor | LatentMoments
    owners: torch.Tensor | None
    if config.target == "image":
        subset = images.subset(indices)
        ids, inputs, owners = subset.ids, load_pixels(subset, resolution_of(config)), None
    else:
        ids = [CLASS_PREFIX + images.classes[c] for c in indices]
        members = [np.flatnonzero(images.labels == c).tolist() for c in indices]
        inputs = encode_images(backbone, images.subset([i for m in members for i in m]), resolution_of(config))
        owners = torch.cat([torch.full((len(m),), b, dtype=torch.long) for b, m in enumerate(members)])
    keys = rng.keys_tensor(config.seed, ids)
    start_from = None
    if isinstance(encoder, _ByLabel):
        start_from = encoder.starts[torch.as_tensor(subset.labels if config.target == "image" else indices)]
    elif encoder is not None and isinstance(inputs, torch.Tensor):  # the config allows an encoder for image targets only
        with torch.no_grad():
            start_from = encoder(inputs.to(backbone.device, torch.float32)).float()

    # 2. A checkpoint of exactly these items continues; one of another split of them is ignored.
    batch = part_name(ids)
    resumed = writer.load_checkpoint(batch)
    if resumed is not None and resumed[1]["ids"] != ids:
        resumed = None
    if resumed is not None and "updates" not in resumed[1]:  # a checkpoint from before the one loop
        log(f"note: the checkpoint of batch {batch_index} is in an older format; the batch starts again")
        resumed = None
    rows_run = padded(InversionSettings.of(config), len(ids), pad_to, owners)
    if resumed is not None and len(resumed[1]["steps"]) != rows_run:  # made with(out) --compile's padding
        log(f"note: the checkpoint of batch {batch_index} was made with{'out' if pad_to else ''} --compile; the batch starts again")
        resumed = None
    if resumed is not None:
        meta = resumed[1]
        bar.update(sum(config.steps if st == DONE else k for k, st in zip(meta["steps"], meta["status"])))

    def step_done(iteration: int, loss: float | None, advanced: int) -> None:
        bar.update(advanced)
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(batch_index, iteration)

    def checkpoint(iteration: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        writer.save_checkpoint(batch, tensors, None, {"ids": ids, "step": iteration, **meta})

    # 3. Optimise; items whose loss is not finite are retried at lower learning rates. With --early-stop the
    #    batch is a pool moving through --batch-size slots.
    result = invert_items(backbone, inputs, keys, InversionSettings.of(config), owners=owners, init=start_from, log=log,
                          what=f"batch {batch_index}", slots=config.batch_size, resume_from=resumed, checkpoint=checkpoint,
                          on_step=step_done, pad_to=pad_to)

    # 4. Rows of the manifest; the failures apart.
    if config.target == "image":
        rows = [{"id": ids[j], "index": indices[j], "label": int(subset.labels[j]), "class": images.classes[subset.labels[j]],
                 "source": subset.sources[j]} for j in range(len(indices))]
    else:
        rows = [{"id": ids[j], "index": c, "label": c, "class": images.classes[c], "source": f"{len(members[j])} images",
                 "n_images": len(members[j])} for j, c in enumerate(indices)]
    rows = [{**r, "loss_init": float(result.loss_init[j]), "loss": float(result.loss_final[j]), "steps": result.steps[j],
             "lr": result.lrs[j]} for j, r in enumerate(rows)]
    good = [j for j in range(len(ids)) if result.finite(j)]
    if not good and len(ids) > 1:
        # A whole batch failing is the settings, not the images: stop before it happens to every batch.
        raise InversionError(f"the inversion loss was not finite for any of the {len(ids)} items of batch {batch_index}, even after "
                             f"{config.nan_retries} retries at lower learning rates; lower --lr or use --precision fp32 "
                             f"(finished batches are kept)")
    failed = [{**rows[j], "error": f"loss not finite at lr {config.lr:g} and {config.nan_retries} lower rate(s)"}
              for j in range(len(ids)) if j not in good]
    writer.write_part(result.embeddings[good], [rows[j] for j in good], failed)
    writer.clear_checkpoint(batch)
    return len(failed)


def class_starts(path: str, backbone: Backbone, classes: list[str], tokens: int) -> torch.Tensor:
    """Each class's conditioning [C, K, D] from a ``--target class`` store made on this model, in ``classes`` order."""
    store = EmbeddingStore.open(path)
    if store.info.get("target") != "class":
        raise StoreError(f"--init-store {path} holds one conditioning per image; make a per-class one with "
                         f"`diffinv invert --target class` on the same model and data")
    if store.info.get("model_fingerprint") not in backbone.fingerprints():
        raise StoreError(f"--init-store {path} was made with another model ({store.info.get('model')}); invert the classes "
                         f"with this --model")
    if list(store.embeddings.shape[1:]) != [tokens + backbone.extra_tokens, backbone.cond_dim]:
        raise StoreError(f"--init-store {path} holds conditionings of shape {list(store.embeddings.shape[1:])}, this "
                         f"inversion needs {[tokens + backbone.extra_tokens, backbone.cond_dim]} (--tokens)")
    row = {i: j for j, i in enumerate(store.ids)}
    missing = [c for c in classes if CLASS_PREFIX + c not in row]
    if missing:
        raise StoreError(f"--init-store {path} has no conditioning for class(es) {', '.join(missing[:5])}; invert every "
                         f"class of the data with --target class")
    return store.embeddings[[row[CLASS_PREFIX + c] for c in classes]]


class _ByLabel:
    """Per-class starting conditionings [C, K, D] (``--init text`` or ``class``), looked up by each item's label."""

    def __init__(self, starts: torch.Tensor):
        self.starts = starts.float()


def _count_done(out: Path, seen: dict[str, int]) -> tuple[int, int | None]:
    """Finished images of a store being written by shards; ``seen`` caches each finished part's size."""
    for meta in (*(out / "parts").glob("part-*.json"), *(out / "failed").glob("part-*.json")):
        key = f"{meta.parent.name}/{meta.name}"
        if key not in seen:
            seen[key] = len(read_json(meta))
    info = read_json(out / MARKER)
    return sum(seen.values()), info.get("n_items", info.get("n_images"))


def _summary(config: InvertConfig, out: Path) -> str:
    # Manifest rows only: the embeddings of a large store need not fit in memory.
    info, rows = read_json(out / MARKER), read_rows(out)
    losses = [r["loss"] for r in rows]
    inits = [r["loss_init"] for r in rows]
    what = (f"{len(rows)} images" if config.target == "image"
            else f"one conditioning per class from {sum(r['n_images'] for r in rows)} images")
    steps = [r["steps"] for r in rows]
    after = (f"{config.steps} steps" if min(steps) == config.steps else
             f"{sum(steps) / len(steps):.0f} steps on average (early stop; {min(steps)}-{max(steps)}, at most {config.steps})")
    return (f"store {out}: {what}, {len(info['classes'])} classes, conditioning {tuple(info['cond_shape'])}; "
            f"mean loss {sum(inits) / len(inits):.4f} at init -> {sum(losses) / len(losses):.4f} after {after}")


def _run(config: InvertConfig, out: Path, *, shard: Shard, resume: bool, overwrite: bool, progress: bool,
         log: Callable[[str], None], hook: Any = None) -> Path | None:
    if not config.model or not config.data:
        from diffinv.config import ConfigError

        raise ConfigError("--model and --data are required (on the command line or in --config)")
    return invert_dataset(config, out, resume=resume or not shard.whole, overwrite=overwrite, progress=progress,
                          on_step=hook, log=log, shard=shard)


STAGE = Stage(name="invert", config=InvertConfig, marker=MARKER, run=_run, finish=finish_store, count_done=_count_done,
              summary=_summary, unit="img", path_fields=("model", "data", "init_store", "original_config"), shardable=True,
              description="Diffusion Inversion stage 1: a learned K x D conditioning per image, UNet and VAE frozen.",
              outputs=("store folder to write", "continue an unfinished store, skipping finished images", "replace an existing store"))
