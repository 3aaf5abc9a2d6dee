"""A study's statistics from its result rows: per-replicate means, paired gains over real only, head to head.

A row is one classifier run (``results.json``): ``dataset``, ``method``, ``per_class``, ``seed`` (the
replicate), ``repeat`` and its metrics, with its ``validation`` metrics beside them. The report, the
result table and the benchmark scripts all read these functions, so every number of a study is
computed once, one way.
"""

from __future__ import annotations

import statistics
from typing import Any

from diffinv.report.stats import headline_metric, paired_gain

METRICS = ("top1", "balanced_accuracy", "macro_f1", "auc")
GROUP_KEYS = ("dataset", "method", "per_class")
BASELINE = "real"


def per_replicate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per seed (replicate): the mean of its repeats' metrics; rows without repeats pass unchanged.

    A replicate is degenerate when any of its classifiers is, so a one-class predictor is never averaged away.
    """
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(r)

    def mean(values: list[Any]) -> float | None:
        return None if any(v is None for v in values) else statistics.fmean(values)

    out = []
    for members in by_seed.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        row = {**members[0], **{m: mean([x.get(m) for x in members]) for m in METRICS},
               "degenerate": any(x["degenerate"] for x in members), "repeats": len(members),
               "per_class_acc": [mean(list(col)) for col in zip(*(x["per_class_acc"] for x in members))]}
        if all(x.get("validation") for x in members):
            row["validation"] = {m: mean([x["validation"].get(m) for x in members]) for m in METRICS}
        out.append(row)
    return out


def summarise_study(rows: list[dict[str, Any]], compare: dict[str, list[str]] | None = None,
                     baselines: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Per (dataset, method, K): mean and std over replicates of each metric, degenerate runs, the gain of
    each method with synthetic data over real only at the same K, and head-to-head rows (``compare``).

    ``baselines``: method -> the real-only method its gain is over (one trained as it is, e.g. from the same
    pretrained backbone); default ``real``.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    groups = {key: per_replicate(members) for key, members in groups.items()}
    summary = [_entry(key, members) for key, members in groups.items()]
    for entry in summary:
        name = (baselines or {}).get(entry["method"], BASELINE)
        base = (entry["dataset"], name, entry["per_class"])
        if entry["n_synthetic"] and base in groups:
            entry["baseline"] = name
            entry["gain"] = paired(groups[_key(entry)], groups[base])
    for method, rivals in (compare or {}).items():
        for entry in summary:
            for rival in rivals:
                other = (entry["dataset"], rival, entry["per_class"])
                if entry["method"] == method and other in groups:
                    entry.setdefault("versus", {})[rival] = paired(groups[_key(entry)], groups[other])
    return summary


def _key(entry: dict[str, Any]) -> tuple:
    return tuple(entry[k] for k in GROUP_KEYS)


def _entry(key: tuple, members: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [m["top1"] for m in members]
    per_class = [statistics.fmean(v for v in col if v is not None) if any(v is not None for v in col) else None
                 for col in zip(*(m["per_class_acc"] for m in members))]
    first = members[0]
    entry = {**dict(zip(GROUP_KEYS, key)), **{k: first.get(k) for k in ("setting", "arch", "aug")},
             "top1_mean": statistics.fmean(accs), "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
             "n_seeds": len(accs), "n_real": first["n_real"], "n_synthetic": first["n_synthetic"],
             "classes": first["classes"], "per_class_acc_mean": per_class}
    for metric in METRICS[1:]:
        values = [m[metric] for m in members if m.get(metric) is not None]
        if len(values) == len(members):
            entry[f"{metric}_mean"] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for metric in METRICS:  # validation means: what settings are chosen on, never test
        values = [(m.get("validation") or {}).get(metric) for m in members]
        if values and all(v is not None for v in values):
            entry[f"val_{metric}_mean"] = statistics.fmean(values)
    counts = first.get("class_counts")
    entry["headline"] = headline_metric(counts) if counts else "top1"
    entry["degenerate_runs"] = sum(1 for m in members if m.get("degenerate"))
    entry["seeds"] = [m["seed"] for m in members]
    return entry


def paired(mine: list[dict[str, Any]], theirs: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """Paired gains (per headline metric) of one group's replicates over another's, on the seeds both have.

    ``split="validation"`` pairs the rows' validation metrics instead.
    """
    a, b = {r["seed"]: r for r in mine}, {r["seed"]: r for r in theirs}
    seeds = sorted(set(a) & set(b))

    def value(row: dict[str, Any], metric: str) -> float | None:
        return row.get(metric) if split == "test" else (row.get("validation") or {}).get(metric)

    out = {}
    for metric in ("top1", "balanced_accuracy"):
        first, second = [value(a[s], metric) for s in seeds], [value(b[s], metric) for s in seeds]
        if seeds and None not in first and None not in second:
            gain = paired_gain([float(v or 0.0) for v in first], [float(v or 0.0) for v in second])
            # A degenerate run (one class predicted) on either side is not evidence of anything.
            gain["degenerate"] = split == "test" and any(a[s].get("degenerate") or b[s].get("degenerate") for s in seeds)
            gain["beyond_noise"] = gain["beyond_noise"] and not gain["degenerate"]
            out[metric] = gain
    return out
