"""``diffinv`` command line: one sub-command per stage, its flags generated from the stage's config.

Every flag that sets a config field defaults to None, so a YAML ``--config`` supplies what the
command line leaves out, and the dataclass defaults supply the rest. A flag's help, choices and
default come from the field's metadata in :mod:`diffinv.config`.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import MISSING, fields, replace
from pathlib import Path

from diffinv import __version__
from diffinv.config import STUDY_OWNED, ConfigError, LaunchConfig, StudyConfig, load_config

SHARD_FLAGS = tuple(f.name for f in fields(LaunchConfig))
NOT_FIELDS = {"out", "config", "resume", "overwrite", "quiet", "func", "command", "log_format", *SHARD_FLAGS}


# ----------------------------------------------------------------------------- flags from config fields


def add_config_flags(parser: argparse._ActionsContainer, cls: type, dynamic: dict[str, typing.Callable[[], dict]] | None = None,
                     only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls`` (or of the fields in ``only``): type, choices, help and default from the field.

    ``dynamic`` adds what only the running program knows, e.g. the registered methods as choices (called for
    the fields ``cls`` has).
    """
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = dict(f.metadata)
        if "help" not in meta or not meta.get("cli", True) or (only is not None and f.name not in only):
            continue
        meta.update((dynamic or {}).get(f.name, dict)())
        hint = hints[f.name]
        optional = [a for a in typing.get_args(hint) if a is not type(None)]  # int | None -> int
        base = optional[0] if optional and typing.get_origin(hint) is not tuple else hint
        kwargs: dict = {"dest": f.name, "default": None}
        if base is bool:
            kwargs.update(action="store_const", const=not f.default)
        elif typing.get_origin(hint) is tuple:
            if meta.get("action"):
                kwargs.update(action=meta["action"])
                if meta["action"] == "extend":
                    kwargs["nargs"] = "+"
            else:
                kwargs.update(type=str, metavar=meta.get("metavar") or "A,B")  # "64,128": load_config splits it
        else:
            kwargs["type"] = base
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(meta.get("flag") or "--" + f.name.replace("_", "-"), help=_help(meta["help"], f), **kwargs)


def _help(text: str, f) -> str:
    default = f.default if f.default is not MISSING else None
    if isinstance(default, bool) or default in (None, "", ()):
        return text.replace("%", "%%")
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default {shown})".replace("%", "%%")


def add_study_flags(parser: argparse.ArgumentParser, dynamic: dict[str, typing.Callable[[], dict]]) -> None:
    """A study's own flags, then one per field of each stage it runs: ``--invert-steps``, ``--generate-guidance`` ...

    A stage flag's value may be a comma list, which makes candidates (``--generate-guidance 1,2``).
    """
    from diffinv.study.spec import BLOCKS

    add_config_flags(parser, StudyConfig, dynamic)
    for block, cls in BLOCKS.items():
        group = parser.add_argument_group(f"{block} settings", f"{cls.__name__} fields for every {block} of the study "
                                          f"(a comma list is candidates, chosen on validation)")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            meta = f.metadata
            if "help" not in meta or f.name in STUDY_OWNED[cls.__name__] or typing.get_origin(hints[f.name]) is tuple:
                continue
            kwargs: dict = {"dest": f"{block}.{f.name}", "default": None}
            if hints[f.name] is bool:
                kwargs.update(action="store_const", const=not f.default)
            else:
                kwargs.update(metavar="V[,V...]")
            parser_help = _help(meta["help"], f)
            group.add_argument(f"--{block}-{f.name.replace('_', '-')}", help=parser_help, **kwargs)


def _study_config(args: argparse.Namespace, path: str | None):
    """The study of ``path`` (optional) with the flags over it."""
    from diffinv.study.spec import BLOCKS, load_study, parse_candidates

    flags: dict = {block: {} for block in BLOCKS}
    for key, value in vars(args).items():
        if value is None or key in NOT_FIELDS or key == "study":
            continue
        block, _, name = key.partition(".")
        if name:
            flags[block][name] = parse_candidates(value) if isinstance(value, str) else value
        else:
            flags[key] = value
    return load_study(path, flags)


def _stage_config(cls: type | None, args: argparse.Namespace):
    """The stage's config: defaults < --config YAML < flags (flags left unset are None and do not count)."""
    if cls is None:
        raise RuntimeError("a stage built from its config's fields has a config class")
    return load_config(cls, args.config, {k: v for k, v in vars(args).items() if k not in NOT_FIELDS})


def _add_output_flags(p: argparse.ArgumentParser, outputs: tuple[str, str, str]) -> None:
    what, resume, overwrite = outputs
    p.add_argument("--out", required=True, help=what)
    p.add_argument("--config", help="YAML file of the config fields below (flags override it)")
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--overwrite", action="store_true", help=overwrite)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- running a stage


def _run_stage(stage: str, config, args: argparse.Namespace) -> int:
    """Run ``stage`` as the flags ask: whole, one --shard (or the launcher's), or all shards on Ray; print its summary."""
    from diffinv.launch import get_stage, run_on_ray, run_shard
    from diffinv.shards import Shard, resolve_shard

    spec = get_stage(stage)
    out: Path | None
    launch = load_config(LaunchConfig, None, {k: getattr(args, k, None) for k in SHARD_FLAGS})
    if launch.backend == "ray":
        if launch.shard or getattr(args, "overwrite", False):
            raise ConfigError(f"--{'shard' if launch.shard else 'overwrite'} and --backend ray do not mix: Ray makes the shards "
                              f"itself (set --workers), and overwriting would race them (delete {args.out} first)")
        out = run_on_ray(stage, config, args.out, workers=launch.workers, address=launch.ray_address or None,
                         gpus_per_shard=launch.gpus_per_shard, attempts=launch.attempts, progress=not args.quiet)
    else:
        shard = resolve_shard(launch.shard or None) if spec.shardable else Shard()
        out = run_shard(stage, config, args.out, shard, progress=not args.quiet, resume=getattr(args, "resume", False),
                        overwrite=getattr(args, "overwrite", False))
        if out is None:
            print(f"shard {shard} of {args.out} is done; the other shards' work is not finished yet (the last shard to "
                  f"finish writes the manifest, or run `diffinv merge {args.out}`)")
            return 0
    if spec.summary is not None:
        print(spec.summary(config, Path(out)))
    return 0


def _config_stage(stage: str):
    """The handler of a stage whose flags are its config's fields."""
    def run(args: argparse.Namespace) -> int:
        from diffinv.launch import get_stage

        return _run_stage(stage, _stage_config(get_stage(stage).config, args), args)
    return run


# ----------------------------------------------------------------------------- the parser


def build_parser(stages: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of ``stages`` (default: every stage); the others are names only.

    ``main`` builds the flags of the one stage on its command line: a stage's module (and torch) is
    imported only when that stage is used, so ``diffinv --help`` and ``diffinv verify`` start at once.
    """
    from diffinv.launch import CATALOG, STAGES

    listing = "\n".join(f"  {name:<13}  {line}" for name, (_, line) in CATALOG.items())
    parser = argparse.ArgumentParser(prog="diffinv",
                                     description="Diffusion Inversion: synthetic training data from a frozen diffusion model.",
                                     epilog="stages:\n" + listing, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffinv {__version__}")
    parser.add_argument("--log-format", choices=("auto", "bar", "lines", "json"), default=None,
                        help="progress as a bar (a terminal), plain lines every 10%% or 60 s (a log file: the default when "
                             "stderr is not a terminal) or JSON lines; also $DIFFINV_LOG_FORMAT")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")
    for name, (_, line) in CATALOG.items():
        # No help= here: the stages are listed once, one line each, in the epilog.
        if stages is not None and name not in stages:
            sub.add_parser(name, add_help=False)  # a name only, so that a mistyped stage is still told the choices
            continue
        spec = STAGES[name]
        p = sub.add_parser(name, description=spec.description or line, usage=spec.usage or None)
        _ARGUMENTS[spec.cli](p, spec, DYNAMIC)
        if spec.shardable:
            add_config_flags(p.add_argument_group("scaling out", "shards of one job write into the same --out; the last one "
                                                  "writes the manifest"), LaunchConfig)
    return parser


def _method_choices() -> dict:
    from diffinv.diffusion.methods import METHODS

    return {"choices": tuple(METHODS)}


def _arch_help() -> dict:
    from diffinv.classify.models import ARCHITECTURES

    return {"help": f"classifier: {', '.join(ARCHITECTURES.names())} or timm:<name>"}


def _export_choices() -> dict:
    from diffinv.data.export import EXPORT_FORMATS

    return {"choices": tuple(EXPORT_FORMATS.names())}


def _data_format_choices() -> dict:
    from diffinv.data.real import OPENERS

    return {"choices": ("auto", *OPENERS.names())}


# What only the running program knows, by field: looked up (importing the registry) only when a stage has that field.
DYNAMIC: dict[str, typing.Callable[[], dict]] = {"method": _method_choices, "arch": _arch_help, "to": _export_choices,
                                                 "format": _data_format_choices}


def _chosen_stage(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is neither a top-level option nor its value)."""
    words = iter(argv)
    for word in words:
        if word == "--log-format":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _config_arguments(p: argparse.ArgumentParser, spec, dynamic: dict[str, typing.Callable[[], dict]]) -> None:
    """A stage whose flags are its config's fields."""
    _add_output_flags(p, spec.outputs)
    add_config_flags(p, spec.config, dynamic)
    p.set_defaults(func=_config_stage(spec.name))


def _study_arguments(p: argparse.ArgumentParser, spec, dynamic: dict[str, typing.Callable[[], dict]]) -> None:
    """A study: a STUDY.yaml argument (or the stage's fixed study), then the study's flags and every stage's."""
    if spec.study:
        p.add_argument("--out", default=spec.default_out, help=f"folder to write (default {spec.default_out})")
    else:
        p.add_argument("study", nargs="?", help="study YAML (keys: the flags below; see diffinv.study.spec)")
        p.add_argument("--out", required=True, help="study folder (re-running continues it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_study_flags(p, dynamic)

    def run(args: argparse.Namespace) -> int:
        if not spec.study and args.study is None and args.data is None:
            raise ConfigError(f"give a study file (diffinv {spec.name} STUDY.yaml --out DIR) or at least --data (the methods "
                              f"then are di and img2img; see diffinv {spec.name} --help)")
        config = _study_config(args, spec.study or args.study)
        if config.plan:
            from diffinv.study.engine import show_plan
            from diffinv.study.spec import fast

            if not config.name:
                config = replace(config, name=Path(args.out).resolve().name)
            show_plan(fast(config) if config.fast else config, args.out)
            return 0
        return _run_stage(spec.name, config, args)
    p.set_defaults(func=run)


def _folder_arguments(p: argparse.ArgumentParser, spec, dynamic: dict[str, typing.Callable[[], dict]]) -> None:
    """A tool that reads one folder (verify, inspect, report, merge)."""
    p.add_argument("folder", help=spec.folder)
    if spec.flags is not None:
        add_config_flags(p, spec.flags[0], only=spec.flags[1])
    p.set_defaults(func=spec.command)


_ARGUMENTS = {"config": _config_arguments, "study": _study_arguments, "folder": _folder_arguments}


def reference() -> str:
    """docs/reference.md: every sub-command's ``--help``, as printed at 100 columns (so it cannot drift from the CLI)."""
    import os

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = ["# Command reference\n", "Generated from the configs' field metadata by `python docs/make_reference.py`; "
                 "`diffinv STAGE --help` prints the same.\n", "```text", parser.format_help().rstrip(), "```\n"]
        for name, sub in action.choices.items():
            parts += [f"## `diffinv {name}`\n", "```text", sub.format_help().rstrip(), "```\n"]
        return "\n".join(parts)
    finally:
        os.environ.pop("COLUMNS") if saved is None else os.environ.__setitem__("COLUMNS", saved)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(stages=tuple(filter(None, [_chosen_stage(argv)])))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from diffinv.errors import UserError

    if args.log_format:
        import os

        from diffinv.progress import ENV

        os.environ[ENV] = args.log_format  # worker processes inherit it
    try:
        return args.func(args)
    except UserError as exc:
        print(f"diffinv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `diffinv inspect M | head`: the reader has all it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes at exit
        return 0
    except OSError as exc:
        advice = _os_advice(exc)
        if advice is None:
            raise
        print(f"diffinv {args.command}: error: {advice}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "with --resume" if any(a.option_strings == ["--resume"] for a in _subparser(parser, args.command)._actions) else ""
        print(f"diffinv {args.command}: interrupted; finished work is kept: run the same command again {again}".rstrip(),
              file=sys.stderr)
        return 130


def _os_advice(exc: OSError) -> str | None:
    """One line for the operating-system errors a user can fix (a name, the disk, permissions); None for the others."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENAMETOOLONG:
        return f"a file or folder name is too long for this file system{where[:120]}; use a shorter --out or name"
    if exc.errno == errno.ENOSPC:
        return f"the disk is full{where}; free space or write elsewhere; finished work is kept: run the same command again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}; choose a folder you can write to"
    return None


if __name__ == "__main__":
    sys.exit(main())
