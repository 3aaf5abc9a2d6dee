"""Stage 1, Diffusion Inversion: learn a conditioning c_i [K, D] per real image.

The maths (noising, targets, per-image loss, initialisation, evaluation) are pure tensor
functions at the top; :func:`invert_dataset` (orchestration: data, store, resume) and
:func:`invert_batch` (the hot loop) follow.

Speed choices against the paper's code: latent moments are computed once per image, not every
step; all images of a batch are optimised together (AdamW is element-wise and the loss is a sum
of per-image losses, so an image's trajectory does not depend on its batch-mates); the UNet runs
in bf16/fp16 on GPU; the host is only synchronised every ``log_every`` steps.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from diffinv.config import InvertConfig, config_to_dict
from diffinv.data.real import LabelledImages, load_pixels, open_images, select
from diffinv.diffusion import rng
from diffinv.diffusion.backbone import Backbone, LatentMoments, load_backbone, resolve_device, resolve_dtype
from diffinv.diffusion.store import MARKER, StoreWriter, part_name, read_rows
from diffinv.runs import RunError, check_free_space, open_output, read_yaml, remove_temporaries, write_yaml
from diffinv.shards import Shard, missing_message

StepHook = Callable[[int, int], None]  # (batch index, finished step) -> None; may raise to stop


class InversionError(RuntimeError):
    """Inversion cannot go on (e.g. the loss is not finite); the message says what to try."""


# ----------------------------------------------------------------------------- pure maths


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion x_t = sqrt(a) x0 + sqrt(1 - a) noise; x0, noise [B, ...], alpha_bar [B]."""
    a = alpha_bar.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def denoising_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet is trained to output: epsilon, or v = sqrt(a) noise - sqrt(1 - a) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alpha_bar.view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise InversionError(f"prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")


def per_image_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image: [B, ...] x2 -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def init_embeddings(keys: torch.Tensor, tokens: int, dim: int, std: float) -> torch.Tensor:
    """Keyed N(0, std^2) starting point [B, K, D] for each image's conditioning."""
    return rng.keyed_normal(keys, 0, rng.STREAM_INIT, (tokens, dim)) * std


def training_draws(keys: torch.Tensor, step: int, moments: LatentMoments, num_timesteps: int,
                   sample_latent: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's random draws for each image: clean latent x0, noise [B, C, h, w], timestep t [B]."""
    shape = tuple(moments.mean.shape[1:])
    x0 = moments.mean
    if sample_latent:
        x0 = x0 + moments.std * rng.keyed_normal(keys, step, rng.STREAM_LATENT, shape)
    noise = rng.keyed_normal(keys, step, rng.STREAM_NOISE, shape)
    t = rng.keyed_randint(keys, step, rng.STREAM_TIMESTEP, num_timesteps)
    return x0, noise, t


@torch.no_grad()
def evaluation_loss(backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, keys: torch.Tensor,
                    n_timesteps: int = 8) -> torch.Tensor:
    """Deterministic denoising loss [B] of conditioning cond [B, K, D] on clean latents [B, C, h, w].

    Averaged over ``n_timesteps`` evenly spaced timesteps with keyed noise, so two
    conditionings of the same images are compared on identical draws.
    """
    T = backbone.num_train_timesteps
    total = torch.zeros(latents.shape[0], device=latents.device)
    for j in range(n_timesteps):
        t = torch.full((latents.shape[0],), int((j + 0.5) * T / n_timesteps), device=latents.device, dtype=torch.long)
        noise = rng.keyed_normal(keys, j, rng.STREAM_EVAL, tuple(latents.shape[1:]))
        a = backbone.alphas_cumprod[t]
        pred = backbone.predict_noise(q_sample(latents, noise, a), t, cond)
        total += per_image_loss(pred, denoising_target(latents, noise, a, backbone.prediction_type))
    return total / n_timesteps


# ----------------------------------------------------------------------------- the hot loop


def invert_batch(backbone: Backbone, pixels: torch.Tensor | LatentMoments, keys: torch.Tensor, config: InvertConfig, *,
                 owners: torch.Tensor | None = None, state: dict[str, torch.Tensor] | None = None, start_step: int = 0,
                 checkpoint: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                 on_step: Callable[[int, float | None], None] | None = None,
                 init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise one conditioning per image of a batch (or, with ``owners``, one per group of images).

    pixels [N, 3, R, R] in [-1, 1], or their latent moments; keys [B] from :func:`rng.keys_tensor`,
    one per conditioning. Without ``owners``, N = B and conditioning b belongs to image b. With
    ``owners`` [N] (sorted, values 0..B-1), conditioning b is shared by the images it owns and
    each step trains it on one of them, drawn by its key (textual inversion's class token).
    ``state`` and ``start_step`` continue from a checkpoint; ``init`` [B, K, D] replaces the
    keyed random start (e.g. the base's encoder tokens). Returns (embeddings [B, K, D]
    float32 on CPU, initial and final evaluation losses [B]).
    """
    device = backbone.device
    keys = keys.to(device)

    # 1. Encode every image once; the paper re-encodes it at every step.
    moments = pixels if isinstance(pixels, LatentMoments) else _encode_in_slices(backbone, pixels)
    groups = _Groups(owners.to(device), len(keys)) if owners is not None else None

    # 2. Starting point: fresh keyed initialisation, or the checkpointed embeddings and AdamW moments.
    init = init_embeddings(keys, config.tokens, backbone.cond_dim, config.init_std) if init is None else init.to(device, torch.float32)
    emb = torch.nn.Parameter((state["embeddings"] if state else init).to(device, torch.float32).clone())
    opt = torch.optim.AdamW([emb], lr=config.lr, weight_decay=config.weight_decay)
    if state:
        opt.state[emb] = {"step": state["adam_step"].reshape(()).float().clone(), "exp_avg": state["exp_avg"].to(device).clone(),
                          "exp_avg_sq": state["exp_avg_sq"].to(device).clone()}
    loss_init = _evaluate(backbone, moments.mean, init, keys, groups, config.eval_timesteps)

    # 3. Denoising steps. Loss = sum of per-image means, so each image's gradient is its own
    #    (a NaN in one image stays in that image: the caller retries it at a lower lr).
    running, counted = torch.zeros(len(keys), device=device), 0
    for step in range(start_step, config.steps):
        step_moments = moments if groups is None else groups.draw(moments, keys, step)
        x0, noise, t = training_draws(keys, step, step_moments, backbone.num_train_timesteps, config.latent == "sample")
        a = backbone.alphas_cumprod[t]
        pred = backbone.predict_noise(q_sample(x0, noise, a), t, emb)
        losses = per_image_loss(pred, denoising_target(x0, noise, a, backbone.prediction_type))
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        running += losses.detach()
        counted += 1

        # 4. Host syncs only here, every log_every steps: finiteness check and the progress bar.
        done = step + 1
        mean_loss = None
        if done % config.log_every == 0 or done == config.steps:
            per_image = running / counted
            finite = torch.isfinite(per_image)
            if not bool(finite.any()):
                break  # every image has failed: stop early, the caller retries or reports them
            mean_loss = per_image[finite].mean().item()
            running.zero_()
            counted = 0
        if checkpoint is not None and done % config.checkpoint_every == 0 and done < config.steps:
            adam = opt.state[emb]
            checkpoint(done, {"embeddings": emb.detach(), "exp_avg": adam["exp_avg"], "exp_avg_sq": adam["exp_avg_sq"],
                              "adam_step": torch.as_tensor(adam["step"]).reshape(1).float()})
        if on_step is not None:
            on_step(done, mean_loss)

    # 5. Final deterministic evaluation, same draws as the initial one.
    loss_final = _evaluate(backbone, moments.mean, emb.detach(), keys, groups, config.eval_timesteps)
    return emb.detach().float().cpu(), loss_init.cpu(), loss_final.cpu()


class _Groups:
    """Images [N] owned by conditionings [B] (contiguous runs): per-step picks and per-group means."""

    EVAL_MEMBERS = 32  # the final loss of a class is measured on at most this many of its images

    def __init__(self, owners: torch.Tensor, n_groups: int):
        self.owners = owners
        self.count = torch.bincount(owners, minlength=n_groups)
        if bool((self.count == 0).any()):
            raise InversionError("every shared conditioning needs at least one image")
        self.start = torch.cumsum(self.count, 0) - self.count
        position = torch.arange(len(owners), device=owners.device) - self.start[owners]
        self.evaluated = position < self.EVAL_MEMBERS
        self.position = position

    def draw(self, moments: LatentMoments, keys: torch.Tensor, step: int) -> LatentMoments:
        """The one image [B] each conditioning trains on at ``step``, keyed by the conditioning."""
        u = rng.keyed_uniform(keys, step, rng.STREAM_PICK, (1,))[:, 0]
        idx = self.start + (u * self.count).long().clamp(max=self.count - 1)
        return LatentMoments(moments.mean[idx], moments.std[idx])

    def evaluate(self, backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, keys: torch.Tensor,
                 n_timesteps: int) -> torch.Tensor:
        own = self.owners[self.evaluated]
        # Member 0 keeps the group's key, so a class of one image scores exactly as that image would.
        member_keys = (keys[own] + self.position[self.evaluated] * 0x9E3779B1) & 0xFFFFFFFF
        losses = evaluation_loss(backbone, latents[self.evaluated], cond[own], member_keys, n_timesteps)
        total = torch.zeros(len(cond), device=losses.device).index_add_(0, own, losses)
        return total / self.count.clamp(max=self.EVAL_MEMBERS)


def _evaluate(backbone: Backbone, latents: torch.Tensor, cond: torch.Tensor, keys: torch.Tensor, groups: _Groups | None,
              n_timesteps: int) -> torch.Tensor:
    if groups is None:
        return evaluation_loss(backbone, latents, cond, keys, n_timesteps)
    return groups.evaluate(backbone, latents, cond, keys, n_timesteps)


def _encode_in_slices(backbone: Backbone, pixels: torch.Tensor, slice_size: int = 32) -> LatentMoments:
    parts = [backbone.encode(pixels[i : i + slice_size]) for i in range(0, len(pixels), slice_size)]
    return LatentMoments(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))


# ----------------------------------------------------------------------------- orchestration


def invert_dataset(config: InvertConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                   progress: bool = True, on_step: StepHook | None = None, log: Callable[[str], None] = print,
                   shard: Shard | None = None) -> Path | None:
    """Invert every selected image of ``config.data`` into the store at ``out``.

    Items are planned in fixed batches of ``batch_size``; finished batches are written as
    atomic parts, a batch in progress is checkpointed every ``checkpoint_every`` steps, so
    ``resume=True`` after a kill gives the same store as an uninterrupted run. With ``shard``
    (I of N) only batches b with b % N == I are inverted, into the same folder as the other
    shards; whichever shard finishes last writes the manifest. Returns ``out``, or None while
    other shards' batches are still missing.
    """
    out = Path(out)
    shard = shard or Shard()
    mode = open_output(out, MARKER, config, noun="store", resume=resume, overwrite=overwrite, shared=not shard.whole)
    if mode == "done":
        log(f"{out} is already complete; nothing to do")
        return out

    # 1. Data: the selected, readable images.
    images = select(open_images(config.data, config.format, config.split), config.per_class, config.subset_seed,
                    config.bad_images, warn=log)

    # 2. Model, frozen, on the device in the working precision.
    device = resolve_device(config.device)
    backbone = load_backbone(config.model).to(device, resolve_dtype(config.precision, device))
    latent_shape = backbone.latent_shape(config.resolution)
    encoder = None
    if config.init == "encoder":
        from diffinv.diffusion.pretrain import load_encoder

        encoder = load_encoder(config.model).to(device)

    # 3. Store: header and resolved config, or a check that the resumed store fits this model.
    #    A store holds one row per image, or one per class with --target class.
    item_ids = images.ids if config.target == "image" else [CLASS_PREFIX + name for name in images.classes]
    writer = StoreWriter(out)
    # The absolute path lets `generate` find the model from any working directory.
    model_path = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    info = {"model": config.model, "model_path": model_path, "model_fingerprint": backbone.fingerprint(), "cond_shape": [config.tokens, backbone.cond_dim],
            "classes": images.classes, "resolution": config.resolution, "latent_shape": list(latent_shape),
            "n_images": len(item_ids), "n_items": len(item_ids), "target": config.target, "shards": shard.count,
            "dtype": str(backbone.dtype).replace("torch.", "")}
    if (out / MARKER).is_file():
        old = writer.info()
        if old.get("model_fingerprint") != info["model_fingerprint"]:
            raise RunError(f"{out} was made with another model ({old.get('model')}); use --overwrite or a new --out")
    else:
        write_yaml(out / "config.yaml", config_to_dict(config))
        writer.start(info)
    # The whole store's embeddings plus a checkpoint per batch (AdamW keeps two more copies).
    cond_bytes = 4 * config.tokens * backbone.cond_dim
    check_free_space(out, len(item_ids) * cond_bytes + 4 * config.batch_size * cond_bytes + (1 << 20), "the store")

    # 4. This shard's batches that are not finished yet.
    finished = writer.finished_ids()
    work = [(b, [i for i in batch if item_ids[i] not in finished]) for b, batch in enumerate(plan_batches(len(item_ids), config.batch_size))
            if shard.owns(b)]
    work = [(b, todo) for b, todo in work if todo]
    unit = "image" if config.target == "image" else "class"
    n_todo = sum(len(todo) for _, todo in work)
    bar = tqdm(total=n_todo * config.steps, unit=f"{unit}-step", disable=not progress, dynamic_ncols=True,
               desc=f"invert {n_todo} {unit}{'es' if unit == 'class' else 's'}" + ("" if shard.whole else f" (shard {shard})"))
    failed = 0
    for b, todo in work:
        failed += _invert_and_write(backbone, images, todo, config, writer, bar, b, on_step, log, encoder)
    bar.close()
    if work and failed == n_todo:
        raise InversionError(f"the inversion loss was not finite for every image, even after {config.nan_retries} retries at "
                             f"lower learning rates; lower --lr or use --precision fp32")

    # 5. The manifest, once every shard's batches are in.
    return finish_store(out, log=log, strict=shard.whole)


CLASS_PREFIX = "class:"


def plan_batches(n_items: int, batch_size: int) -> list[list[int]]:
    """The fixed batches of item indices [0, n_items): batch b is what shard b % N inverts."""
    return [list(range(i, min(i + batch_size, n_items))) for i in range(0, n_items, batch_size)]


def finish_store(out: str | Path, log: Callable[[str], None] = print, strict: bool = True) -> Path | None:
    """Write the store's manifest if every item is finished; else raise (``strict``) or log what is missing and return None."""
    out = Path(out)
    writer = StoreWriter(out)
    info = writer.info()
    total = info.get("n_items", info["n_images"])
    done = {r["index"] for r in read_rows(out)} | {r["index"] for r in read_rows(out, "failed")}
    missing = sorted(set(range(total)) - done)
    if missing:
        batch_size = int(read_yaml(out / "config.yaml")["batch_size"])
        batches = sorted({i // batch_size for i in missing})
        message = f"{out}: {len(missing)} images in " + missing_message(batches, int(info.get("shards", 1)), "batch")
        if strict:
            raise RunError(message)
        log(message)
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
                      log: Callable[[str], None], encoder: torch.nn.Module | None = None) -> int:
    """Invert one batch of items (images, or classes with ``target == "class"``) and write its part.

    Out of GPU memory, the batch is split in two and each half written as its own part.
    Returns how many items were given up on (non-finite loss after every retry).
    """
    try:
        return _invert_batch_and_write(backbone, images, indices, config, writer, bar, batch_index, on_step, log, encoder)
    except OUT_OF_MEMORY as exc:
        if len(indices) == 1:
            raise InversionError(f"out of memory inverting a single item ({exc}); lower --resolution or use a smaller model") from exc
        half = len(indices) // 2
        log(f"out of memory on a batch of {len(indices)}; continuing in batches of {half} and {len(indices) - half} "
            f"(pass a smaller --batch-size to avoid the retry)")
        if backbone.device.type == "cuda":
            torch.cuda.empty_cache()
        return sum(_invert_and_write(backbone, images, part, config, writer, bar, batch_index, on_step, log, encoder)
                   for part in (indices[:half], indices[half:]))


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _invert_batch_and_write(backbone: Backbone, images: LabelledImages, indices: list[int], config: InvertConfig,
                            writer: StoreWriter, bar, batch_index: int, on_step: StepHook | None,
                            log: Callable[[str], None], encoder: torch.nn.Module | None) -> int:
    # 1. Inputs: pixels per image, or latents of every image of each class with its owner.
    if config.target == "image":
        subset = images.subset(indices)
        ids, inputs, owners = subset.ids, load_pixels(subset, config.resolution), None
    else:
        ids = [CLASS_PREFIX + images.classes[c] for c in indices]
        members = [np.flatnonzero(images.labels == c).tolist() for c in indices]
        inputs = encode_images(backbone, images.subset([i for m in members for i in m]), config.resolution)
        owners = torch.cat([torch.full((len(m),), b, dtype=torch.long) for b, m in enumerate(members)])
    keys = rng.keys_tensor(config.seed, ids)
    start_from = None
    if encoder is not None:
        with torch.no_grad():
            start_from = encoder(inputs.to(backbone.device, torch.float32)).float()
    batch = part_name(ids)
    resumed = writer.load_checkpoint(batch)
    if resumed is not None and resumed[1]["ids"] != ids:
        resumed = None  # a checkpoint of another split of these images (e.g. another --batch-size)
    state, start = (resumed[0], int(resumed[1]["step"])) if resumed else (None, 0)
    bar.update(start * len(indices))

    def checkpoint(step: int, tensors: dict[str, torch.Tensor]) -> None:
        writer.save_checkpoint(batch, tensors, {"ids": ids, "step": step})

    def step_done(step: int, loss: float | None) -> None:
        bar.update(len(indices))
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(batch_index, step)

    # 2. Optimise, then retry the items whose loss is not finite at lower learning rates.
    emb, loss_init, loss_final = invert_batch(backbone, inputs, keys, config, owners=owners, state=state, start_step=start,
                                              checkpoint=checkpoint, on_step=step_done, init=start_from)
    lrs = [config.lr] * len(ids)
    for attempt in range(1, config.nan_retries + 1):
        bad = [j for j in range(len(ids)) if not _finite(emb[j], loss_final[j])]
        if not bad:
            break
        lr = config.lr * 0.1**attempt
        log(f"{len(bad)} item(s) of batch {batch_index} had a non-finite loss at lr {lrs[bad[0]]:g}; retrying at lr {lr:g}")
        # One image's trajectory does not depend on its batch-mates, so the retry takes only the failed ones
        # (a class batch is retried whole: its images are laid out by owner).
        sel = bad if owners is None else list(range(len(ids)))
        retry = invert_batch(backbone, inputs[sel] if owners is None else inputs, keys[sel], replace(config, lr=lr), owners=owners,
                             init=None if start_from is None else start_from[sel])
        for r, j in enumerate(sel):
            emb[j], loss_init[j], loss_final[j], lrs[j] = retry[0][r], retry[1][r], retry[2][r], lr

    # 3. Rows of the manifest; the failures apart.
    if config.target == "image":
        rows = [{"id": ids[j], "index": indices[j], "label": int(subset.labels[j]), "class": images.classes[subset.labels[j]],
                 "source": subset.sources[j]} for j in range(len(indices))]
    else:
        rows = [{"id": ids[j], "index": c, "label": c, "class": images.classes[c], "source": f"{len(members[j])} images",
                 "n_images": len(members[j])} for j, c in enumerate(indices)]
    rows = [{**r, "loss_init": float(loss_init[j]), "loss": float(loss_final[j]), "steps": config.steps, "lr": lrs[j]}
            for j, r in enumerate(rows)]
    good = [j for j in range(len(ids)) if _finite(emb[j], loss_final[j])]
    if not good and len(ids) > 1:
        # A whole batch failing is the settings, not the images: stop before it happens to every batch.
        raise InversionError(f"the inversion loss was not finite for any of the {len(ids)} items of batch {batch_index}, even after "
                             f"{config.nan_retries} retries at lower learning rates; lower --lr or use --precision fp32 "
                             f"(finished batches are kept)")
    failed = [{**rows[j], "error": f"loss not finite at lr {config.lr:g} and {config.nan_retries} lower rate(s)"}
              for j in range(len(ids)) if j not in good]
    writer.write_part(emb[good], [rows[j] for j in good], failed)
    writer.clear_checkpoint(batch)
    return len(failed)


def _finite(embedding: torch.Tensor, loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(embedding).all()) and bool(torch.isfinite(loss))


def encode_images(backbone: Backbone, images: LabelledImages, resolution: int, slice_size: int = 64) -> LatentMoments:
    """Latent moments [N, C, h, w] of many images, loading their pixels one slice at a time."""
    parts = [backbone.encode(load_pixels(images.subset(range(i, min(i + slice_size, len(images)))), resolution))
             for i in range(0, len(images), slice_size)]
    return LatentMoments(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))
