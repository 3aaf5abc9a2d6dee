"""Every unit of a study's work, keyed by what makes its result, so nothing is done twice.

A unit is one replicate's store (``stores/``), one candidate's synthetic set (``sets/``) or one
classifier run (``runs/``). Its key is a digest of the fields of its stage config that change the
result and differ from their defaults (data and model as the study names them, parent units by
key), so the candidates of a replicate that share inversion settings share one store, every
method's comparison shares the real-only runs, and a candidate or replicate added later reuses
everything finished. The units of one (size, replicate) form a job; jobs are independent, which is
what processes, shards and Ray tasks split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from diffinv.config import (
    FilterConfig,
    FinetuneConfig,
    GenerateConfig,
    InvertConfig,
    StudyConfig,
    TrainConfig,
    config_to_dict,
    load_config,
    result_fields,
)
from diffinv.runs import RunError, read_json
from diffinv.study.spec import REAL, Candidate, candidates

ASSETS = Path(__file__).parent.parent / "assets"
EMBEDDED_BASE = ASSETS / "digits-base"
KINDS = {"store": ("store.json", "stores"), "adapters": ("finetune.json", "adapters"), "set": ("generate.json", "sets"),
         "filter": ("generate.json", "sets"), "run": ("train.json", "runs")}


def embedded_base() -> Path:
    """The digits base shipped in the package (made by ``diffinv pretrain-base``, see its pretrain.json)."""
    if not (EMBEDDED_BASE / "unet").is_dir():
        raise RunError(f"the embedded base model is missing from {EMBEDDED_BASE}; reinstall the package, or pass "
                       f"--model PATH to a model from `diffinv pretrain-base`")
    return EMBEDDED_BASE


@dataclass(frozen=True)
class Unit:
    kind: str  # store | adapters (LoRA per class) | set | filter (a filtered set) | run
    key: str
    folder: str  # relative to the study folder
    config: Any  # the InvertConfig / GenerateConfig / TrainConfig it runs
    job: int

    def done(self, out: Path) -> bool:
        """Finished, and for a set: every image of its manifest there (one deleted is made again by the study's re-run)."""
        marker = out / self.folder / KINDS[self.kind][0]
        try:
            complete = read_json(marker).get("status") == "complete"
        except (OSError, ValueError):
            return False
        if complete and self.kind in ("set", "filter"):
            from diffinv.data.synthetic import damage, read_manifest

            try:
                return not damage(out / self.folder, read_manifest(out / self.folder))
            except ValueError:  # a damaged manifest
                return False
        return complete


@dataclass(frozen=True)
class Trial:
    """One classifier run of one candidate: the unit the statistics read."""

    arm: str
    label: str
    per_class: int
    replicate: int
    repeat: int
    run: str  # its run unit's key
    sets: tuple[str, ...] = ()


@dataclass
class Plan:
    study: StudyConfig
    jobs: list[tuple[int, int]]  # (real images per class, replicate)
    candidates: dict[str, list[Candidate]]
    units: dict[str, Unit] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)

    def job_units(self, job: int) -> list[Unit]:
        """A job's units in the order they can run (the order they were added: each after the units it reads)."""
        return [u for u in self.units.values() if u.job == job]

    def runs(self) -> list[Unit]:
        return [u for u in self.units.values() if u.kind == "run"]

    def trials_of(self, arm: str, label: str, per_class: int) -> list[Trial]:
        return [t for t in self.trials if (t.arm, t.label, t.per_class) == (arm, label, per_class)]

    def sizes(self, arm: str) -> list[int]:
        return sorted({t.per_class for t in self.trials if t.arm == arm})

    def to_json(self) -> dict[str, Any]:
        return {"jobs": [list(j) for j in self.jobs],
                "units": [{"kind": u.kind, "key": u.key, "folder": u.folder, "job": u.job} for u in self.units.values()],
                "trials": [t.__dict__ | {"sets": list(t.sets)} for t in self.trials]}


class Backbones:
    """Each generator read once while a study is planned and estimated (a Stable Diffusion folder takes seconds)."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] = {}

    def __call__(self, model: str) -> Any:
        from diffinv.diffusion.model_io import load_backbone

        if model not in self.loaded:
            self.loaded[model] = load_backbone(model)
        return self.loaded[model]

    def clear(self) -> None:
        self.loaded.clear()


def build_plan(study: StudyConfig, out: str | Path, backbones: Backbones | None = None) -> Plan:
    """Every unit and trial of ``study`` run into ``out`` (nothing is read from ``out``); ``backbones`` reads the models."""
    out = Path(out).resolve()
    found = candidates(study)
    generative = any(c.method for cs in found.values() for c in cs)
    study_where = _Where(study, generative, backbones=backbones or Backbones())
    sizes = sorted(set(study.per_class) | set(study.real_sizes))
    plan = Plan(study, [(k, r) for k in sizes for r in study.seeds], found)
    for job, (k, r) in enumerate(plan.jobs):
        for arm, cands in found.items():
            if arm != REAL and k not in study.per_class:
                continue  # the real-only curve's extra sizes
            for cand in cands:
                sets: tuple[str, ...] = ()
                where = study_where.of(cand)
                if cand.method is not None:
                    store = _add(plan, "store", f"k{k}-r{r}", _invert_config(where, cand, k, r), job, where.written)
                    gen = _generate_config(where, cand, out / store.folder)
                    parents = {**where.written, "store": store.key}
                    if gen.space == "judge" and not gen.judge:  # retrieval in the replicate's real-only classifier's features
                        judge = real_judge(plan, where, k, r, job)
                        gen = replace(gen, judge=str(out / judge.folder))
                        parents["judge"] = judge.key
                    if cand.finetune is not None:  # lora, di+lora: a LoRA per class, fitted on the class store
                        fitted = adapters(plan, where, cand, k, r, job, out)
                        gen = replace(gen, adapters=str(out / fitted.folder))
                        parents["adapters"] = fitted.key
                    made = _add(plan, "set", f"{cand.method}-k{k}-r{r}", gen, job, parents)
                    if cand.filter is not None:  # judged by the replicate's first real-only classifier
                        judge = real_judge(plan, where, k, r, job)
                        rule = load_config(FilterConfig, None, {**cand.filter, "set": str(out / made.folder),
                                                                "judge": str(out / judge.folder), "device": study.device})
                        made = _add(plan, "filter", f"{cand.method}-k{k}-r{r}-filtered", rule, job,
                                    {"set": made.key, "judge": judge.key})
                    sets = (made.key,)
                for c in range(study.repeats):
                    config = _train_config(where, cand, k, r, c, [out / plan.units[s].folder for s in sets])
                    prefix = "real" if cand.method is None else cand.method
                    run = _add(plan, "run", f"{prefix}-k{k}-r{r}-c{c}", config, job, {**where.written, "synthetic": list(sets)})
                    plan.trials.append(Trial(arm, cand.label, k, r, c, run.key, sets))
    return plan


def adapters(plan: Plan, where: _Where, cand: Candidate, k: int, r: int, job: int, out: Path) -> Unit:
    """The replicate's per-class LoRA adapters, fitted on its class store (made here: di+lora's store is per image)."""
    config = _invert_config(where, cand, k, r, target="class")
    classes = _add(plan, "store", f"k{k}-r{r}-class", config, job, where.written)
    fit = _build(FinetuneConfig, {**(cand.finetune or {}), "store": str(out / classes.folder), "device": where.study.device}, cand,
                 "finetune")
    return _add(plan, "adapters", f"k{k}-r{r}", fit, job, {"store": classes.key})


def real_judge(plan: Plan, where: _Where, k: int, r: int, job: int) -> Unit:
    """The replicate's first real-only run: the judge of its filters and of retrieval's ``space: judge`` (never val or test)."""
    return _add(plan, "run", f"real-k{k}-r{r}-c0", _train_config(where, plan.candidates[REAL][0], k, r, 0, []), job,
                {**where.written, "synthetic": []})


class _Where:
    """What every unit's config takes from the study: local paths, the default resolution, tokens and image size (of
    the study's model, or of a candidate's own generator: :meth:`of`)."""

    def __init__(self, study: StudyConfig, generative: bool, model: str | None = None, *, backbones: Backbones):
        self.study = study
        self.backbones = backbones
        self.generative = generative
        self.data = local_path(study, study.data)
        written = study.model if model is None else model
        self.model = local_path(study, written) if written else str(embedded_base())
        self.written = {"data": study.data, "model": written}  # what keys see: the study's own words
        self.native = self.resolution = self.tokens = self.tokens_trained = None
        self._others: dict[str, _Where] = {}
        if generative:
            from diffinv.data.real import open_images
            from diffinv.diffusion.encoder import encoder_tokens

            self.native = min(open_images(self.data, study.format, study.split).image(0).size)
            self.tokens_trained = encoder_tokens(self.model)  # pretrain-base models: the K their encoder makes
            self.tokens = self.tokens_trained or InvertConfig.tokens
            if "resolution" not in (study.invert or {}):
                self.resolution = backbones(self.model).choose_resolution(self.native)

    def of(self, cand: Candidate) -> _Where:
        """Where ``cand``'s units take their values from: the study's model's, or its own generator's."""
        if not cand.model or cand.model == self.written["model"]:
            return self
        if cand.model not in self._others:
            self._others[cand.model] = _Where(self.study, self.generative, cand.model, backbones=self.backbones)
        return self._others[cand.model]


def _invert_config(where: _Where, cand: Candidate, k: int, r: int, target: str = "") -> InvertConfig:
    """The store a candidate reads (``target`` "class": its class store, whatever its method's store is)."""
    from diffinv.diffusion.methods import get_method

    s = where.study
    values = {"tokens": where.tokens, "resolution": where.resolution, **cand.invert,
              "model": where.model, "data": where.data, "format": s.format, "split": s.split, "per_class": k,
              "subset_seed": s.subset_seed + r, "val_per_class": 0 if s.val_split else s.val_per_class, "device": s.device}
    if target == "class" or (cand.method is not None and get_method(cand.method).store_target == "class"):
        values["target"] = "class"
        if values.get("init") == "encoder":  # the base's encoder starts an image's tokens; a class starts at random
            values["init"] = "random"
    config = _build(InvertConfig, values, cand, "invert")
    if config.init == "encoder" and where.tokens_trained is None:
        from diffinv.config import ConfigError

        raise ConfigError(f"{where.model} has no base encoder (encoder.safetensors, saved by `diffinv pretrain-base`), which "
                          f"method {cand.arm} starts inversion from (invert init: encoder); pass --invert-init random (and "
                          f"more --invert-steps, e.g. 60) for other models")
    return config


def _generate_config(where: _Where, cand: Candidate, store: Path) -> GenerateConfig:
    values = {"save_size": where.native, **cand.generate, "method": cand.method, "store": str(store),
              "device": where.study.device}
    return _build(GenerateConfig, values, cand, "generate")


def _train_config(where: _Where, cand: Candidate, k: int, r: int, repeat: int, sets: list[Path]) -> TrainConfig:
    s = where.study
    values = dict(cand.train)
    if not sets:  # real only pools its batches: the real / synthetic split is for runs with synthetic images
        values.pop("real_batch", None), values.pop("syn_batch", None)
        values["use"] = "real"
    values.update(data=where.data, format=s.format, split=s.split, eval_split=s.eval_split, per_class=k,
                  subset_seed=s.subset_seed + r, val_per_class=0 if s.val_split else s.val_per_class, val_split=s.val_split,
                  seed=r + 1000 * repeat, synthetic=tuple(str(p) for p in sets), device=s.device)
    return _build(TrainConfig, values, cand, "train")


def _build(cls: type, values: dict[str, Any], cand: Candidate, block: str) -> Any:
    from diffinv.config import ConfigError

    try:
        return load_config(cls, None, {k: v for k, v in values.items() if v is not None})
    except ConfigError as exc:
        raise ConfigError(f"method {cand.arm} ({cand.label}), {block} settings: {exc}") from exc


def _add(plan: Plan, kind: str, name: str, config: Any, job: int, written: dict[str, Any]) -> Unit:
    key = unit_key(kind, config, written)
    if key not in plan.units:
        plan.units[key] = Unit(kind, key, f"{KINDS[kind][1]}/{name}-{key[:10]}", config, job)
    return plan.units[key]


def unit_key(kind: str, config: Any, written: dict[str, Any]) -> str:
    """A digest of the result fields of ``config`` that differ from their defaults, with ``written`` in place of paths.

    A field added to a stage later (with its default) leaves every key as it was.
    """
    defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(config)}
    values = {k: v for k, v in config_to_dict(config).items() if k in result_fields(config) and v != defaults[k]}
    values.update({k: v for k, v in written.items() if k in {f.name for f in fields(config)}})
    text = json.dumps({"kind": kind, **values}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def _name(f: Path, root: Path) -> str:
    return str(f.relative_to(root)) if f != root else f.name


def stat_fingerprint(path: str) -> str:
    """A cheap identity of data or a model folder: every file's name, size and modification time (no byte is read).

    Equal means unchanged; different means only "maybe changed" (a copy, a clone or a remount gives new times).
    """
    root = Path(path)
    if not root.exists():
        return path  # "digits", hf:NAME: the name is the identity
    h = hashlib.sha256()
    for f in _files(root):
        stat = f.stat()
        h.update(f"{_name(f, root)}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def data_fingerprint(path: str) -> str:
    """The identity of data or a model folder by content: every file's name and bytes (times do not count).

    A study folder's units are of the data and model they were made from; this says when either changed under them.
    """
    root = Path(path)
    if not root.exists():
        return path
    h = hashlib.sha256()
    for f in _files(root):
        h.update(f"{_name(f, root)}\x1f{f.stat().st_size}\n".encode())
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def local_path(study: StudyConfig, value: str) -> str:
    """A path the study names, as this process reads it: from ``workdir`` (Ray workers) or the working directory.

    Special sources ("digits", "hf:NAME", hub ids that are not folders) stay as written.
    """
    if not value or value == "digits" or ":" in value or os.path.isabs(value):
        return value
    path = Path(study.workdir or os.getcwd()) / value
    return str(path.resolve()) if path.exists() else value
