"""``diffinv`` command line: one sub-command per stage.

Every flag that sets a config field defaults to None, so a YAML ``--config`` supplies what the
command line leaves out, and the dataclass defaults supply the rest.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from diffinv import __version__
from diffinv.config import ConfigError, InvertConfig, load_config

STAGES = """stages:
  invert       learn one conditioning per real image (stage 1) -> embedding store
  tiny-model   save a small random SD-architecture model (for trying the pipeline offline)
"""


def _add_invert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("invert", help="learn one conditioning per real image (stage 1)",
                       description="Diffusion Inversion stage 1: a learned K x D conditioning per image, UNet and VAE frozen.")
    p.add_argument("--model", help="diffusers folder, .safetensors file or cached hub id")
    p.add_argument("--data", help="image folder, .npz, .csv, idx folder, 'digits' or 'hf:NAME'")
    p.add_argument("--out", required=True, help="store folder to write")
    p.add_argument("--config", help="YAML file of InvertConfig fields (flags override it)")
    p.add_argument("--format", choices=["auto", "folder", "npz", "idx", "csv", "digits", "hf"])
    p.add_argument("--split", help="data split to read (default train)")
    p.add_argument("--per-class", type=int, help="seeded subset of K images per class")
    p.add_argument("--subset-seed", type=int, help="seed of the per-class subset (default 0)")
    p.add_argument("--resolution", type=int, help="images are resized (bicubic) to R x R (default 32)")
    p.add_argument("--tokens", type=int, help="conditioning tokens K per image (default 5)")
    p.add_argument("--steps", type=int, help="optimisation steps per image (default 3000)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-2)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-2)")
    p.add_argument("--init-std", type=float, help="std of the random initial conditioning (default 1.0)")
    p.add_argument("--latent", choices=["sample", "mean"], help="sample the VAE posterior each step (paper) or use its mean")
    p.add_argument("--eval-timesteps", type=int, help="timesteps of the final per-image loss (default 8)")
    p.add_argument("--batch-size", type=int, help="images optimised together (default 64); does not change results")
    p.add_argument("--seed", type=int, help="seed of all noise and initialisation (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint the batch in progress every N steps (default 200)")
    p.add_argument("--log-every", type=int, help="progress/NaN check interval in steps (default 25)")
    p.add_argument("--bad-images", choices=["skip", "error"], help="unreadable images: skip them (reported) or stop")
    p.add_argument("--resume", action="store_true", help="continue an unfinished store, skipping finished images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_invert)


def _run_invert(args: argparse.Namespace) -> int:
    from diffinv.diffusion.inversion import invert_dataset
    from diffinv.diffusion.store import read_rows
    from diffinv.runs import read_json

    skip = {"out", "config", "resume", "overwrite", "quiet", "func", "command"}
    config = load_config(InvertConfig, args.config, {k: v for k, v in vars(args).items() if k not in skip})
    if not config.model or not config.data:
        raise ConfigError("--model and --data are required (on the command line or in --config)")
    out = invert_dataset(config, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    # The summary reads the manifest rows only: the embeddings of a large store need not fit in memory.
    info, rows = read_json(out / "store.json"), read_rows(out)
    losses = [r["loss"] for r in rows]
    inits = [r["loss_init"] for r in rows]
    print(f"store {out}: {len(rows)} images, {len(info['classes'])} classes, conditioning {tuple(info['cond_shape'])}; "
          f"mean loss {sum(inits) / len(inits):.4f} at init -> {sum(losses) / len(losses):.4f} after {config.steps} steps")
    return 0


def _add_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="save a small random SD-architecture model (diffusers format)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--kind", choices=["latent", "pixel", "sd1"], default="latent",
                   help="latent: tiny UNet + VAE; pixel: UNet only; sd1: SD 1.x-sized random UNet + VAE")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--text-encoder", action="store_true", help="also save a tiny CLIP text encoder + tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a model previously written by tiny-model")
    p.set_defaults(func=_run_tiny)


def _run_tiny(args: argparse.Namespace) -> int:
    from diffinv.diffusion.tiny import save_tiny_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (args.overwrite and (out / "model_index.json").is_file()):
            raise ConfigError(f"{out} exists and is not empty; choose a new folder (--overwrite replaces a tiny-model folder)")
        shutil.rmtree(out)
    path = save_tiny_model(args.out, args.kind, args.seed, args.prediction_type, args.text_encoder)
    print(f"saved a random {args.kind} model to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffinv", description="Diffusion Inversion: synthetic training data from a frozen diffusion model.",
                                     epilog=STAGES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffinv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")
    _add_invert(sub)
    _add_tiny(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from diffinv.data.real import DataError
    from diffinv.diffusion.backbone import ModelError
    from diffinv.diffusion.inversion import InversionError
    from diffinv.diffusion.store import StoreError
    from diffinv.runs import RunError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, InversionError, StoreError, RunError) as exc:
        print(f"diffinv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffinv {args.command}: interrupted; finished work is kept, re-run with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
