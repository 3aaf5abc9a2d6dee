"""The result table of a study: one row per (method, real size) in the headline metric, then head-to-head rows.

What ``diffinv experiment`` and ``diffinv demo`` print and what the report shows, from ``summary.json``.
Gains are paired by replicate (the same real subset and seed with and without the synthetic set)
with their 95% t-interval; a gain is evidence ("beyond noise") only when that interval excludes 0
over >= 3 replicates and no run of either side is degenerate (one class predicted). "Worth" reads the
real-only curve (how many real images per class reach the same accuracy) and is shown only for
gains beyond noise.
"""

from __future__ import annotations

from typing import Any

from diffinv.report.efficiency import worth_text
from diffinv.report.stats import METRIC_NAMES, replicates_to_decide


def headline(summary: list[dict[str, Any]]) -> str:
    return next((r["headline"] for r in summary if r.get("headline")), "top1")


def interval_text(g: dict[str, Any]) -> str:
    """'+6.53 [+2.69, +10.37]' in points, with '(within noise)' or '(degenerate run)' where it is not evidence."""
    note = " (degenerate run)" if g["degenerate"] else ("" if g["beyond_noise"] else " (within noise)")
    return f"{100 * g['mean']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]{note}"


def result_table(summary: list[dict[str, Any]]) -> str:
    """The Markdown table of a study's summary rows."""
    metric = headline(summary)
    mean_key, std_key = f"{metric}_mean", f"{metric}_std"
    curve = [(float(r["per_class"]), r[mean_key]) for r in summary if r["method"] == "real" and r["per_class"]]
    rows = sorted(summary, key=lambda r: (r["per_class"] or 0, r["method"] != "real"))
    lines = [f"| training data | real / class | images | test {METRIC_NAMES[metric]} % (mean ± std) "
             f"| gain vs real (points, 95% CI) | worth real / class | replicates |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["per_class"]
        what = ("real only" if r["method"] == "real" else f"real + {r['method']}" if r["n_synthetic"]
                else f"real only ({r['method']})")  # a real-only arm of other classifier settings
        n = f"{r['n_real']} + {r['n_synthetic']}" if r["n_synthetic"] else str(r["n_real"])
        gain = worth = ""
        g = (r.get("gain") or {}).get(metric)
        if g is not None:
            gain = interval_text(g) + ("" if r.get("baseline", "real") == "real" else f" vs {r['baseline']}")
            same_curve = r.get("baseline", "real") == "real"  # the curve is of the study's own real-only classifier
            text = worth_text(curve, k, r[mean_key]) if len(curve) >= 2 and k and g["beyond_noise"] and same_curve else None
            if text is not None:
                worth = f"{text[0]} ({text[1]})"
        mark = " (degenerate)" if r.get("degenerate_runs") else ""
        lines.append(f"| {what} | {'all' if k is None else k} | {n} | {100 * r[mean_key]:.2f} ± {100 * r[std_key]:.2f}{mark} "
                     f"| {gain} | {worth} | {r['n_seeds']} |")
    for r in rows:  # head to head, paired by replicate
        for rival, versus in (r.get("versus") or {}).items():
            g = versus.get(metric)
            if g is not None:
                k = "all" if r["per_class"] is None else r["per_class"]
                lines.append(f"| {r['method']} minus {rival} | {k} | | | {interval_text(g)} | | {g['n']} |")
    return "\n".join(lines)


def chosen_text(selection: dict[str, Any]) -> str:
    """One line per method and size that had several candidates: what validation chose, out of how many."""
    lines = []
    for arm, sizes in selection.items():
        for k, entry in sizes.items():
            if len(entry["candidates"]) > 1:
                best = next(c for c in entry["candidates"] if c["label"] == entry["chosen"])
                lines.append(f"- {arm} at {k} per class: {entry['chosen']} (validation {100 * best['validation_mean']:.2f}, "
                             f"best of {len(entry['candidates'])} candidates)")
    return "\n".join(lines)


def undecided(g: dict[str, Any]) -> str:
    """Why a gain within noise is not a "no": how wide its interval is, and how many replicates would likely decide."""
    n, std, mean = g.get("n", 0), g.get("std", 0.0), g.get("mean", 0.0)
    if n < 2 or not std:
        return ""
    need = replicates_to_decide(mean, std)
    half = (g["high"] - g["low"]) / 2 * 100
    if need is None:
        return (f" (undecided: the interval spans +-{half:.1f} points, and a gain of {mean * 100:+.2f} would need more "
                f"than 200 replicates to tell from noise; if there is a gain it is small)")
    if need <= n:
        return ""
    return (f" (undecided: the interval spans +-{half:.1f} points; about {need} replicates would decide if the gain is the "
            f"{mean * 100:+.2f} seen here)")


def verdict_lines(summary: list[dict[str, Any]]) -> str:
    """One plain sentence per method and size: its gain on the test split, and where it stands against its rivals."""
    metric = headline(summary)
    lines = []
    for r in sorted(summary, key=lambda r: (r["per_class"] or 0, r["method"])):
        g = (r.get("gain") or {}).get(metric)
        if g is None:
            continue
        setting = "" if r.get("setting") in (None, "as given") else f" ({r['setting']})"
        word = "degenerate" if g["degenerate"] else ("beyond noise" if g["beyond_noise"] else "within noise"
                                                     + undecided(g))
        over = "real only" if r.get("baseline", "real") == "real" else f"real only ({r['baseline']})"
        text = (f"- {r['method']}{setting} at {r['per_class']} per class: {interval_text(g).split(' (')[0]} points of test "
                f"{METRIC_NAMES[metric]} over {over}, {word}")
        for rival, versus in (r.get("versus") or {}).items():
            v = versus.get(metric)
            if v is not None:
                stand = ("ahead of" if v["mean"] > 0 else "behind") if v["beyond_noise"] else "level with"
                text += f"; {stand} {rival} ({interval_text(v).split(' (')[0]})"
        lines.append(text)
    return "\n".join(lines)


def generator_lines(summary: list[dict[str, Any]]) -> str:
    """For a study comparing generators (arms ``method@generator``): per method and size, which generator's data helped
    the classifier more on the test split, or that this many replicates cannot tell. Empty for one generator."""
    metric = headline(summary)
    lines = []
    for r in sorted(summary, key=lambda r: (r["per_class"] or 0, r["method"])):
        method, _, mine = r["method"].partition("@")
        for rival, versus in (r.get("versus") or {}).items():
            other, _, theirs = rival.partition("@")
            v = versus.get(metric)
            if not mine or not theirs or other != method or v is None:
                continue
            if v["degenerate"]:
                word = "no verdict (a degenerate run)"
            elif v["beyond_noise"]:
                word = f"{mine if v['mean'] > 0 else theirs} won"
            else:
                word = "no winner: level within noise" + undecided(v)
            lines.append(f"- {method} at {r['per_class']} per class, {mine} minus {theirs}: {interval_text(v).split(' (')[0]} "
                         f"points of test {METRIC_NAMES[metric]}; {word}")
    return "\n".join(lines)
