"""Progress in a log file: plain lines at intervals, or JSON lines; a bar only on a terminal."""

import io
import json

import pytest

from diffinv import progress


def test_lines_come_every_tenth_and_at_the_end_with_rate_and_time_left():
    out = io.StringIO()
    bar = progress.LineProgress(total=100, desc="invert", unit="step", gap=0.0, stream=out)
    for _ in range(100):
        bar.update(1)
        if bar.n == 50:
            bar.set_postfix(loss="0.1234")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("invert: 10/100 step (10%)") and "step/s" in lines[0] and "left" in lines[0]
    assert "loss=0.1234" in lines[5] and "\r" not in out.getvalue()


def test_a_fast_loop_writes_one_line_and_json_lines_parse():
    out = io.StringIO()
    for _ in progress.LineProgress(range(1000), desc="loading", unit="img", stream=out):
        pass
    assert out.getvalue().count("\n") == 1 and "1,000/1,000 img (100%)" in out.getvalue()
    out = io.StringIO()
    bar = progress.LineProgress(total=4, desc="generate", unit="img", gap=0.0, json_lines=True, stream=out)
    bar.update(4)
    record = json.loads(out.getvalue().splitlines()[0])
    assert record["progress"] == "generate" and record["n"] == 4 and record["total"] == 4


def test_the_format_follows_the_terminal_and_the_setting(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    assert progress.log_format() == "lines" and isinstance(progress.bar(total=3), progress.LineProgress)
    monkeypatch.setenv(progress.ENV, "bar")
    assert progress.log_format() == "bar" and not isinstance(progress.bar(total=3), progress.LineProgress)


@pytest.mark.slow
def test_a_study_log_in_a_file_is_lines_not_carriage_returns(tmp_path, tiny_latent):
    import subprocess
    import sys

    from conftest import REPO

    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "diffinv.cli", "invert", "--model", str(tiny_latent), "--data", "digits",
                               "--per-class", "2", "--steps", "30", "--resolution", "16", "--out", str(tmp_path / "s")],
                              stderr=fh, stdout=fh, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src"),
                                                         "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and text.count("\n") <= 15 and "step (100%)" in text
