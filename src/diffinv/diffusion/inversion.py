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
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from diffinv import rng
from diffinv.data.real import LabelledImages, load_pixels
from diffinv.diffusion.backbone import Backbone, LatentMoments
from diffinv.diffusion.objective import (
    IMPORTANCE_BINS,
    adamw_rows,
    denoising_losses,
    evaluation_loss,
    importance_weights,
    init_embeddings,
    pilot_steps,
    timestep_bins,
    timestep_proposal,
    training_draws,
)
from diffinv.errors import UserError
from diffinv.schedule import lr_factor

Checkpoint = Callable[[int, dict[str, torch.Tensor], dict], None]  # (iteration, tensors, meta), see _State
OnStep = Callable[[int, "float | None", int], None]  # (iteration, mean loss at a log step else None, image-steps done or skipped)
WAITING, ACTIVE, DONE = 0, 1, 2  # an image's status (kept in the checkpoint's meta)


class InversionError(UserError, RuntimeError):
    """Inversion cannot go on (e.g. the loss is not finite); the message says what to try."""


@dataclass(frozen=True)
class InversionSettings:
    """What the inversion loop reads; :meth:`of` takes these fields from any object that has them (a stage's config)."""

    steps: int = 300
    lr: float = 0.3
    weight_decay: float = 1e-2
    lr_schedule: str = "cosine"
    warmup: int = 10
    timesteps: str = "importance"
    draws: str = "antithetic"
    latent: str = "sample"
    tokens: int = 5
    init: str = "random"
    init_std: float = 1.0
    update: str = "own"
    group_size: int = 100
    group_batch: int = 50
    early_stop: float = 0.0
    check_every: int = 25
    patience: int = 2
    eval_timesteps: int = 8
    log_every: int = 25
    checkpoint_every: int = 200
    nan_retries: int = 2

    @classmethod
    def of(cls, source: object) -> InversionSettings:
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})


class Inverted(NamedTuple):
    """Per item [B]: its embedding [K, D] (CPU, float32), initial and final evaluation losses, steps taken."""

    embeddings: torch.Tensor
    loss_init: torch.Tensor
    loss_final: torch.Tensor
    steps: list[int]


def invert_batch(backbone: Backbone, pixels: torch.Tensor | LatentMoments, keys: torch.Tensor, settings: InversionSettings, *,
                 owners: torch.Tensor | None = None, slots: int | None = None, init: torch.Tensor | None = None,
                 resume_from: tuple[dict[str, torch.Tensor], dict] | None = None, checkpoint: Checkpoint | None = None,
                 on_step: OnStep | None = None) -> Inverted:
    """Optimise one conditioning per image of a batch (or, with ``owners``, one per group of images).

    pixels [N, 3, R, R] in [-1, 1], or their latent moments; keys [B] from :func:`rng.keys_tensor`,
    one per conditioning. Without ``owners``, N = B and conditioning b belongs to image b. With
    ``owners`` [N] (sorted, values 0..B-1), conditioning b is shared by the images it owns and
    each step trains it on one of them, drawn by its key (textual inversion's class token). ``init``
    [B, K, D] replaces the keyed random start (e.g. the base's encoder tokens); ``resume_from`` is
    what ``checkpoint`` was given. With ``update == "group"`` the batch is one group of the official
    loop's pattern (see :func:`update_slices`).

    Each image has its own step, learning rate, AdamW moments and bias correction, and its draws
    are keyed by (image, its step), so its trajectory is the one it would have alone. With
    ``early_stop``, at most ``slots`` images are optimised at once: every ``check_every`` of its
    steps an image's evaluation loss is measured, and after ``patience`` checks in a row (past
    its warm-up) that did not lower its best by that fraction it is finished (its best checked
    embedding is kept) and the next waiting image takes its slot.
    """
    s, device = settings, backbone.device
    keys = keys.to(device)

    # 1. Encode every image once; the paper re-encodes it at every step.
    moments = pixels if isinstance(pixels, LatentMoments) else _encode_in_slices(backbone, pixels)
    groups = _Groups(owners.to(device), len(keys)) if owners is not None else None

    # 2. Starting point: the keyed (or given) start, or the checkpoint's embeddings, moments and steps.
    init = (_keyed_start(backbone, keys, s) if init is None else init).to(device, torch.float32)
    loss_init = _evaluate(backbone, moments.mean, init, keys, groups, s.eval_timesteps)
    state = _State.start(init, loss_init, s.steps) if resume_from is None else _State.resume(*resume_from, device)
    slots = slots if s.early_stop and slots else len(keys)
    running = torch.zeros(len(keys), device=device)

    while True:
        # 3. Refill: waiting images, in order, take the free slots (all are active without early stopping).
        rows = state.refill(slots)
        if not rows:
            break

        # 4. One gradient per active image at its own step (per slice of the group pattern), then AdamW.
        losses = _train_step(backbone, moments, keys, groups, state, rows, s)
        if len(rows) == len(keys):  # the common path indexes nothing (no index copied to the device)
            running += losses
        else:
            running[rows] += losses
        advanced = len(rows)

        # 5. Early stopping: checks on the fixed evaluation draws; else an image is done at ``steps``.
        advanced += _check(backbone, moments.mean, keys, state, rows, s) if s.early_stop else 0
        for i in rows:
            if state.steps[i] >= s.steps:
                state.status[i] = DONE
        state.iteration += 1

        # 6. Host syncs only every log_every iterations: the progress bar, and a stop once every image has failed.
        mean_loss = None
        if state.iteration % s.log_every == 0 or all(st == DONE for st in state.status):
            finite = torch.isfinite(running[rows])
            if not s.early_stop and not bool(finite.any()):
                break  # the caller retries or reports them
            mean_loss = (running[rows][finite] / state.since_log).mean().item() if bool(finite.any()) else None
            running.zero_()
            state.since_log = 0
        state.since_log += 1
        if checkpoint is not None and state.iteration % s.checkpoint_every == 0 and any(st != DONE for st in state.status):
            checkpoint(state.iteration, *state.saved(s.early_stop))
        if on_step is not None:
            on_step(state.iteration, mean_loss, advanced)

    # 7. Final deterministic evaluation, same draws as the initial one (with early stopping: each best checked one).
    if s.early_stop:
        return Inverted(state.best_emb.float().cpu(), loss_init.cpu(), torch.tensor(state.best, dtype=torch.float32),
                        state.steps)
    loss_final = _evaluate(backbone, moments.mean, state.emb, keys, groups, s.eval_timesteps)
    return Inverted(state.emb.float().cpu(), loss_init.cpu(), loss_final.cpu(), state.steps)


@dataclass
class _State:
    """The loop's per-image state: tensors on the device, counters and statuses on the host (no device syncs)."""

    emb: torch.Tensor  # [B, K, D] float32
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    best_emb: torch.Tensor  # early stopping: the best checked embedding
    stats: torch.Tensor  # [B, IMPORTANCE_BINS] pilot gradients' second moments (importance-sampled timesteps)
    steps: list[int]  # gradients taken
    updates: list[int]  # AdamW updates taken (the group pattern makes several per step)
    best: list[float]
    stale: list[int]
    status: list[int]
    iteration: int = 0
    since_log: int = 1  # iterations in the progress bar's running loss (not checkpointed: it restarts on resume)

    @classmethod
    def start(cls, init: torch.Tensor, loss_init: torch.Tensor, steps: int) -> _State:
        n = len(init)
        return cls(init.clone(), torch.zeros_like(init), torch.zeros_like(init), init.clone(),
                   torch.zeros(n, IMPORTANCE_BINS, device=init.device), [0] * n, [0] * n, loss_init.tolist(), [0] * n,
                   [WAITING if steps > 0 else DONE] * n)  # 0 steps: the start is kept as it is

    @classmethod
    def resume(cls, tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> _State:
        t = {k: v.to(device, torch.float32).clone() for k, v in tensors.items()}
        return cls(t["embeddings"], t["exp_avg"], t["exp_avg_sq"], t.get("best", t["embeddings"].clone()), t["timestep_stats"],
                   list(meta["steps"]), list(meta["updates"]), list(meta["best_loss"]), list(meta["stale"]),
                   list(meta["status"]), int(meta["iteration"]))

    def saved(self, early_stop: float) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"embeddings": self.emb, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "timestep_stats": self.stats,
                   **({"best": self.best_emb} if early_stop else {})}
        meta = {"steps": self.steps, "updates": self.updates, "best_loss": self.best, "stale": self.stale, "status": self.status,
                "iteration": self.iteration}
        return tensors, meta

    def refill(self, slots: int) -> list[int]:
        active = [i for i, st in enumerate(self.status) if st == ACTIVE]
        for i, st in enumerate(self.status):
            if len(active) >= slots:
                break
            if st == WAITING:
                self.status[i] = ACTIVE
                active.append(i)
        return sorted(active)


def _train_step(backbone: Backbone, moments: LatentMoments, keys: torch.Tensor, groups: _Groups | None, state: _State,
                rows: list[int], s: InversionSettings) -> torch.Tensor:
    """One step of the active rows: per slice, the keyed draws, the loss's gradient, an AdamW update. Returns losses [len(rows)].

    "own": one slice, loss = sum of per-image losses, so each image's gradient is its own (a NaN
    stays in its image). "group": the official loop, one update per slice, loss = the slice's
    mean, and AdamW moves every image of the group at each update (its momentum and decay).
    When every image is active at one step (no early stopping) nothing is copied to the device.
    """
    # 1. The active rows (idx None: all of them), their steps, learning rates and timestep proposal.
    device = keys.device
    idx = None if len(rows) == len(keys) else torch.tensor(rows, device=device)
    own_steps = [state.steps[i] for i in rows]
    step = own_steps[0] if len(set(own_steps)) == 1 else torch.tensor(own_steps, device=device)
    lrs = [s.lr * lr_factor(k, s.steps, s.lr_schedule, warm_up(s)) for k in own_steps]
    pilot = pilot_steps(s.timesteps, s.draws)
    in_pilot = torch.tensor([k < pilot for k in own_steps], device=device) if pilot and min(own_steps) < pilot <= max(own_steps) else None
    proposal = _proposal(_at(state.stats, idx), pilot, max(own_steps), in_pilot)
    emb, exp_avg, exp_avg_sq = _at(state.emb, idx), _at(state.exp_avg, idx), _at(state.exp_avg_sq, idx)
    losses = torch.zeros(len(rows), device=device)

    # 2. One AdamW update per slice ("own": one slice of every row); the pilot's gradient statistics on the way.
    for part in update_slices(len(rows), s):
        part = None if part is None else part.to(device)
        part_losses, grad, t = _slice_gradient(backbone, moments, keys, groups, idx, part, step, emb, proposal, s)
        if pilot and min(own_steps) < pilot:
            rows_of_keys = idx if idx is not None else torch.arange(len(keys), device=device)
            _record_pilot(state.stats, grad, t, _at(rows_of_keys, part), None if in_pilot is None else _at(in_pilot, part),
                          backbone.num_train_timesteps)
        if part is not None:  # the whole group moves at each update, with zero gradient outside the slice
            grad = torch.zeros_like(emb).index_copy_(0, part, grad)
            losses = losses.index_copy(0, part, part_losses.detach())
        else:
            losses = part_losses.detach()
        for i in rows:
            state.updates[i] += 1
        emb, exp_avg, exp_avg_sq = adamw_rows(emb, grad, exp_avg, exp_avg_sq, [state.updates[i] for i in rows], lrs,
                                              s.weight_decay)

    # 3. The rows back into the state, one step further.
    if idx is None:
        state.emb, state.exp_avg, state.exp_avg_sq = emb, exp_avg, exp_avg_sq
    else:
        state.emb[idx], state.exp_avg[idx], state.exp_avg_sq[idx] = emb, exp_avg, exp_avg_sq
    for i in rows:
        state.steps[i] += 1
    return losses


def _at(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The rows ``index`` of x (all of them for None, without a copy)."""
    return x if index is None else x[index]


def _proposal(stats: torch.Tensor, pilot: int, latest: int, in_pilot: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's timestep proposal [R, bins] from its pilot's statistics; uniform for rows still in their pilot.
    None (uniform, no weights) while no row has finished its pilot."""
    if not pilot or latest < pilot:
        return None
    proposal = timestep_proposal(stats)
    return torch.where(in_pilot[:, None], 1.0 / IMPORTANCE_BINS, proposal) if in_pilot is not None else proposal


def _slice_gradient(backbone: Backbone, moments: LatentMoments, keys: torch.Tensor, groups: _Groups | None,
                    idx: torch.Tensor | None, part: torch.Tensor | None, step: int | torch.Tensor, emb: torch.Tensor,
                    proposal: torch.Tensor | None, s: InversionSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The denoising losses [P] of one slice's rows, the gradient of their sum ("own") or mean ("group") with respect to
    their conditionings [P, K, D], and the timesteps [P] drawn."""
    # 1. Keyed draws: the image (a group's member, or the row's own), its latent, noise and timestep.
    part_proposal = None if proposal is None else _at(proposal, part)
    step_moments = groups.draw(moments, keys, step) if groups is not None else LatentMoments(
        _at(_at(moments.mean, idx), part), _at(_at(moments.std, idx), part))
    x0, noise, t = training_draws(_at(_at(keys, idx), part), step if not torch.is_tensor(step) else _at(step, part), step_moments,
                                  backbone.num_train_timesteps, s.latent == "sample", s.timesteps, s.draws, part_proposal)
    # 2. The loss, importance-weighted where a proposal drew t, and its gradient.
    cond = _at(emb, part).detach().requires_grad_()
    losses = denoising_losses(backbone, x0, noise, t, cond)
    weighted = losses if part_proposal is None else losses * importance_weights(t, part_proposal, backbone.num_train_timesteps)
    (grad,) = torch.autograd.grad(weighted.sum() if part is None else weighted.mean(), cond)
    return losses, grad, t


def _record_pilot(stats: torch.Tensor, grad: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, in_pilot: torch.Tensor | None,
                  num_timesteps: int) -> None:
    """The pilot: add each gradient's norm^2 to its row's bin of its timestep (rows past their pilot add nothing)."""
    g2 = grad.pow(2).flatten(1).sum(1)
    g2 = g2 * in_pilot.to(g2) if in_pilot is not None else g2
    stats.index_put_((rows, timestep_bins(t, num_timesteps)), g2, accumulate=True)


def _check(backbone: Backbone, latents: torch.Tensor, keys: torch.Tensor, state: _State, rows: list[int],
           s: InversionSettings) -> int:
    """Early stopping: evaluate the images at a multiple of check_every (or their last step); returns the steps skipped."""
    warm = warm_up(s)  # no image stops while its learning rate is still rising
    due = [i for i in rows if state.steps[i] % s.check_every == 0 or state.steps[i] >= s.steps]
    if not due:
        return 0
    d = torch.tensor(due, device=keys.device)
    checked = evaluation_loss(backbone, latents[d], state.emb[d], keys[d], s.eval_timesteps).tolist()
    skipped = 0
    for i, loss in zip(due, checked):
        if not math.isfinite(loss):  # failed: NaN out, so the caller retries it at a lower lr
            state.best[i], state.best_emb[i], state.status[i] = float("nan"), float("nan"), DONE
            continue
        state.stale[i] = 0 if loss < state.best[i] * (1 - s.early_stop) or state.steps[i] <= warm else state.stale[i] + 1
        if loss < state.best[i]:
            state.best[i], state.best_emb[i] = loss, state.emb[i]
        if state.stale[i] >= s.patience and state.steps[i] < s.steps:
            state.status[i] = DONE
            skipped += s.steps - state.steps[i]  # the steps it did not need
    return skipped


def _keyed_start(backbone: Backbone, keys: torch.Tensor, s: InversionSettings) -> torch.Tensor:
    """Each image's keyed random start [B, K, D]: N(0, init_std^2), or the official nn.Linear start U(+-1/sqrt(group size))."""
    uniform = s.init == "uniform"
    return init_embeddings(keys, s.tokens + backbone.extra_tokens, backbone.cond_dim,
                           s.group_size ** -0.5 if uniform else s.init_std, "uniform" if uniform else "normal")


def warm_up(s: InversionSettings) -> int:
    """An image's warm-up steps: at most a tenth of its steps (a short run is not all warm-up)."""
    return min(s.warmup, s.steps // 10)


def update_slices(n: int, s: InversionSettings) -> list[torch.Tensor | None]:
    """The optimiser steps of one step of n images: [None] (all at once), or the group pattern's batches in order."""
    if s.update == "own":
        return [None]
    return [torch.arange(i, min(i + s.group_batch, n)) for i in range(0, n, s.group_batch)]


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

    def draw(self, moments: LatentMoments, keys: torch.Tensor, step: int | torch.Tensor) -> LatentMoments:
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
class Retried:
    """:func:`invert_items`'s result: embeddings [B, K, D] (CPU, float32), initial and final evaluation losses [B],
    each item's lr and steps."""

    embeddings: torch.Tensor
    loss_init: torch.Tensor
    loss_final: torch.Tensor
    lrs: list[float]
    steps: list[int]

    def finite(self, j: int) -> bool:
        return bool(torch.isfinite(self.embeddings[j]).all()) and bool(torch.isfinite(self.loss_final[j]))

    def first(self, n: int) -> Retried:
        return Retried(self.embeddings[:n], self.loss_init[:n], self.loss_final[:n], self.lrs[:n], self.steps[:n])


def padded(settings: InversionSettings, n: int, pad_to: int | None, owners: torch.Tensor | None) -> int:
    """How many rows a batch of ``n`` runs as: ``pad_to`` where padding changes no result (every row its own
    optimiser, all in lock-step: no group pattern, no class batch, no early stopping), else ``n``."""
    independent = owners is None and settings.update == "own" and not settings.early_stop
    return max(n, pad_to) if pad_to and independent else n


def invert_items(backbone: Backbone, inputs: torch.Tensor | LatentMoments, keys: torch.Tensor, settings: InversionSettings, *,
                 owners: torch.Tensor | None = None, init: torch.Tensor | None = None, pad_to: int | None = None,
                 log: Callable[[str], None] = print, what: str = "batch", **resume) -> Retried:
    """:func:`invert_batch`, then the items whose loss is not finite again at lr/10, lr/100 ... (``nan_retries`` times).

    ``resume`` passes ``slots``, ``resume_from``, ``checkpoint`` and ``on_step`` to the first run only. ``pad_to``:
    a shorter batch runs with copies of its last row up to that size (see :func:`padded`), so a compiled UNet sees one
    shape through a run; the copies are dropped.
    """
    n = len(keys)
    size = padded(settings, n, pad_to, owners)
    if size > n:
        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
        inputs = LatentMoments(pad(inputs.mean), pad(inputs.std)) if isinstance(inputs, LatentMoments) else pad(inputs)
        return invert_items(backbone, inputs, pad(keys), settings, init=None if init is None else pad(init), log=log, what=what,
                            **resume).first(n)
    slots = resume.get("slots")
    first = invert_batch(backbone, inputs, keys, settings, owners=owners, init=init, **resume)
    result = Retried(first.embeddings, first.loss_init, first.loss_final, [settings.lr] * len(keys), list(first.steps))
    for attempt in range(1, settings.nan_retries + 1):
        bad = [j for j in range(len(keys)) if not result.finite(j)]
        if not bad:
            break
        lr = settings.lr * 0.1**attempt
        log(f"{len(bad)} item(s) of {what} had a non-finite loss at lr {result.lrs[bad[0]]:g}; retrying at lr {lr:g}")
        # One image's trajectory does not depend on its batch-mates, so the retry takes only the failed ones;
        # a class batch (its images laid out by owner) and a group of the official pattern (one optimiser) whole.
        sel = bad if owners is None and settings.update == "own" else list(range(len(keys)))
        retry = invert_batch(backbone, _select(inputs, sel) if owners is None else inputs, keys[sel], replace(settings, lr=lr),
                             owners=owners, slots=slots, init=None if init is None else init[sel])
        for r, j in enumerate(sel):
            result.embeddings[j], result.loss_init[j], result.loss_final[j] = retry.embeddings[r], retry.loss_init[r], retry.loss_final[r]
            result.lrs[j], result.steps[j] = lr, retry.steps[r]
    return result


def _select(inputs: torch.Tensor | LatentMoments, rows: list[int]) -> torch.Tensor | LatentMoments:
    """The given rows of a batch's pixels or latent moments."""
    if isinstance(inputs, LatentMoments):
        return LatentMoments(inputs.mean[rows], inputs.std[rows])
    return inputs[rows]


def encode_images(backbone: Backbone, images: LabelledImages, resolution: int, slice_size: int = 64) -> LatentMoments:
    """Latent moments [N, C, h, w] of many images, loading their pixels one slice at a time."""
    parts = [backbone.encode(load_pixels(images.subset(range(i, min(i + slice_size, len(images)))), resolution))
             for i in range(0, len(images), slice_size)]
    return LatentMoments(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))
