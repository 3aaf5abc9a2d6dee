"""Stage 2 maths: new conditionings around the learned ones (pure functions, no model).

c = c_i + s (c_j - c_i) + sigma * eps, with j a partner of the same class. Every random choice
is keyed by the sample's identity (see :mod:`diffinv.rng`), so a sample does not
depend on the batch it is made in.
"""

from __future__ import annotations

import torch

from diffinv import rng


def pick_partners(keys: torch.Tensor, sources: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A partner row for each sample: another image of the same class, keyed by the sample.

    keys [B] sample keys; sources [B] row of each sample's own image; labels [N] class of every
    row. Returns (partner rows [B], fallback [B] bool). When a class has no other image the
    partner comes from the other classes (the paper's rule) and ``fallback`` is True. With a
    single row in total the partner is the image itself.
    """
    u = rng.keyed_uniform(keys.cpu(), 0, rng.STREAM_PARTNER, (1,))[:, 0].double()
    labels, sources = labels.cpu(), sources.cpu()
    order = torch.sort(labels, stable=True).indices  # rows grouped by class
    count = torch.bincount(labels)
    start = torch.cumsum(count, 0) - count
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))  # position of each row in the grouped order
    cls = labels[sources]
    n_others = count[cls] - 1
    # Pick one of the class's other rows: a draw over n - 1 slots, skipping the image's own slot.
    slot = (u * n_others.clamp(min=1)).long().clamp(max=(n_others - 1).clamp(min=0))
    own_slot = rank[sources] - start[cls]
    same = order[(start[cls] + slot + (slot >= own_slot).long()).clamp(max=len(order) - 1)]  # clamp: fallback rows
    # Fallback: any row but itself (all of another class, since its own class has no other).
    total = len(labels)
    slot_all = (u * max(total - 1, 1)).long().clamp(max=max(total - 2, 0))
    other = torch.where(slot_all >= sources, slot_all + 1, slot_all).clamp(max=total - 1)
    fallback = n_others == 0
    partners = torch.where(fallback, other, same)
    if total == 1:  # one image in all: interpolating with itself is a no-op
        partners = sources.clone()
    return partners, fallback


def paper_partners(keys: torch.Tensor, labels: torch.Tensor, per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's partners: ``per_image`` rows per image of the store, keyed by the image.

    keys [N] one per image (row), labels [N]. Drawn from the image's class without replacement,
    the image itself included; when the class has fewer than ``per_image`` other images, all of
    them, the rest drawn without replacement from the other classes. Returns (partner rows
    [N, per_image], fallback [N, per_image] bool: drawn from another class).
    """
    keys, labels = keys.cpu(), labels.cpu()
    n = len(labels)
    partners = torch.empty(n, per_image, dtype=torch.long)
    fallback = torch.zeros(n, per_image, dtype=torch.bool)
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten()
        others = torch.nonzero(labels != c).flatten()
        for chunk in members.split(256):  # [chunk, class size] draws at a time, whatever the store's size
            if len(members) - 1 >= per_image:
                # A keyed random order of the class (itself included); the first per_image are the partners.
                u = rng.keyed_uniform(keys[chunk], 0, rng.STREAM_PARTNER, (len(members),))
                partners[chunk] = members[u.argsort(dim=1)[:, :per_image]]
                continue
            fill = per_image - (len(members) - 1)
            if len(others) < fill:
                raise ValueError(f"{per_image} partners per image need at least {per_image + 1} images in the store; it has {n}")
            u = rng.keyed_uniform(keys[chunk], 1, rng.STREAM_PARTNER, (len(others),))
            drawn = others[u.argsort(dim=1)[:, :fill]]
            for r, i in enumerate(chunk.tolist()):
                partners[i] = torch.cat([members[members != i], drawn[r]])
                fallback[i, len(members) - 1:] = True
    return partners, fallback


def lerp(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """a + s (b - a); a, b [B, K, D]."""
    return a + s * (b - a)


def slerp(a: torch.Tensor, b: torch.Tensor, s: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of each token vector: a, b [B, K, D] -> [B, K, D].

    Moves along the great circle between the directions and interpolates the norms linearly;
    falls back to :func:`lerp` where the two directions (almost) coincide.
    """
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(eps), b / nb.clamp_min(eps)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    sin = torch.sin(omega)
    direction = (torch.sin((1 - s) * omega) * ua + torch.sin(s * omega) * ub) / sin.clamp_min(eps)
    out = direction * ((1 - s) * na + s * nb)
    return torch.where(sin < 1e-4, lerp(a, b, s), out)


def perturb(own: torch.Tensor, partner: torch.Tensor, keys: torch.Tensor, interp: float, noise: float,
            mode: str = "linear") -> torch.Tensor:
    """The new conditioning [B, K, D] from own and partner embeddings [B, K, D] and sample keys [B]."""
    mixed = lerp(own, partner, interp) if mode == "linear" else slerp(own, partner, interp)
    if noise == 0:
        return mixed
    eps = rng.keyed_normal(keys.to(own.device), 0, rng.STREAM_PERTURB, tuple(own.shape[1:]))
    return mixed + noise * eps


def cfg_combine(uncond_out: torch.Tensor, cond_out: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: u + g (c - u); g = 1 is the conditional output alone."""
    return uncond_out + guidance * (cond_out - uncond_out)
