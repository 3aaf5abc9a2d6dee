"""The one learning-rate schedule, shared by inversion, pretraining and classifier training."""

from __future__ import annotations

import math


def lr_factor(step: int, steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``steps``: linear warm-up, then constant or cosine to 0.

    A pure function of the step, so a resumed run sets exactly the rate the uninterrupted one had.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0
