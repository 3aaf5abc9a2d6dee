"""Stage 1's engine, Diffusion Inversion: learn a conditioning c_i [K, D] per real image.

:func:`invert_items` optimises a batch and retries the images whose loss is not finite at
lower learning rates; :func:`invert_batch` is the hot loop. Files, stores and resume live in
:mod:`diffinv.stages.invert`; the losses in :mod:`diffinv.diffusion.objective`.

Speed choices against the paper's code: latent moments are computed once per image, not every
step; all images of a batch are optimised together (AdamW is element-wise and the loss is a sum
of per-image losses, so an image's trajectory does not depend on its batch-mates); the UNet runs
in bf16/fp16 on GPU; the host is only synchronised every ``log_every`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from diffinv import rng
from diffinv.config import InvertConfig
from diffinv.data.real import LabelledImages, load_pixels
from diffinv.diffusion.backbone import Backbone, LatentMoments
from diffinv.diffusion.objective import (
    IMPORTANCE_BINS,
    adamw_rows,
    denoising_target,
    evaluation_loss,
    importance_weights,
    init_embeddings,
    lr_factor,
    per_image_loss,
    pilot_steps,
    q_sample,
    timestep_bins,
    timestep_proposal,
    training_draws,
)
from diffinv.errors import UserError
from diffinv.runs import load_optimiser_tensors

# (finished step, {"embeddings": [B, K, D], "timestep_stats": [B, bins] with importance sampling}, optimiser)
Checkpoint = Callable[[int, dict[str, torch.Tensor], torch.optim.Optimizer], None]


class InversionError(UserError, RuntimeError):
    """Inversion cannot go on (e.g. the loss is not finite); the message says what to try."""


def invert_batch(backbone: Backbone, pixels: torch.Tensor | LatentMoments, keys: torch.Tensor, config: InvertConfig, *,
                 owners: torch.Tensor | None = None, state: dict[str, torch.Tensor] | None = None, start_step: int = 0,
                 checkpoint: Checkpoint | None = None,
                 on_step: Callable[[int, float | None], None] | None = None,
                 init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise one conditioning per image of a batch (or, with ``owners``, one per group of images).

    pixels [N, 3, R, R] in [-1, 1], or their latent moments; keys [B] from :func:`rng.keys_tensor`,
    one per conditioning. Without ``owners``, N = B and conditioning b belongs to image b. With
    ``owners`` [N] (sorted, values 0..B-1), conditioning b is shared by the images it owns and
    each step trains it on one of them, drawn by its key (textual inversion's class token).
    ``state`` (the tensors ``checkpoint`` was given and the optimiser's, as :func:`runs.save_checkpoint`
    stored them) and ``start_step`` continue from a checkpoint; ``init`` [B, K, D] replaces the
    keyed random start (e.g. the base's encoder tokens). With ``config.update == "group"`` the
    batch is one group of the official loop's pattern (see :func:`update_slices`). Returns
    (embeddings [B, K, D] float32 on CPU, initial and final evaluation losses [B]).
    """
    device = backbone.device
    keys = keys.to(device)

    # 1. Encode every image once; the paper re-encodes it at every step.
    moments = pixels if isinstance(pixels, LatentMoments) else _encode_in_slices(backbone, pixels)
    groups = _Groups(owners.to(device), len(keys)) if owners is not None else None

    # 2. Starting point: fresh keyed initialisation, or the checkpointed embeddings and AdamW moments.
    init = (_keyed_start(backbone, keys, config) if init is None else init).to(device, torch.float32)
    emb = torch.nn.Parameter((state["embeddings"] if state else init).to(device, torch.float32).clone())
    opt = torch.optim.AdamW([emb], lr=config.lr, weight_decay=config.weight_decay)
    if state:
        load_optimiser_tensors(opt, state)
    loss_init = _evaluate(backbone, moments.mean, init, keys, groups, config.eval_timesteps)
    slices = [rows if rows is None else rows.to(device) for rows in update_slices(len(keys), config)]
    # With importance-sampled timesteps each image first measures its gradient's second moment per
    # timestep bin (its pilot steps); its proposal is fixed from then on (objective.timestep_proposal).
    pilot = pilot_steps(config.timesteps, config.draws)
    stats = None
    if pilot:
        stats = torch.zeros(len(keys), IMPORTANCE_BINS) if not state or "timestep_stats" not in state else state["timestep_stats"]
        stats = stats.to(device, torch.float32).clone()

    # 3. Denoising steps. Each image's timestep, noise and latent draw are keyed by (image, step).
    #    "own": one optimiser step per step, loss = sum of per-image means, so each image's gradient
    #    is its own (a NaN stays in its image: the caller retries it at a lower lr). "group": the
    #    official loop, one optimiser step per slice, loss = the slice's mean.
    running, counted = torch.zeros(len(keys), device=device), 0
    for step in range(start_step, config.steps):
        for param_group in opt.param_groups:
            param_group["lr"] = config.lr * lr_factor(step, config.steps, config.lr_schedule, config.warmup)
        proposal = timestep_proposal(stats) if pilot and step >= pilot else None  # None: uniform (no weights)
        for rows in slices:
            own = rows is None
            step_keys = keys if own else keys[rows]
            if groups is not None:  # a class token trains on one of its images, drawn by its key
                step_moments = groups.draw(moments, keys, step)
            else:
                step_moments = moments if own else LatentMoments(moments.mean[rows], moments.std[rows])
            step_proposal = proposal if own or proposal is None else proposal[rows]
            x0, noise, t = training_draws(step_keys, step, step_moments, backbone.num_train_timesteps,
                                          config.latent == "sample", config.timesteps, config.draws, step_proposal)
            a = backbone.alphas_cumprod[t]
            pred = backbone.predict_noise(q_sample(x0, noise, a), t, emb if own else emb[rows])
            losses = per_image_loss(pred, denoising_target(x0, noise, a, backbone.prediction_type))
            weighted = losses if step_proposal is None else losses * importance_weights(t, step_proposal, backbone.num_train_timesteps)
            opt.zero_grad(set_to_none=True)
            (weighted.sum() if own else weighted.mean()).backward()
            if pilot and step < pilot:  # the pilot: this step's gradient norm^2 in its timestep's bin
                grad = emb.grad if own else emb.grad[rows]
                where = torch.arange(len(keys), device=device) if own else rows
                stats.index_put_((where, timestep_bins(t, backbone.num_train_timesteps)), grad.pow(2).flatten(1).sum(1),
                                 accumulate=True)
            opt.step()
            if own:
                running += losses.detach()
            else:
                running[rows] += losses.detach()
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
            checkpoint(done, {"embeddings": emb.detach(), **({"timestep_stats": stats} if pilot else {})}, opt)
        if on_step is not None:
            on_step(done, mean_loss)

    # 5. Final deterministic evaluation, same draws as the initial one.
    loss_final = _evaluate(backbone, moments.mean, emb.detach(), keys, groups, config.eval_timesteps)
    return emb.detach().float().cpu(), loss_init.cpu(), loss_final.cpu()


StreamCheckpoint = Callable[[int, dict[str, torch.Tensor], dict], None]  # (iteration, tensors, meta)
STREAM_WAITING, STREAM_ACTIVE, STREAM_DONE = 0, 1, 2  # an image's status in invert_stream (and its checkpoint meta)


@dataclass
class Streamed:
    """What :func:`invert_stream` returns: per image [N] its best checked embedding, losses and steps taken."""

    embeddings: torch.Tensor  # [N, K, D] float32, CPU
    loss_init: torch.Tensor
    loss_final: torch.Tensor
    steps: list[int]


def invert_stream(backbone: Backbone, pixels: torch.Tensor | LatentMoments, keys: torch.Tensor, config: InvertConfig, *,
                  slots: int, resume_from: tuple[dict[str, torch.Tensor], dict] | None = None,
                  checkpoint: StreamCheckpoint | None = None,
                  on_step: Callable[[int, float | None, int], None] | None = None,
                  init: torch.Tensor | None = None) -> Streamed:
    """Per-image early stopping with refill: at most ``slots`` of the N images are optimised at once.

    pixels [N, 3, R, R] (or their latent moments) and keys [N] as for :func:`invert_batch`. Every
    ``config.check_every`` of its own steps an image's evaluation loss is measured; after
    ``config.patience`` checks in a row (past its warm-up) that did not lower its best by the
    fraction ``config.early_stop``, or at ``config.steps``, the image is finished (its best checked
    embedding is kept) and the next waiting image takes its slot, so the batch stays full. Each image has its own step count, learning-rate schedule, AdamW moments
    and bias correction, and its draws are keyed by (image, its step): its trajectory, stopping
    step and result are those it would have alone. An image whose checked loss is not finite is
    returned as NaN (the caller retries it). ``on_step(iteration, mean loss or None, image-steps
    done or skipped)``; ``checkpoint`` every ``config.checkpoint_every`` iterations, and
    ``resume_from`` the (tensors, meta) it saved.
    """
    device = backbone.device
    keys = keys.to(device)
    n = len(keys)
    tol, every = config.early_stop, config.check_every
    warm = min(config.warmup, config.steps // 10)  # no image stops while its learning rate is still rising

    # 1. Encode every image once.
    moments = pixels if isinstance(pixels, LatentMoments) else _encode_in_slices(backbone, pixels)

    # 2. Per-image state: embedding, AdamW moments, best checked embedding and loss, own step, status.
    init = (_keyed_start(backbone, keys, config) if init is None else init).to(device, torch.float32)
    loss_init = evaluation_loss(backbone, moments.mean, init, keys, config.eval_timesteps)
    WAITING, ACTIVE, DONE = STREAM_WAITING, STREAM_ACTIVE, STREAM_DONE
    pilot = pilot_steps(config.timesteps, config.draws)  # importance-sampled timesteps: see invert_batch
    stats = torch.zeros(n, IMPORTANCE_BINS, device=device)
    if resume_from is None:
        emb, m, v, best_emb = init.clone(), torch.zeros_like(init), torch.zeros_like(init), init.clone()
        steps, best, stale, status, iteration = [0] * n, loss_init.tolist(), [0] * n, [WAITING] * n, 0
    else:
        tensors, meta = resume_from
        emb, m, v, best_emb = (tensors[k].to(device, torch.float32).clone() for k in ("embeddings", "exp_avg", "exp_avg_sq", "best"))
        if "timestep_stats" in tensors:
            stats = tensors["timestep_stats"].to(device, torch.float32).clone()
        steps, best, stale, status = list(meta["steps"]), list(meta["best_loss"]), list(meta["stale"]), list(meta["status"])
        iteration = int(meta["iteration"])
    running, counted = 0.0, 0

    while True:
        # 3. Refill: the waiting images, in order, take the free slots.
        active = [i for i in range(n) if status[i] == ACTIVE]
        for i in range(n):
            if len(active) >= slots:
                break
            if status[i] == WAITING:
                status[i] = ACTIVE
                active.append(i)
        if not active:
            break
        order = sorted(active)  # host-side lists: indexing them costs no device sync
        rows = torch.tensor(order, device=device)
        own_steps = torch.tensor([steps[i] for i in order], device=device)

        # 4. One gradient per active image at its own step, one AdamW update with its own bias correction.
        lr = torch.tensor([config.lr * lr_factor(steps[i], config.steps, config.lr_schedule, config.warmup) for i in order],
                          device=device)
        proposal = None
        if pilot:  # uniform (weights 1) for an image still in its pilot steps
            proposal = torch.where((own_steps >= pilot)[:, None], timestep_proposal(stats[rows]), 1.0 / IMPORTANCE_BINS)
        x0, noise, t = training_draws(keys[rows], own_steps, LatentMoments(moments.mean[rows], moments.std[rows]),
                                      backbone.num_train_timesteps, config.latent == "sample", config.timesteps, config.draws,
                                      proposal)
        a = backbone.alphas_cumprod[t]
        cond = emb[rows].requires_grad_()
        losses = per_image_loss(backbone.predict_noise(q_sample(x0, noise, a), t, cond),
                                denoising_target(x0, noise, a, backbone.prediction_type))
        weighted = losses if proposal is None else losses * importance_weights(t, proposal, backbone.num_train_timesteps)
        (grad,) = torch.autograd.grad(weighted.sum(), cond)
        if pilot:  # images past their pilot add 0 (a mask, not a selection: no device sync)
            in_pilot = (own_steps < pilot).to(grad)
            stats.index_put_((rows, timestep_bins(t, backbone.num_train_timesteps)), grad.pow(2).flatten(1).sum(1) * in_pilot,
                             accumulate=True)
        emb[rows], m[rows], v[rows] = adamw_rows(cond.detach(), grad, m[rows], v[rows], own_steps + 1, lr, config.weight_decay)
        for i in order:
            steps[i] += 1
        iteration += 1
        advanced = len(order)

        # 5. Checks: an image at a multiple of check_every (or its last step) is evaluated on the fixed draws.
        due = [i for i in order if steps[i] % every == 0 or steps[i] >= config.steps]
        if due:
            d = torch.tensor(due, device=device)
            checked = evaluation_loss(backbone, moments.mean[d], emb[d], keys[d], config.eval_timesteps).tolist()
            for j, i in enumerate(due):
                loss = checked[j]
                if not math.isfinite(loss):  # failed: NaN out, so the caller retries it at a lower lr
                    best[i], best_emb[i] = float("nan"), float("nan")
                    status[i] = DONE
                    continue
                stale[i] = 0 if loss < best[i] * (1 - tol) or steps[i] <= warm else stale[i] + 1
                if loss < best[i]:
                    best[i], best_emb[i] = loss, emb[i]
                if stale[i] >= config.patience or steps[i] >= config.steps:
                    status[i] = DONE
                    advanced += config.steps - steps[i]  # the steps it did not need
        running, counted = running + losses.detach().mean(), counted + 1

        if checkpoint is not None and iteration % config.checkpoint_every == 0 and any(s != DONE for s in status):
            checkpoint(iteration, {"embeddings": emb, "exp_avg": m, "exp_avg_sq": v, "best": best_emb, "timestep_stats": stats},
                       {"steps": steps, "best_loss": best, "stale": stale, "status": status, "iteration": iteration})
        if on_step is not None:
            report = None
            if iteration % config.log_every == 0:  # the only host sync besides the checks
                report, running, counted = float(running) / counted, 0.0, 0
            on_step(iteration, report, advanced)

    return Streamed(best_emb.float().cpu(), loss_init.cpu(), torch.tensor(best, dtype=torch.float32), steps)


def _keyed_start(backbone: Backbone, keys: torch.Tensor, config: InvertConfig) -> torch.Tensor:
    """Each image's keyed random start [B, K, D]: N(0, init_std^2), or the official nn.Linear start U(+-1/sqrt(group size))."""
    uniform = config.init == "uniform"
    return init_embeddings(keys, config.tokens + backbone.extra_tokens, backbone.cond_dim,
                           config.group_size ** -0.5 if uniform else config.init_std, "uniform" if uniform else "normal")


def update_slices(n: int, config: InvertConfig) -> list[torch.Tensor | None]:
    """The optimiser steps of one step of n images: [None] (all at once), or the group pattern's batches in order."""
    if config.update == "own":
        return [None]
    return [torch.arange(i, min(i + config.group_batch, n)) for i in range(0, n, config.group_batch)]


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


@dataclass
class Inverted:
    """A batch's result: embeddings [B, K, D] (CPU, float32), initial and final evaluation losses [B], each item's lr and steps."""

    embeddings: torch.Tensor
    loss_init: torch.Tensor
    loss_final: torch.Tensor
    lrs: list[float]
    steps: list[int]

    def finite(self, j: int) -> bool:
        return bool(torch.isfinite(self.embeddings[j]).all()) and bool(torch.isfinite(self.loss_final[j]))


def invert_items(backbone: Backbone, inputs: torch.Tensor | LatentMoments, keys: torch.Tensor, config: InvertConfig, *,
                 owners: torch.Tensor | None = None, init: torch.Tensor | None = None,
                 log: Callable[[str], None] = print, what: str = "batch", **resume) -> Inverted:
    """:func:`invert_batch`, then the items whose loss is not finite again at lr/10, lr/100 ... (``nan_retries`` times).

    ``resume`` passes ``state``, ``start_step``, ``checkpoint`` and ``on_step`` to the first run only
    (with ``config.early_stop``: ``slots``, ``resume_from``, ``checkpoint`` and ``on_step`` of :func:`invert_stream`).
    """
    if config.early_stop:
        slots = resume.pop("slots", len(keys))
        first = invert_stream(backbone, inputs, keys, config, slots=slots, init=init, **resume)
        result = Inverted(first.embeddings, first.loss_init, first.loss_final, [config.lr] * len(keys), first.steps)
    else:
        emb, loss_init, loss_final = invert_batch(backbone, inputs, keys, config, owners=owners, init=init, **resume)
        result = Inverted(emb, loss_init, loss_final, [config.lr] * len(keys), [config.steps] * len(keys))
    for attempt in range(1, config.nan_retries + 1):
        bad = [j for j in range(len(keys)) if not result.finite(j)]
        if not bad:
            break
        lr = config.lr * 0.1**attempt
        log(f"{len(bad)} item(s) of {what} had a non-finite loss at lr {result.lrs[bad[0]]:g}; retrying at lr {lr:g}")
        # One image's trajectory does not depend on its batch-mates, so the retry takes only the failed ones
        # (a class batch is retried whole: its images are laid out by owner).
        # So is a group of the official update pattern: its images share one optimiser.
        sel = bad if owners is None and config.update == "own" else list(range(len(keys)))
        again = dict(pixels=inputs[sel] if owners is None else inputs, keys=keys[sel], config=replace(config, lr=lr),
                     init=None if init is None else init[sel])
        if config.early_stop:
            retry = invert_stream(backbone, slots=slots, **again)
            retry = (retry.embeddings, retry.loss_init, retry.loss_final, retry.steps)
        else:
            retry = (*invert_batch(backbone, owners=owners, **again), [config.steps] * len(sel))
        for r, j in enumerate(sel):
            result.embeddings[j], result.loss_init[j], result.loss_final[j] = retry[0][r], retry[1][r], retry[2][r]
            result.lrs[j], result.steps[j] = lr, retry[3][r]
    return result


def encode_images(backbone: Backbone, images: LabelledImages, resolution: int, slice_size: int = 64) -> LatentMoments:
    """Latent moments [N, C, h, w] of many images, loading their pixels one slice at a time."""
    parts = [backbone.encode(load_pixels(images.subset(range(i, min(i + slice_size, len(images)))), resolution))
             for i in range(0, len(images), slice_size)]
    return LatentMoments(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))
