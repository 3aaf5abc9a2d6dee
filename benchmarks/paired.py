"""Paired differences between any two methods of a finished study, on test and on validation.

A study's ``compare:`` gives one rival per method, on test only. Choosing each generator's setting on
validation and then comparing the chosen pair (possibly from different bases) needs any pair, at one
size, on both splits:

    python benchmarks/paired.py runs/sweep-digits-pc5-10 long-di-g1-n0.5:emb-img2img:5 long-di-enc:real:10

Each argument is METHOD:RIVAL:K. Replicates are paired by seed, each the mean of its repeats (as the
study's own tables); prints one line per pair and, with --json, the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffinv.report.stats import paired_gain
from diffinv.report.summary import per_replicate


def replicates(rows: list[dict], method: str, k: int) -> dict[int, dict]:
    mine = [r for r in rows if r["method"] == method and r["per_class"] == k]
    if not mine:
        have = sorted({(r["method"], r["per_class"]) for r in rows})
        raise SystemExit(f"no runs of {method} at {k} per class; the study has {have}")
    return {r["seed"]: r for r in per_replicate(mine)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="a finished study folder (its results.json)")
    p.add_argument("pairs", nargs="+", help="METHOD:RIVAL:K")
    p.add_argument("--metric", default="balanced_accuracy", choices=("top1", "balanced_accuracy", "macro_f1", "auc"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = json.loads((Path(args.study) / "results.json").read_text())
    out = []
    for pair in args.pairs:
        method, rival, k = pair.rsplit(":", 2)
        a, b = replicates(rows, method, int(k)), replicates(rows, rival, int(k))
        seeds = sorted(set(a) & set(b))
        entry = {"method": method, "rival": rival, "per_class": int(k), "replicates": len(seeds)}
        for split, get in (("test", lambda r: r[args.metric]), ("validation", lambda r: (r.get("validation") or {}).get(args.metric))):
            if all(get(a[s]) is not None and get(b[s]) is not None for s in seeds):
                entry[split] = paired_gain([get(a[s]) for s in seeds], [get(b[s]) for s in seeds])
        out.append(entry)
        text = "  ".join(f"{split} {100 * g['mean']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]"
                         for split in ("test", "validation") if (g := entry.get(split)))
        print(f"{k:>3} per class  {method} minus {rival} ({len(seeds)} replicates, {args.metric}): {text}")
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
