"""Progress that suits where it goes: a bar on a terminal, plain lines (or JSON lines) in a log file.

A progress bar redraws itself with carriage returns many times a second: in a file written by
nohup, SLURM or a Ray worker that is megabytes of noise. :func:`bar` makes a tqdm bar when stderr
is a terminal, else a :class:`LineProgress` that writes one line when another 10% is done (at most
one per 5 s) or 60 s have passed, and one when it ends, with the rate and the time left. ``DIFFINV_LOG_FORMAT`` (``--log-format``) forces
``bar``, ``lines`` or ``json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

FORMATS = ("auto", "bar", "lines", "json")
ENV = "DIFFINV_LOG_FORMAT"


def log_format() -> str:
    """bar, lines or json: what progress looks like in this process (``auto``: a bar on a terminal, else lines)."""
    chosen = os.environ.get(ENV, "auto")
    if chosen not in FORMATS or chosen == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return chosen


def bar(iterable: Iterable | None = None, *, total: float | None = None, initial: int = 0, desc: str = "",
        unit: str = "it", disable: bool | None = False, **tqdm_options: Any) -> Any:
    """A progress bar with tqdm's interface (iterate, update, set_postfix, close), drawn as the log format says.

    ``disable=None`` is tqdm's "only on a terminal": here that means lines in a file, as every other bar.
    """
    if disable:
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, disable=True)
    fmt = log_format()
    if fmt == "bar":
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=False, **tqdm_options)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, json_lines=fmt == "json")


class LineProgress:
    """tqdm's interface, written as a line per 10% of the total (``gap`` seconds apart at least) or per ``every`` seconds,
    whichever comes first, and a last line at the end."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, initial: float = 0, desc: str = "",
                 unit: str = "it", json_lines: bool = False, every: float = 60.0, gap: float = 5.0, stream: Any = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.json_lines, self.every, self.gap = json_lines, every, gap
        self.stream = stream
        self.postfix: dict[str, Any] = {}
        self._start, self._start_n = time.monotonic(), initial
        self._last_time, self._last_n = self._start, initial
        self._closed = False

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = {k: v for k, v in values.items()}

    def set_postfix_str(self, text: str) -> None:
        self.postfix = {"": text}

    def refresh(self) -> None:
        """Write a line if one is due (a caller that sets ``n`` itself calls this often)."""
        now = time.monotonic()
        step, since = (self.total or 0) / 10, now - self._last_time
        if (step and self.n - self._last_n >= step and since >= self.gap) or since >= self.every:
            self._write(now)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._last_n:
                self._write(time.monotonic(), final=True)

    def _write(self, now: float, final: bool = False) -> None:
        self._last_time, self._last_n = now, self.n
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else None
        left = (self.total - self.n) / rate if rate and self.total else None
        stream = self.stream or sys.stderr
        if self.json_lines:
            record = {"progress": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                      "rate": round(rate, 4) if rate else None, "elapsed_s": round(elapsed, 1),
                      "eta_s": round(left, 1) if left is not None else None, **{k or "note": v for k, v in self.postfix.items()}}
            print(json.dumps(record), file=stream, flush=True)
            return
        done = f"{self.n:,.0f}/{self.total:,.0f} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n:,.0f} {self.unit}"
        speed = f", {rate:.3g} {self.unit}/s" if rate else ""
        eta = f", {_duration(left)} left" if left is not None and not final else f", {_duration(elapsed)}" if final else ""
        extra = ", ".join(f"{k}={v}" if k else str(v) for k, v in self.postfix.items())
        print(f"{self.desc + ': ' if self.desc else ''}{done}{speed}{eta}{' ' + extra if extra else ''}", file=stream,
              flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
