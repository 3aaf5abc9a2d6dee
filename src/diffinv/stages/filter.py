"""``diffinv filter``: keep the synthetic images that a real-only classifier trusts, as a new set.

The judge is a classifier trained on the real subset alone (a `diffinv train` run without
``--synthetic``), so no label beyond the few real ones is used. Every image of the source set is
scored by the probability the judge gives its own class; the kept images are copied, with their
score in their manifest row, into a new set that reads, trains and verifies like any generated
one. The source set is never changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffinv.config import FilterConfig, config_to_dict
from diffinv.data.real import load_uint8
from diffinv.data.synthetic import MARKER, open_synthetic, read_manifest
from diffinv.device import resolve_device
from diffinv.quality.filtering import keep_mask, own_class_scores
from diffinv.quality.measures import judge_probabilities
from diffinv.runs import RunError, file_sha256, open_output, read_json, read_yaml, write_bytes, write_json, write_text, write_yaml
from diffinv.stages import Stage
from diffinv.stages.train import load_classifier


def filter_set(config: FilterConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
               log: Callable[[str], None] = print) -> Path:
    out, source = Path(out), Path(config.set)
    if out.resolve() == source.resolve():
        raise RunError("--out must be a new folder: the source set is never changed")
    if open_output(out, MARKER, config, noun="filtered set", resume=resume, overwrite=overwrite) == "done":
        return out
    # 1. The judge, checked to be a classifier run that saw the real subset only, of the data the set was made from.
    judge_config = _judge_config(config.judge)
    if judge_config.get("synthetic") or judge_config.get("use") == "synthetic":
        raise RunError(f"--judge {config.judge} was trained on synthetic images; train it on the real images alone "
                       f"(`diffinv train` without --synthetic) so it judges with real labels only")
    made_from = (read_json(source / MARKER) if (source / MARKER).is_file() else {}).get("data")
    if made_from and judge_config.get("data") and not _same_data(made_from, judge_config["data"]):
        log(f"warning: --judge {config.judge} was trained on {judge_config['data']}, but {source} was made from "
            f"{made_from}: it scores the images by another dataset's idea of each class name; train the judge on "
            f"{made_from} (`diffinv train --data {made_from}` without --synthetic)")
    model, meta = load_classifier(config.judge, resolve_device(config.device))
    # 2. Every image's score: the judge's probability of its own class.
    images = open_synthetic(source, meta["classes"])
    probabilities = judge_probabilities(model, load_uint8(images, meta["resolution"]), meta["mean"], meta["std"],
                                        config.batch_size)
    labels = torch.as_tensor(images.labels)
    scores = own_class_scores(probabilities, labels)
    keep = keep_mask(scores, labels, min_confidence=config.min_confidence, keep_top=config.keep_top)
    if not keep.any():
        raise RunError(f"no image of {source} reaches --min-confidence {config.min_confidence} (the highest own-class "
                       f"probability is {float(scores.max()):.3f}); lower it, or use --keep-top Q")
    # 3. The kept images copied, their rows with the score; the marker last.
    write_yaml(out / "config.yaml", config_to_dict(config))
    rows = []
    for row, kept, score, best in zip(read_manifest(source), keep.tolist(), scores.tolist(), probabilities.argmax(1).tolist()):
        if kept:
            write_bytes(out / row["file"], (source / row["file"]).read_bytes())
            rows.append({**row, "judge_score": round(score, 6), "judge_class": meta["classes"][best]})
    write_text(out / "manifest.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    info = read_json(source / MARKER)
    write_json(out / MARKER, {**info, "status": "complete", "n_samples": len(rows), "filter": {
        "source": str(source.resolve()), "source_manifest_sha256": file_sha256(source / "manifest.jsonl"),
        "judge": str(Path(config.judge).resolve()), "judge_sha256": file_sha256(Path(config.judge) / "model.safetensors"),
        "min_confidence": config.min_confidence, "keep_top": config.keep_top, "kept": len(rows), "of": len(keep)}})
    dropped = f", dropped {float(scores[~keep].median()):.2f}" if (~keep).any() else ""
    log(f"kept {len(rows)} of {len(keep)} images (median own-class probability: kept {float(scores[keep].median()):.2f}{dropped})")
    return out


def _judge_config(judge: str) -> dict[str, Any]:
    """The saved config of a `diffinv train` run; a folder of another stage is named as what it is."""
    folder = Path(judge)
    if not (folder / "train.json").is_file() and not (folder / "model.safetensors").is_file():
        kinds = {MARKER: "a synthetic set", "store.json": "an embedding store", "study.yaml": "a study folder"}
        kind = next((what for marker, what in kinds.items() if (folder / marker).is_file()), "not a `diffinv train` run")
        raise RunError(f"--judge {judge} is {kind}; give the folder of a `diffinv train` run on the real images alone "
                       f"(no --synthetic), e.g. `diffinv train --data DATA --out {Path(judge).name}-judge`")
    return read_yaml(folder / "config.yaml") or {}


def _same_data(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def _run(config: FilterConfig, out: Path, *, resume: bool, overwrite: bool, log: Callable[[str], None], **_: Any) -> Path:
    return filter_set(config, out, resume=resume, overwrite=overwrite, log=log)


def _summary(config: FilterConfig, out: Path) -> str:
    info = read_json(out / MARKER)["filter"]
    return f"filtered set {out}: {info['kept']} of {info['of']} images of {config.set}; train on it with --synthetic {out}"


STAGE = Stage(name="filter", config=FilterConfig, marker=MARKER, run=_run, summary=_summary, path_fields=("set", "judge"),
              outputs=("filtered set to write (a new folder)", "finish an interrupted filter", "replace an existing filtered set"))
