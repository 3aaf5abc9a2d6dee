"""``diffinv experiment``: a study, from one command: invert, generate, train, choose on validation, test, report.

What a study file holds and how candidates are written: :mod:`diffinv.study.spec`; how the work is
split and resumed: :mod:`diffinv.study.engine`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffinv.config import StudyConfig
from diffinv.runs import read_json
from diffinv.shards import Shard
from diffinv.stages import Stage


def run(config: StudyConfig, out: Path, *, shard: Shard, progress: bool, log: Callable[[str], None], hook: Any = None,
        **_: Any) -> Path | None:
    from diffinv.study.engine import run_study
    from diffinv.study.spec import fast

    if not config.name:  # a study of flags alone is named by its folder (titles, the report, the log)
        config = replace(config, name=Path(out).resolve().name)
    return run_study(fast(config) if config.fast else config, out, shard=shard, progress=progress, log=log, hook=hook)


def summary(config: StudyConfig, out: Path) -> str:
    """The result table, the settings chosen, and where the report and the kept synthetic sets are."""
    out = Path(out)
    kept = sorted({s for row in read_json(out / "results.json") for s in row["sets"]})
    sets = f"\nkept synthetic sets: {len(kept)} in {out / 'sets'} (e.g. {out / kept[0]})" if kept else ""
    report = f"\nreport: {out / 'report' / 'report.html'}" if (out / "report" / "report.html").is_file() else ""
    return (out / "results.md").read_text().rstrip() + f"\ntable: {out / 'results.md'}; every run: {out / 'results.csv'}" + sets + report


def _finish(out: Path, log: Callable[[str], None] = print) -> Path:
    from diffinv.study.engine import finish_study

    return finish_study(out, log=log)


def _count_done(out: Path, seen: dict[str, int]) -> tuple[int, int | None]:
    from diffinv.study.engine import count_done

    return count_done(out, seen)


STAGE = Stage(name="experiment", config=StudyConfig, marker="study.yaml", run=run, finish=_finish, count_done=_count_done,
              summary=summary, unit="run", shardable=True, path_fields=("data",), cli="study",
              usage="diffinv experiment [STUDY.yaml] --out DIR [study flags] [--invert-X V] [--generate-X V[,V...]] ...",
              absolute=lambda config: replace(config, workdir=config.workdir or os.getcwd()),
              description=("Inverts each replicate's real subset, generates every method's candidate sets, trains the "
                           "classifiers, keeps each method's candidate with the best validation score, scores the kept ones "
                           "on the test split and writes the table and the report. Re-running continues a killed study and "
                           "reuses every finished unit, also after candidates or replicates are added. A list value "
                           "(YAML) or a comma list (flags, e.g. --generate-guidance 1,2) is a list of candidates."))
