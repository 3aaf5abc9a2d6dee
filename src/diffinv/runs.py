"""Output folders that never lose finished work: atomic writes and start/resume/overwrite rules."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from diffinv.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are written: `diffinv --help` and verify start without it
    import torch


class RunError(UserError, RuntimeError):
    """An output folder is in a state that does not allow the requested action."""


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` and rename it into place.

    A kill at any moment leaves either the old file or the complete new one, never a partial
    file that looks finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunError(f"the disk is full while writing {path}; free space and run the same command again, with "
                           f"--resume where the command has it (finished work is kept and will not be redone)") from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_temporaries(root: str | Path) -> int:
    """Delete the hidden temporaries a killed :func:`atomic_write` can leave under ``root``; returns how many."""
    stale = list(Path(root).rglob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml(path: str | Path, obj: Any, comment: str = "") -> None:
    """``obj`` as YAML, atomically; ``comment`` (lines) goes on top as ``#`` comments, which every reader ignores."""
    header = "".join(f"# {line.lstrip('# ')}\n" if not line.startswith("#") else f"{line}\n" for line in comment.splitlines())
    write_text(path, header + yaml.safe_dump(obj, sort_keys=False))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(p: Path) -> None:
        try:
            save_file(contiguous, str(p), metadata=metadata)
        except Exception as exc:  # safetensors reports a full disk as its own error type, not OSError
            if "No space left" in str(exc) or "Disk quota" in str(exc):
                raise OSError(errno.ENOSPC, str(exc)) from exc
            raise

    atomic_write(path, write)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


COST = "cost.json"  # seconds and device a run folder's work took: a measurement, kept apart from its marker


def add_cost(folder: str | Path, seconds: float, count: int, device: str, noun: str,
             parts: dict[str, float] | None = None) -> dict[str, Any]:
    """Count ``seconds`` spent making ``count`` ``noun`` on ``device`` in the folder's ``cost.json`` (a resumed run adds
    each run's), and each of ``parts`` (seconds of named steps, within ``seconds``) likewise; the record. Not a result:
    the marker, which a resumed run reproduces byte for byte, never holds it."""
    path = Path(folder) / COST
    cost: dict[str, Any] = read_json(path) if path.is_file() else {"seconds": 0.0, noun: 0, "device": device}
    cost.update({"seconds": round(cost["seconds"] + seconds, 3), noun: cost.get(noun, 0) + count, "device": device})
    cost.update({k: round(cost.get(k, 0.0) + v, 3) for k, v in (parts or {}).items()})
    write_json(path, cost)
    return cost


def cost_seconds(folder: str | Path) -> float | None:
    """The seconds a finished folder's ``cost.json`` records; None where it has none (made in shards, or before costs)."""
    path = Path(folder) / COST
    return float(read_json(path)["seconds"]) if path.is_file() else None


def read_yaml(path: str | Path) -> Any:
    """A YAML file through the bounded safe loader (:mod:`diffinv.safe_yaml`: no aliases, at most 1 MiB)."""
    from diffinv import safe_yaml

    return safe_yaml.read(path)


def check_same_settings(out: str | Path, config: Any, noun: str, action: str) -> None:
    """Refuse to continue ``out`` when its saved ``config.yaml`` differs from ``config`` in a result field.

    A field added after the folder was made counts as its default. ``noun`` names the folder in
    the message ("store"), ``action`` what was refused ("cannot resume").
    """
    from dataclasses import fields

    from diffinv.config import config_to_dict, result_fields

    saved = read_yaml(Path(out) / "config.yaml") or {}
    # From the fields, not an instance: a config may refuse to be made without its required paths.
    defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(config)}
    asked = config_to_dict(config)
    diffs = {k: (saved.get(k, defaults[k]), asked[k]) for k in result_fields(config) if saved.get(k, defaults[k]) != asked[k]}
    if diffs:
        listing = ", ".join(f"{k}: {noun} has {a!r}, asked {b!r}" for k, (a, b) in diffs.items())
        raise RunError(f"{action} {out} with different settings ({listing}); use the same settings, --overwrite, or a new --out")


def check_out_path(out: Path) -> None:
    """Refuse an --out that can never be a folder: a file, or a symbolic link to nothing."""
    if out.is_symlink() and not out.exists():
        raise RunError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist; create that folder, "
                       f"or give another --out")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is a file; give a folder path")


def prepare_output(out: str | Path, marker: str, *, resume: bool, overwrite: bool) -> str:
    """Decide how a stage may use ``out``. Returns ``"fresh"``, ``"resume"`` or ``"done"``.

    ``marker`` is the JSON file (relative to ``out``) whose ``status`` field says whether the
    folder holds a complete output. A complete one is never overwritten without ``overwrite``;
    an unfinished one is only continued with ``resume``; a non-empty folder that is not ours is
    never deleted.
    """
    out = Path(out)
    marker_path = out / marker
    check_out_path(out)
    if marker_path.exists():
        status = read_json(marker_path).get("status")
        if overwrite:
            for child in out.iterdir():  # everything but the lock this process holds
                if child.name != LOCK:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif status == "complete" and not resume:
            raise RunError(f"{out} already holds a finished result; pass --overwrite to replace it or choose another --out")
        elif status == "complete":
            return "done"
        elif not resume:
            raise RunError(f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to start over")
        else:
            return "resume"
    elif out.exists() and any(not _started_here(p) for p in out.iterdir()):
        raise RunError(f"--out {out} is a non-empty folder that is not a diffinv output; choose an empty or new folder")
    _check_writable(out)
    return "fresh"


def _started_here(path: Path) -> bool:
    """What a stage writes before its marker (its config, the lock, hidden temporaries, empty folders): a start killed early."""
    return path.name in (LOCK, "config.yaml") or path.name.startswith(".") or (path.is_dir() and not any(path.iterdir()))


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A per-process name: several shards may probe the same folder at once.
        probe = out / f".write-test-{os.getpid()}.tmp"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write to --out {out}: {exc}") from exc


def join_shared_output(out: str | Path, marker: str) -> str:
    """:func:`prepare_output` for one of several shards writing into the same folder at once.

    Any shard may be first: a folder that is missing, empty, or holds only what a starting
    shard writes (``config.yaml``, hidden temporaries) is ``"fresh"``; one whose marker says
    in progress is joined (``"resume"``); a complete one is ``"done"``. Never deletes anything.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is a file; give a folder path")
    if (out / marker).exists():
        return "done" if read_json(out / marker).get("status") == "complete" else "resume"
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != "config.yaml")
        if foreign:
            raise RunError(f"--out {out} is a non-empty folder that is not a diffinv output (holds {foreign[:3]}); "
                           f"choose an empty or new folder")
    _check_writable(out)
    return "fresh"


def open_output(out: str | Path, marker: str, config: Any, *, noun: str, resume: bool, overwrite: bool,
                shared: bool = False) -> str:
    """Every stage's opening: decide fresh / resume / done and refuse to mix settings in one folder.

    ``shared``: several shard processes write this folder together (see :mod:`diffinv.shards`),
    so it is joined rather than claimed, ``--overwrite`` is refused (it would delete the other
    shards' work) and temporaries are left alone (another shard may be writing them).
    Returns ``"fresh"``, ``"resume"`` or ``"done"``.
    """
    out = Path(out)
    if shared and overwrite:
        raise RunError(f"--overwrite cannot be combined with sharding (it would delete other shards' work); "
                       f"delete {out} first, then start the shards")
    mode = join_shared_output(out, marker) if shared else prepare_output(out, marker, resume=resume, overwrite=overwrite)
    if (out / "config.yaml").is_file():
        check_same_settings(out, config, noun, "cannot continue" if mode == "done" else "cannot resume")
        saved = (read_yaml(out / "config.yaml") or {}).get("batch_size")
        if shared and saved is not None and saved != getattr(config, "batch_size", saved):
            # The batch is the unit shards split the work by: other sizes would cut it differently.
            raise RunError(f"every shard of {out} must use the same --batch-size (the {noun} has {saved}), "
                           f"or shards would split the work differently")
    if mode == "resume" and not shared:
        remove_temporaries(out)
    return mode


def check_free_space(out: str | Path, need_bytes: int, what: str) -> None:
    """Refuse to start when the disk holding ``out`` has less than ``need_bytes`` free."""
    out = Path(out)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise RunError(f"{what} needs about {human_bytes(need_bytes)} but only {human_bytes(free)} are free "
                       f"on the disk of {out}; free space or choose another --out")


def human_bytes(n: float) -> str:
    """1,536 -> '1.5 KiB': three significant figures, so two different sizes never read alike."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.0f} bytes" if i == 0 else f"{n:.3g} {units[i]}" if n < 100 else f"{n:,.0f} {units[i]}"


# ----------------------------------------------------------------------------- units of work in one folder


def missing_message(missing: list[int], count: int, unit: str, total: int | None = None) -> str:
    """'3 batches not finished yet (they belong to shard 1/2 ...)': which shards a user must re-run.

    ``count`` 0: the number of shards is not known (then no shard is named).
    """
    plural = "es" if unit.endswith("ch") else "s"
    what = (f"{len(missing)} of {total} {unit}{plural}" if total is not None
            else f"{len(missing)} {unit}{'' if len(missing) == 1 else plural}")
    if count <= 0:
        return f"{what} not finished yet; run the remaining shards (or the same command without --shard), then `diffinv merge`"
    shards = sorted({u % count for u in missing})
    listed = ", ".join(f"{s}/{count}" for s in shards[:8]) + (" ..." if len(shards) > 8 else "")
    return (f"{what} not finished yet "
            f"(they belong to shard{'s' if len(shards) > 1 else ''} {listed} of a {count}-shard run); run those shards "
            f"(or the same command without --shard), then `diffinv merge`")


@dataclass(frozen=True)
class Units:
    """A stage's work in one output folder as fixed units: invert's batches, generate's chunks, a study's cells.

    Unit ``u`` belongs to shard ``u % shards``; ``is_done(u)`` reads the folder. Every stage asks
    the same three questions of it: what is left for this shard, what is missing, and whether the
    whole is complete (the last shard to finish then writes the manifest).
    """

    out: Path
    noun: str  # "batch", "chunk", "cell"
    total: int
    is_done: Callable[[int], bool]
    shards: int = 1

    def todo(self, shard: Any) -> list[int]:
        """This shard's unfinished units (``shard.owns(u)``), in order."""
        return [u for u in range(self.total) if shard.owns(u) and not self.is_done(u)]

    def missing(self) -> list[int]:
        return [u for u in range(self.total) if not self.is_done(u)]

    def complete(self, *, strict: bool, log: Callable[[str], None], what: str = "") -> bool:
        """True when every unit is done; else raise (``strict``) or log which shards must still run."""
        missing = self.missing()
        if not missing:
            return True
        message = f"{self.out}: {what}" + missing_message(missing, self.shards, self.noun, self.total)
        if strict:
            raise RunError(message)
        log(message)
        return False


# ----------------------------------------------------------------------------- optimiser state in checkpoints


def optimiser_tensors(optimiser: torch.optim.Optimizer, prefix: str = "opt") -> dict[str, torch.Tensor]:
    """Every per-parameter state tensor of ``optimiser`` (Adam's moments and step, SGD's momentum) by name."""
    import torch

    tensors = {}
    for i, p in enumerate(p for group in optimiser.param_groups for p in group["params"]):
        for name, value in optimiser.state.get(p, {}).items():
            value = torch.as_tensor(value).detach()
            tensors[f"{prefix}.{i}.{name}"] = value.reshape(1) if value.dim() == 0 else value  # safetensors keeps no 0-d
    return tensors


def load_optimiser_tensors(optimiser: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str = "opt") -> None:
    """Restore what :func:`optimiser_tensors` saved; scalars (Adam's step) come back as 0-d tensors on the CPU."""
    for i, p in enumerate(p for group in optimiser.param_groups for p in group["params"]):
        state = {}
        for key, value in tensors.items():
            head, _, name = key.rpartition(".")
            if head == f"{prefix}.{i}":
                state[name] = value.reshape(()).cpu() if value.numel() == 1 and name == "step" else value.to(p.device)
        if state:
            optimiser.state[p] = state


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], optimiser: torch.optim.Optimizer | None,
                    meta: dict[str, Any]) -> None:
    """One atomic safetensors file: named tensors (weights, embeddings), the optimiser's state and JSON ``meta``.

    Tensors and metadata live in one file, so a kill can never leave a torn pair.
    """
    tensors = dict(state)
    if optimiser is not None:
        tensors.update(optimiser_tensors(optimiser))
    write_safetensors(path, tensors, {"meta": json.dumps(meta)})


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and ``meta`` of a :func:`save_checkpoint` file (optimiser entries under ``opt.``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.``, with the prefix removed (a module's state dict inside a checkpoint)."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------- one writer per folder


LOCK = ".diffinv.lock"


@contextlib.contextmanager
def output_lock(out: str | Path, shared: bool = False):
    """Hold ``out`` for this process alone while a stage writes it; a second writer is refused, naming the first.

    The lock is a file holding the owner's host and pid. One left by a killed process (same host,
    pid gone) is taken over. Shards of one job write a folder together, so ``shared`` takes no lock.
    """
    if shared:
        yield
        return
    out = Path(out)
    check_out_path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        advice = "use a shorter name" if exc.errno == errno.ENAMETOOLONG else "choose a folder you can write to"
        raise RunError(f"cannot make --out {str(out)[:160]} ({exc.strerror or exc}); {advice}") from exc
    path = out / LOCK
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = path.read_text().strip() if path.is_file() else ""
            host, _, pid = holder.partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise RunError(f"{out} is being written by another process ({holder or 'unknown'}); wait for it to finish or stop "
                           f"it (a lock left by a crash on another machine: delete {path})") from None
        except OSError as exc:  # read-only file system, no permission
            raise RunError(f"cannot write to --out {out} ({exc.strerror or exc}); choose a folder you can write to") from exc
    else:
        raise RunError(f"cannot take the lock {path}; delete it if no other process writes {out}")
    try:
        os.write(fd, me.encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def refuse_inside(out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output folder inside one of the inputs (e.g. a synthetic set inside the real data's class folders)."""
    target = Path(out).resolve()
    for name, value in inputs.items():
        if not value or not Path(value).is_dir():
            continue
        source = Path(value).resolve()
        if target == source or source in target.parents:
            raise RunError(f"--out {out} is inside {name} {value}: what is written there would be read back as input "
                           f"(e.g. as another class of images); choose a folder outside it")


def remove_if_unstarted(out: Path) -> None:
    """Delete a folder a failed command made that holds no finished work (only configs, markers, locks, temporaries)."""
    if not out.is_dir():
        return
    metadata = {"config.yaml", "store.json", "generate.json", "train.json", "pretrain.json", "demo.yaml", "study.yaml", LOCK}
    for path in out.rglob("*"):
        if path.is_file() and path.name not in metadata and not (path.name.startswith(".") and path.name.endswith(".tmp")):
            return
    shutil.rmtree(out, ignore_errors=True)
