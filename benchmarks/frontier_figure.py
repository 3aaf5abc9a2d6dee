"""One figure of the fidelity / diversity frontier across finished studies, a panel per study and size.

    python benchmarks/frontier_figure.py --out docs/figures/frontier.png \
        "digits, 5 per class=runs/digits-k5-10-frontier:5" "PneumoniaMNIST=runs/pneumoniamnist-k5-frontier:5"

Each point is one candidate setting: its synthetic sets' label fidelity and diversity (means over the
replicates, from the study's quality.json) and, as colour, its gain over real only on the validation
split (the study's selection.json). Circles are Diffusion Inversion, squares img2img. The points and
drawing are the report's own (`diffinv report` draws the same frontier per study); this puts several
side by side with short labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffinv.report.build import draw_frontier, frontier_points


def short(label: str) -> str:
    return label.replace("img2img", "i2i").replace("guidance=", "g").replace("noise=", "σ").replace("strength=", "st")


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("panels", nargs="+", help="TITLE=STUDY_FOLDER:K")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    fig, axes = plt.subplots(1, len(args.panels), figsize=(5.2 * len(args.panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], args.panels):
        title, spec = panel.rsplit("=", 1)
        folder, k = spec.rsplit(":", 1)
        quality = json.loads((Path(folder) / "quality.json").read_text())
        selection = json.loads((Path(folder) / "selection.json").read_text())
        points = [q for q in frontier_points(quality, selection) if str(q["per_class"]) == k]
        scale = draw_frontier(ax, points, lambda q: short(q["label"]), fontsize=6.5)
        ax.set_title(f"{title}\nlabels: validation gain, points (max |gain| {100 * scale:.1f})", fontsize=9)
        ax.set_xlabel("label fidelity (%), real-only judge")
    axes[0][0].set_ylabel("diversity: within-class spread, synthetic / real")
    import textwrap

    title = "Fidelity vs diversity of each generation setting: circles DI, squares img2img; green gains on validation, red loses"
    fig.suptitle("\n".join(textwrap.wrap(title, 60 * len(args.panels))), fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
