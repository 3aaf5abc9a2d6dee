"""``diffinv report DIR``: a Markdown page and a self-contained HTML page for a study or a single run.

Every number and plot comes from the files the study or run saved (``summary.json``,
``quality.json``, ``metrics.jsonl``, generated sets' manifests), so a report can be rebuilt at
any time without training anything.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diffinv.report.cost import cost_table
from diffinv.report.efficiency import worth_text
from diffinv.report.plots import gain_plot, series_style
from diffinv.report.stats import METRIC_NAMES
from diffinv.runs import RunError, read_json, read_yaml, write_bytes, write_text

GRID_SOURCES = 6  # real images per grid
GRID_VARIANTS = 5  # synthetic variants beside each


def build_report(root: str | Path) -> Path:
    """Write ``ROOT/report/report.md`` and ``report.html``; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import json

    root = Path(root)
    try:
        return _write_report(root)
    except json.JSONDecodeError as exc:
        raise RunError(f"a file of {root} is cut short or not valid JSON ({exc}); for a study run the same `diffinv "
                       f"experiment` command again (it writes the tables again from its runs), for a run `diffinv train "
                       f"... --resume`") from None


def _write_report(root: Path) -> Path:
    if (root / "summary.json").is_file():
        sections = _study_sections(root)
        name = (read_yaml(root / "study.yaml") or {}).get("name") if (root / "study.yaml").is_file() else ""
        title = f"Study: {name or root.name}"
    elif (root / "final.json").is_file():
        sections = _run_sections(root)
        title = f"Run {root.name}"
    elif (root / "metrics.jsonl").is_file():
        raise RunError(f"{root} is an unfinished run; finish it with `diffinv train ... --resume`, then report")
    elif (root / "study.yaml").is_file():
        done, total = _runs_done(root)
        raise RunError(f"{root} is an unfinished study ({done} of {total} classifier runs finished); run the same `diffinv "
                       f"experiment` command again to finish it (finished work is reused), then report")
    else:
        raise RunError(f"{root} is neither a study (summary.json) nor a finished run (final.json)")
    out = root / "report"
    out.mkdir(exist_ok=True)
    md, body = [f"# {title}\n"], [f"<h1>{html.escape(title)}</h1>"]
    for heading, text, figure in sections:
        md.append(f"## {heading}\n")
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            md.append(text + "\n")
            body.append(_markdown_table_to_html(text))
        if figure is not None:
            name = f"{_slug(heading)}.png"
            png = figure if isinstance(figure, bytes) else _png(figure)
            write_bytes(out / name, png)
            md.append(f"![{heading}]({name})\n")
            body.append(f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    write_text(out / "report.md", "\n".join(md))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
             "img{max-width:100%}pre{background:#f6f6f6;padding:1em}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>" \
           f"<body>{''.join(body)}</body></html>"
    write_text(out / "report.html", page)
    return out / "report.html"


# ----------------------------------------------------------------------------- study


def _study_sections(root: Path) -> list[tuple[str, str, Any]]:
    from diffinv.report.table import chosen_text, generator_lines, result_table

    rows = read_json(root / "summary.json")
    quality = read_json(root / "quality.json") if (root / "quality.json").is_file() else {}
    selection = read_json(root / "selection.json") if (root / "selection.json").is_file() else {}
    study = read_yaml(root / "study.yaml") if (root / "study.yaml").is_file() else {}
    chosen = chosen_text(selection)
    sections: list[tuple[str, str, Any]] = [("Verdict", verdict(rows), None)]
    if generator_lines(rows):
        sections.append(("Which generator", generator_lines(rows), None))
    sections += [("Accuracy", _accuracy_text() + "\n\n" + result_table(rows)
                  + (f"\n\nSettings chosen on validation:\n{chosen}" if chosen else ""), _accuracy_plot(rows, study.get("name", ""))),
                 ("Sample efficiency", _efficiency_table(rows), None),
                 ("Per-class recall", _per_class_table(rows), _per_class_plot(rows, study.get("name", "")))]
    gains = gain_plot(rows, _metric(rows), METRIC_NAMES[_metric(rows)], study.get("name", ""))
    if gains is not None:
        sections.insert(sections.index(next(x for x in sections if x[0] == "Accuracy")) + 1, (
            "Gains, paired by replicate", "Each method's gain over its real-only arm in points: the mean of the replicates' "
            "differences and its 95% interval (filled: beyond noise).", gains))
    kept = {k: q for k, q in quality.items() if q.get("kept", True)}
    if kept:
        sections.append(("Synthetic data quality", _quality_table(kept), None))
    points = frontier_points(quality, selection)
    if len(points) >= 2:
        sections.append(("Fidelity / diversity frontier", _frontier_text(points), _frontier_plot(points)))
    if (root / "costs.json").is_file():
        costs = read_json(root / "costs.json")
        sections.append(("Cost", cost_table(costs), _cost_plot(costs["gains"]) if costs["gains"] else None))
    side_by_side = _methods_figure(root, kept, study)
    if side_by_side is not None:
        sections.append(("Every method side by side", "One replicate's real images (left) and what each kept method "
                         "made of that image or, for methods without one source per sample, of its class.", side_by_side))
    shown = set()
    for key, q in kept.items():
        if (q["method"], q["per_class"]) in shown:
            continue  # one grid per method and size (the first replicate's)
        shown.add((q["method"], q["per_class"]))
        figure = _grid_figure(str(root / q["synthetic"][0]), study, key)
        if figure is not None:  # drawn now and let go: a study with many kept methods held dozens of figures open
            sections.append((f"Real images and their synthetic variants ({key})", "", _png(figure)))
    return sections


def _runs_done(root: Path) -> tuple[int, int | None]:
    plan = read_json(root / "plan.json") if (root / "plan.json").is_file() else {"units": []}
    runs = [u for u in plan["units"] if u["kind"] == "run"]
    done = 0
    for u in runs:
        try:
            done += read_json(root / u["folder"] / "train.json").get("status") == "complete"
        except (OSError, ValueError):
            pass
    return done, len(runs)


def _k(value: Any) -> str:
    return "all" if value is None else str(value)


def _metric(rows: list[dict[str, Any]]) -> str:
    """The headline metric of a group's rows (balanced accuracy on an imbalanced test split)."""
    return next((r["headline"] for r in rows if r.get("headline")), "top1")


def _value(r: dict[str, Any], metric: str, what: str = "mean") -> float:
    return r.get(f"{metric}_{what}", r[f"top1_{what}"])


def _accuracy_text() -> str:
    return ("Test accuracy in %, mean ± std over replicates; gains over real only in points, paired by replicate, with "
            "their 95% t-interval (beyond noise only when it excludes 0 over >= 3 replicates and no run predicts one class "
            "for >= 95% of the images). Every method's setting was chosen on the validation split; the test split was "
            "read once, for the chosen settings only.")


def verdict(rows: list[dict[str, Any]]) -> str:
    """From the numbers, one bullet per method (which sizes it gains at beyond noise) and one per head-to-head
    comparison and size (whom it beats, trails, is level with)."""
    metric = _metric(rows)
    name = METRIC_NAMES[metric]
    lines: list[str] = []
    counts: set[int] = set()
    for method in dict.fromkeys(r["method"] for r in rows if r.get("gain")):
        mine = sorted((r for r in rows if r["method"] == method and (r.get("gain") or {}).get(metric)),
                      key=lambda r: math.inf if r["per_class"] is None else r["per_class"])
        real = [f"{100 * r['gain'][metric]['mean']:+.1f} points at {_k(r['per_class'])}" for r in mine
                if r["gain"][metric]["beyond_noise"]]
        noise = [_k(r["per_class"]) for r in mine if not r["gain"][metric]["beyond_noise"]]
        counts.update(r["gain"][metric]["n"] for r in mine)
        over = "" if mine[0].get("baseline", "real") == "real" else f" over {mine[0]['baseline']}"
        if real:
            text = f"**{method}** improves {name}{over} beyond noise: {', '.join(real)} real images per class"
            text += f"; at {', '.join(noise)} its gain is within noise" if noise else ""
        else:
            text = f"**{method}** shows no gain{over} beyond noise in {name} at any size ({', '.join(noise)} per class)"
        lines.append(f"- {text}.")
    for r in rows:
        said: dict[str, list[str]] = {}
        for rival, versus in (r.get("versus") or {}).items():
            g = versus.get(metric)
            if g is None:
                continue
            verb = "beats" if g["beyond_noise"] and g["mean"] > 0 else ("trails" if g["beyond_noise"] else "is level with")
            said.setdefault(verb, []).append(f"**{rival}** ({100 * g['mean']:+.2f} [{100 * g['low']:+.2f}, "
                                             f"{100 * g['high']:+.2f}])")
        if said:
            stands = "; ".join(f"{verb} {', '.join(them)}" for verb, them in said.items())
            lines.append(f"- Head to head at {_k(r['per_class'])} per class, **{r['method']}** {stands}.")
    if not lines:
        return "No method with synthetic data has a real-only baseline at the same size to compare with."
    n = "-".join(str(c) for c in sorted({min(counts), max(counts)})) if counts else "the"
    notes = [f"Points of test {name}, with 95% t-intervals over {n} replicates, paired by replicate; beyond noise where "
             "the interval excludes 0."]
    degenerate = [f"{r['method']} at {_k(r['per_class'])}" for r in rows if r.get("degenerate_runs")]
    if degenerate:
        notes.append(f"Degenerate runs (one class for >= 95% of predictions), never counted as gains: {', '.join(degenerate)}.")
    if metric != "top1":
        notes.append(f"The test split is imbalanced, so {name} is the headline (top-1 would reward predicting the majority).")
    return "\n".join(lines) + "\n\n" + " ".join(notes)


def _real_curve(rows: list[dict[str, Any]], metric: str = "top1") -> list[tuple[float, float]]:
    # The study's own real-only classifier; a real-only arm of other settings (a pretrained backbone) is another curve.
    return [(float(r["n_real"]) / len(r["classes"]), _value(r, metric)) for r in rows if r["method"] == "real"]


def _efficiency_table(rows: list[dict[str, Any]]) -> str:
    metric = _metric(rows)
    curve = _real_curve(rows, metric)
    if len(curve) < 2:
        return "Worth in real images needs real-only runs at two or more sizes: add them with --real-sizes (e.g. 4,8)."
    lines = [f"| method | real / class | {METRIC_NAMES[metric]} % | worth real / class | factor |", "|---|---|---|---|---|"]
    for r in rows:
        if r["n_synthetic"] == 0:
            continue
        k = r["n_real"] / len(r["classes"])
        gain = (r.get("gain") or {}).get(metric)
        text = worth_text(curve, k, _value(r, metric))
        if text is None or r.get("baseline", "real") != "real":  # over another real-only arm: not on this curve
            continue
        if gain is not None and not gain["beyond_noise"]:
            text = ("", "none: the gain is within noise")
        lines.append(f"| {r['method']} | {k:g} | {100 * _value(r, metric):.2f} | {text[0]} | {text[1]} |")
    return ("How many real images per class the real-only curve needs to match each method (interpolated in log size; "
            "'>' means better than every real-only size measured). Shown only where the method's gain over real only "
            "is beyond noise: a factor read off a gain inside its interval is not evidence.\n\n" + "\n".join(lines))


def _accuracy_plot(rows: list[dict[str, Any]], tag: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator
    from scipy.special import stdtrit

    metric = _metric(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if len({r["n_real"] / len(r["classes"]) for r in rows}) == 1:  # one size: a curve would be a column of dots
        return _accuracy_bars(fig, ax, rows, metric, tag)
    sizes: set[float] = set()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    style = series_style(methods)
    banded = methods if len(methods) <= 4 else [m for m in methods if m == "real" or m.startswith("real-")]  # else a smear
    for m in methods:
        # Bands: the 95% t-interval of each mean over its replicates.
        pts = sorted((r["n_real"] / len(r["classes"]), 100 * _value(r, metric),
                      100 * _value(r, metric, "std") * (stdtrit(r["n_seeds"] - 1, 0.975) / math.sqrt(r["n_seeds"])
                                                        if r["n_seeds"] > 1 else 0.0)) for r in rows if r["method"] == m)
        x, y, s = (np.array(v) for v in zip(*pts))
        sizes.update(x.tolist())
        ax.plot(x, y, marker="o", label=m, **style[m])
        if m in banded:
            ax.fill_between(x, y - s, y + s, alpha=0.15, color=style[m]["color"])
    ax.set_xscale("log")
    # Log-scale default ticks (10^0, 10^1...) hide the sizes actually measured; label exactly those.
    ax.set_xticks(sorted(sizes), [f"{v:g}" for v in sorted(sizes)])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("real images per class")
    ax.set_ylabel(f"test {METRIC_NAMES[metric]} (%), 95% CI")
    ax.set_title(f"Accuracy vs real data ({tag})" + ("" if banded == methods else "; bands: real only"))
    ax.grid(alpha=0.3)
    if len(methods) > 6:
        fig.set_size_inches(8.5, 4)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend()
    fig.tight_layout()
    return fig


def _accuracy_bars(fig, ax, rows: list[dict[str, Any]], metric: str, tag: str):
    """Each method's mean at the study's one size, with its 95% t-interval over replicates."""
    from scipy.special import stdtrit

    methods = list(dict.fromkeys(r["method"] for r in rows))
    means = [100 * _value(next(r for r in rows if r["method"] == m), metric) for m in methods]
    half = [100 * _value(r, metric, "std") * (stdtrit(r["n_seeds"] - 1, 0.975) / math.sqrt(r["n_seeds"]) if r["n_seeds"] > 1
                                               else 0.0) for r in (next(r for r in rows if r["method"] == m) for m in methods)]
    ax.bar(range(len(methods)), means, yerr=half, capsize=4, color="#4c72b0", alpha=0.85)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    low = min(m - h for m, h in zip(means, half))
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(m + h for m, h in zip(means, half)) + 3))
    size = rows[0]["n_real"] / len(rows[0]["classes"])
    ax.set_ylabel(f"test {METRIC_NAMES[metric]} (%), 95% CI")
    ax.set_title(f"Accuracy at {size:g} real images per class ({tag})")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def _per_class_plot(rows: list[dict[str, Any]], tag: str):
    import matplotlib.pyplot as plt

    smallest = min(r["n_real"] for r in rows)
    chosen = [r for r in rows if r["n_real"] == smallest]
    classes = chosen[0]["classes"]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.6 * len(classes) * len(chosen) / 2) + 1.8, 4))
    width = 0.8 / len(chosen)
    style = series_style([r["method"] for r in chosen])  # twelve arms, twelve looks: -ft twins hatched in their twin's colour
    for i, r in enumerate(chosen):
        vals = [100 * (v or 0) for v in r["per_class_acc_mean"]]
        ax.bar(np.arange(len(classes)) + i * width, vals, width, label=r["method"], color=style[r["method"]]["color"],
               hatch="//" if style[r["method"]]["linestyle"] == "--" else None, edgecolor="white", linewidth=0.3)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Per-class accuracy at {smallest / len(classes):g} real / class ({tag})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, never over them
    fig.tight_layout()
    return fig


def _per_class_table(rows: list[dict[str, Any]]) -> str:
    """Per-class recall (mean over replicates) of every method at the smallest real size: a class a method ignores shows."""
    smallest = min(r["n_real"] for r in rows)
    chosen = [r for r in rows if r["n_real"] == smallest]
    classes = chosen[0]["classes"]
    lines = ["| class | " + " | ".join(r["method"] for r in chosen) + " |", "|---" * (len(chosen) + 1) + "|"]
    for i, c in enumerate(classes):
        vals = ["" if r["per_class_acc_mean"][i] is None else f"{100 * r['per_class_acc_mean'][i]:.1f}" for r in chosen]
        lines.append(f"| {c} | " + " | ".join(vals) + " |")
    return f"Test recall per class in %, at {smallest / len(classes):g} real images per class, mean over replicates.\n\n" + "\n".join(lines)


def _quality_table(quality: dict[str, Any]) -> str:
    """One row per kept method and size (an -ft arm on its twin's very sets shares its row): means over the replicates'
    sets, label fidelity also with its spread; every set's own figures are in quality.json."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, q in quality.items():
        name = key.rsplit("/", 1)[0] if key.count("/") >= 2 else key
        groups.setdefault(name, []).append(q)
    names = {name: name.replace(groups[name][0]["method"], _arms(groups[name][0]["method"], also), 1)
             for name, also in _same_sets(groups).items()}
    lines = ["| method / size | sets | label fidelity | diversity (syn/real) | NN dist syn→real | NN dist real→real | near copies "
             "| FD (judge) | FID |", "|---|---|---|---|---|---|---|---|---|"]

    def mean(qs: list[dict[str, Any]], field: str) -> float | None:
        return float(np.mean([q[field] for q in qs])) if all(q.get(field) is not None for q in qs) else None

    for name, shown in names.items():
        qs = groups[name]
        fidelity = [100 * q["label_fidelity"] for q in qs]
        spread = f" ± {np.std(fidelity, ddof=1):.1f}" if len(qs) > 1 else ""
        div, fd, fid = mean(qs, "diversity_ratio"), mean(qs, "fd_judge"), mean(qs, "fid")
        lines.append(f"| {shown} | {len(qs)} | {np.mean(fidelity):.1f}%{spread} | {'' if div is None else f'{div:.3f}'} | "
                     f"{mean(qs, 'nn_distance_syn_to_real') or 0:.4f} | {mean(qs, 'nn_distance_real_to_real') or 0:.4f} | "
                     f"{sum(q['near_copies'] for q in qs)}/{sum(q['n_synthetic'] for q in qs)} | "
                     f"{'' if fd is None else f'{fd:.2f}'} | {'left out' if fid is None else f'{fid:.2f}'} |")
    notes = sorted({q["fid_note"] for q in quality.values() if q.get("fid_note")})
    precision = [f"{names[n]} {100 * p:.1f}%" for n, qs in groups.items() if n in names
                 and (p := mean(qs, "label_precision")) is not None]
    if precision:  # retrieval from a labelled pool: shown, never used to choose
        notes.append("Retrieval label precision (the share of retrieved images whose own pool label is their query's; "
                     "for the report only, never used to choose): " + ", ".join(precision))
    return ("Means over each kept method's sets, one per replicate (label fidelity also with its standard deviation; every "
            "set's own figures: quality.json). Label fidelity: accuracy of the real-only judge on the synthetic images. "
            "Distances are RMS on [0, 1] pixels. FD (judge): Fréchet distance to the real test set in the judge's feature "
            "space.\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes))


def frontier_points(quality: dict[str, Any], selection: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per (method, setting, K): label fidelity and diversity, means over the replicates' sets.

    Each point carries the setting's validation gain over real only (``selection.json``), so the
    settings compared on this plot are read against validation, never test.
    """
    sets: dict[tuple, list[dict[str, Any]]] = {}
    for q in quality.values():
        if q.get("diversity_ratio") is not None:
            sets.setdefault((q["method"], q.get("setting", ""), q["per_class"]), []).append(q)
    points: list[dict[str, Any]] = []
    varying = _varying_parts(sets)
    for (method, setting, k), also in _same_sets(sets).items():
        qs = sets[(method, setting, k)]
        entry = (selection.get(method) or {}).get(str(k)) or {}
        cand: dict[str, Any] = next((c for c in entry.get("candidates", []) if c["label"] == setting), {})
        gain = (cand.get("validation_gain") or {}).get("mean")
        several = len(entry.get("candidates", [])) > 1
        short = ", ".join(part for part in setting.split(", ") if part.split("=")[0] in varying[method])
        points.append({"method": method, "also": also, "setting": setting,
                       "label": f"{_arms(method, also)} {short}" if several and short else _arms(method, also),
                       "per_class": k, "sets": len(qs), "kept": entry.get("chosen") == setting,
                       "label_fidelity": float(np.mean([q["label_fidelity"] for q in qs])),
                       "diversity_ratio": float(np.mean([q["diversity_ratio"] for q in qs])),
                       "val_gain": gain, "metric": entry.get("metric") or "top1"})
    return points


def _same_sets(groups: dict[Any, list[dict[str, Any]]]) -> dict[Any, list[str]]:
    """Groups of quality entries (one per replicate's set) to show, each with the other arms that trained on its very
    sets (di-ft beside di), which are folded into it; an arm from scratch is shown before its -ft twin."""
    first: dict[frozenset, Any] = {}
    shown: dict[Any, list[str]] = {}
    for key in sorted(groups, key=lambda k: groups[k][0]["method"].endswith("-ft")):
        folders = frozenset(f for q in groups[key] for f in q.get("synthetic") or [])
        if folders in first:
            shown[first[folders]].append(groups[key][0]["method"])
            continue
        if folders:
            first[folders] = key
        shown[key] = []
    return shown


def _arms(method: str, also: list[str]) -> str:
    """``di(-ft)`` for an arm and its -ft twin on the same sets, ``a / b`` otherwise."""
    return f"{method}(-ft)" if also == [f"{method}-ft"] else " / ".join([method, *also])


def _varying_parts(sets: dict[tuple, Any]) -> dict[str, set[str]]:
    """Per method, the setting keys whose values differ between its candidates (a label needs no more); the classifier's
    own (``train.*``) are left out: they do not change the set."""
    values: dict[str, dict[str, set[str]]] = {}
    for method, setting, _ in sets:
        for part in filter(None, setting.split(", ")):
            key, _, value = part.partition("=")
            values.setdefault(method, {}).setdefault(key, set()).add(value)
    return {m: {k for k, v in kv.items() if len(v) > 1 and not k.startswith("train.")} for m, kv in values.items()} | {
        m: set() for m, _, _ in sets if m not in values}


def _frontier_text(points: list[dict[str, Any]]) -> str:
    lines = ["| method | setting | real / class | label fidelity | diversity (syn/real) | validation gain (points) | kept |",
             "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (_k(p["per_class"]), -p["label_fidelity"])):
        gain = "" if p["val_gain"] is None else f"{100 * p['val_gain']:+.2f} ({METRIC_NAMES[p['metric']]})"
        names = _arms(p["method"], p.get("also", []))
        lines.append(f"| {names} | {p['setting']} | {_k(p['per_class'])} | {100 * p['label_fidelity']:.1f}% | "
                     f"{p['diversity_ratio']:.3f} | {gain} | {'yes' if p['kept'] else ''} |")
    return ("Each synthetic set's label fidelity (the real-only judge's accuracy on it) against its diversity (the "
            "within-class spread of the judge's features, synthetic over real), means over replicates, with the "
            "method's gain over real only on the validation split: settings are chosen on that column, never on "
            "test.\n\n" + "\n".join(lines))


def _cost_plot(gains: list[dict[str, Any]]):
    """Gain over real only against the device time that made it: up and to the left is accuracy bought cheaply."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for g in gains:
        hours = g["seconds_per_replicate"] / 3600
        ax.scatter(hours, g["gain_points"], s=30)
        ax.annotate(f"{g['method']} k{_k(g['per_class'])}", (hours, g["gain_points"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    device = "/".join(sorted({g["device"] for g in gains}))
    ax.set_xlabel(f"{device}-hours to make one replicate's synthetic data (log)")
    ax.set_ylabel("test gain over real only (points)")
    ax.set_title("What each method's data cost and bought", fontsize=10)
    fig.tight_layout()
    return fig


def _frontier_plot(points: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ax.set_xlabel("label fidelity (%): the real-only judge's accuracy on the set")
    ax.set_ylabel("diversity: within-class spread, synthetic / real")
    ax.set_title("Fidelity vs diversity\n(colour and label: validation gain over real only, points)", fontsize=10)
    xs, ys = [100 * p["label_fidelity"] for p in points], [p["diversity_ratio"] for p in points]
    pad = max(0.05, 0.1 * (max(ys) - min(ys)))  # room for the labels, placed on the final frame
    ax.set_xlim(min(xs) - 2, max(xs) + 2)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    fig.tight_layout()
    draw_frontier(ax, points, lambda p: f"{p['label']} k{_k(p['per_class'])}")
    return fig


def draw_frontier(ax: Any, points: list[dict[str, Any]], label: Callable[[dict[str, Any]], str],
                  fontsize: float = 7) -> float:
    """Scatter :func:`frontier_points` on ``ax``: colour and label the validation gain, squares the img2img sets.

    Returns the largest |validation gain| (the colour scale's end), for a caption.
    """
    import matplotlib.pyplot as plt

    gains = [p["val_gain"] for p in points if p["val_gain"] is not None]
    scale = max((abs(g) for g in gains), default=0.0) or 1.0
    for p in points:
        colour = "grey" if p["val_gain"] is None else plt.cm.RdYlGn(0.5 + 0.5 * p["val_gain"] / scale)
        ax.scatter(100 * p["label_fidelity"], p["diversity_ratio"], color=colour, edgecolor="black", s=60, zorder=3,
                   marker="s" if "img2img" in p["method"] else "o")
    placed: list[Any] = []
    for p in sorted(points, key=lambda p: -p["diversity_ratio"]):
        gain = "" if p["val_gain"] is None else f" ({100 * p['val_gain']:+.1f})"
        placed.append(_place_label(ax, label(p) + gain, (100 * p["label_fidelity"], p["diversity_ratio"]), fontsize, placed))
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    return scale


def _place_label(ax: Any, text: str, xy: tuple[float, float], fontsize: float, placed: list[Any]) -> Any:
    """Annotate ``xy`` at the first offset where the label overlaps no label placed before and stays inside the axes
    (the last offset tried when none does); returns its box in display units."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    annotation: Any = None
    for dx, dy in ((4, 4), (4, -11), (-4, 4), (-4, -11), (4, 13), (-4, 13), (4, -20), (-4, -20)):
        if annotation is not None:
            annotation.remove()
        annotation = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), ha="left" if dx > 0 else "right",
                                 fontsize=fontsize)
        annotation.set_in_layout(False)  # a long label must not squeeze the axes
        box = annotation.get_window_extent(renderer)
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        if inside and not any(box.overlaps(other) for other in placed):
            return box
    annotation.remove()  # nowhere free: beside the point, where it is least ambiguous
    annotation = ax.annotate(text, xy, textcoords="offset points", xytext=(4, 4), fontsize=fontsize)
    annotation.set_in_layout(False)
    return annotation.get_window_extent(renderer)


def _grid_figure(synthetic: str, dataset: dict[str, Any], title: str):
    """Rows of [real source | its variants] from a generated set's manifest; None if it cannot be drawn."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from diffinv.data.real import open_images
    from diffinv.data.synthetic import read_manifest

    try:
        rows = read_manifest(synthetic)
    except Exception:  # a moved set is reported as a missing figure, not a failed report
        return None
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_source.setdefault(r.get("source") or f"class {r['class']}", []).append(r)
    sources = list(by_source)[:: max(1, len(by_source) // GRID_SOURCES)][:GRID_SOURCES]
    real_by_id: dict[str, Any] = {}
    if dataset.get("data"):
        try:
            real = open_images(dataset["data"], dataset.get("format", "auto"), dataset.get("split", "train"))
            wanted = set(sources)
            real_by_id = {i: idx for idx, i in enumerate(real.ids) if i in wanted}
        except Exception:
            real = None
    fig, axes = plt.subplots(len(sources), GRID_VARIANTS + 1, figsize=(1.3 * (GRID_VARIANTS + 1), 1.3 * len(sources)),
                             squeeze=False)
    for row, src in zip(axes, sources):
        for ax in row:
            ax.axis("off")
        if real is not None and src in real_by_id:
            row[0].imshow(real.image(real_by_id[src]))
            row[0].set_title("real", fontsize=7)
        for ax, r in zip(row[1:], by_source[src][:GRID_VARIANTS]):
            ax.imshow(Image.open(Path(synthetic) / r["file"]).convert("RGB"))
            ax.set_title(r["class"], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _methods_figure(root: Path, kept: dict[str, Any], dataset: dict[str, Any], per_row: int = 2, most_classes: int = 4):
    """Rows: real images of the first replicate at the smallest size (``per_row`` of each of up to ``most_classes``
    classes); columns: real, then each kept method's sample of that image (or of its class). None if under two methods."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from diffinv.data.real import open_images
    from diffinv.data.synthetic import read_manifest

    first = [q for q in kept.values() if q.get("replicate") == 0 and q["per_class"] == min(x["per_class"] for x in kept.values())]
    try:
        folders: dict[str, list[str]] = {}  # one column per set: methods that kept the same set share it
        for q in first:
            folders.setdefault(q["synthetic"][0], []).append(q["method"])
        sets = {"\n".join(m): (root / f, read_manifest(root / f)) for f, m in folders.items()}
        real = open_images(dataset["data"], dataset.get("format", "auto"), dataset.get("split", "train"))
    except Exception:  # a moved set or data: the report goes on without the figure
        return None
    sources = {r["source"]: r["class"] for _, rows in sets.values() for r in rows if r.get("source") in set(real.ids)}
    classes = sorted(set(sources.values()))[:most_classes]
    picked = [s for c in classes for s in [s for s, k in sources.items() if k == c][:per_row]]
    if len(sets) < 2 or not picked:
        return None
    index = {i: n for n, i in enumerate(real.ids)}
    titles = [name.replace("@", "\n@") for name in ["real", *sets]]  # di@generator on two lines: columns are narrow
    width = max(1.2, 0.075 * max(len(line) for t in titles for line in t.split("\n")))  # inches per column, titles apart
    fig, axes = plt.subplots(len(picked), len(sets) + 1, figsize=(width * (len(sets) + 1), 1.25 * len(picked)), squeeze=False)
    for row, src in zip(axes, picked):
        for ax in row:
            ax.axis("off")
        row[0].imshow(real.image(index[src]))
        for col, (folder, rows) in enumerate(sets.values(), start=1):
            same_class = [r for r in rows if r["class"] == sources[src]][picked.index(src) % per_row:]
            own = [r for r in rows if r.get("source") == src] or same_class
            if own:
                row[col].imshow(Image.open(folder / own[0]["file"]).convert("RGB"))
    for col, title in enumerate(titles):
        axes[0][col].set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- single run


def _run_sections(root: Path) -> list[tuple[str, str, Any]]:
    import json

    import matplotlib.pyplot as plt

    final = read_json(root / "final.json")
    rows = []
    for number, line in enumerate((root / "metrics.jsonl").read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError:
            raise RunError(f"{root}/metrics.jsonl line {number} is cut short or corrupt; delete that line (the run's result "
                           f"in final.json is intact) and report again") from None
    config = read_yaml(root / "config.yaml")
    classes = final["classes"]
    text = (f"| field | value |\n|---|---|\n| architecture | {config['arch']} |\n| real images | {final['n_real']} |\n"
            f"| synthetic images | {final['n_synthetic']} |\n| steps | {final['steps']} |\n"
            f"| test top-1 | {100 * final['top1']:.2f}% on {final['n_test']} images |")
    curve, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [100 * r["top1"] for r in rows], marker="o")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("test top-1 (%)")
    ax[1].plot(steps, [r["train_loss"] for r in rows], label="train (EMA)")
    ax[1].plot(steps, [r["loss"] for r in rows], label="test")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("loss")
    ax[1].legend()
    curve.tight_layout()
    conf = np.array(rows[-1]["confusion"])
    fig, axc = plt.subplots(1, 2, figsize=(11, 4.5))
    axc[0].bar(range(len(classes)), [100 * (v or 0) for v in final["per_class"]])
    axc[0].set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axc[0].set_ylabel("test accuracy (%)")
    axc[1].imshow(conf / np.maximum(conf.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    axc[1].set_xticks(range(len(classes)), classes, rotation=90)
    axc[1].set_yticks(range(len(classes)), classes)
    axc[1].set_xlabel("predicted")
    axc[1].set_ylabel("true")
    fig.tight_layout()
    return [("Summary", text, None), ("Learning curves", "", curve), ("Per-class accuracy and confusion", "", fig)]


# ----------------------------------------------------------------------------- helpers


def _png(figure) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80]


def _markdown_table_to_html(text: str) -> str:
    """The small subset of Markdown these sections use: paragraphs, bullet lists and pipe tables."""
    out: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if table:
            head, *body = [row for row in table if not set(row.replace("|", "")) <= set("-: ")]
            cells = lambda row: [c.strip() for c in row.strip().strip("|").split("|")]  # noqa: E731
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells(head)) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells(r)) + "</tr>" for r in body)
                       + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("- "):
            if out and out[-1].endswith("</li></ul>"):  # the next item of the same list
                out[-1] = out[-1][:-len("</ul>")] + f"<li>{_inline(line[2:])}</li></ul>"
            else:
                out.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "".join(out)


def _inline(text: str) -> str:
    """Markdown's inline marks (**bold**, *italic*, `code`, [text](link)) as HTML; everything else escaped."""
    import re

    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{m[2].replace(chr(34), "&quot;")}">{m[1]}</a>', text)
