"""How many images of synthetic sets are noise rather than pictures: their roughness against the real images'.

Roughness is the mean absolute difference between neighbouring pixels (grey, 0-1). An image rougher than
every one of the real training images (the threshold printed) is counted as noise; the real images set
the bar, so the count needs no labels and no model.

    python benchmarks/noisy_samples.py --data ../shared/data/pneumoniamnist.npz SET [SET ...] [--group-by model]

Prints JSON (per group: sets, images, noisy, fraction) and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def roughness(grey: np.ndarray) -> float:
    """Mean |neighbour difference| of a grey image in [0, 1]."""
    return float((np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()) / 2)


def _grey(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(image.convert("L").resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0


def main() -> None:
    from diffinv.data.real import open_images
    from diffinv.data.synthetic import read_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+")
    parser.add_argument("--data", required=True, help="the real data (its training split sets the bar)")
    parser.add_argument("--group-by", default="model", help="a manifest field to group the sets by (default model)")
    args = parser.parse_args()
    real = open_images(args.data)
    size = real.image(0).size[0]
    bar = max(roughness(_grey(real.image(i), size)) for i in range(len(real)))
    groups: dict[str, dict[str, float]] = {}
    for folder in args.sets:
        rows = read_manifest(folder)
        key = str(rows[0].get(args.group_by, "")) if rows else ""
        g = groups.setdefault(key, {"sets": 0, "images": 0, "noisy": 0})
        g["sets"] += 1
        for r in rows:
            g["images"] += 1
            g["noisy"] += roughness(_grey(Image.open(Path(folder) / r["file"]), size)) > bar
    for g in groups.values():
        g["fraction"] = g["noisy"] / max(g["images"], 1)
    print(json.dumps({"threshold": bar, "real_images": len(real), "groups": groups}, indent=1))
    print("; ".join(f"{Path(k).name}: {int(g['noisy'])} of {int(g['images'])} noisy ({100 * g['fraction']:.1f}%)"
                    for k, g in groups.items()))


if __name__ == "__main__":
    main()
