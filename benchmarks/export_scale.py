"""A large synthetic set through `diffinv export --to webdataset`, read back with the webdataset library: time and size.

The set is made as a user makes one (a tiny random pixel model built here, `invert`, `generate` with many variants
per image at 16 px), so the export reads real PNGs, a real manifest and its provenance; then every shard is read back
and each sample's label and pixels are compared with the set's. With ``--writer`` the set's images are random 16 px
pixels written by the library's set writer (what `generate` writes with: atomic PNGs, a manifest with checksums),
which takes a minute for 100,000 where sampling them on a 2-core CPU takes an hour; the export is the same.

    python benchmarks/export_scale.py --images 100000 --writer --work /work/scratch/export-scale
Prints one JSON object, then a one-line summary.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffinv.cli import main as diffinv


def run(*argv: object) -> float:
    start = time.perf_counter()
    code = diffinv([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"diffinv {' '.join(map(str, argv))} exited {code}")
    return time.perf_counter() - start


def read_back(shards: list[Path], set_root: Path) -> tuple[int, float]:
    """Every sample of the shards, through webdataset; each one's pixels and label checked against the set's PNG."""
    import webdataset as wds

    rows = {r["id"]: r for r in map(json.loads, (set_root / "manifest.jsonl").read_text().splitlines())}
    start, n = time.perf_counter(), 0
    for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False):
        meta = json.loads(sample["json"])
        row = rows[meta["id"]]
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        if n % 997 == 0:  # every pixel of one sample in a thousand; labels of all
            assert np.array_equal(image, np.asarray(Image.open(set_root / row["file"]).convert("RGB")))
        assert meta["class_name"] == row["class"] and int(sample["cls"]) == row["label"], (meta, row)
        n += 1
    return n, time.perf_counter() - start


def written_set(root: Path, n: int) -> float:
    """A complete set of ``n`` random 16 px images in 2 classes, through the library's SyntheticWriter; its seconds."""
    import torch

    from diffinv.data.synthetic import SyntheticWriter

    start = time.perf_counter()
    writer = SyntheticWriter(root)
    writer.start({"classes": ["cat", "dog"], "method": "random", "model": "", "shards": 1})
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        c = ("cat", "dog")[i % 2]
        row = {"id": f"{c}-{i:07d}", "file": f"{c}/{c}-{i:07d}.png", "class": c, "label": i % 2, "method": "random",
               "source": f"{c}/real-{i % 10:02d}.png"}
        writer.write_image(row, torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8))
        rows.append(row)
    writer.finish(rows)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="synthetic images (a multiple of 20)")
    parser.add_argument("--work", required=True, help="a folder to write (the model, data, store, set and export)")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--writer", action="store_true", help="write the set's images with the set writer (random pixels) "
                        "instead of sampling them with generate")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.writer:
        timings = {"write_set": written_set(work / "set", args.images)}
    else:
        rs = np.random.RandomState(0)
        for c in ("cat", "dog"):  # 2 classes x 10 real images, 16 px
            (work / "data" / c).mkdir(parents=True, exist_ok=True)
            for i in range(10):
                Image.fromarray(rs.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(work / "data" / c / f"{c}_{i:02d}.png")
        timings = {"model": run("tiny-model", "--kind", "pixel", "--out", work / "model", "--overwrite"),
                   "invert": run("invert", "--model", work / "model", "--data", work / "data", "--resolution", "16", "--steps",
                                 "1", "--out", work / "store", "--overwrite", "--quiet"),
                   "generate": run("generate", "--store", work / "store", "--per-image", args.images // 20, "--steps", "1",
                                   "--batch-size", "500", "--out", work / "set", "--overwrite", "--quiet")}
    timings |= {"export": run("export", "--set", work / "set", "--to", "webdataset", "--shard-size", args.shard_size,
                             "--out", work / "wds", "--overwrite", "--quiet")}
    shards = sorted((work / "wds").rglob("*.tar"))
    n, timings["read_back"] = read_back(shards, work / "set")
    pngs = sum(p.stat().st_size for p in (work / "set").rglob("*.png"))
    result = {"images": n, "shards": len(shards), "tar_bytes": sum(s.stat().st_size for s in shards), "png_bytes": pngs,
              "seconds": {k: round(v, 1) for k, v in timings.items()},
              "export_images_per_second": round(n / timings["export"]), "read_images_per_second": round(n / timings["read_back"])}
    print(json.dumps(result, indent=1))
    print(f"export: {n:,} images -> {len(shards)} WebDataset shards, {result['tar_bytes'] / 2**20:.0f} MiB "
          f"({pngs / 2**20:.0f} MiB of PNGs) in {timings['export']:.0f} s; read back and checked in {timings['read_back']:.0f} s")


if __name__ == "__main__":
    main()
