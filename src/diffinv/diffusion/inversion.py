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

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from diffinv.config import InvertConfig, config_to_dict
from diffinv.data.real import LabelledImages, load_pixels, open_images, select
from diffinv.diffusion import rng
from diffinv.diffusion.backbone import Backbone, LatentMoments, load_backbone, resolve_device, resolve_dtype
from diffinv.diffusion.store import MARKER, StoreWriter
from diffinv.runs import RunError, check_same_settings, prepare_output, remove_temporaries, write_yaml

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
                 on_step: Callable[[int, float | None], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise one conditioning per image of a batch (or, with ``owners``, one per group of images).

    pixels [N, 3, R, R] in [-1, 1], or their latent moments; keys [B] from :func:`rng.keys_tensor`,
    one per conditioning. Without ``owners``, N = B and conditioning b belongs to image b. With
    ``owners`` [N] (sorted, values 0..B-1), conditioning b is shared by the images it owns and
    each step trains it on one of them, drawn by its key (textual inversion's class token).
    ``state`` and ``start_step`` continue from a checkpoint. Returns (embeddings [B, K, D]
    float32 on CPU, initial and final evaluation losses [B]).
    """
    device = backbone.device
    keys = keys.to(device)

    # 1. Encode every image once; the paper re-encodes it at every step.
    moments = pixels if isinstance(pixels, LatentMoments) else _encode_in_slices(backbone, pixels)
    groups = _Groups(owners.to(device), len(keys)) if owners is not None else None

    # 2. Starting point: fresh keyed initialisation, or the checkpointed embeddings and AdamW moments.
    init = init_embeddings(keys, config.tokens, backbone.cond_dim, config.init_std)
    emb = torch.nn.Parameter((state["embeddings"] if state else init).to(device, torch.float32).clone())
    opt = torch.optim.AdamW([emb], lr=config.lr, weight_decay=config.weight_decay)
    if state:
        opt.state[emb] = {"step": state["adam_step"].reshape(()).float().clone(), "exp_avg": state["exp_avg"].to(device).clone(),
                          "exp_avg_sq": state["exp_avg_sq"].to(device).clone()}
    loss_init = _evaluate(backbone, moments.mean, init, keys, groups, config.eval_timesteps)

    # 3. Denoising steps. Loss = sum of per-image means, so each image's gradient is its own.
    running, counted = torch.zeros((), device=device), 0
    for step in range(start_step, config.steps):
        step_moments = moments if groups is None else groups.draw(moments, keys, step)
        x0, noise, t = training_draws(keys, step, step_moments, backbone.num_train_timesteps, config.latent == "sample")
        a = backbone.alphas_cumprod[t]
        pred = backbone.predict_noise(q_sample(x0, noise, a), t, emb)
        loss = per_image_loss(pred, denoising_target(x0, noise, a, backbone.prediction_type)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.detach()
        counted += 1

        # 4. Host syncs only here, every log_every steps: finiteness check and the progress bar.
        done = step + 1
        mean_loss = None
        if done % config.log_every == 0 or done == config.steps:
            mean_loss = running.item() / (len(keys) * counted)
            running.zero_()
            counted = 0
            if not math.isfinite(mean_loss):
                raise InversionError(f"the inversion loss became {mean_loss} at step {done}; lower --lr or use --precision fp32")
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
                   progress: bool = True, on_step: StepHook | None = None, log: Callable[[str], None] = print) -> Path:
    """Invert every selected image of ``config.data`` into the store at ``out``.

    Finished batches are written as atomic parts; the batch in progress is checkpointed every
    ``checkpoint_every`` steps, so ``resume=True`` after a kill gives the same store as an
    uninterrupted run.
    """
    out = Path(out)
    mode = prepare_output(out, MARKER, resume=resume, overwrite=overwrite)
    if mode == "done":
        log(f"{out} is already complete; nothing to do")
        return out
    if mode == "resume":
        check_same_settings(out, config, "store", "cannot resume")
        remove_temporaries(out)

    # 1. Data: the selected, readable images.
    images = select(open_images(config.data, config.format, config.split), config.per_class, config.subset_seed,
                    config.bad_images, warn=log)

    # 2. Model, frozen, on the device in the working precision.
    device = resolve_device(config.device)
    backbone = load_backbone(config.model).to(device, resolve_dtype(config.precision, device))
    latent_shape = backbone.latent_shape(config.resolution)

    # 3. Store: header and resolved config, or a check that the resumed store fits this model.
    #    A store holds one row per image, or one per class with --target class.
    item_ids = images.ids if config.target == "image" else [CLASS_PREFIX + name for name in images.classes]
    writer = StoreWriter(out)
    # The absolute path lets `generate` find the model from any working directory.
    model_path = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    info = {"model": config.model, "model_path": model_path, "model_fingerprint": backbone.fingerprint(), "cond_shape": [config.tokens, backbone.cond_dim],
            "classes": images.classes, "resolution": config.resolution, "latent_shape": list(latent_shape),
            "n_images": len(item_ids), "target": config.target, "dtype": str(backbone.dtype).replace("torch.", "")}
    if mode == "resume":
        old = writer.info()
        if old.get("model_fingerprint") != info["model_fingerprint"]:
            raise RunError(f"{out} was made with another model ({old.get('model')}); use --overwrite or a new --out")
    else:
        write_yaml(out / "config.yaml", config_to_dict(config))
        writer.start(info)

    # 4. Batches of not-yet-finished items, the checkpointed batch first.
    finished = writer.finished_ids()
    todo = [i for i, item in enumerate(item_ids) if item not in finished]
    batches = _plan_batches(item_ids, todo, config.batch_size, writer.load_checkpoint())
    unit = "image" if config.target == "image" else "class"
    bar = tqdm(total=len(todo) * config.steps, unit=f"{unit}-step", disable=not progress, dynamic_ncols=True,
               desc=f"invert {len(todo)} {unit}{'es' if unit == 'class' else 's'}")
    for b, (indices, resumed) in enumerate(batches):
        _invert_and_write(backbone, images, indices, config, writer, resumed, bar, b, on_step)
    bar.close()
    writer.finish(len(item_ids))
    return out


CLASS_PREFIX = "class:"


def _plan_batches(ids: list[str], todo: list[int], batch_size: int, checkpoint) -> list[tuple[list[int], object]]:
    """Batches of ``todo`` (indices into ``ids``); a checkpointed batch whose items are all still to do goes first.

    A checkpoint whose batch already has its part (a kill between the two writes) is ignored.
    """
    batches: list[tuple[list[int], object]] = []
    if checkpoint is not None:
        pending = {ids[i]: i for i in todo}
        saved = checkpoint[1]["ids"]
        if all(i in pending for i in saved):
            first = [pending[i] for i in saved]
            batches.append((first, checkpoint))
            in_first = set(first)
            todo = [i for i in todo if i not in in_first]
    batches += [(todo[i : i + batch_size], None) for i in range(0, len(todo), batch_size)]
    return batches


def _invert_and_write(backbone: Backbone, images: LabelledImages, indices: list[int], config: InvertConfig,
                      writer: StoreWriter, resumed, bar, batch_index: int, on_step: StepHook | None) -> None:
    """Invert one batch of items (images, or classes with ``target == "class"``) and write its part."""
    if config.target == "image":
        subset = images.subset(indices)
        ids, inputs, owners = subset.ids, load_pixels(subset, config.resolution), None
    else:
        ids = [CLASS_PREFIX + images.classes[c] for c in indices]
        members = [np.flatnonzero(images.labels == c).tolist() for c in indices]
        inputs = encode_images(backbone, images.subset([i for m in members for i in m]), config.resolution)
        owners = torch.cat([torch.full((len(m),), b, dtype=torch.long) for b, m in enumerate(members)])
    keys = rng.keys_tensor(config.seed, ids)
    state, start = (resumed[0], int(resumed[1]["step"])) if resumed else (None, 0)
    bar.update(start * len(indices))

    def checkpoint(step: int, tensors: dict[str, torch.Tensor]) -> None:
        writer.save_checkpoint(tensors, {"ids": ids, "step": step})

    def step_done(step: int, loss: float | None) -> None:
        bar.update(len(indices))
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}", done=f"{bar.n // config.steps}")
        if on_step is not None:
            on_step(batch_index, step)

    emb, loss_init, loss_final = invert_batch(backbone, inputs, keys, config, owners=owners, state=state, start_step=start,
                                              checkpoint=checkpoint, on_step=step_done)
    if config.target == "image":
        rows = [{"id": ids[j], "index": indices[j], "label": int(subset.labels[j]), "class": images.classes[subset.labels[j]],
                 "source": subset.sources[j]} for j in range(len(indices))]
    else:
        rows = [{"id": ids[j], "index": c, "label": c, "class": images.classes[c], "source": f"{len(members[j])} images",
                 "n_images": len(members[j])} for j, c in enumerate(indices)]
    rows = [{**r, "loss_init": float(loss_init[j]), "loss": float(loss_final[j]), "steps": config.steps} for j, r in enumerate(rows)]
    writer.write_part(emb, rows)
    writer.clear_checkpoint()


def encode_images(backbone: Backbone, images: LabelledImages, resolution: int, slice_size: int = 64) -> LatentMoments:
    """Latent moments [N, C, h, w] of many images, loading their pixels one slice at a time."""
    parts = [backbone.encode(load_pixels(images.subset(range(i, min(i + slice_size, len(images)))), resolution))
             for i in range(0, len(images), slice_size)]
    return LatentMoments(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))
