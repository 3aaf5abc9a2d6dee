"""The denoising objective as pure tensor functions: losses, keyed draws, timestep proposals.

Shared by inversion (which optimises the conditioning), LoRA fitting and pretraining (which optimise
the network); how noise is added and what the network predicts is the model's noise process
(:mod:`~diffinv.diffusion.process`). Nothing here knows about files, configs or stages.
"""

from __future__ import annotations

import torch

from diffinv import rng
from diffinv.diffusion.backbone import Backbone, LatentMoments


def per_image_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image: [B, ...] x2 -> [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def denoising_losses(backbone: Backbone, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                     cond: torch.Tensor) -> torch.Tensor:
    """The denoising loss [B] of the network under ``cond`` [B, K, D]: clean x0 and noise [B, C, h, w] at schedule
    positions t [B], noised and targeted as the model's noise process says. Differentiable w.r.t. ``cond``."""
    process = backbone.process
    pred = backbone.predict(process.add_noise(x0, noise, t), process.model_time(t), cond)
    return per_image_loss(pred, process.target(x0, noise, t))


def init_embeddings(keys: torch.Tensor, tokens: int, dim: int, std: float, dist: str = "normal") -> torch.Tensor:
    """Keyed starting point [B, K, D] for each image's conditioning.

    ``normal``: N(0, std^2). ``uniform``: U(-std, std), which with std = 1/sqrt(n) is the
    official code's start (its embeddings are the columns of an ``nn.Linear(n, K*D)`` with
    PyTorch's default init, n images per group).
    """
    if dist == "uniform":
        return (rng.keyed_uniform(keys, 0, rng.STREAM_INIT, (tokens, dim)) * 2 - 1) * std
    return rng.keyed_normal(keys, 0, rng.STREAM_INIT, (tokens, dim)) * std


# The golden ratio's fractional part: t_s = frac(u + s * PHI) covers [0, 1) evenly for every run
# of consecutive steps s (a Kronecker sequence), so an image's timesteps are stratified without
# knowing the total step count, and each step's draw is still a function of (key, step) alone.
_PHI = 0.6180339887498949


# Importance-sampled timesteps (``timesteps="importance"``). Most of an inversion gradient is noise
# the conditioning cannot explain, and how much depends steeply on the timestep: on our bases the
# gradient's second moment falls 60-240x from the lowest tenth of the schedule to the highest
# (benchmarks/timestep_profile.py). Sampling t with probability proportional to the root of that
# second moment, and weighting each loss by (uniform / proposal) so that its expectation is
# unchanged, is the variance-minimising proposal. Each image measures its own profile in its first
# IMPORTANCE_BINS draws (one per tenth of the schedule, in a keyed order; these are ordinary steps
# with weight 1) and keeps IMPORTANCE_FLOOR of the proposal uniform, which bounds every weight by
# 1 / IMPORTANCE_FLOOR.
IMPORTANCE_BINS = 10
IMPORTANCE_FLOOR = 0.1


def timestep_bin_edges(num_timesteps: int, bins: int = IMPORTANCE_BINS) -> torch.Tensor:
    """Integer edges [bins + 1] of equal parts of the schedule: bin k holds edges[k] <= t < edges[k + 1]."""
    return torch.tensor([-(-k * num_timesteps // bins) for k in range(bins + 1)])


def timestep_bins(t: torch.Tensor, num_timesteps: int, bins: int = IMPORTANCE_BINS) -> torch.Tensor:
    """Which bin [B] each timestep t [B] falls in."""
    edges = timestep_bin_edges(num_timesteps, bins).to(t.device)
    return torch.searchsorted(edges, t.contiguous(), right=True) - 1


def timestep_proposal(stats: torch.Tensor, floor: float = IMPORTANCE_FLOOR) -> torch.Tensor:
    """Each image's proposal [B, bins] over timestep bins from its pilot gradients' second moments stats [B, bins].

    Proportional to sqrt(stats), mixed with ``floor`` of uniform; uniform for an image whose stats
    are all zero (no pilot yet).
    """
    shape = stats.float().clamp_min(0).sqrt()
    total = shape.sum(1, keepdim=True)
    shape = torch.where(total > 0, shape / total.clamp_min(torch.finfo(shape.dtype).tiny), 1.0 / stats.shape[1])
    return (1 - floor) * shape + floor / stats.shape[1]


def importance_weights(t: torch.Tensor, proposal: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Loss weight [B] of timesteps t [B] drawn from ``proposal`` [B, bins]: uniform density / proposal density.

    A loss times its weight has the expectation it has under uniform timesteps; 1 everywhere when
    the proposal is uniform (as during an image's pilot draws).
    """
    bins = proposal.shape[1]
    edges = timestep_bin_edges(num_timesteps, bins).to(t.device)
    b = torch.searchsorted(edges, t.contiguous(), right=True) - 1  # timestep_bins, without rebuilding the edges
    width = (edges[1:] - edges[:-1]).to(proposal)[b]
    return width / (num_timesteps * proposal.gather(1, b[:, None])[:, 0])


def _importance_timesteps(keys: torch.Tensor, draw: int | torch.Tensor, num_timesteps: int, proposal: torch.Tensor,
                          u: torch.Tensor) -> torch.Tensor:
    """Draws 0..bins-1 visit each bin once in a keyed order (the pilot); later ones invert the proposal's CDF at u [B]."""
    bins = proposal.shape[1]
    edges = timestep_bin_edges(num_timesteps, bins).to(proposal.device)
    draw = torch.as_tensor(draw, device=keys.device).expand(len(keys))
    order = torch.argsort(rng.keyed_uniform(keys, 0, rng.STREAM_TIMESTEP_PILOT, (bins,)), dim=1)  # [B, bins]
    pilot_bin = order.gather(1, draw.clamp(max=bins - 1)[:, None])[:, 0]
    inner = rng.keyed_uniform(keys, draw + 1, rng.STREAM_TIMESTEP_PILOT, (1,))[:, 0].double()  # where in the pilot's bin
    cdf = torch.cat([torch.zeros(len(keys), 1, device=proposal.device), proposal.double().cumsum(1)], 1)
    cdf = cdf / cdf[:, -1:]
    later_bin = (torch.searchsorted(cdf[:, 1:-1].contiguous(), u[:, None].double(), right=True)[:, 0]).clamp(max=bins - 1)
    lo = cdf.gather(1, later_bin[:, None])[:, 0]
    width = cdf.gather(1, later_bin[:, None] + 1)[:, 0] - lo
    later_frac = ((u.double() - lo) / width.clamp_min(1e-12)).clamp(0, 1)
    pilot = draw < bins
    b = torch.where(pilot, pilot_bin, later_bin)
    frac = torch.where(pilot, inner, later_frac)
    t = edges[b] + (frac * (edges[b + 1] - edges[b])).long()
    return torch.minimum(t, edges[b + 1] - 1)


def training_timesteps(keys: torch.Tensor, step: int | torch.Tensor, num_timesteps: int, mode: str = "uniform",
                       proposal: torch.Tensor | None = None) -> torch.Tensor:
    """Timestep [B] of each image at draw ``step``: i.i.d. uniform (the paper), ``stratified`` along the image's
    steps, or ``importance``: drawn from ``proposal`` [B, bins] (see :func:`timestep_proposal`) after a pilot
    of one draw per bin."""
    if mode == "uniform":
        return rng.keyed_randint(keys, step, rng.STREAM_TIMESTEP, num_timesteps)
    offset = rng.keyed_uniform(keys, 0, rng.STREAM_TIMESTEP, (1,))[:, 0].double()
    u = torch.frac(offset + (step.double() if torch.is_tensor(step) else step) * _PHI)
    if mode == "importance":
        if proposal is None:
            proposal = torch.ones(len(keys), IMPORTANCE_BINS, device=keys.device)
        return _importance_timesteps(keys, step, num_timesteps, proposal.to(keys.device), u)
    return (u * num_timesteps).long().clamp_(max=num_timesteps - 1)


def pilot_steps(timesteps: str, draws: str, bins: int = IMPORTANCE_BINS) -> int:
    """Steps an image spends measuring its timestep profile: one draw per bin (a pair of steps per draw if antithetic)."""
    if timesteps != "importance":
        return 0
    return bins * (2 if draws == "antithetic" else 1)


def training_draws(keys: torch.Tensor, step: int | torch.Tensor, moments: LatentMoments, num_timesteps: int,
                   sample_latent: bool, timesteps: str = "uniform", draws: str = "independent",
                   proposal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's random draws for each image: clean latent x0, noise [B, C, h, w], timestep t [B].

    ``step``: one int, or an int64 tensor [B] of each image's own step (per-image early stopping).
    ``proposal`` [B, bins]: the timestep proposal of ``timesteps="importance"``.
    ``draws="antithetic"``: steps 2k and 2k+1 share pair k's timestep and latent draw, and the odd
    step's noise is the even step's negated. The part of the gradient that is linear in the noise,
    which dominates when the conditioning cannot explain the noise, then cancels within a pair
    (and Adam's momentum spans many pairs); each step's loss keeps its expectation.
    """
    if draws == "antithetic":
        pair = step // 2
        x0, noise, t = training_draws(keys, pair, moments, num_timesteps, sample_latent, timesteps, proposal=proposal)
        if not torch.is_tensor(step):
            return x0, -noise if step % 2 else noise, t
        sign = 1 - 2 * (step % 2).to(noise)  # [B]: each image at its own step
        return x0, noise * sign.view(-1, *([1] * (noise.dim() - 1))), t
    shape = tuple(moments.mean.shape[1:])
    x0 = moments.mean
    if sample_latent:
        x0 = x0 + moments.std * rng.keyed_normal(keys, step, rng.STREAM_LATENT, shape)
    noise = rng.keyed_normal(keys, step, rng.STREAM_NOISE, shape)
    t = training_timesteps(keys, step, num_timesteps, timesteps, proposal)
    return x0, noise, t


def adamw_rows(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: list[int], lr: list[float], weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW update of rows that are each at their own step: ``torch.optim.AdamW``'s arithmetic for each row alone.

    param, grad, exp_avg, exp_avg_sq [B, ...]; step [B] counts this update (1 at the first) and lr [B],
    on the host: the per-row factors are computed in float64 as torch's optimiser computes its
    scalars, so a row's result is bit-identical to torch's single-tensor AdamW on CPU (tested).
    Returns the new (param, exp_avg, exp_avg_sq).
    """
    beta1, beta2 = betas
    if len(set(step)) == 1 and len(set(lr)) == 1:  # every row at one step: python scalars, nothing copied to the device
        k, r = float(step[0]), lr[0]
        exp_avg = exp_avg.lerp(grad, 1 - beta1)
        exp_avg_sq = torch.addcmul(exp_avg_sq * beta2, grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / ((1 - beta2**k) ** 0.5)).add_(eps)
        return (param * (1 - r * weight_decay)).addcdiv_(exp_avg, denom, value=-(r / (1 - beta1**k))), exp_avg, exp_avg_sq

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=param.dtype, device=param.device).view((-1,) + (1,) * (param.dim() - 1))

    decay = column([1 - r * weight_decay for r in lr])
    step_size = column([-(r / (1 - beta1 ** float(k))) for r, k in zip(lr, step)])
    bias2_sqrt = column([(1 - beta2 ** float(k)) ** 0.5 for k in step])
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = torch.addcmul(exp_avg_sq * beta2, grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    return param * decay + step_size * exp_avg / denom, exp_avg, exp_avg_sq


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
        total += denoising_losses(backbone, latents, noise, t, cond)
    return total / n_timesteps


def wiener_estimate(x_t: torch.Tensor, signal: torch.Tensor, noise: torch.Tensor, mean: torch.Tensor,
                    var: torch.Tensor) -> torch.Tensor:
    """The best clean estimate from x_t = signal x0 + noise n that treats every value alone: the linear MMSE (Wiener)
    estimate of x0 given x0's per-channel ``mean`` and ``var`` [C]. A denoiser that learned images' structure beats
    it; one that learned nothing does not. x_t [B, C, h, w]; signal, noise [B] (a process's ``levels``)."""
    a, s = signal.view(-1, 1, 1, 1), noise.view(-1, 1, 1, 1)
    m, v = mean.view(1, -1, 1, 1), var.view(1, -1, 1, 1)
    return m + a * v / (a * a * v + s * s) * (x_t - a * m)


def gain_over_wiener_db(x0: torch.Tensor, x0_model: torch.Tensor, x0_wiener: torch.Tensor) -> float:
    """10 log10 of the Wiener estimate's squared error over the model's (> 0: the model knows something of these images)."""
    return float(10 * torch.log10((x0_wiener - x0).pow(2).mean() / (x0_model - x0).pow(2).mean().clamp_min(1e-12)))
