"""What a study cost, as lines for its log and a table for its report (from its ``costs.json``)."""

from __future__ import annotations

from typing import Any


def human_duration(seconds: float) -> str:
    """'41 s', '12 min', '3.4 h': a duration as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def points_per_hour(gain: dict[str, Any]) -> float:
    return gain["gain_points"] / (gain["seconds_per_replicate"] / 3600)


def cost_lines(costs: dict[str, Any]) -> list[str]:
    """The study's time (measured and estimated) and each kept method's gain per device-hour, one line each."""
    line = f"time: {human_duration(costs['measured_seconds'])} measured in the units (cost.json)"
    if costs.get("estimate"):
        line += f"; estimated before they ran: {_estimated(costs['estimate'])}"
    per_set = [f"{m} {human_duration(s)}" for m, s in costs["seconds_per_set"].items()]
    lines = [line + (f"; per synthetic set (its inversion included): {', '.join(per_set)}" if per_set else "")]
    for g in costs["gains"]:
        lines.append(f"cost: {g['method']} at {g['per_class']} per class: {g['gain_points']:+.2f} points over real only for "
                     f"{g['seconds_per_replicate']:.0f} s of {g['device']} per replicate, {points_per_hour(g):+.1f} points per "
                     f"{g['device']}-hour")
    return lines


def _estimated(estimate: dict[str, Any]) -> str:
    """The last start's estimate, with what it covered: a resumed study's estimate is of the units then left."""
    units = estimate.get("units")
    return (f"{human_duration(estimate['seconds'])} on {estimate['device']}"
            + (f" for the {units} units unfinished when the study last started" if units is not None else ""))


def cost_table(costs: dict[str, Any]) -> str:
    """Markdown: the measured time and, per kept method and size, its gain, the time that bought it and the ratio."""
    estimate = costs.get("estimate")
    head = (f"The study's units ran for {human_duration(costs['measured_seconds'])} (their cost.json)"
            + (f"; the plan estimated, before they ran, {_estimated(estimate)}" if estimate else "")
            + ". Time to make one replicate's synthetic data (its inversion included), and the "
            "gain over real only it bought; the classifiers' own training is left out, being the same with or without it.")
    if not costs["gains"]:
        return head
    rows = ["| method | per class | gain (points) | time per replicate | points per device-hour |", "|---|---|---|---|---|"]
    for g in costs["gains"]:
        rows.append(f"| {g['method']} | {g['per_class']} | {g['gain_points']:+.2f} | "
                    f"{human_duration(g['seconds_per_replicate'])} of {g['device']} | {points_per_hour(g):+.1f} |")
    return head + "\n\n" + "\n".join(rows)
