"""Pack the training images of every dataset we have into one .npz for the generalist base (no labels kept but the
dataset's index; train splits only, never a test split), or with ``--classes`` a labelled set for pretraining a classifier.

    python benchmarks/pack_generalist.py --root ../shared/data --per-dataset 5000 --out .gpu/data/generalist-32.npz
    python benchmarks/pack_generalist.py --only cifar10 --only imagenette --only mnist --classes --per-dataset 60000 \
        --out runs/data/generalist-mix-classes-32.npz       # 30 classes, train and held-out splits

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


TEST_SPLITS = {"imagenette": "val"}  # the held-out split of each dataset, where it is not "test"


def pack(root: Path, per_dataset: int, resolution: int, seed: int, names: list[str] | None = None, split: str = "train",
         classes: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Images [N, R, R, 3] uint8, labels [N, 1] and what each dataset gave (or why it gave nothing).

    Labels are the dataset's index, or with ``classes`` its own class labels offset past the datasets before it (the
    union of their classes: a classifier's pretraining set). ``split`` "test" takes each dataset's held-out split.
    """
    images, labels, report = [], [], {}
    offset = 0
    for index, (name, where) in enumerate(SOURCES):
        if names and name not in names:
            continue
        spec = where if where == "digits" else str(root / where)
        try:
            source = open_images(spec, "auto", TEST_SPLITS.get(name, "test") if split == "test" else split)
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
        own = source.labels[pick][:, None].astype(np.uint8) + offset if classes else np.full((len(pick), 1), index, np.uint8)
        labels.append(own)
        report[name] = {"images": int(len(pick)), "of": int(len(source)),
                        **({"labels": f"{offset}-{offset + len(source.classes) - 1}", "classes": source.classes} if classes else {})}
        offset += len(source.classes)
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
    ap.add_argument("--classes", action="store_true", help="keep each dataset's class labels (offset past the datasets before "
                    "it) and pack the held-out splits too (test_images / test_labels): a classifier's pretraining set")
    ap.add_argument("--out", default=".gpu/data/generalist-32.npz")
    args = ap.parse_args()
    images, labels, report = pack(Path(args.root), args.per_dataset, args.resolution, args.seed, args.only, "train", args.classes)
    arrays = {"train_images": images, "train_labels": labels}
    if args.classes:
        test_images, test_labels, test_report = pack(Path(args.root), args.per_dataset, args.resolution, args.seed, args.only,
                                                     "test", True)
        arrays.update(test_images=test_images, test_labels=test_labels)
        report = {name: {**info, "test_images": test_report.get(name, {}).get("images")} for name, info in report.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    result = {"benchmark": "pack_generalist", "out": str(out), "images": int(len(images)), "resolution": args.resolution,
              "mib": round(out.stat().st_size / 2**20, 1), "datasets": report}
    print(json.dumps(result))
    print(f"pack_generalist: {len(images):,} images at {args.resolution} px from {sum('images' in r for r in report.values())} "
          f"datasets, {result['mib']} MiB -> {out}")


if __name__ == "__main__":
    main()
