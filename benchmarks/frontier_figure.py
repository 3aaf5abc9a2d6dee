"""One figure of the fidelity / diversity frontier across finished studies (issue 18), a panel per study and size.

    python benchmarks/frontier_figure.py --out docs/figures/frontier.png \
        "digits, 5 per class=runs/sweep-digits-pc5-10:5" "PneumoniaMNIST=runs/frontier-pneumoniamnist/sweep-study:5"

Each point is one generation setting: its synthetic sets' label fidelity and diversity (means over the
replicates, from the study's quality.json) and, as colour, its gain over real only on the validation
split (the study's summary.json). Circles are Diffusion Inversion, squares img2img. The points and
figures are the report's own (`diffinv report` draws the same frontier per study); this puts several
side by side with short labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffinv.report.build import frontier_points


def short(method: str) -> str:
    return method.replace("img2img", "i2i").replace("-n0.5", " s.5").replace("-g1", " g1").replace("-g3", " g3")


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
        summary = json.loads((Path(folder) / "summary.json").read_text())
        points = [q for q in frontier_points(quality, summary) if str(q["per_class"]) == k]
        scale = max((abs(q["val_gain"]) for q in points if q["val_gain"] is not None), default=0.0) or 1.0
        for q in points:
            colour = "grey" if q["val_gain"] is None else plt.cm.RdYlGn(0.5 + 0.5 * q["val_gain"] / scale)
            marker = "s" if "img2img" in q["method"] else "o"
            ax.scatter(100 * q["label_fidelity"], q["diversity_ratio"], color=colour, edgecolor="black", s=70,
                       marker=marker, zorder=3)
            gain = "" if q["val_gain"] is None else f" {100 * q['val_gain']:+.1f}"
            ax.annotate(short(q["method"]) + gain, (100 * q["label_fidelity"], q["diversity_ratio"]),
                        textcoords="offset points", xytext=(4, 3), fontsize=6.5)
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_title(f"{title}\nlabels: validation gain, points (max |gain| {100 * scale:.1f})", fontsize=9)
        ax.set_xlabel("label fidelity (%), real-only judge")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("diversity: within-class spread, synthetic / real")
    fig.suptitle("Fidelity vs diversity of each generation setting: circles DI, squares img2img; "
                 "green gains on validation, red loses", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
