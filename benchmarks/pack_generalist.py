"""Pack the training images of every dataset we have into one .npz for the generalist base (no labels kept but the
dataset's index; train splits only, never a test split).

    python benchmarks/pack_generalist.py --root ../shared/data --per-dataset 5000 --out .gpu/data/generalist-32.npz

Each dataset contributes a seeded random subset of at most ``--per-dataset`` of its training images, resized
to ``--resolution`` (bicubic, as inversion reads them) and stored as uint8 RGB (grey sets as R = G = B), in the
MedMNIST layout ``train_images`` / ``train_labels`` that ``--data FILE.npz`` reads. Prints JSON and a one-line
summary: images per dataset and the file's size (it must travel to a GPU machine with the repository).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffinv.data.real import DataError, load_pixels, open_images

# (name, path under --root or a built-in source): every training split the project has offline.
SOURCES = (("digits", "digits"), ("mnist", "mnist"), ("fashion-mnist", "fashion-mnist"),
           ("pneumoniamnist", "pneumoniamnist.npz"), ("cifar10", "cifar10"), ("imagenette", "imagenette-96"))


def pack(root: Path, per_dataset: int, resolution: int, seed: int, names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Images [N, R, R, 3] uint8, their dataset index [N, 1], and what each dataset gave (or why it gave nothing)."""
    images, labels, report = [], [], {}
    for index, (name, where) in enumerate(SOURCES):
        if names and name not in names:
            continue
        spec = where if where == "digits" else str(root / where)
        try:
            source = open_images(spec, "auto", "train")
        except DataError as exc:
            report[name] = {"skipped": str(exc)[:200]}
            continue
        rs = np.random.RandomState(seed + index)
        pick = np.sort(rs.choice(len(source), size=min(per_dataset, len(source)), replace=False))
        chunks = []
        for start in range(0, len(pick), 2048):  # in slices: a whole set at once would not fit in memory
            pixels = load_pixels(source.subset(pick[start:start + 2048].tolist()), resolution)
            chunks.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        images.append(np.concatenate(chunks))
        labels.append(np.full((len(pick), 1), index, dtype=np.uint8))
        report[name] = {"images": int(len(pick)), "of": int(len(source))}
    if not images:
        raise SystemExit(f"pack_generalist: no dataset could be read under {root}")
    return np.concatenate(images), np.concatenate(labels), report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data")
    ap.add_argument("--per-dataset", type=int, default=5000)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", help="pack only these datasets (repeat)")
    ap.add_argument("--out", default=".gpu/data/generalist-32.npz")
    args = ap.parse_args()
    images, labels, report = pack(Path(args.root), args.per_dataset, args.resolution, args.seed, args.only)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, train_images=images, train_labels=labels)
    result = {"benchmark": "pack_generalist", "out": str(out), "images": int(len(images)), "resolution": args.resolution,
              "mib": round(out.stat().st_size / 2**20, 1), "datasets": report}
    print(json.dumps(result))
    print(f"pack_generalist: {len(images):,} images at {args.resolution} px from {sum('images' in r for r in report.values())} "
          f"datasets, {result['mib']} MiB -> {out}")


if __name__ == "__main__":
    main()
