"""Sample efficiency: how many real images per class a method's accuracy is worth."""

from __future__ import annotations

import math


def equivalent_real(real_curve: list[tuple[float, float]], accuracy: float) -> tuple[float | None, str]:
    """Real images per class that the real-only curve needs to reach ``accuracy``.

    ``real_curve``: (images per class, mean accuracy) points. The curve is interpolated
    linearly in log(images), the way accuracy grows with data. Returns (value, relation):
    ``"="`` inside the curve, ``">"`` when the accuracy is above every real-only point (the
    value is then the largest size measured, a lower bound), ``"<"`` below every point (upper bound).
    Non-monotone curves are made monotone (running maximum) first: more data cannot be worth less.
    """
    points = sorted(real_curve)
    if not points:
        return None, ""
    best = -math.inf
    mono = []
    for k, acc in points:
        best = max(best, acc)
        mono.append((k, best))
    if accuracy > mono[-1][1]:
        return mono[-1][0], ">"
    if accuracy <= mono[0][1]:
        return mono[0][0], "<" if accuracy < mono[0][1] else "="
    for (k0, a0), (k1, a1) in zip(mono, mono[1:]):
        if a0 < accuracy <= a1:
            t = (accuracy - a0) / (a1 - a0)
            return math.exp(math.log(k0) + t * (math.log(k1) - math.log(k0))), "="
    return mono[-1][0], "="


def efficiency_factor(real_curve: list[tuple[float, float]], per_class: float, accuracy: float) -> tuple[float | None, str]:
    """(equivalent real images / real images used, relation) for a method using ``per_class`` real images."""
    value, relation = equivalent_real(real_curve, accuracy)
    return (None, "") if value is None else (value / per_class, relation)


def worth_text(real_curve: list[tuple[float, float]], per_class: float, accuracy: float) -> tuple[str, str] | None:
    """("worth" real images per class, "factor") as table text, e.g. (">14.2", ">2.84x"); None without a curve."""
    factor, relation = efficiency_factor(real_curve, per_class, accuracy)
    if factor is None:
        return None
    mark = relation.replace("=", "")
    return f"{mark}{factor * per_class:.1f}", f"{mark}{factor:.2f}x"
