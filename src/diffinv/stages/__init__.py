"""The pipeline's stages, one module per sub-command, each exporting a :class:`Stage` (``merge``'s is in :mod:`diffinv.launch`,
``experiment``'s and ``demo``'s in :mod:`diffinv.study`, which drives the stages;
``train_data`` is the train stage's data, ``generate_inputs`` what the generate stage opens for a method).
The CLI builds every sub-command from its Stage alone; :data:`diffinv.launch.CATALOG` lists them
(and imports a stage's module only when it is used).

real images -> invert -> store -> generate -> synthetic set -> train / experiment -> runs -> report

A stage owns its output folder (fresh / resume / done, atomic units, the manifest); the maths it
drives lives in the library (:mod:`diffinv.diffusion`, :mod:`diffinv.classify`,
:mod:`diffinv.quality`), which never imports from here. :mod:`diffinv.launch` runs a stage whole,
as one shard, or as shards on Ray, by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    """What the launcher and the CLI need to know of a stage.

    ``run(config, out, *, shard, resume, overwrite, progress, log, hook)`` does the work (one
    shard's part of it) and returns ``out``, or None while other shards' units are missing.
    ``finish(out)`` writes the manifest once every unit is there (``diffinv merge``);
    ``count_done(out, seen)`` reads (finished, total) units from the folder for progress;
    ``summary(config, out)`` is the line the CLI prints; ``path_fields`` are config fields that
    name local paths (made absolute for Ray workers).

    ``cli`` says how the CLI builds the sub-command, the same way for every stage of a kind:
    "config" (a flag per field of ``config``, plus --out/--config/--resume/--overwrite), "study"
    (a study's flags; ``study`` is its fixed study file, else a STUDY.yaml argument) or "folder"
    (a tool that reads one folder, described by ``folder``, with ``flags`` = (config class, fields)
    of extra flags, run by ``command(args) -> exit code``; it has no ``run``).
    """

    name: str
    config: type | None = None
    marker: str = ""
    run: Callable[..., Path | None] | None = None
    description: str = ""  # the sub-command's --help text (default: its line in the catalog)
    outputs: tuple[str, str, str] | None = None  # help of --out, --resume, --overwrite (stages with an output folder)
    finish: Callable[..., Path | None] | None = None
    count_done: Callable[[Path, dict[str, int]], tuple[int, int | None]] | None = None
    summary: Callable[[Any, Path], str] | None = None
    unit: str = "unit"
    path_fields: tuple[str, ...] = ()
    shardable: bool = False
    absolute: Callable[[Any], Any] | None = None  # a config with its local paths made absolute, when path_fields cannot say
    cli: str = "config"
    usage: str = ""
    study: str = ""
    default_out: str = ""
    folder: str = ""
    flags: tuple[type, tuple[str, ...]] | None = None
    command: Callable[[Any], int] | None = None
