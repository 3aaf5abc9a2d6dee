"""Output folders that never lose finished work: atomic writes and start/resume/overwrite rules."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import save_file


class RunError(RuntimeError):
    """An output folder is in a state that does not allow the requested action."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
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


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(contiguous, str(p), metadata=metadata))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_yaml(path: str | Path) -> Any:
    return yaml.safe_load(Path(path).read_text())


def check_same_settings(out: str | Path, config: Any, noun: str, action: str) -> None:
    """Refuse to continue ``out`` when its saved ``config.yaml`` differs from ``config`` in a result field.

    A field added after the folder was made counts as its default. ``noun`` names the folder in
    the message ("store"), ``action`` what was refused ("cannot resume").
    """
    from diffinv.config import config_to_dict, result_fields

    saved = read_yaml(Path(out) / "config.yaml") or {}
    defaults = config_to_dict(type(config)())
    asked = config_to_dict(config)
    diffs = {k: (saved.get(k, defaults[k]), asked[k]) for k in result_fields(config) if saved.get(k, defaults[k]) != asked[k]}
    if diffs:
        listing = ", ".join(f"{k}: {noun} has {a!r}, asked {b!r}" for k, (a, b) in diffs.items())
        raise RunError(f"{action} {out} with different settings ({listing}); use the same settings, --overwrite, or a new --out")


def prepare_output(out: str | Path, marker: str, *, resume: bool, overwrite: bool) -> str:
    """Decide how a stage may use ``out``. Returns ``"fresh"``, ``"resume"`` or ``"done"``.

    ``marker`` is the JSON file (relative to ``out``) whose ``status`` field says whether the
    folder holds a complete output. A complete one is never overwritten without ``overwrite``;
    an unfinished one is only continued with ``resume``; a non-empty folder that is not ours is
    never deleted.
    """
    out = Path(out)
    marker_path = out / marker
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is a file; give a folder path")
    if marker_path.exists():
        status = read_json(marker_path).get("status")
        if overwrite:
            shutil.rmtree(out)
        elif status == "complete" and not resume:
            raise RunError(f"{out} already holds a finished result; pass --overwrite to replace it or choose another --out")
        elif status == "complete":
            return "done"
        elif not resume:
            raise RunError(f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to start over")
        else:
            return "resume"
    elif out.exists() and any(out.iterdir()):
        raise RunError(f"--out {out} is a non-empty folder that is not a diffinv output; choose an empty or new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write to --out {out}: {exc}") from exc
    return "fresh"
