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
from diffinv.config import (ARCHS, AUGS, METHODS, SAMPLERS, ConfigError, DemoConfig, GenerateConfig, InvertConfig, PretrainConfig, TrainConfig,
                            load_config)

STAGES = """stages:
  demo         the whole method on a few-shot split of digits, offline on CPU: table + report
  invert       learn one conditioning per real image (stage 1) -> embedding store
  generate     sample a synthetic dataset around the learned conditionings (stage 2)
  train        train a classifier on real, synthetic or both; evaluate on the real test split (stage 3)
  experiment   run a study grid (datasets x real sizes x methods x archs x augs x seeds): mean and std
  report       Markdown + HTML report of a study or a run, from its saved files
  merge        final step of a sharded invert / generate / experiment (--shard I/N, torchrun, SLURM, --backend ray)
  pretrain-base  train the project's own small base generator on unlabeled images (diffusers format)
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
    p.add_argument("--init", choices=["random", "encoder"],
                   help="start c_i from keyed noise (default, the paper) or from the base's encoder tokens (pretrain-base models)")
    p.add_argument("--latent", choices=["sample", "mean"], help="sample the VAE posterior each step (paper) or use its mean")
    p.add_argument("--eval-timesteps", type=int, help="timesteps of the final per-image loss (default 8)")
    p.add_argument("--batch-size", type=int, help="images optimised together (default 64); does not change results")
    p.add_argument("--seed", type=int, help="seed of all noise and initialisation (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint the batch in progress every N steps (default 200)")
    p.add_argument("--log-every", type=int, help="progress/NaN check interval in steps (default 25)")
    p.add_argument("--bad-images", choices=["skip", "error"], help="unreadable images: skip them (reported) or stop")
    p.add_argument("--target", choices=["image", "class"],
                   help="one conditioning per image (Diffusion Inversion, default) or per class (the class-inversion rival)")
    p.add_argument("--nan-retries", type=int, help="re-invert an image whose loss is not finite at lr/10, lr/100 ... this many times (default 2)")
    _add_output_flags(p, "continue an unfinished store, skipping finished images", "replace an existing store")
    _add_shard_flags(p)
    p.set_defaults(func=_run_invert)


def _add_shard_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scaling out", "shards of one job write into the same --out; the last one writes the manifest")
    g.add_argument("--shard", metavar="I/N", help="run shard I of N (0-based); default: RANK/WORLD_SIZE from torchrun or "
                                                   "accelerate, SLURM array / srun task ids, else the whole job")
    g.add_argument("--backend", choices=["local", "ray"], default="local", help="ray: run --workers shards as Ray tasks (pip install ray)")
    g.add_argument("--workers", type=int, default=2, help="shards (= Ray tasks) with --backend ray (default 2)")
    g.add_argument("--ray-address", help="join a running Ray cluster (e.g. HEAD:6379 or 'auto'); default: start a local one")
    g.add_argument("--gpus-per-shard", type=float, help="GPUs each Ray task asks for (default: 1 when the cluster has GPUs)")
    g.add_argument("--attempts", type=int, default=3, help="tries per Ray shard before the job gives up on it (default 3)")


def _run_stage(stage: str, config, args: argparse.Namespace) -> Path | None:
    """Run ``stage`` as the flags ask: whole, one --shard (or the launcher's), or all shards on Ray.

    Returns the output folder, or None when other shards' work is still missing.
    """
    from diffinv.shards import resolve_shard, run_on_ray, run_shard

    if args.backend == "ray":
        if args.shard:
            raise ConfigError("--shard and --backend ray do not mix: Ray makes the shards itself (set --workers)")
        if args.workers < 1 or args.attempts < 1:
            raise ConfigError("--workers and --attempts must be >= 1")
        if getattr(args, "overwrite", False):
            raise ConfigError(f"--overwrite does not mix with --backend ray (it would race the shards); delete {args.out} first")
        return run_on_ray(stage, config, args.out, workers=args.workers, address=args.ray_address,
                          gpus_per_shard=args.gpus_per_shard, attempts=args.attempts, progress=not args.quiet)
    shard = resolve_shard(args.shard)
    out = run_shard(stage, config, args.out, shard, progress=not args.quiet, resume=getattr(args, "resume", False),
                    overwrite=getattr(args, "overwrite", False))
    if out is None:
        print(f"shard {shard} of {args.out} is done; the other shards' work is not finished yet (the last shard to "
              f"finish writes the manifest, or run `diffinv merge {args.out}`)")
    return out


def _add_output_flags(p: argparse.ArgumentParser, resume: str, overwrite: str) -> None:
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--overwrite", action="store_true", help=overwrite)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _stage_config(cls: type, args: argparse.Namespace):
    """The stage's config: defaults < --config YAML < flags (flags left unset are None and do not count)."""
    not_fields = {"out", "config", "resume", "overwrite", "quiet", "func", "command", *SHARD_FLAGS}
    return load_config(cls, args.config, {k: v for k, v in vars(args).items() if k not in not_fields})


SHARD_FLAGS = ("shard", "backend", "workers", "ray_address", "gpus_per_shard", "attempts")


def _run_invert(args: argparse.Namespace) -> int:
    from diffinv.diffusion.store import read_rows
    from diffinv.runs import read_json

    config = _stage_config(InvertConfig, args)
    if not config.model or not config.data:
        raise ConfigError("--model and --data are required (on the command line or in --config)")
    out = _run_stage("invert", config, args)
    if out is None:
        return 0
    # The summary reads the manifest rows only: the embeddings of a large store need not fit in memory.
    info, rows = read_json(out / "store.json"), read_rows(out)
    losses = [r["loss"] for r in rows]
    inits = [r["loss_init"] for r in rows]
    what = f"{len(rows)} images" if config.target == "image" else f"one conditioning per class from {sum(r['n_images'] for r in rows)} images"
    print(f"store {out}: {what}, {len(info['classes'])} classes, conditioning {tuple(info['cond_shape'])}; "
          f"mean loss {sum(inits) / len(inits):.4f} at init -> {sum(losses) / len(losses):.4f} after {config.steps} steps")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample a synthetic dataset from an embedding store (stage 2)",
                       description="Diffusion Inversion stage 2: c = c_i + s (c_j - c_i) + sigma * eps, guided by the mean "
                                   "embedding; or a rival method (prompt, class-inversion, img2img) through the same sampler.")
    p.add_argument("--store", help="embedding store from `diffinv invert` (per class for --method class-inversion)")
    p.add_argument("--model", help="model; default: the one the store was made with")
    p.add_argument("--out", required=True, help="dataset folder to write: OUT/<class>/<id>.png + manifest.jsonl")
    p.add_argument("--config", help="YAML file of GenerateConfig fields (flags override it)")
    p.add_argument("--method", choices=METHODS, help="di (default), prompt, class-inversion or img2img")
    p.add_argument("--per-image", type=int, help="samples per real image (default 5); per-class methods make as many per class")
    p.add_argument("--interp", type=float, help="s, the step towards a same-class partner (default 0.1)")
    p.add_argument("--interp-mode", choices=["linear", "spherical"], help="interpolation (default linear)")
    p.add_argument("--noise", type=float, help="sigma of the Gaussian added to the conditioning (default 0.1)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 2; 1 = none)")
    p.add_argument("--uncond", choices=["mean", "class-mean"], help="guidance's unconditional input: mean embedding of the store or of the class")
    p.add_argument("--sampler", choices=SAMPLERS, help="ddim (default), dpm++2m, euler or pndm (the paper's)")
    p.add_argument("--steps", type=int, help="sampling steps (default 25)")
    p.add_argument("--eta", type=float, help="DDIM noise (0 = deterministic, default)")
    p.add_argument("--clip-x0", action="store_const", const=True,
                   help="pixel models, ddim/dpm++2m: clip every step's predicted clean image to [-1, 1]")
    p.add_argument("--unit-noise", action="store_const", const=True,
                   help="rescale each sample's starting noise to RMS 1 (steadies small pixel bases)")
    p.add_argument("--strength", type=float, help="img2img: fraction of the schedule each real image is noised to (default 0.5)")
    p.add_argument("--img2img-embedding", choices=["own", "class"], help="img2img: the image's own embedding or its class's")
    p.add_argument("--class-store", help="per-class store (`diffinv invert --target class`) for --img2img-embedding class")
    p.add_argument("--template", dest="templates", action="append",
                   help="prompt method: a template with {} for the class name; repeat for several (default 'a photo of a {}')")
    p.add_argument("--save-size", type=int, help="resize the saved images to PX x PX (default: the inversion resolution)")
    p.add_argument("--seed", type=int, help="seed of every sample's randomness (default 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch-size", type=int, help="samples per batch (default 64); does not change the images")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    _add_output_flags(p, "complete an unfinished set (re-running does the same)", "replace an existing generated set")
    _add_shard_flags(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from diffinv.data.synthetic import read_manifest

    config = _stage_config(GenerateConfig, args)
    out = _run_stage("generate", config, args)
    if out is None:
        return 0
    rows = read_manifest(out)
    per_class: dict[str, int] = {}
    for r in rows:
        per_class[r["class"]] = per_class.get(r["class"], 0) + 1
    fallbacks = sum(1 for r in rows if r.get("partner_fallback"))
    note = f"; {fallbacks} partners from another class (class had a single image)" if fallbacks else ""
    print(f"dataset {out}: {len(rows)} images ({config.method}, {config.sampler} {config.steps} steps, guidance {config.guidance}) "
          f"in {len(per_class)} classes, {min(per_class.values())}-{max(per_class.values())} per class{note}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a classifier on real, synthetic or both (stage 3)",
                       description="Train a classifier with all images in memory and augmentation on the device; evaluates on "
                                   "the real test split and writes metrics, a confusion matrix and safetensors weights.")
    p.add_argument("--data", help="real data (as for invert); its --split is subset, its --eval-split evaluates")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--config", help="YAML file of TrainConfig fields (flags override it)")
    p.add_argument("--format", choices=["auto", "folder", "npz", "idx", "csv", "digits", "hf"])
    p.add_argument("--split", help="training split (default train)")
    p.add_argument("--eval-split", help="evaluation split (default test)")
    p.add_argument("--per-class", type=int, help="seeded subset of K real images per class (default: all)")
    p.add_argument("--subset-seed", type=int, help="seed of the subset; the same rule as invert (default 0)")
    p.add_argument("--synthetic", action="append", help="a folder from `diffinv generate`; repeat for several")
    p.add_argument("--use", choices=["auto", "real", "synthetic", "both"], help="what to train on (auto: both if --synthetic)")
    p.add_argument("--real-batch", type=int, help="real images in every batch (with --syn-batch; the paper's fixed split)")
    p.add_argument("--syn-batch", type=int, help="synthetic images in every batch")
    p.add_argument("--arch", help=f"{', '.join(ARCHS)} or timm:<name> (default resnet18)")
    p.add_argument("--stem", choices=["auto", "cifar", "imagenet"], help="auto: small-image stem below 64 px")
    p.add_argument("--resolution", type=int, help="train at R x R (default: the data's size, at least 32)")
    p.add_argument("--epochs", type=float, help="passes over the training set (default 30)")
    p.add_argument("--steps", type=int, help="SGD steps; overrides --epochs")
    p.add_argument("--batch-size", type=int, help="batch size when pooling (default 128)")
    p.add_argument("--lr", type=float, help="peak SGD learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default 5e-4)")
    p.add_argument("--warmup", type=float, help="fraction of steps of linear warm-up before the cosine (default 0.05)")
    p.add_argument("--label-smoothing", type=float, help="label smoothing (default 0)")
    p.add_argument("--aug", choices=AUGS, help="crop-flip (default), autoaugment, randaugment (both after crop-flip) or none")
    p.add_argument("--mixup", type=float, help="MixUp Beta alpha (0 = off)")
    p.add_argument("--cutmix", type=float, help="CutMix Beta alpha (0 = off)")
    p.add_argument("--seed", type=int, help="seed of initialisation, batch order and augmentation (default 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: ten over the run)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: at every evaluation)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False, help="keep NCHW memory layout")
    p.add_argument("--device", help="auto, cpu, cuda ... (default auto)")
    p.add_argument("--bad-images", choices=["skip", "error"], help="unreadable images: skip them (reported) or stop")
    _add_output_flags(p, "continue an interrupted run from its last checkpoint", "replace an existing run")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from diffinv.classify.train import train_classifier
    from diffinv.runs import read_json

    config = _stage_config(TrainConfig, args)
    out = train_classifier(config, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    final = read_json(out / "final.json")
    worst = min((a, c) for a, c in zip(final["per_class"], final["classes"]) if a is not None)
    print(f"run {out}: {config.arch} on {final['n_real']} real + {final['n_synthetic']} synthetic images, {final['steps']} steps; "
          f"test top-1 {final['top1']:.4f} on {final['n_test']} images (worst class {worst[1]}: {worst[0]:.3f})")
    return 0


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a study grid from a YAML; finished cells are skipped",
                       description="Train every cell of a study (see diffinv.experiment for the YAML), then write "
                                   "results.csv/json, summary.csv/json (mean and std over seeds) and quality.json.")
    p.add_argument("study", help="study YAML")
    p.add_argument("--out", required=True, help="study folder (re-running continues it)")
    p.add_argument("--steps", type=int, help="override train.steps for every cell (e.g. a quick trial)")
    p.add_argument("--device", help="override train.device")
    p.add_argument("--report", action="store_true", help="also write the report when done")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_shard_flags(p)
    p.set_defaults(func=_run_experiment)


def _run_experiment(args: argparse.Namespace) -> int:
    from diffinv.experiment import load_study, with_overrides
    from diffinv.runs import read_json

    study = with_overrides(load_study(args.study), steps=args.steps, device=args.device)
    out = _run_stage("experiment", study, args)
    if out is None:
        return 0
    for r in read_json(out / "summary.json"):
        print(f"{r['dataset']:>10} {r['method']:>16} k={'all' if r['per_class'] is None else r['per_class']:<5} {r['arch']} "
              f"{r['aug']}: top-1 {100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f} % over {r['n_seeds']} seed(s)")
    print(f"study {out}: results.csv, summary.csv, quality.json")
    if args.report:
        from diffinv.report.build import build_report

        print(f"report {build_report(out)}")
    return 0


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="finish a sharded invert / generate / experiment: check every shard's work, write the manifest",
                       description="The final step of a sharded job (the last shard does it automatically when the shards "
                                   "share a folder). Lists what is missing, and which shards to re-run, when work is unfinished.")
    p.add_argument("folder", help="the --out of the sharded job")
    p.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from diffinv.shards import merge

    kind = merge(args.folder)
    print(f"merged {args.folder}: the {kind} is complete")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown + self-contained HTML report of a study or run folder")
    p.add_argument("folder", help="a study folder (from experiment) or a run folder (from train)")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from diffinv.report.build import build_report

    page = build_report(args.folder)
    print(f"report {page} (and {page.with_suffix('.md')})")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain-base", help="train a small SD-architecture base generator on unlabeled images",
                       description="A diffusion autoencoder: a pixel-space UNet2DConditionModel reading K tokens that a small "
                                   "encoder makes from the image (dropped 10%% of the time for guidance). Saved as a diffusers "
                                   "folder that invert/generate load like Stable Diffusion. Labels are never read.")
    p.add_argument("--data", help="training images (as for invert; labels ignored); default digits")
    p.add_argument("--out", required=True, help="folder to write the base model to")
    p.add_argument("--config", help="YAML file of PretrainConfig fields (flags override it)")
    p.add_argument("--format", choices=["auto", "folder", "npz", "idx", "csv", "digits", "hf"])
    p.add_argument("--split", help="training split (default train; test is refused)")
    p.add_argument("--resolution", type=int, help="pixel resolution of the model (default 8, the size of digits)")
    p.add_argument("--channels", help="UNet block widths, e.g. 32,64 (default)")
    p.add_argument("--layers-per-block", type=int, help="resnet layers per UNet block (default 2)")
    p.add_argument("--cross-attention-dim", type=int, help="width D of a conditioning token (default 64)")
    p.add_argument("--tokens", type=int, help="conditioning tokens K (default 5)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"])
    p.add_argument("--beta-schedule", choices=["scaled_linear", "linear"],
                   help="noise schedule: scaled_linear (Stable Diffusion's, default) or linear (DDPM's, "
                        "near-pure noise at t = T; see bases/README.md for how it compared)")
    p.add_argument("--steps", type=int, help="optimiser steps (default 4000)")
    p.add_argument("--batch-size", type=int, help="images per step (default 64)")
    p.add_argument("--lr", type=float, help="AdamW learning rate after warm-up (default 1e-3)")
    p.add_argument("--warmup", type=int, help="steps of linear warm-up (default 200)")
    p.add_argument("--cond-dropout", type=float, help="probability of dropping the tokens (default 0.1)")
    p.add_argument("--ema", type=float, help="decay of the saved weight average (default 0.999)")
    p.add_argument("--hflip", action="store_const", const=True, help="random horizontal flips (natural images)")
    p.add_argument("--extra-data", nargs="+", help="more unlabeled training images (train splits), e.g. MNIST beside digits")
    p.add_argument("--views", choices=["same", "invariant"],
                   help="same: the encoder sees the image the UNet denoises (default); invariant: it sees a strongly "
                        "augmented view, so the tokens keep content and lose pose and colour")
    p.add_argument("--view-min-area", type=float, help="smallest crop of the encoder's view, a fraction of the area (default 0.35)")
    p.add_argument("--token-noise", type=float, help="std of Gaussian noise on the tokens in training (default 0)")
    p.add_argument("--image-channels", type=int, choices=[0, 1, 3], help="0: 1 for grey data, else 3 (default)")
    p.add_argument("--max-seconds", type=float, help="stop training after this many seconds and save (default 0: no limit)")
    p.add_argument("--seed", type=int, help="seed of initialisation, batches and noise (default 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--device", help="auto, cpu, cuda ... (default auto)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 250)")
    p.add_argument("--log-every", type=int, help="steps per logged loss (default 50)")
    p.add_argument("--bad-images", choices=["skip", "error"], help="unreadable images: skip them (reported) or stop")
    _add_output_flags(p, "continue an interrupted pretraining from its last checkpoint", "replace an existing base")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from diffinv.diffusion.pretrain import pretrain_base
    from diffinv.runs import read_json

    config = _stage_config(PretrainConfig, args)
    out = pretrain_base(config, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    info = read_json(out / "pretrain.json")
    size = sum(f.stat().st_size for f in (out / "unet").iterdir()) / 2 ** 20
    print(f"base {out}: {info['unet_parameters'] / 1e6:.2f}M-parameter pixel UNet ({size:.1f} MB) trained {info['steps']} steps "
          f"on {info['images']} images, final loss {info['final_loss']:.4f}; samples in {out / 'samples.png'}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="invert a few-shot split, generate, and compare classifiers (real / + DI / + rival)",
                       description="Runs invert, generate (Diffusion Inversion and the img2img rival) and a seeded classifier "
                                   "study, prints mean ± std test accuracy and writes a report. Default: 5 digits per class "
                                   "into the base model shipped with the package, 3 seeds, a few minutes on a CPU. Re-running "
                                   "continues an interrupted demo.")
    p.add_argument("--data", help="labelled real data (as for invert; default digits)")
    p.add_argument("--base", help="base model (default: the embedded digits base)")
    p.add_argument("--out", default="runs/demo", help="folder to write (default runs/demo)")
    p.add_argument("--config", help="YAML file of DemoConfig fields (flags override it)")
    p.add_argument("--per-class", help="real images per class (default 5); several, e.g. 5,10,20, make a sample-efficiency "
                                       "study")
    p.add_argument("--real-sizes", help="extra real-only sizes per class for the efficiency curve, e.g. 40,80")
    p.add_argument("--seeds", help="classifier seeds, e.g. 0,1,2 (default)")
    p.add_argument("--invert-steps", type=int, help="inversion steps (default 200)")
    p.add_argument("--invert-init", choices=["random", "encoder"], help="start c_i from noise (default) or the base's encoder tokens")
    p.add_argument("--per-image", type=int, help="synthetic images per real image, for each generator (default 5)")
    p.add_argument("--clip-x0", action="store_const", const=True,
                   help="both generators clip every step's predicted clean image to [-1, 1] (pixel bases)")
    p.add_argument("--unit-noise", action="store_const", const=True,
                   help="both generators rescale each sample's starting noise to RMS 1 (small pixel bases)")
    p.add_argument("--arch", help="classifier (default shufflenetv2)")
    p.add_argument("--train-lr", type=float, help="classifier peak SGD learning rate (default 0.05)")
    p.add_argument("--train-steps", type=int, help="classifier SGD steps (default 100)")
    p.add_argument("--train-real-batch", type=int, help="real images per batch of 32 when synthetic data is added (default 16; 0 pools them)")
    p.add_argument("--device", help="auto, cpu, cuda ... (default auto)")
    p.add_argument("--fast", action="store_true", help="every count cut to the bone: checks the flow, not the method")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from diffinv.demo import fast, run_demo, summary_table
    from diffinv.runs import write_text

    fields = {k: v for k, v in vars(args).items() if k not in {"out", "config", "fast", "quiet", "func", "command"}}
    config = load_config(DemoConfig, args.config, fields)
    if args.fast:
        config = fast(config)
    study = run_demo(config, args.out, progress=not args.quiet)
    table = summary_table(study)
    write_text(Path(args.out) / "results.md", table + "\n")
    print(table)
    print(f"report: {study / 'report' / 'report.html'} (and report.md); table: {Path(args.out) / 'results.md'}")
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
    _add_demo(sub)
    _add_invert(sub)
    _add_generate(sub)
    _add_train(sub)
    _add_experiment(sub)
    _add_report(sub)
    _add_merge(sub)
    _add_pretrain(sub)
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
    from diffinv.classify.models import ModelConfigError
    from diffinv.classify.train import TrainingError
    from diffinv.diffusion.pretrain import PretrainError
    from diffinv.runs import RunError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, InversionError, StoreError, RunError, ModelConfigError,
            TrainingError, PretrainError) as exc:
        print(f"diffinv {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffinv {args.command}: interrupted; finished work is kept, re-run with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
