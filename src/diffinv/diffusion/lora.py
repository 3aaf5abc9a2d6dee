"""Fitting a LoRA adapter on a few images under one conditioning (DataDream's per-class step).

Pure tensor code on :class:`~diffinv.diffusion.backbone.Backbone`: the adapter's parameters, the
images' clean latents and the conditioning come in as arguments; files are ``diffinv finetune``'s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffinv.diffusion.backbone import Backbone, LatentMoments
from diffinv.diffusion.objective import denoising_losses


def fit_lora(backbone: Backbone, params: list[torch.nn.Parameter], moments: LatentMoments,
             cond: torch.Tensor | Callable[[], torch.Tensor], *,
             steps: int, lr: float, batch_size: int, seed: int,
             progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``params`` (an active adapter) with the denoising loss of ``moments`` [N, C, h, w] under ``cond`` [K, D],
    or under what ``cond()`` returns each step (a prompt through a text encoder whose adapter is being fitted).

    Every draw (the batch's images, timesteps, noise, latent samples) comes from one generator
    seeded by ``seed``, so a fit is repeatable. Returns the loss of every step.
    """
    device = moments.mean.device
    g = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        # 1. A batch of the images (with replacement: a class may have fewer than a batch), timesteps and noise.
        pick = torch.randint(len(moments.mean), (batch_size,), generator=g)
        t = torch.randint(backbone.num_train_timesteps, (batch_size,), generator=g)
        shape = (batch_size, *moments.mean.shape[1:])
        noise, eps = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
        x0 = moments.mean[pick] + moments.std[pick] * eps  # a latent sample (pixel models: std 0)

        # 2. The denoising loss of the adapted network.
        context = cond() if callable(cond) else cond
        loss = denoising_losses(backbone, x0, noise, t.to(device), context.expand(batch_size, -1, -1)).mean()

        # 3. One AdamW step of the adapter alone.
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    return losses
