"""Which shard of a job this process is: the ``Shard`` value, ``--shard I/N`` and launchers' environments.

Each stage plans its work as a fixed list of units whose results do not depend on which
process makes them: ``invert`` batches of images, ``generate`` chunks of samples, the cells of
an ``experiment`` grid. Unit ``u`` belongs to shard ``u mod N``. All shards write into the one
output folder (a shared filesystem when they run on several machines); every unit is written
atomically and skipped when it is already there, so shards may run in any order, be killed
and re-run. The last shard to finish writes the manifest; ``diffinv merge OUT`` does that final
step by hand (e.g. after copying the shards' folders together).

We do not schedule anything ourselves: ``--shard I/N`` is one shard; under ``torchrun``,
``accelerate launch`` or a SLURM job the shard comes from the environment; ``--backend ray``
makes every shard a Ray task (:mod:`diffinv.launch`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from diffinv.runs import RunError


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
