"""Splitting a stage's work across processes and machines, and running the pieces on Ray.

Each stage plans its work as a fixed list of units whose results do not depend on which
process makes them: ``invert`` batches of images, ``generate`` chunks of samples, the cells of
an ``experiment`` grid. Unit ``u`` belongs to shard ``u mod N``. All shards write into the one
output folder (a shared filesystem when they run on several machines); every unit is written
atomically and skipped when it is already there, so shards may run in any order, be killed
and re-run. The last shard to finish writes the manifest; ``diffinv merge OUT`` does that final
step by hand (e.g. after copying the shards' folders together).

We do not schedule anything ourselves: ``--shard I/N`` is one shard; under ``torchrun``,
``accelerate launch`` or a SLURM job the shard comes from the environment; ``--backend ray``
makes every shard a Ray task with its resources declared, retried when it fails.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from diffinv.runs import RunError, read_json

STAGES = ("invert", "generate", "experiment")


class ShardError(RunError):
    """A shard failed on every attempt; the message names it and its last error."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: owns the units ``u`` with ``u % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise RunError(f"shard {self.index}/{self.count} does not exist: use I/N with 0 <= I < N")

    def owns(self, unit: int) -> bool:
        return unit % self.count == self.index

    @property
    def whole(self) -> bool:
        """True for an unsharded run (one shard of one)."""
        return self.count == 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"I/N"`` -> Shard(I, N), with a message that says the format on a typo."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise RunError(f"--shard {text!r}: write I/N, e.g. --shard 0/4 for the first of four shards") from None
    return Shard(index, count)


def shard_from_env(env: dict[str, str] | None = None) -> Shard | None:
    """The shard a launcher gave this process, or None when it was not started by one.

    torchrun / accelerate launch set RANK and WORLD_SIZE; a SLURM array job sets
    SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (ids may start at SLURM_ARRAY_TASK_MIN);
    ``srun`` with several tasks sets SLURM_PROCID and SLURM_NTASKS.
    """
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env and "RANK" in env:
        return Shard(int(env["RANK"]), int(env["WORLD_SIZE"]))
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return Shard(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]))
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return Shard(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]))
    return None


def resolve_shard(flag: str | None) -> Shard:
    """--shard wins; then the launcher's environment; else the whole job in this process."""
    if flag:
        return parse_shard(flag)
    return shard_from_env() or Shard()


def local_device(device: str) -> str:
    """Under torchrun every process on a machine takes its own GPU (LOCAL_RANK), unless told otherwise."""
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


# ----------------------------------------------------------------------------- one shard, any stage


def run_shard(stage: str, config: Any, out: str | Path, shard: Shard, hook: Callable[..., None] | None = None,
              log: Callable[[str], None] = print, *, progress: bool = False, resume: bool = True,
              overwrite: bool = False) -> Path | None:
    """Run one shard of ``stage`` in this process (the whole job for Shard(0, 1)).

    What the CLI, every ``--shard`` process and every Ray task call. A sharded run always
    joins the folder (``resume``). Returns ``out``, or None while other shards' work is missing.
    """
    if is_dataclass(config) and "device" in {f.name for f in fields(config)}:
        config = replace(config, device=local_device(config.device))
    if stage == "invert":
        from diffinv.diffusion.inversion import invert_dataset

        return invert_dataset(config, out, resume=resume or not shard.whole, overwrite=overwrite, progress=progress,
                              on_step=hook, log=log, shard=shard)
    if stage == "generate":
        from diffinv.diffusion.generation import generate_dataset

        return generate_dataset(config, out, overwrite=overwrite, progress=progress, on_batch=hook, log=log, shard=shard)
    if stage == "experiment":
        from diffinv.experiment import run_study

        return run_study(config, out, progress=progress, log=log, on_cell=hook, shard=shard)
    raise RunError(f"unknown stage {stage!r}; one of {STAGES}")


def merge(out: str | Path, log: Callable[[str], None] = print) -> str:
    """The final step of a sharded job: check every unit is there and write the manifest.

    Returns the kind of folder merged ("store", "dataset" or "study"); raises RunError naming
    what is missing (and which shards to re-run) when some units are not finished.
    """
    out = Path(out)
    if (out / "store.json").is_file():
        from diffinv.diffusion.inversion import finish_store

        finish_store(out)
        return "store"
    if (out / "generate.json").is_file():
        from diffinv.diffusion.generation import finish_dataset

        finish_dataset(out)
        return "dataset"
    if (out / "study.yaml").is_file():
        from diffinv.experiment import finish_study

        finish_study(out, log=log)
        return "study"
    raise RunError(f"{out} is not a diffinv store, generated dataset or study folder; give the --out of the sharded job")


def missing_message(missing: list[int], count: int, unit: str) -> str:
    """'3 batches not finished yet (they belong to shard 1/2 ...)': which shards a user must re-run."""
    shards = sorted({u % count for u in missing})
    listed = ", ".join(f"{s}/{count}" for s in shards[:8]) + (" ..." if len(shards) > 8 else "")
    plural = "" if len(missing) == 1 else "es" if unit.endswith("ch") else "s"
    return (f"{len(missing)} {unit}{plural} not finished yet "
            f"(they belong to shard{'s' if len(shards) > 1 else ''} {listed} of a {count}-shard run); run those shards "
            f"(or the same command without --shard), then `diffinv merge`")


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
    if stage not in STAGES:
        raise RunError(f"unknown stage {stage!r}; one of {STAGES}")
    ray = import_ray()
    out = Path(out).resolve()
    config = absolute_paths(config)
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
    unit = {"invert": "img", "generate": "img", "experiment": "cell"}[stage]
    total = None
    if stage == "experiment":
        from diffinv.experiment import cells

        total = len(cells(config))
    bar = tqdm(total=total, unit=unit, disable=not progress, dynamic_ncols=True, desc=f"{stage} on Ray, {workers} shards")
    failures: dict[Shard, str] = {}
    seen: dict[str, int] = {}  # finished part -> its images: parts never change, so each is read once

    # 2. Wait; report and resubmit failed shards.
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        _update_bar(bar, stage, out, seen)
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
    _update_bar(bar, stage, out, seen)
    bar.close()
    if failures:
        listing = "; ".join(f"shard {s}: {e}" for s, e in failures.items())
        raise ShardError(f"{len(failures)} of {workers} shards failed after {attempts} attempts ({listing}). Finished work "
                         f"is kept: fix the cause and run the same command again")

    # 3. Every shard is done: the manifest.
    merge(out, log=log)
    return out


def absolute_paths(config: Any) -> Any:
    """The config with its local paths made absolute: Ray workers do not share the driver's working directory."""
    if not is_dataclass(config):
        return config

    def local(value: str) -> str:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    from diffinv.experiment import Study

    if isinstance(config, Study):
        # Study paths may be templates ("runs/{dataset}-di") that exist only once filled in.
        def path(value: str) -> str:
            special = value == "digits" or ":" in value or os.path.isabs(value)
            return value if special else os.path.abspath(value)

        datasets = {name: {**spec, "data": path(spec["data"])} for name, spec in config.datasets.items()}
        methods = {name: {**spec, "synthetic": [path(f) for f in spec["synthetic"]]} for name, spec in config.methods.items()}
        return replace(config, datasets=datasets, methods=methods)
    changes = {}
    for name in ("model", "data", "store", "class_store"):
        value = getattr(config, name, None)
        if isinstance(value, str) and local(value) != value:
            changes[name] = local(value)
    return replace(config, **changes) if changes else config


def _short_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in "".join(traceback.format_exception_only(type(cause), cause)).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def _update_bar(bar, stage: str, out: Path, seen: dict[str, int]) -> None:
    done, total = units_done(stage, out, seen)
    total = total if total is not None else bar.total
    if total is not None and bar.total != total:
        bar.total = total
    bar.n = done
    bar.refresh()


def units_done(stage: str, out: Path, seen: dict[str, int] | None = None) -> tuple[int, int | None]:
    """(finished, total) work of a sharded job, read from its folder: images, samples or cells.

    ``seen`` caches the size of every finished store part between calls.
    """
    try:
        if stage == "invert" and (out / "store.json").is_file():
            seen = {} if seen is None else seen
            for meta in (*(out / "parts").glob("part-*.json"), *(out / "failed").glob("part-*.json")):
                key = f"{meta.parent.name}/{meta.name}"
                if key not in seen:
                    seen[key] = len(read_json(meta))
            info = read_json(out / "store.json")
            return sum(seen.values()), info.get("n_items", info.get("n_images"))
        if stage == "generate" and (out / "generate.json").is_file():
            done = sum(1 for d in out.iterdir() if d.is_dir() for f in os.scandir(d) if f.name.endswith(".png"))
            return done, read_json(out / "generate.json").get("n_samples")
        if stage == "experiment":
            return len(list((out / "runs").rglob("final.json"))), None
    except (OSError, ValueError):
        pass  # a file being replaced mid-read; the next poll sees it
    return 0, None

