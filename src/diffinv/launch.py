"""Running a stage by name: whole, as one shard, or as shards on Ray; merging a sharded job; progress from its folder.

Each stage plans its work as fixed units whose results do not depend on which process makes
them (invert's batches, generate's chunks, a study's cells). Unit ``u`` belongs to shard
``u mod N``; all shards write into the one output folder, every unit atomically, so shards may
run in any order, be killed and re-run, and the last one to finish writes the manifest.
``diffinv merge OUT`` does that final step by hand.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from diffinv.progress import bar as progress_bar
from diffinv.runs import RunError, output_lock, refuse_inside, remove_if_unstarted
from diffinv.shards import Shard, local_device
from diffinv.stages import Stage


def _merge_command(args) -> int:
    print(f"merged {args.folder}: the {dict(invert='store', generate='dataset', experiment='study')[merge(args.folder)]} is complete")
    return 0


MERGE = Stage(name="merge", cli="folder", command=_merge_command, folder="the --out of the sharded job")

# Every sub-command: its Stage ("module:attribute") and its line in `diffinv --help`, in the order the pipeline runs them,
# then the tools that read a folder. A stage's module (and torch with it) is imported only when that stage is used.
CATALOG: dict[str, tuple[str, str]] = {
    "demo": ("diffinv.study.demo:STAGE", "the whole method on a few-shot split of digits, offline on CPU: table + report"),
    "invert": ("diffinv.stages.invert:STAGE", "learn one conditioning per real image (stage 1) -> embedding store"),
    "finetune": ("diffinv.stages.finetune:STAGE",
                 "fit one LoRA adapter of the UNet per class on its real images (DataDream-style) -> adapters"),
    "generate": ("diffinv.stages.generate:STAGE", "sample a synthetic dataset around the learned conditionings (stage 2)"),
    "filter": ("diffinv.stages.filter:STAGE",
               "keep the synthetic images a real-only classifier trusts, as a new set (the source is left as it is)"),
    "export": ("diffinv.stages.export:STAGE",
               "a synthetic set (optionally with its real subset) as ImageFolder, Hugging Face dataset or WebDataset shards"),
    "train": ("diffinv.stages.train:STAGE",
              "train a classifier on real, synthetic or both; evaluate on the real test split (stage 3)"),
    "experiment": ("diffinv.study.experiment:STAGE",
                   "a study: which synthetic data helps, by how much, with which settings (every stage, chosen on validation)"),
    "pretrain-vae": ("diffinv.stages.pretrain_vae:STAGE",
                     "train a latent autoencoder on unlabeled images, for a latent base (pretrain-base --vae)"),
    "pretrain-base": ("diffinv.stages.pretrain:STAGE",
                      "train the project's own small base generator on unlabeled images (diffusers format)"),
    "tiny-model": ("diffinv.stages.tiny:STAGE", "save a small random SD-architecture model (for trying the pipeline offline)"),
    "report": ("diffinv.stages.report:STAGE", "Markdown + HTML report of a study or a run, from its saved files"),
    "merge": ("diffinv.launch:MERGE", "final step of a sharded invert / generate / experiment: the manifest, or which shards to re-run"),
    "verify": ("diffinv.stages.verify:STAGE",
               "check a store or a synthetic set byte by byte: checksums, finite embeddings, files and manifest"),
    "inspect": ("diffinv.stages.inspect_model:STAGE",
                "what a run would do with a model: family, prediction type, resolution, latent, precision, FLOPs"),
}


def load_stage(name: str) -> Stage:
    """The Stage of sub-command ``name``, importing its module."""
    import importlib

    module, _, attribute = CATALOG[name][0].partition(":")
    stage = getattr(importlib.import_module(module), attribute)
    if stage.name != name:
        raise RuntimeError(f"{CATALOG[name][0]} is the stage {stage.name!r}, listed as {name!r}")
    return stage


class _Stages(Mapping[str, Stage]):
    """The catalog's stages by name, each module imported when its stage is first looked up."""

    def __getitem__(self, name: str) -> Stage:
        if name not in CATALOG:
            raise KeyError(name)
        return load_stage(name)

    def __iter__(self) -> Iterator[str]:
        return iter(CATALOG)

    def __len__(self) -> int:
        return len(CATALOG)


STAGES: Mapping[str, Stage] = _Stages()


class ShardError(RunError):
    """A shard failed on every attempt; the message names it and its last error."""


def get_stage(name: str) -> Stage:
    """A stage that runs into an output folder (not a tool that reads one)."""
    if name not in STAGES or STAGES[name].run is None:
        raise RunError(f"unknown stage {name!r}; one of {', '.join(n for n, s in STAGES.items() if s.run is not None)}")
    return STAGES[name]


def run_shard(stage: str, config: Any, out: str | Path, shard: Shard, hook: Callable[..., None] | None = None,
              log: Callable[[str], None] = print, *, progress: bool = False, resume: bool = True,
              overwrite: bool = False) -> Path | None:
    """Run one shard of ``stage`` in this process (the whole job for Shard(0, 1)).

    What the CLI, every ``--shard`` process and every Ray task call. Returns ``out``, or None
    while other shards' work is missing.
    """
    if is_dataclass(config) and not isinstance(config, type) and "device" in {f.name for f in fields(config)}:
        config = replace(config, device=local_device(getattr(config, "device")))  # noqa: B009 (a field only some configs have)
    spec, out = get_stage(stage), Path(out)
    paths = {name: getattr(config, name, None) for name in spec.path_fields}
    refuse_inside(out, {f"--{name.replace('_', '-')} {v}" if isinstance(value, tuple) else name: v
                        for name, value in paths.items() for v in (value if isinstance(value, tuple) else (value,))})
    existed = out.exists()
    with output_lock(out, shared=not shard.whole):
        try:
            assert spec.run is not None  # get_stage returns runnable stages only
            return spec.run(config, out, shard=shard, resume=resume, overwrite=overwrite, progress=progress, log=log, hook=hook)
        except BaseException:
            if not existed and shard.whole:  # nothing of this command's is worth keeping if no unit finished
                remove_if_unstarted(out)  # (never under shards: another one may be writing the folder)
            raise


def merge(out: str | Path, log: Callable[[str], None] = print) -> str:
    """The final step of a sharded job: check every unit is there and write the manifest.

    Returns the stage's name; raises RunError naming what is missing (and which shards to
    re-run) when some units are not finished.
    """
    out = Path(out)
    for stage in STAGES.values():
        if stage.finish is not None and (out / stage.marker).is_file():
            stage.finish(out, log=log)
            return stage.name
    raise RunError(f"{out} is not a diffinv store, generated dataset or study folder; give the --out of the sharded job")


# ----------------------------------------------------------------------------- Ray


def import_ray():
    try:
        import ray
    except ImportError:
        raise RunError("--backend ray needs Ray: pip install 'diffusion-inversion[ray]' (or pip install ray)") from None
    return ray


def _ray_task(stage: str, config: Any, out: str, shard: Shard, hook: Callable[..., None] | None) -> str:
    import torch

    # Ray gives each task OMP_NUM_THREADS = its CPUs; make torch's pool agree when it was imported earlier.
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    run_shard(stage, config, out, shard, hook, log=lambda msg: print(f"[shard {shard}] {msg}", flush=True))
    return str(shard)


def run_on_ray(stage: str, config: Any, out: str | Path, *, workers: int, address: str | None = None,
               gpus_per_shard: float | None = None, attempts: int = 3, hook: Callable[..., None] | None = None,
               progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Run ``stage`` as ``workers`` shards on Ray, then merge. Returns ``out``.

    Each shard is one Ray task declaring 1 CPU and ``gpus_per_shard`` GPUs (default: 1 when
    the cluster has GPUs and the config does not ask for the CPU). A failed shard (an error,
    or its worker process killed) is reported with its error and submitted again, up to
    ``attempts`` times; finished units inside it are not redone. ``address`` joins an existing
    cluster (``ray start --head`` on one node, ``ray start --address HEAD:6379`` on the
    others); without it a local Ray with ``workers`` CPUs is started.
    """
    spec = get_stage(stage)
    if not spec.shardable:
        raise RunError(f"{stage} cannot be sharded; run it without --backend ray")
    if workers < 1 or attempts < 1:
        raise RunError("--workers and --attempts must be >= 1")
    ray = import_ray()
    out = Path(out).resolve()
    config = absolute_paths(stage, config)
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 logging_level="ERROR", configure_logging=True)
    if gpus_per_shard is None:
        wants_cpu = str(getattr(config, "device", "auto")).startswith("cpu")
        gpus_per_shard = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and not wants_cpu else 0.0
    task = ray.remote(_ray_task).options(num_cpus=1, num_gpus=gpus_per_shard, max_retries=0)

    # 1. One task per shard; the progress bar follows the finished units in the output folder.
    shards = [Shard(i, workers) for i in range(workers)]
    pending = {task.remote(stage, config, str(out), s, hook): (s, 1) for s in shards}
    bar = progress_bar(total=None, unit=spec.unit, disable=not progress, dynamic_ncols=True, desc=f"{stage} on Ray, {workers} shards")
    failures: dict[Shard, str] = {}
    seen: dict[str, int] = {}  # finished part -> its images: parts never change, so each is read once

    # 2. Wait; report and resubmit failed shards.
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        _update_bar(bar, spec, out, seen)
        for ref in ready:
            shard, attempt = pending.pop(ref)
            try:
                ray.get(ref)
                log(f"shard {shard} finished")
            except Exception as exc:  # a task error or a dead worker: both are retried
                error = _short_error(exc)
                if attempt < attempts:
                    log(f"shard {shard} failed (attempt {attempt} of {attempts}): {error}; retrying it")
                    pending[task.remote(stage, config, str(out), shard, hook)] = (shard, attempt + 1)
                else:
                    log(f"shard {shard} failed (attempt {attempt} of {attempts}): {error}; giving up on it")
                    failures[shard] = error
    _update_bar(bar, spec, out, seen)
    bar.close()
    if failures:
        listing = "; ".join(f"shard {s}: {e}" for s, e in failures.items())
        raise ShardError(f"{len(failures)} of {workers} shards failed after {attempts} attempts ({listing}). Finished work "
                         f"is kept: fix the cause and run the same command again")

    # 3. Every shard is done: the manifest.
    merge(out, log=log)
    return out


def absolute_paths(stage: str, config: Any) -> Any:
    """The config with its local paths made absolute: Ray workers do not share the driver's working directory."""
    spec = get_stage(stage)
    if spec.absolute is not None:
        return spec.absolute(config)
    changes: dict[str, str | tuple[str, ...]] = {}
    for name in spec.path_fields:
        value = getattr(config, name, None)
        if isinstance(value, str) and value and Path(value).exists() and str(Path(value).resolve()) != value:
            changes[name] = str(Path(value).resolve())
        elif isinstance(value, tuple) and any(isinstance(v, str) and Path(v).exists() for v in value):
            changes[name] = tuple(str(Path(v).resolve()) if Path(v).exists() else v for v in value)
    return replace(config, **changes) if changes else config


def _short_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in "".join(traceback.format_exception_only(type(cause), cause)).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def _update_bar(bar, spec: Stage, out: Path, seen: dict[str, int]) -> None:
    done, total = units_done(spec.name, out, seen)
    total = total if total is not None else bar.total
    if total is not None and bar.total != total:
        bar.total = total
    bar.n = done
    bar.refresh()


def units_done(stage: str, out: Path, seen: dict[str, int] | None = None) -> tuple[int, int | None]:
    """(finished, total) work of a sharded job, read from its folder: images, samples or cells.

    ``seen`` caches what the stage has already counted (e.g. the size of every finished store part).
    """
    spec = get_stage(stage)
    try:
        if spec.count_done is not None and (out / spec.marker).is_file():
            return spec.count_done(out, {} if seen is None else seen)
    except (OSError, ValueError):
        pass  # a file being replaced mid-read; the next poll sees it
    return 0, None
