"""Writing labelled images out in the formats other training code reads: ImageFolder, a Hugging Face dataset, WebDataset.

A writer takes :class:`Record` s (PNG bytes, label, provenance) and a folder it owns; it knows
nothing of diffinv's run folders. Writers are registered by name in :data:`EXPORT_FORMATS`
(a :class:`~diffinv.registry.Registry`).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from diffinv.registry import Registry
from diffinv.runs import RunError, atomic_write, write_bytes, write_text


@dataclass(frozen=True)
class Record:
    """One image to export: its PNG bytes, label and class name, and where it came from."""

    id: str
    png: bytes
    label: int
    class_name: str
    origin: str  # "synthetic" or "real"
    provenance: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, Any]:
        """The flat columns every format carries; ``provenance`` keeps the whole manifest row as JSON."""
        return {"id": self.id, "label": self.label, "class_name": self.class_name, "origin": self.origin,
                "source": str(self.provenance.get("source") or ""), "method": str(self.provenance.get("method") or ""),
                "provenance": json.dumps(self.provenance, sort_keys=True)}


class Writer(Protocol):
    def __call__(self, records: Iterable[Record], out: Path, classes: list[str], *, shard_size: int) -> dict[str, Any]: ...


# The formats a set is exported to, by --to name.
EXPORT_FORMATS: Registry[Writer] = Registry("export format", RunError)


def _file_name(record: Record, index: int) -> str:
    from diffinv.data.synthetic import slug

    return f"{slug(record.class_name)}/{index:08d}-{slug(record.id)[:80]}.png"


@EXPORT_FORMATS.register("imagefolder", "OUT/<class>/<n>-<id>.png, read by torchvision's ImageFolder; metadata.jsonl "
                                "(file_name + provenance) as Hugging Face's imagefolder loader reads it")
def write_imagefolder(records: Iterable[Record], out: Path, classes: list[str], *, shard_size: int = 0) -> dict[str, Any]:
    lines = []
    for i, record in enumerate(records):
        name = _file_name(record, i)
        write_bytes(out / name, record.png)
        lines.append(json.dumps({"file_name": name, **record.columns()}, sort_keys=True) + "\n")
    write_text(out / "metadata.jsonl", "".join(lines))
    return {"images": len(lines), "files": "<class>/*.png, metadata.jsonl"}


@EXPORT_FORMATS.register("webdataset", "tar shards OUT/shard-NNNNNN.tar of <key>.png, <key>.cls (label), <key>.json "
                               "(provenance), --shard-size images each")
def write_webdataset(records: Iterable[Record], out: Path, classes: list[str], *, shard_size: int = 10_000) -> dict[str, Any]:
    shards: list[str] = []
    batch: list[tuple[int, Record]] = []

    def flush() -> None:
        name = f"shard-{len(shards):06d}.tar"
        atomic_write(out / name, lambda p: _write_tar(p, batch))
        shards.append(name)
        batch.clear()

    count = 0
    for i, record in enumerate(records):
        batch.append((i, record))
        count += 1
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    return {"images": count, "shards": shards}


def _write_tar(path: Path, batch: list[tuple[int, Record]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, record in batch:
            key = f"{i:08d}"  # WebDataset splits a member's name at its first dot: the key has none
            for ext, data in (("png", record.png), ("cls", str(record.label).encode()),
                              ("json", json.dumps(record.columns(), sort_keys=True).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: the same set gives the same bytes
                tar.addfile(info, io.BytesIO(data))


@EXPORT_FORMATS.register("hf", "a Hugging Face dataset (datasets.load_from_disk(OUT)): image, label (ClassLabel), "
                       "id, class_name, origin, source, method, provenance")
def write_hf(records: Iterable[Record], out: Path, classes: list[str], *, shard_size: int = 0) -> dict[str, Any]:
    datasets = import_datasets()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes),
                                  **{k: datasets.Value("string") for k in ("id", "class_name", "origin", "source", "method",
                                                                           "provenance")}})
    rows: dict[str, list[Any]] = {name: [] for name in features}
    for record in records:
        for name, value in record.columns().items():
            rows[name].append(value)
        rows["image"].append({"bytes": record.png, "path": None})
    datasets.disable_progress_bars()  # our own bar counts the images
    dataset = datasets.Dataset.from_dict(rows, features=features)
    # save_to_disk writes into a fresh folder; the move makes the finished dataset appear whole
    staging = out / ".hf-staging"
    dataset.save_to_disk(str(staging))
    target = out / "dataset"
    staging.rename(target)
    return {"images": len(dataset), "files": "dataset/ (datasets.load_from_disk)"}


def import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise RunError("--to hf needs the Hugging Face datasets library: pip install 'diffusion-inversion[export]' "
                       "(or pip install datasets)") from None
    return datasets
