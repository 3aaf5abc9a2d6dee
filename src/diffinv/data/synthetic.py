"""A generated dataset on disk: ``OUT/<class>/<sample-id>.png`` plus the provenance of each image.

Layout::

    generate.json     format, method, classes, counts, model fingerprint, status
    config.yaml       the resolved GenerateConfig
    manifest.jsonl    one row per image: file, label, source, partner, s, sigma, guidance, sampler, ...
    <class>/<id>.png  the images

Every PNG is written atomically, so an image file that exists is complete: a re-run (or
``--resume`` after a kill) only makes the missing ones. ``manifest.jsonl`` is written when the
set is complete. The folder reads as an ordinary class-per-folder dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from diffinv.data.real import DataError, LabelledImages

if TYPE_CHECKING:  # imported where tensors are made, so that opening a folder (verify, report) needs no torch
    import torch

from diffinv.runs import COST, RunError, add_cost, atomic_write, file_sha256, read_json, write_json, write_text

SYNTHETIC_FORMAT = "diffinv-synthetic-v1"
MARKER = "generate.json"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str) -> str:
    """A file-name-safe form of an id; a short hash keeps two ids that clean up alike apart."""
    clean = _UNSAFE.sub("_", text).strip("._") or "x"
    if clean == text:
        return clean
    return f"{clean[-60:]}_{hashlib.blake2b(text.encode(), digest_size=3).hexdigest()}"


class SyntheticWriter:
    """Writes a generated dataset image by image; safe to kill at any point and re-run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def start(self, info: dict[str, Any]) -> None:
        write_json(self.root / MARKER, {**info, "format": SYNTHETIC_FORMAT, "status": "in-progress"})

    def info(self) -> dict[str, Any]:
        return read_json(self.root / MARKER)

    def exists(self, row: dict[str, Any]) -> bool:
        return (self.root / row["file"]).is_file()

    def write_image(self, row: dict[str, Any], image: torch.Tensor) -> None:
        """image uint8 [H, W, 3] -> ``OUT/<file>`` atomically."""
        buf = io.BytesIO()
        Image.fromarray(image.numpy()).save(buf, format="PNG")
        data = buf.getvalue()
        atomic_write(self.root / row["file"], lambda p: p.write_bytes(data))

    def add_cost(self, seconds: float, images: int, device: str, load_seconds: float = 0.0) -> None:
        """Count ``seconds`` spent making ``images`` images on ``device`` in ``cost.json`` (a resumed set adds each run's);
        ``load_seconds`` of them went to the method's preparation (retrieval's search, DDIM inversion's)."""
        add_cost(self.root, seconds, images, device, "images", {"load_seconds": load_seconds})

    def add_preparation(self, inversion_seconds: float | None) -> None:
        """Record in ``cost.json`` what inverting the stores the set samples from took (None: not known)."""
        if (self.root / COST).is_file():
            write_json(self.root / COST, {**read_json(self.root / COST), "inversion_seconds": inversion_seconds})

    def finish(self, rows: list[dict[str, Any]]) -> None:
        missing = [r["file"] for r in rows if not self.exists(r)]
        if missing:
            raise RunError(f"{self.root}: {len(missing)} images are missing, e.g. {missing[:3]}; re-run the same command to make them")
        # Every image's size and checksum in its row: opening the set checks sizes, `diffinv verify` the sums.
        rows = [{**r, "bytes": (self.root / r["file"]).stat().st_size, "sha256": file_sha256(self.root / r["file"])} for r in rows]
        write_text(self.root / "manifest.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        info = self.info()
        if (self.root / COST).is_file():
            write_json(self.root / COST, per_image_cost(read_json(self.root / COST), info, len(rows)))
        write_json(self.root / MARKER, {**info, "status": "complete", "n_samples": len(rows)})


def per_image_cost(cost: dict[str, Any], info: dict[str, Any], n_samples: int) -> dict[str, Any]:
    """A set's cost per image: sampling, plus its share of what was prepared for it (the inversions of the stores it
    samples from, ``cost["inversion_seconds"]``; the LoRA fits, ``info["lora"]``). An unknown part counts as 0 and is None."""
    fit = (info.get("lora") or {}).get("fit_seconds_per_image", 0.0)
    inversion = cost.get("inversion_seconds")
    inversion = None if inversion is None else round(inversion / max(n_samples, 1), 6)
    sampling = cost["seconds"] / max(cost["images"], 1)
    return {**cost, "sampling_seconds_per_image": round(sampling, 6), "fit_seconds_per_image": fit,
            "inversion_seconds_per_image": inversion, "seconds_per_image": round(sampling + fit + (inversion or 0.0), 6)}


def read_manifest(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / "manifest.jsonl"
    if not path.is_file():
        raise DataError(f"{root} has no manifest.jsonl; finish it with `diffinv generate ... --resume`")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path} line {number} is not valid JSON (damaged or edited); run the `diffinv generate` "
                                f"command that made the set again: it rewrites the manifest") from None
    return rows


def open_synthetic(root: str | Path, classes: list[str] | None = None) -> LabelledImages:
    """A finished generated set as :class:`LabelledImages`, labels in the order of ``classes``.

    ``classes`` (e.g. the real data's class list) maps class names to labels so real and
    synthetic images share one label space; by default the set's own class list is used.
    """
    root = Path(root)
    if not (root / MARKER).is_file():
        raise DataError(f"{root} is not a generated dataset (no {MARKER}); make one with `diffinv generate`")
    info = read_json(root / MARKER)
    if info.get("status") != "complete":
        raise DataError(f"{root} is unfinished; complete it with `diffinv generate ... --resume`")
    rows = read_manifest(root)
    problems = damage(root, rows, checksums=True)
    if problems:
        remedy = ("restore its manifest.jsonl, or make the set again (the `diffinv generate` command with --overwrite)"
                  if any("manifest was edited" in p for p in problems) else
                  "run the `diffinv generate` command that made it again: it makes what is missing")
        raise DataError(f"{root} is damaged: {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. {remedy[0].upper()}"
                        f"{remedy[1:]}")
    classes = list(classes or info["classes"])
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r["class"] for r in rows} - set(index))
    if unknown:
        raise DataError(f"{root} has classes {unknown} that the real data does not have")
    paths = [root / r["file"] for r in rows]
    return LabelledImages([r["id"] for r in rows], np.asarray([index[r["class"]] for r in rows], dtype=np.int64), classes,
                          [str(p) for p in paths], lambda i: Image.open(paths[i]))


def damage(root: Path, rows: list[dict[str, Any]], checksums: bool = False) -> list[str]:
    """What is wrong with a finished set: images missing or of another size than recorded, and with ``checksums`` (what
    a classifier reads) images whose content is not the one recorded (two images swapped between classes, say)."""
    from diffinv.runs import file_sha256

    problems = []
    for r in rows:
        path = root / r["file"]
        if Path(r["file"]).parts[0] != slug(r["class"]):  # every image is written into its class's folder
            problems.append(f"{r['file']} lies in another class's folder than its manifest row's class {r['class']!r} "
                            f"(the manifest was edited)")
        elif not path.is_file():
            problems.append(f"{r['file']} is missing")
        elif r.get("bytes") is not None and path.stat().st_size != r["bytes"]:
            problems.append(f"{r['file']} has {path.stat().st_size} bytes, {r['bytes']} expected")
        elif checksums and r.get("sha256") and file_sha256(path) != r["sha256"]:
            problems.append(f"{r['file']} is not the image its manifest records (its checksum differs)")
    return problems
