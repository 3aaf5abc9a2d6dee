"""Which synthetic images a judge trusts: pure functions of its probabilities."""

from __future__ import annotations

import torch


def own_class_scores(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] the probability the judge gives each image's own label, from [N, C] probabilities and [N] labels."""
    return probabilities.gather(1, labels.long().view(-1, 1)).squeeze(1)


def keep_mask(scores: torch.Tensor, labels: torch.Tensor, *, min_confidence: float = 0.0, keep_top: float = 0.0) -> torch.Tensor:
    """[N] bool: images scored at least ``min_confidence``, or the top ``keep_top`` fraction of each class.

    Ties at the cut of ``keep_top`` are broken by position (the earlier image kept), so the result is
    fixed by the scores alone; each class keeps at least one image.
    """
    if keep_top <= 0:
        return scores >= min_confidence
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for label in labels.unique():
        members = torch.nonzero(labels == label).squeeze(1)
        count = max(1, round(keep_top * len(members)))
        order = torch.argsort(-scores[members].double(), stable=True)
        keep[members[order[:count]]] = True
    return keep
