"""``diffinv`` command line: one sub-command per stage, its flags generated from the stage's config.

Every flag that sets a config field defaults to None, so a YAML ``--config`` supplies what the
command line leaves out, and the dataclass defaults supply the rest. A flag's help, choices and
default come from the field's metadata in :mod:`diffinv.config`.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from diffinv import __version__
from diffinv.config import ConfigError, InvertConfig, LaunchConfig, TrainConfig, load_config

SHARD_FLAGS = tuple(f.name for f in fields(LaunchConfig))
NOT_FIELDS = {"out", "config", "resume", "overwrite", "quiet", "func", "command", *SHARD_FLAGS}


# ----------------------------------------------------------------------------- flags from config fields


def add_config_flags(parser: argparse.ArgumentParser, cls: type, dynamic: dict[str, dict] | None = None,
                     only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls`` (or of the fields in ``only``): type, choices, help and default from the field.

    ``dynamic`` adds what only the running program knows, e.g. the registered methods as choices.
    """
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = dict(f.metadata)
        if "help" not in meta or (only is not None and f.name not in only):
            continue
        meta.update((dynamic or {}).get(f.name, {}))
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


def _stage_config(cls: type, args: argparse.Namespace):
    """The stage's config: defaults < --config YAML < flags (flags left unset are None and do not count)."""
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


def _run_experiment(args: argparse.Namespace) -> int:
    from diffinv.stages.experiment import load_study, with_overrides

    code = _run_stage("experiment", with_overrides(load_study(args.study), steps=args.steps, device=args.device), args)
    if args.report and (Path(args.out) / "summary.json").is_file():
        from diffinv.report.build import build_report

        print(f"report {build_report(args.out)}")
    return code


def _run_report(args: argparse.Namespace) -> int:
    from diffinv.report.build import build_report

    print(f"report {(page := build_report(args.folder))} (and {page.with_suffix('.md')})")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from diffinv.stages.verify import verify

    kind, problems = verify(args.folder)
    for problem in problems:
        print(f"{args.folder}: {problem}", file=sys.stderr)
    print(f"{args.folder}: {kind} {'ok' if not problems else f'has {len(problems)} problem(s)'}")
    return 2 if problems else 0


def _run_inspect(args: argparse.Namespace) -> int:
    from diffinv.stages.inspect import inspect_model

    for name, value in inspect_model(args.folder, args.data or "", args.resolution, original_config=args.original_config or "",
                                     prediction_type=args.prediction_type or ""):
        print(f"{name:>32}: {value}")
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from diffinv.launch import merge

    print(f"merged {args.folder}: the {dict(invert='store', generate='dataset', experiment='study')[merge(args.folder)]} is complete")
    return 0


# ----------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    from diffinv.classify.models import ARCHS
    from diffinv.diffusion.methods import METHODS
    from diffinv.launch import STAGES

    others = {  # name: (what it does, what its one argument is, handler)
        "report": ("Markdown + HTML report of a study or a run, from its saved files",
                   "a study folder (from experiment) or a run folder (from train)", _run_report),
        "merge": ("final step of a sharded invert / generate / experiment: the manifest, or which shards to re-run",
                  "the --out of the sharded job", _run_merge),
        "verify": ("check a store or a synthetic set byte by byte: checksums, finite embeddings, files and manifest",
                   "a store (from invert) or a synthetic set (from generate)", _run_verify),
        "inspect": ("what a run would do with a model: family, prediction type, resolution, latent, precision, FLOPs",
                    "a model (as invert's --model)", _run_inspect)}
    listing = "\n".join(f"  {name:<13}  {text}" for name, text in [(n, s.help) for n, s in STAGES.items()]
                        + [(n, o[0]) for n, o in others.items()])
    parser = argparse.ArgumentParser(prog="diffinv", description="Diffusion Inversion: synthetic training data from a frozen diffusion model.",
                                     epilog="stages:\n" + listing, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffinv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")
    dynamic = {"method": {"choices": tuple(METHODS)},
               "arch": {"help": f"classifier: {', '.join(ARCHS)} or timm:<name>"}}

    for name, spec in STAGES.items():
        p = sub.add_parser(name, help=spec.help, description=spec.description or spec.help)
        if name == "experiment":
            p.add_argument("study", help="study YAML (see diffinv.stages.experiment for its keys)")
            p.add_argument("--out", required=True, help="study folder (re-running continues it)")
            p.add_argument("--report", action="store_true", help="also write the report when done")
            add_config_flags(p, TrainConfig, only=("steps", "device"))  # overrides of every cell's train settings
            p.add_argument("--quiet", action="store_true", help="no progress bars")
            p.set_defaults(func=_run_experiment)
        elif name == "demo":
            p.add_argument("--out", default="runs/demo", help="folder to write (default runs/demo)")
            p.add_argument("--config", help="YAML file of DemoConfig fields (flags override it)")
            p.add_argument("--quiet", action="store_true", help="no progress bars")
            add_config_flags(p, spec.config, dynamic)
            p.set_defaults(func=_config_stage(name))
        else:
            _add_output_flags(p, spec.outputs)
            add_config_flags(p, spec.config, dynamic)
            p.set_defaults(func=_config_stage(name))
        if spec.shardable:
            add_config_flags(p.add_argument_group("scaling out", "shards of one job write into the same --out; the last one "
                                                  "writes the manifest"), LaunchConfig)

    for name, (text, folder, func) in others.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("folder", help=folder)
        p.set_defaults(func=func)
        if name == "inspect":
            add_config_flags(p, InvertConfig, only=("data", "resolution", "original_config", "prediction_type"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from diffinv.errors import UserError

    try:
        return args.func(args)
    except UserError as exc:
        print(f"diffinv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffinv {args.command}: interrupted; finished work is kept, re-run with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
