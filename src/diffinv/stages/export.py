"""``diffinv export``: a synthetic set, with the real subset it was made from if asked, as ImageFolder, HF dataset or WebDataset.

The set is checked (checksums) before anything is written; every image keeps its manifest row
as provenance. The export folder is finished when ``export.json`` says so.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from diffinv.config import ExportConfig, config_to_dict
from diffinv.data.export import EXPORT_FORMATS, Record, import_datasets
from diffinv.data.real import DataError, LabelledImages, open_images
from diffinv.data.synthetic import MARKER as SET_MARKER
from diffinv.data.synthetic import open_synthetic, read_manifest
from diffinv.progress import bar
from diffinv.runs import RunError, open_output, read_json, read_yaml, write_json, write_yaml
from diffinv.stages import Stage

MARKER = "export.json"


def export_set(config: ExportConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
               progress: bool = False, log: Callable[[str], None] = print) -> Path:
    out, source = Path(out), Path(config.set)
    if out.resolve() == source.resolve():
        raise RunError("--out must be a new folder: the set is never changed")
    writer = EXPORT_FORMATS.get(config.to)
    if config.to == "hf":
        import_datasets()  # before any work: say what to install
    if open_output(out, MARKER, config, noun="export", resume=resume, overwrite=overwrite) == "done":
        return out
    # 1. The set, read and checked in full; the real subset it was made from, if asked.
    synthetic = open_synthetic(source)
    rows = read_manifest(source)
    real = set_real_images(source, synthetic.classes) if config.with_real else None
    total = len(synthetic) + (len(real) if real is not None else 0)
    # 2. Every image through the format's writer (each file atomic); the marker last.
    write_yaml(out / "config.yaml", config_to_dict(config))
    for stale in (out / "dataset", out / ".hf-staging"):  # a resumed hf export starts its one file again
        if stale.exists():
            shutil.rmtree(stale)
    with bar(total=total, desc=f"export ({config.to})", unit="img", disable=not progress) as pbar:
        written = writer(_counted(_records(synthetic, rows, real), pbar), out, synthetic.classes, shard_size=config.shard_size)
    n_real = len(real) if real is not None else 0
    info = {"status": "complete", "format": config.to, "set": str(source.resolve()), "synthetic": len(synthetic),
            "real": n_real, "classes": synthetic.classes, **written}
    if config.push_to_hub:
        info["pushed_to"] = push(out / "dataset", config.push_to_hub)
    write_json(out / MARKER, info)
    return out


def _counted(records: Iterator[Record], pbar: Any) -> Iterator[Record]:
    for record in records:
        yield record
        pbar.update(1)


def _records(synthetic: LabelledImages, rows: list[dict[str, Any]], real: LabelledImages | None) -> Iterator[Record]:
    for i, row in enumerate(rows):
        yield Record(row["id"], Path(synthetic.sources[i]).read_bytes(), int(synthetic.labels[i]), row["class"], "synthetic", row)
    if real is None:
        return
    for i in range(len(real)):
        buffer = io.BytesIO()
        real.image(i).save(buffer, format="PNG")  # lossless: the pixels the classifier would read
        label = int(real.labels[i])
        yield Record(real.ids[i], buffer.getvalue(), label, real.classes[label], "real",
                     {"id": real.ids[i], "source": real.sources[i], "origin": "real"})


def set_real_images(set_root: Path, classes: list[str]) -> LabelledImages:
    """The real images a set was made from: its store's images, else the rows' sources; labels in ``classes``' order."""
    info = read_json(set_root / SET_MARKER)
    store = _store_folder(set_root, info.get("store") or "")
    if store is not None:
        from diffinv.diffusion.store import read_rows

        settings = read_yaml(store / "config.yaml") or {}
        ids = [r["id"] for r in read_rows(store)]
        data, format, split = settings.get("data"), settings.get("format", "auto"), settings.get("split", "train")
    else:
        ids = sorted({r["source"] for r in read_manifest(set_root) if r.get("source")})
        data, format, split = info.get("data"), "auto", info.get("split", "train")
    if not data or not ids:
        raise RunError(f"{set_root} does not record the real images it was made from (no store, no source images); "
                       f"export it without --with-real")
    try:
        images = open_images(data, format, split)
    except DataError as exc:
        raise RunError(f"--with-real: the real data of {set_root} cannot be opened ({exc}); export without --with-real, "
                       f"or put the data back at {data}") from None
    where = {image_id: i for i, image_id in enumerate(images.ids)}
    missing = [i for i in ids if i not in where]
    if missing:
        raise RunError(f"--with-real: {len(missing)} real image(s) the set was made from are no longer in {data} "
                       f"(e.g. {missing[0]}); export without --with-real")
    subset = images.subset([where[i] for i in ids])
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted({images.classes[label] for label in subset.labels} - set(index))
    if unknown:
        raise RunError(f"--with-real: the real data has classes {unknown} that the set has not")
    labels = np.asarray([index[images.classes[label]] for label in subset.labels], dtype=np.int64)
    return replace(subset, labels=labels, classes=list(classes))


def _store_folder(set_root: Path, named: str) -> Path | None:
    """The store as the set names it: as given (relative to where generate ran), else beside the set."""
    if not named:
        return None
    for candidate in (Path(named), set_root.parent / Path(named).name):
        if (candidate / "store.json").is_file():
            return candidate
    return None


def push(folder: Path, repo: str) -> str:
    """Push a saved dataset to the Hugging Face hub; offline, a one-line refusal with what to run where there is internet."""
    datasets = import_datasets()
    try:
        datasets.load_from_disk(str(folder)).push_to_hub(repo)
    except Exception as exc:  # network, auth and hub errors come in many types
        raise RunError(f"--push-to-hub {repo} failed ({str(exc).splitlines()[0][:160]}); the dataset is saved in {folder}: "
                       f"push it where there is internet with `huggingface-cli login` then "
                       f"`python -c \"import datasets; datasets.load_from_disk('{folder}').push_to_hub('{repo}')\"`") from None
    return repo


def _run(config: ExportConfig, out: Path, *, resume: bool, overwrite: bool, progress: bool, log: Callable[[str], None],
         **_: Any) -> Path:
    return export_set(config, out, resume=resume, overwrite=overwrite, progress=progress, log=log)


def _summary(config: ExportConfig, out: Path) -> str:
    info = read_json(out / MARKER)
    how = {"imagefolder": f"torchvision.datasets.ImageFolder('{out}')",
           "hf": f"datasets.load_from_disk('{out / 'dataset'}')",
           "webdataset": f"webdataset.WebDataset('{out}/shard-{{000000..{len(info.get('shards', [1])) - 1:06d}}}.tar')"}[info["format"]]
    real = f" + {info['real']} real" if info["real"] else ""
    return f"exported {info['synthetic']} synthetic{real} images of {config.set} as {info['format']} to {out}; read it with {how}"


STAGE = Stage(name="export", config=ExportConfig, marker=MARKER, run=_run, summary=_summary, path_fields=("set",),
              outputs=("folder to write (a new one)", "finish an interrupted export", "replace an existing export"))
