"""``diffinv report FOLDER``: the Markdown + HTML report of a study or a run, from its saved files."""

from __future__ import annotations

from diffinv.stages import Stage


def _command(args) -> int:
    from diffinv.report.build import build_report

    print(f"report {(page := build_report(args.folder))} (and {page.with_suffix('.md')})")
    return 0


STAGE = Stage(name="report", cli="folder", command=_command,
              folder="a study folder (from experiment) or a run folder (from train)")
