"""Scaling out: wall time of one inversion job as 1 vs N Ray workers, against one plain process.

The job: invert digits (the embedded base, its own 8 px resolution) with the same settings in
every configuration; each configuration writes a fresh store and the stores are compared with
the plain run's (bitwise equal when the plain run has one thread, as the workers do). Every worker runs one thread (Ray's
OMP_NUM_THREADS = the task's one CPU); the plain process runs with ``--threads`` threads.

Prints one JSON object and a one-line summary. Examples::

    python benchmarks/scale.py                               # this machine: 1 vs 2 workers
    python benchmarks/scale.py --workers 1 2 4 8 --images 400 --ray-address auto   # a cluster

On a cluster, start Ray first (``ray start --head`` on one node, ``ray start --address HEAD:6379``
on the others), put the output folder on a filesystem every node sees (``--out``) and pass
``--ray-address auto``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffinv.config import InvertConfig
from diffinv.diffusion.store import EmbeddingStore
from diffinv.launch import import_ray, run_on_ray
from diffinv.stages.invert import invert_dataset
from diffinv.study.demo import embedded_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to time")
    ap.add_argument("--images", type=int, default=16, help="digits per class (10 classes)")
    ap.add_argument("--steps", type=int, default=150, help="inversion steps per image")
    ap.add_argument("--batch-size", type=int, default=10, help="images per batch (= the unit shards split)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the plain single-process baseline")
    ap.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    ap.add_argument("--out", help="folder for the stores (shared by every node on a cluster); default: a temp folder")
    args = ap.parse_args()

    config = InvertConfig(model=str(embedded_base()), data="digits", per_class=args.images, resolution=8, steps=args.steps,
                          batch_size=args.batch_size, device="cpu", log_every=25, checkpoint_every=50)
    root = Path(args.out or tempfile.mkdtemp(prefix="diffinv-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}

    # 1. Baseline: one plain process, no Ray (after a one-step warm-up, as the Ray workers get one).
    torch.set_num_threads(args.threads)
    invert_dataset(replace(config, steps=1), root / "plain-warm-up", progress=False, log=lambda m: None)
    start = time.perf_counter()
    invert_dataset(config, root / "plain", progress=False, log=lambda m: None)
    results["plain"] = {"wall_s": time.perf_counter() - start, "threads": args.threads}
    reference = EmbeddingStore.open(root / "plain")

    # 2. The same job on Ray with each worker count (the cluster is started once, outside the timings).
    ray = import_ray()
    ray.init(address=args.ray_address, num_cpus=None if args.ray_address else max(args.workers),
             include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    run_on_ray("invert", config, root / "warm-up", workers=max(args.workers), progress=False, log=lambda m: None)
    for n in args.workers:
        out = root / f"ray-{n}"
        start = time.perf_counter()
        run_on_ray("invert", config, out, workers=n, progress=False, log=lambda m: None)
        wall = time.perf_counter() - start
        store = EmbeddingStore.open(out)
        # Bitwise equality holds against a 1-thread plain run; more threads reduce sums in another order.
        results[f"ray-{n}"] = {"wall_s": wall, "workers": n, "identical_to_plain": bool(
            store.ids == reference.ids and torch.equal(store.embeddings, reference.embeddings)),
            "max_abs_diff_to_plain": float((store.embeddings - reference.embeddings).abs().max()) if store.ids == reference.ids else None}
    ray.shutdown()

    one = results[f"ray-{min(args.workers)}"]["wall_s"]
    for n in args.workers:
        results[f"ray-{n}"]["speedup_vs_ray_min"] = one / results[f"ray-{n}"]["wall_s"]
        results[f"ray-{n}"]["speedup_vs_plain"] = results["plain"]["wall_s"] / results[f"ray-{n}"]["wall_s"]
    report = {"benchmark": "scale", "images": 10 * args.images, "steps": args.steps, "batch_size": args.batch_size,
              "cpu_count": os.cpu_count(), "results": results}
    print(json.dumps(report, indent=2))
    best = max(args.workers)
    print(f"scale: {10 * args.images} images x {args.steps} steps: plain {results['plain']['wall_s']:.1f} s, "
          + ", ".join(f"{n} worker(s) {results[f'ray-{n}']['wall_s']:.1f} s" for n in args.workers)
          + f"; {best} vs {min(args.workers)} workers x{results[f'ray-{best}']['speedup_vs_ray_min']:.2f}, identical stores: "
          + str(all(r.get("identical_to_plain", True) for r in results.values())))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
