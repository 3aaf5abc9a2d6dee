"""Retrieval throughput: pool features once, then exact k-NN queries/s against a full-distance-matrix baseline.

Pool: ``--pool`` (default CIFAR-10's 50,000 training images from ``$DIFFINV_DATA``, else random
tensors of the same shape); space: a base's token encoder (``--model``) or raw pixels. Reports the
one-off cost (pool images/s to decode + embed, the cache write, the cache read that replaces it on
the next query) and the search (queries/s of ``diffinv.data.pool.nearest``, chunked matmul top-k,
vs ``torch.cdist`` over the whole pool then ``topk``; both exact, checked equal). Prints one JSON
object and a one-line summary::

    python benchmarks/retrieval_speed.py                          # CIFAR-10 train, bases/cifar10-16-inv, 16 px
    python benchmarks/retrieval_speed.py --space pixels --queries 1000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from diffinv.data.pool import cached, nearest, open_pool
from diffinv.diffusion.methods.retrieval import space_features
from diffinv.diffusion.model_io import load_backbone

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", default=str(Path(os.environ.get("DIFFINV_DATA", ROOT.parent / "shared" / "data")) / "cifar10"))
    p.add_argument("--model", default=str(ROOT / "bases" / "cifar10-16-inv"))
    p.add_argument("--space", default="encoder", choices=("encoder", "pixels"))
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--limit", type=int, default=0, help="use the first N pool images only (0: all)")
    args = p.parse_args()

    backbone = load_backbone(args.model)
    features = space_features(args.space, backbone, args.resolution, model=args.model)
    pool = open_pool(args.pool)
    images = pool.images if not args.limit else pool.images.subset(range(min(args.limit, len(pool.images))))

    # 1. One-off: every pool image decoded and embedded, then cached; the cache read that replaces it.
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        feats = cached(cache, "bench", lambda: {"features": features(images, "features")})["features"]
        embed_s = time.perf_counter() - start
        start = time.perf_counter()
        again = cached(cache, "bench", lambda: {"features": torch.zeros(0)})["features"]
        read_s = time.perf_counter() - start
        cache_mb = sum(f.stat().st_size for f in Path(cache).iterdir()) / 2**20
    assert torch.equal(feats, again)

    # 2. Search: queries drawn from the pool (their own row excluded as a banned row would be).
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(len(feats), generator=g)[: args.queries]
    queries = feats[rows]
    banned = torch.zeros(len(feats), dtype=torch.bool)
    banned[rows] = True
    start = time.perf_counter()
    d, idx = nearest(queries, feats, args.k, banned)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    full = torch.cdist(queries.double(), feats.double())
    full[:, banned] = float("inf")
    base_d, base_idx = full.topk(args.k, dim=1, largest=False)
    base_s = time.perf_counter() - start
    same = bool(torch.allclose(d, base_d, atol=1e-6))

    result = {"pool": args.pool, "pool_images": len(feats), "space": args.space, "feature_dim": int(feats.shape[1]),
              "resolution": args.resolution, "threads": torch.get_num_threads(), "embed_images_per_s": round(len(feats) / embed_s, 1),
              "embed_s": round(embed_s, 2), "cache_read_s": round(read_s, 3), "cache_mb": round(cache_mb, 1),
              "queries": args.queries, "k": args.k, "queries_per_s": round(args.queries / ours_s, 1),
              "baseline_cdist_queries_per_s": round(args.queries / base_s, 1), "speedup": round(base_s / ours_s, 2),
              "same_distances_as_baseline": same}
    print(json.dumps(result, indent=2))
    print(f"retrieval on {len(feats):,} pool images ({args.space}, {feats.shape[1]} dims): {result['queries_per_s']:,} queries/s "
          f"(cdist baseline {result['baseline_cdist_queries_per_s']:,}; x{result['speedup']}); pool embedded once at "
          f"{result['embed_images_per_s']:,} images/s, read back from cache in {read_s:.2f} s")


if __name__ == "__main__":
    main()
