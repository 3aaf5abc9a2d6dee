"""``diffinv filter``: keep the synthetic images that a real-only classifier trusts, as a new set.

The judge is a classifier trained on the real subset alone (a `diffinv train` run without
``--synthetic``), so no label beyond the few real ones is used. Every image of the source set is
scored by the probability the judge gives its own class; the kept images are copied, with their
score in their manifest row, into a new set that reads, trains and verifies like any generated
one. The source set is never changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from diffinv.config import FilterConfig, config_to_dict
from diffinv.data.real import load_uint8
from diffinv.data.synthetic import MARKER, open_synthetic, read_manifest
from diffinv.device import resolve_device
from diffinv.quality.filtering import keep_mask, own_class_scores
from diffinv.quality.measures import judge_probabilities
from diffinv.runs import RunError, atomic_write, file_sha256, open_output, read_json, read_yaml, write_json, write_text, write_yaml
from diffinv.stages import Stage
from diffinv.stages.train import load_classifier


def filter_set(config: FilterConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
               log: Callable[[str], None] = print) -> Path:
    out, source = Path(out), Path(config.set)
    if out.resolve() == source.resolve():
        raise RunError("--out must be a new folder: the source set is never changed")
    if open_output(out, MARKER, config, noun="filtered set", resume=resume, overwrite=overwrite) == "done":
        return out
    # 1. The judge, checked to have seen the real subset only.
    if not (Path(config.judge) / "config.yaml").is_file():
        raise RunError(f"--judge {config.judge} is not a run of `diffinv train` (no config.yaml)")
    judge_config = read_yaml(Path(config.judge) / "config.yaml") or {}
    if judge_config.get("synthetic") or judge_config.get("use") == "synthetic":
        raise RunError(f"--judge {config.judge} was trained on synthetic images; train it on the real images alone "
                       f"(`diffinv train` without --synthetic) so it judges with real labels only")
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
            data = (source / row["file"]).read_bytes()
            atomic_write(out / row["file"], lambda p, data=data: p.write_bytes(data))
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


def _run(config: FilterConfig, out: Path, *, resume: bool, overwrite: bool, log: Callable[[str], None], **_: Any) -> Path:
    return filter_set(config, out, resume=resume, overwrite=overwrite, log=log)


def _summary(config: FilterConfig, out: Path) -> str:
    info = read_json(out / MARKER)["filter"]
    return f"filtered set {out}: {info['kept']} of {info['of']} images of {config.set}; train on it with --synthetic {out}"


STAGE = Stage(name="filter", config=FilterConfig, marker=MARKER, run=_run, summary=_summary, path_fields=("set", "judge"),
              help="keep the synthetic images a real-only classifier trusts, as a new set (the source is left as it is)",
              outputs=("filtered set to write (a new folder)", "finish an interrupted filter", "replace an existing filtered set"))
