"""The train stage's data: what a classifier run holds in memory, read from its config, and its batch streams.

The run itself (folder, loop, checkpoints) is :mod:`diffinv.stages.train`; the pure parts
(batch order, evaluation steps) are :mod:`diffinv.classify.batches`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import overload

import numpy as np
import torch

from diffinv.classify.batches import Stream, conflicting_labels, overlap_notes
from diffinv.config import TrainConfig
from diffinv.data.near_duplicates import SIDE
from diffinv.data.real import DataError, LabelledImages, load_uint8, open_images, select, validation_ids
from diffinv.data.synthetic import MARKER, open_synthetic, read_manifest
from diffinv.diffusion.store import CLASS_PREFIX
from diffinv.errors import UserError
from diffinv.runs import read_json, read_yaml

MIN_RESOLUTION = 32  # the smallest side on which every listed architecture keeps a spatial map
# A study trains many runs in one process on the same evaluation split (CIFAR-10's test split: 10,000
# JPEGs opened to check them, then decoded, ~10 s a run on this CPU); it is read once per process.
_SPLITS: dict[tuple, tuple] = {}
_SPLITS_KEPT = 2


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to change."""


@dataclass
class TrainData:
    """Everything a run reads, as uint8 tensors [N, 3, S, S] and int64 labels [N]."""

    classes: list[str]
    resolution: int
    real: torch.Tensor
    real_labels: torch.Tensor
    syn: torch.Tensor
    syn_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    val: torch.Tensor | None = None  # validation images, when the config asks for them
    val_labels: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)


def load_train_data(config: TrainConfig, progress: bool = False, log: Callable[[str], None] = print,
                    with_test: bool = True) -> TrainData:
    """Real subset, synthetic sets (mapped to the real label space), the validation data and (``with_test``) the test split."""
    check_synthetic(config)
    source = open_images(config.data, config.format, config.split)
    classes = source.classes
    if len(classes) < 2:
        raise DataError(f"{config.data} has one class ({classes[0]!r}); a classifier needs two or more (every prediction "
                        f"would be that class and score 100%)")
    use = _use(config)
    held_out = validation_ids(source, config.val_per_class)
    real_set = select(source, config.per_class, config.subset_seed, config.bad_images, warn=log, exclude=held_out)
    test_set, decoded = _whole_split(config, config.eval_split, log) if with_test else (None, None)
    val_set = None
    if held_out:
        val_set = source.subset([i for i, image_id in enumerate(source.ids) if image_id in held_out])
    elif config.val_split:
        val_set = select(open_images(config.data, config.format, config.val_split, "--val-split"), None, 0, config.bad_images,
                         warn=log)
    test_set = _in_classes(test_set, classes, config.eval_split, config.split, log)
    val_set = _in_classes(val_set, classes, config.val_split or "validation", config.split, log)
    resolution = config.resolution or max(MIN_RESOLUTION, *real_set.image(0).size)
    syn_sets = [open_synthetic(root, classes) for root in (config.synthetic if use != "real" else ())]
    notes = []
    if use == "both":
        notes += _provenance_notes(config, set(real_set.ids))
    empty = torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
    real = load_uint8(real_set, resolution, progress, "real images") if use != "synthetic" else empty
    test = _decoded_once(decoded, test_set, resolution, progress, f"{config.eval_split} images") if with_test else empty
    if use != "synthetic":
        notes += conflicting_labels(real, real_set.labels, real_set.ids, classes)
    # Copies are told from look-alikes at 32 px or more, whatever the classifier's resolution.
    compared = test if resolution >= SIDE or not with_test else _decoded_once(decoded, test_set, SIDE, False, "")
    if with_test and use != "synthetic":
        notes += overlap_notes(_at_least(SIDE, real, real_set), real_set.ids, compared, config.eval_split)
    for note in notes:
        log(f"warning: {note}")
    syn = torch.cat([load_uint8(s, resolution, progress, "synthetic images") for s in syn_sets]) if syn_sets else empty
    syn_labels = torch.cat([torch.from_numpy(s.labels) for s in syn_sets]) if syn_sets else torch.empty(0, dtype=torch.int64)
    if with_test and len(syn):  # a retrieved or filtered set can carry test images back in under other names
        leaks = overlap_notes(torch.cat([_at_least(SIDE, None, s) for s in syn_sets]) if resolution < SIDE else syn,
                              [i for s in syn_sets for i in s.ids], compared, config.eval_split, "synthetic")
        notes += leaks
        for note in leaks:
            log(f"warning: {note}")
    return TrainData(
        classes=classes, resolution=resolution,
        real=real, real_labels=torch.from_numpy(real_set.labels) if use != "synthetic" else torch.empty(0, dtype=torch.int64),
        syn=syn, syn_labels=syn_labels,
        test=test,
        test_labels=torch.from_numpy(test_set.labels) if with_test else torch.empty(0, dtype=torch.int64),
        val=None if val_set is None else load_uint8(val_set, resolution, progress, "validation images"),
        val_labels=None if val_set is None else torch.from_numpy(val_set.labels),
        notes=notes,
    )


def check_synthetic(config: TrainConfig) -> None:
    """Refuse synthetic sets that would make the numbers wrong: listed twice, inside the real data, or made from the
    very split the run is scored (or validated) on."""
    resolved = [Path(root).resolve() for root in config.synthetic]
    twice = sorted({str(r) for r in resolved if resolved.count(r) > 1})
    if twice:
        raise DataError(f"--synthetic {twice[0]} is given twice; each set counts once (its images would weigh double)")
    data = Path(config.data).resolve() if Path(config.data).exists() else None
    for root, path in zip(config.synthetic, resolved):
        if data is not None and data.is_dir() and data in path.parents:
            raise DataError(f"the synthetic set {root} is inside the real data {config.data}, so it would also be read as a "
                            f"class of real images; move it out (and generate into a folder outside the data)")
        made_from = _origin(root)
        same_data = made_from.get("data") == (str(data) if data is not None else config.data)
        scored = {config.eval_split, config.val_split} - {""}
        if same_data and made_from.get("split") in scored:
            raise DataError(f"the synthetic set {root} was made from the {made_from['split']!r} split of {config.data}, which "
                            f"this run is {'scored' if made_from['split'] == config.eval_split else 'validated'} on: synthetic "
                            f"data made from those images must never meet them. Invert the training split (--split "
                            f"{config.split}) and generate again")


def _origin(root: str) -> dict[str, str]:
    """The data and split a set's store inverted (recorded by generate; read from the store for older sets)."""
    try:
        info = read_json(Path(root) / MARKER)
    except (OSError, ValueError):
        return {}
    if "split" in info:
        return {"data": info.get("data", ""), "split": info["split"]}
    store = Path(info.get("store", "")) / "config.yaml"
    if not store.is_file():
        return {}
    made = read_yaml(store) or {}
    source = str(made.get("data", ""))
    return {"data": str(Path(source).resolve()) if source and Path(source).exists() else source,
            "split": str(made.get("split", "train"))}


def _provenance_notes(config: TrainConfig, chosen: set[str]) -> list[str]:
    """Synthetic images made from real images outside this run's subset would smuggle in more real data."""
    notes = []
    data = str(Path(config.data).resolve()) if Path(config.data).exists() else config.data
    for root in config.synthetic:
        made_from = _origin(root).get("data")
        if made_from and made_from != data:
            notes.append(f"the synthetic set {root} was made from the images of {made_from}, not of {config.data} (this run's "
                         f"data): its sources are other images than this run's subset")
            continue
        # A per-class row's source names its class ("class:NAME", a class store's row), not one real image.
        outside = {r["source"] for r in read_manifest(root)
                   if r.get("source") and r["source"] not in chosen and not r["source"].startswith(CLASS_PREFIX)}
        if outside:
            notes.append(f"{len(outside)} synthetic source image(s) of {root} are not in the real subset (per-class "
                         f"{config.per_class}, subset-seed {config.subset_seed}); pass the settings the store was inverted with")
    return notes


def load_test_split(config: TrainConfig, resolution: int, classes: list[str],
                    log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation split at ``resolution`` (uint8 images, labels) for a run trained on ``classes``."""
    test_set, decoded = _whole_split(config, config.eval_split, log)
    test_set = _in_classes(test_set, classes, config.eval_split, config.split, log)
    return _decoded_once(decoded, test_set, resolution, False, ""), torch.from_numpy(test_set.labels)


def test_split_ids(config: TrainConfig, classes: list[str]) -> list[str]:
    """The ids of :func:`load_test_split`'s images, in its order."""
    test_set, _ = _whole_split(config, config.eval_split, lambda m: None)
    return list(_in_classes(test_set, classes, config.eval_split, config.split, lambda m: None).ids)


def _split_key(config: TrainConfig, split: str) -> tuple:
    # The file's or folder's modification time and size: a source replaced on disk is read again.
    try:
        stat = os.stat(config.data)
    except OSError:  # "digits", a hub id ...: not a path
        return (config.data, None, config.format, split, config.bad_images)
    return (os.path.abspath(config.data), (stat.st_mtime_ns, stat.st_size), config.format, split, config.bad_images)


@overload
def _in_classes(images: LabelledImages, classes: list[str], name: str, train_split: str,
                log: Callable[[str], None]) -> LabelledImages: ...
@overload
def _in_classes(images: None, classes: list[str], name: str, train_split: str, log: Callable[[str], None]) -> None: ...
def _in_classes(images: LabelledImages | None, classes: list[str], name: str, train_split: str,
                log: Callable[[str], None]) -> LabelledImages | None:
    """A test or validation split with labels in the training split's class order. A split that lacks some classes is
    scored on those it has (balanced accuracy averages the classes present), and says so; one with other classes is
    refused."""
    if images is None or images.classes == classes:
        return images
    extra = sorted(set(images.classes) - set(classes))
    if extra:
        raise DataError(f"the {name} split has classes {extra} that the {train_split} split has not ({classes}); a classifier "
                        f"cannot predict them: remove them from the {name} split or add training images of them")
    missing = [c for c in classes if c not in images.classes]
    present = sorted({images.classes[int(label)] for label in images.labels})
    if missing or len(present) < len(classes):
        absent = [c for c in classes if c not in present]
        log(f"note: the {name} split has no images of {absent}: it is scored on the {len(classes) - len(absent)} classes "
            f"it has (balanced accuracy averages those)")
    index = np.asarray([classes.index(c) for c in images.classes], dtype=np.int64)
    return replace(images, labels=index[images.labels], classes=list(classes))


def _whole_split(config: TrainConfig, split: str, log: Callable[[str], None]) -> tuple:
    """Every readable image of ``split`` (what a run evaluates on), opened and checked once per process,
    with its pixels decoded so far ({resolution: uint8 tensor}, filled by :func:`_decoded_once`)."""
    key = _split_key(config, split)
    if key not in _SPLITS:
        while len(_SPLITS) >= _SPLITS_KEPT:
            _SPLITS.pop(next(iter(_SPLITS)))
        flag = "--eval-split" if split == config.eval_split else "--val-split"
        _SPLITS[key] = (select(open_images(config.data, config.format, split, flag), None, 0, config.bad_images, warn=log), {})
    return _SPLITS[key]


def _at_least(side: int, pixels: torch.Tensor | None, images) -> torch.Tensor:
    """``pixels`` when they are ``side`` px or more, else ``images`` decoded at ``side``: a copy is told from a look-alike on
    detail that 16 px thumbnails no longer hold."""
    return pixels if pixels is not None and pixels.shape[-1] >= side else load_uint8(images, side)


def _decoded_once(decoded: dict[int, torch.Tensor], images, resolution: int, progress: bool, desc: str) -> torch.Tensor:
    """:func:`load_uint8` of ``images`` at ``resolution``, decoded once (a copy, so no run alters the kept one)."""
    if resolution not in decoded:
        decoded[resolution] = load_uint8(images, resolution, progress, desc)
    return decoded[resolution].clone()


def _use(config: TrainConfig) -> str:
    return ("both" if config.synthetic else "real") if config.use == "auto" else config.use


# ----------------------------------------------------------------------------- pure schedule parts


def plan_streams(config: TrainConfig, n_real: int, n_syn: int) -> tuple[list[tuple[str, Stream]], int]:
    """The index streams of a run and its length in steps."""
    use = _use(config)
    if config.real_batch and use != "both":
        raise DataError(f"--real-batch/--syn-batch split batches between real and synthetic images; use is {use!r}")
    if use == "both" and config.real_batch:
        sizes = [("real", n_real, config.real_batch), ("syn", n_syn, config.syn_batch)]
    else:
        sizes = [("pool", {"real": n_real, "synthetic": n_syn, "both": n_real + n_syn}[use], config.batch_size)]
    for name, size, _ in sizes:
        if size == 0:
            raise DataError(f"no {name} training images; check --data, --per-class and --synthetic")
    streams = [(name, Stream(size, batch, config.seed, name)) for name, size, batch in sizes]
    steps_per_epoch = max(s.per_pass for _, s in streams)
    total = config.steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    return streams, total
