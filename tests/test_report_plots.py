"""The study figures: each gain drawn where its interval is, filled only beyond noise; a method and its -ft twin alike."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from diffinv.report.plots import gain_plot, series_style  # noqa: E402


def _row(method, k, mean, low, high, beyond, baseline="real"):
    gain = {"balanced_accuracy": {"mean": mean, "low": low, "high": high, "beyond_noise": beyond}}
    return {"method": method, "per_class": k, "baseline": baseline, "gain": gain}


def test_each_gain_is_drawn_at_its_interval_and_filled_only_beyond_noise():
    rows = [{"method": "real", "per_class": 5},
            _row("di", 5, 0.02, -0.01, 0.05, False), _row("lora", 5, 0.08, 0.02, 0.13, True),
            _row("di", 10, 0.05, 0.03, 0.075, True), _row("di-ft", 10, 0.003, -0.02, 0.03, False, baseline="real-ft")]
    fig = gain_plot(rows, "balanced_accuracy", "balanced accuracy", "t")
    five, ten = fig.axes
    points = {(ax.get_title(), line.get_ydata()[0]): (line.get_xdata()[0], line.get_markerfacecolor())
              for ax in (five, ten) for line in ax.lines if line.get_marker() == "o"}
    assert points[("5 real / class", 0)] == (2.0, "white")  # di: within noise, hollow
    assert points[("5 real / class", 1)][0] == 8.0 and points[("5 real / class", 1)][1] != "white"
    assert points[("10 real / class", 0)][0] == 5.0 and points[("10 real / class", 0)][1] != "white"
    assert len(points) == 4  # no point where a method has no row at that size
    bars = [c for c in ten.collections if len(c.get_segments())]  # the interval of di at 10: 3 to 7.5 points
    assert any(abs(s[0][0] - 3.0) < 1e-9 and abs(s[1][0] - 7.5) < 1e-9 for c in bars for s in c.get_segments())
    assert [t.get_text() for t in five.get_yticklabels()] == ["di", "lora", "di-ft (vs real-ft)"]


def test_no_gain_no_figure_and_twins_share_a_colour():
    assert gain_plot([{"method": "real", "per_class": 5}], "top1", "top-1", "t") is None
    style = series_style(["real", "di", "di-ft", "lora", "real-ft"])
    assert style["di"]["color"] == style["di-ft"]["color"] != style["lora"]["color"]
    assert style["di-ft"]["linestyle"] == "--" and style["di"]["linestyle"] == "-"
    assert style["real"]["color"] == style["real-ft"]["color"]


def test_the_title_of_a_one_panel_figure_stays_inside_it():
    rows = [_row(m, 5, 0.02, -0.01, 0.05, False) for m in ("di", "img2img", "retrieval")]
    fig = gain_plot(rows, "balanced_accuracy", "balanced accuracy", "fashion-mnist-generalist")
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    frame = fig.bbox
    assert frame.x0 <= title.x0 and title.x1 <= frame.x1  # before: cut at both edges of a one-size study's figure
    low, high = sorted(fig.axes[0].get_ylim())
    assert low < -0.3 and high > 2.3  # the first and last points clear the frame (before: cut in half at its edge)


def test_an_arm_trained_otherwise_on_the_same_sets_shares_its_twins_frontier_point():
    from diffinv.report.build import frontier_points

    def q(method, setting, folder, r):
        return {"method": method, "setting": setting, "per_class": 5, "replicate": r, "label_fidelity": 0.6,
                "diversity_ratio": 0.9, "synthetic": [f"sets/{folder}-r{r}"]}

    ft = "guidance=2, train.pretrained=backbones/b/model.safetensors"
    quality = {f"{m}/{s}/{r}": q(m, s, f, r) for r in (0, 1) for m, s, f in
               (("di", "guidance=2", "di-a"), ("di", "guidance=1", "di-b"), ("di-ft", ft, "di-a"), ("lora", "", "lora-a"))}
    def cands(*labels):
        return {"5": {"chosen": labels[0], "candidates": [{"label": s, "validation_gain": {"mean": 0.01}} for s in labels]}}

    selection = {"di": cands("guidance=2", "guidance=1"), "di-ft": cands(ft, "guidance=1, train.pretrained=x"),
                 "lora": cands("")}
    points = frontier_points(quality, selection)
    labels = sorted(p["label"] for p in points)
    assert labels == ["di guidance=1", "di(-ft) guidance=2", "lora"]  # before: a second di-ft point on top, path in label


def test_the_quality_table_has_a_row_per_method_and_size_not_per_set():
    from diffinv.report.build import _quality_table

    def q(method, folder, r, fidelity):
        return {"method": method, "per_class": 5, "label_fidelity": fidelity, "diversity_ratio": 1.0, "n_synthetic": 50,
                "near_copies": r, "nn_distance_syn_to_real": 0.1, "nn_distance_real_to_real": 0.2, "fd_judge": 3.0,
                "fid": None, "fid_note": "FID left out", "synthetic": [f"sets/{folder}-r{r}"]}

    quality = {f"{m}/k5/r{r}": q(m, f, r, fid) for r, fid in ((0, 0.8), (1, 0.9)) for m, f in
               (("di-ft", "di-a"), ("di", "di-a"), ("lora", "lora-a"))}
    rows = [line for line in _quality_table(quality).splitlines() if line.startswith("| ") and "/k5" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| di(-ft)/k5", "| lora/k5"]  # before: six rows, di's sets twice
    assert rows[0].split(" | ")[1:4] == ["2", "85.0% ± 7.1", "1.000"] and "| 1/100 |" in rows[0]
