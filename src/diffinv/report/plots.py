"""Study figures that stay readable with many arms: one style per method, and each gain with its paired interval."""

from __future__ import annotations

import textwrap
from typing import Any

# A method and its fine-tuned twin share a colour; the twin is dashed (twelve arms stay twelve distinct lines).
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def series_style(methods: list[str]) -> dict[str, dict[str, Any]]:
    """matplotlib keywords per method: a colour per base name (``di`` and ``di-ft`` alike), dashed for ``-ft`` arms."""
    bases = list(dict.fromkeys(_base(m) for m in methods))
    return {m: {"color": COLOURS[bases.index(_base(m)) % len(COLOURS)], "linestyle": "--" if m.endswith("-ft") else "-"}
            for m in methods}


def _base(method: str) -> str:
    return method[:-3] if method.endswith("-ft") else method


def gain_plot(rows: list[dict[str, Any]], metric: str, metric_name: str, tag: str):
    """One panel per size: each method's gain over its real-only arm in points with its paired 95% interval; filled
    where the interval excludes zero. None when no row has a gain."""
    import matplotlib.pyplot as plt

    gained = [r for r in rows if (r.get("gain") or {}).get(metric)]
    if not gained:
        return None
    sizes = sorted({r["per_class"] for r in gained})
    methods = list(dict.fromkeys(r["method"] for r in gained))
    style = series_style(methods)
    width = max(5.5, 3.2 * len(sizes) + 1.6)
    fig, axes = plt.subplots(1, len(sizes), figsize=(width, 0.32 * len(methods) + 1.6), sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for y, method in enumerate(methods):
            row = next((r for r in gained if r["method"] == method and r["per_class"] == size), None)
            if row is None:
                continue
            g = row["gain"][metric]
            colour = style[method]["color"]
            ax.errorbar(100 * g["mean"], y, xerr=[[100 * (g["mean"] - g["low"])], [100 * (g["high"] - g["mean"])]], fmt="o",
                        color=colour, mfc=colour if g.get("beyond_noise") else "white", capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{size:g} real / class", fontsize=9)
        ax.set_xlabel("gain (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(methods)),
                          [m + (f" (vs {_baseline(gained, m)})" if _baseline(gained, m) != "real" else "") for m in methods])
    axes[0][0].set_ylim(len(methods) - 0.5, -0.5)  # top to bottom, with room for the first and last point
    title = f"Gain in test {metric_name} over real only, paired 95% CI; filled: beyond noise ({tag})"
    fig.suptitle(textwrap.fill(title, int(width * 11)), fontsize=9)  # one panel is narrower than the title
    fig.tight_layout()
    return fig


def _baseline(rows: list[dict[str, Any]], method: str) -> str:
    return next((r.get("baseline") or "real" for r in rows if r["method"] == method), "real")


PAIRS_SHOWN = 24


def pair_grid(real: Any, test: Any, pairs: list[tuple[int, int, str, float]], scale: int = 2) -> bytes:
    """PNG of the first :data:`PAIRS_SHOWN` (training image | test image) pairs, four pairs to a row, in overlap.csv's order."""
    import io

    import numpy as np
    from PIL import Image

    shown = pairs[:PAIRS_SHOWN]
    side = real.shape[-1] * scale
    cols, gap, inner = 4, 12, 2  # a pair's two images close together, the pairs apart
    stride = 2 * side + inner + gap
    rows = (len(shown) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * stride + gap, rows * (side + gap) + gap), "white")
    for n, (i, j, _, _) in enumerate(shown):
        x, y = (n % cols) * stride + gap, (n // cols) * (side + gap) + gap
        for k, image in enumerate((real[i], test[j])):
            tile = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(tile, (x + k * (side + inner), y))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
