"""The study file: what to compare, not where files are.

    name: pneumoniamnist-k5
    data: ../shared/data/pneumoniamnist.npz
    model: bases/pneumoniamnist-16-inv
    per_class: [5]
    seeds: [0, 1, 2, 3, 4]
    repeats: 3
    invert: {steps: 300, init: encoder}
    generate: {per_image: 5, steps: 4}
    train: {arch: shufflenetv2, steps: 100, lr: 0.05, real_batch: 16, syn_batch: 16}
    methods:
      di: {guidance: [1, 2], noise: [0.1, 0.5]}      # a grid: four candidates
      img2img: [{}, {strength: [0.25, 0.75]}]         # a union: the blocks as given, then two strengths
      di-enc: {method: di, invert: {steps: 0}}        # a name that is not a method says which it is
      real-ft: {method: real, train: {pretrained: backbones/x/model.safetensors}}  # real only, other classifier
      di-sd3: {method: di, model: runs/sd3-tiny}      # this method with another generator
    compare: {di: img2img}

``model: [A, B]`` (or ``--models A B``) makes the generator a study axis: every generating method runs
with each model as its own arm, ``di@A`` and ``di@B`` (named by the models' folder names), its
setting chosen on validation with that generator; the head-to-head rows then hold each method
against its rivals with the same generator and, for every method, "with A minus with B".

Every key but ``methods`` is a :class:`~diffinv.config.StudyConfig` field (``diffinv experiment --help``).
``invert``, ``generate`` and ``train`` hold those stages' own fields, for every method; a method's
mapping holds ``generate`` fields and may hold its own ``invert:``, ``train:`` and (lora, di+lora)
``finetune:`` blocks, which win over the study's. Real only is always there (the baseline); ``method: real`` adds another real-only
arm with its own ``train:`` block (e.g. a pretrained backbone), to compare against its like. What the study sets itself (data,
subset, sizes, seeds, store and set paths) is refused in the blocks. ``real_batch`` / ``syn_batch``
split the batches of runs with synthetic images; real-only runs pool (``batch_size``).

Candidates: in any block a list value is a list of candidates, several lists are crossed (a grid),
and a method given as a list of mappings is the union of their grids. A field whose value is itself a
list (e.g. ``templates``) takes a list of lists. Each method keeps its candidate with the best mean
validation score over the replicates.
"""

from __future__ import annotations

import itertools
import os
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from diffinv.config import (
    STUDY_OWNED,
    ConfigError,
    FilterConfig,
    FinetuneConfig,
    GenerateConfig,
    InvertConfig,
    StudyConfig,
    TrainConfig,
    load_config,
)
from diffinv.errors import brief
from diffinv.runs import read_yaml

REAL = "real"  # the baseline's name: real images only
DEFAULT_METHODS: dict[str, dict[str, Any]] = {"di": {}, "img2img": {}}
BLOCKS = {"invert": InvertConfig, "generate": GenerateConfig, "train": TrainConfig, "finetune": FinetuneConfig}
OWN_BLOCKS = ("invert", "train", "finetune")  # the blocks a method's mapping may hold besides its generate fields


@dataclass(frozen=True)
class Candidate:
    """One setting of one method: the values it gives each stage over the study's, and its name in the tables."""

    arm: str  # the method's name in the study (``real`` for real only; ``di@A`` for di with generator A)
    method: str | None  # the generation method (None: real only)
    label: str  # what sets it apart, e.g. "guidance=1, noise=0.5"; "as given" when nothing does
    invert: dict[str, Any]
    generate: dict[str, Any]
    train: dict[str, Any]
    filter: dict[str, Any] | None = None  # FilterConfig rule of the set (judged by the replicate's real-only run); None: unfiltered
    finetune: dict[str, Any] | None = None  # FinetuneConfig of the adapters lora / di+lora sample through; None: no adapters
    model: str = ""  # the generator, as the study names it ("": the study's model)


def load_study(path: str | Path | None, flags: dict[str, Any] | None = None) -> StudyConfig:
    """The study of a YAML file (optional) with command-line ``flags`` over it; nested flags as ``{"invert": {...}}``."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"study file {path} is a folder; give a study YAML (e.g. configs/studies/*.yaml) or use "
                              f"--data {path} for a study of flags alone")
        if not path.is_file():
            raise ConfigError(f"study file {path} does not exist")
        try:
            raw = read_yaml(path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"study file {path} is not valid YAML ({' '.join(str(exc).split())})") from exc
        if raw is None:
            raise ConfigError(f"study file {path} is empty; give at least data: and methods: (or no file, and flags)")
        if not isinstance(raw, dict):
            raise ConfigError(f"study file {path} must hold a mapping of study settings")
        raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
        raw.setdefault("name", path.stem)
    for key, value in (flags or {}).items():
        if key in BLOCKS and value:
            raw[key] = {**(raw.get(key) or {}), **value}
        elif value is not None and key not in BLOCKS:
            raw[key] = value
    if isinstance(raw.get("model"), list):  # model: [A, B]: the generator as a study axis
        listed = [str(m) for m in raw.pop("model")]
        raw["model"] = listed[0] if listed else ""
        if len(listed) > 1:
            raw["models"] = listed
    study = load_config(StudyConfig, None, raw)
    if study.models and not study.model:
        study = replace(study, model=study.models[0])
    check_study(study)
    return study


def generators(study: StudyConfig) -> dict[str, str]:
    """Short name -> model as the study names it, for a study comparing generators (empty for one model): each
    model's folder or file name (a hub id's last part), numbered where two would read the same."""
    names: dict[str, str] = {}
    for model in study.models:
        short = Path(model.rstrip("/")).name.removesuffix(".safetensors") or model
        names[short if short not in names else f"{short}-{len(names) + 1}"] = model
    return names


def arms(study: StudyConfig) -> dict[str, list[dict[str, Any]]]:
    """Every method of the study as a list of mappings (a union of grids), real only first."""
    out: dict[str, list[dict[str, Any]]] = {REAL: [{}]}
    for name, spec in (DEFAULT_METHODS if study.methods is None else study.methods).items():
        name = str(name)
        if name == REAL:
            if spec:
                raise ConfigError("methods: real is the real-only baseline and takes no settings (its classifier's are "
                                  "the study's train: block)")
            continue
        mappings = spec if isinstance(spec, list) else [spec or {}]
        if not all(isinstance(m, dict) for m in mappings):
            raise ConfigError(f"method {name}: give a mapping of generate settings, or a list of them; got {brief(spec)}")
        if len(study.models) > 1 and not any("model" in m or m.get("method") == REAL for m in mappings):
            for short, model in generators(study).items():  # one arm per generator, each chosen on its own
                out[f"{name}@{short}"] = [{**m, "method": m.get("method", name), "model": model} for m in mappings]
        else:
            out[name] = [dict(m) for m in mappings]
    return out


def compare_pairs(study: StudyConfig) -> dict[str, list[str]]:
    """Head-to-head pairs, method -> rivals: as given, else di against every other method; with generators compared
    (``model: [A, B]``), each pair within each generator, and every method with A against itself with B."""
    if len(study.models) > 1:
        return _generator_pairs(study)
    names = [a for a in arms(study) if a != REAL]
    if study.compare is None:
        return {"di": [a for a in names if a != "di"]} if "di" in names and len(names) > 1 else {}
    pairs = {str(k): [str(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in study.compare.items()}
    for method, rivals in pairs.items():
        if method in rivals:
            raise ConfigError(f"compare: {method}: {rivals} compares {method} with itself (always 0); name other methods")
        for name in [method, *rivals]:
            if name not in names and name != REAL:
                raise ConfigError(f"compare: {method}: {rivals} names {name!r}, which is not a method of the study; "
                                  f"methods: {names}")
    return pairs


def _generator_pairs(study: StudyConfig) -> dict[str, list[str]]:
    names = [a for a in arms(study) if a != REAL]
    shorts = list(generators(study))
    base = compare_pairs(replace(study, models=()))  # the pairs of the study's methods, as if with one generator
    pairs: dict[str, list[str]] = {}
    for short in shorts:
        for method, rivals in base.items():
            mine = f"{method}@{short}" if f"{method}@{short}" in names else method
            theirs = [f"{r}@{short}" if f"{r}@{short}" in names else r for r in rivals]
            pairs.setdefault(mine, []).extend(r for r in theirs if r != mine and r not in pairs.get(mine, []))
    for name in names:  # the generators head to head: each method with the first against it with every other
        method, _, short = name.partition("@")
        if short == shorts[0]:
            pairs.setdefault(name, []).extend(f"{method}@{other}" for other in shorts[1:])
    return {k: v for k, v in pairs.items() if v}


def candidates(study: StudyConfig) -> dict[str, list[Candidate]]:
    """Every method's candidates, in the order listed (ties in validation go to the first)."""
    from diffinv.diffusion.methods import get_method

    out: dict[str, list[Candidate]] = {}
    for arm, mappings in arms(study).items():
        found: list[Candidate] = []
        for mapping in mappings:
            mapping = dict(mapping)
            method = None if arm == REAL else str(mapping.pop("method", arm))
            if method == REAL:  # real only under its own classifier settings, e.g. a pretrained backbone
                method = None
            if method is not None:
                get_method(method)  # a clear error naming the registered methods
            rule = mapping.pop("filter", None)
            model = str(mapping.pop("model", "") or "")
            blocks = {**{b: mapping.pop(b, None) or {} for b in OWN_BLOCKS}, "generate": mapping}
            if method is None:
                blocks = {"invert": {}, "generate": {}, "train": blocks["train"], "finetune": {}}
            adapted = method is not None and get_method(method).uses_adapters
            label_of = {b: list(v) for b, v in blocks.items()}  # fields the method's mapping sets: always in its label
            merged = {b: {**((getattr(study, b) or {}) if _reads(b, method, adapted) else {}), **blocks[b]} for b in BLOCKS}
            grids = {b: _grid(merged[b], BLOCKS[b], f"{arm}: {b}") for b in BLOCKS}
            rules: list[tuple[dict[str, Any] | None, list[str]]] = [*_grid(rule, FilterConfig, f"{arm}: filter")] if rule else [(None, [])]
            for (inv, inv_var), (gen, gen_var), (trn, trn_var), (fit, fit_var), (flt, _) in itertools.product(
                    grids["invert"], grids["generate"], grids["train"], grids["finetune"], rules):
                shown = {**{f"invert.{k}": inv[k] for k in dict.fromkeys(label_of["invert"] + inv_var)},
                         **{k: gen[k] for k in dict.fromkeys(label_of["generate"] + gen_var)},
                         **{f"train.{k}": trn[k] for k in dict.fromkeys(label_of["train"] + trn_var)},
                         **{f"finetune.{k}": fit[k] for k in dict.fromkeys(label_of["finetune"] + fit_var)},
                         **{f"filter.{k}": v for k, v in (flt or {}).items()}}
                label = ", ".join(f"{k}={_text(v)}" for k, v in shown.items()) or "as given"
                if any(c.label == label for c in found):
                    continue
                found.append(Candidate(arm, method, label, inv, gen, trn, flt, fit if adapted else None, model))
        out[arm] = found
    return out


def _reads(block: str, method: str | None, adapted: bool) -> bool:
    """Whether a candidate takes the study's own ``block``: real only its train block, finetune only LoRA methods."""
    if method is None:
        return block == "train"
    return block != "finetune" or adapted


def check_study(study: StudyConfig) -> None:
    """Refuse, before anything runs, blocks with unknown or study-owned fields and methods that do not exist."""
    for block, cls in BLOCKS.items():
        _check_block(getattr(study, block) or {}, cls, block)
    for arm, mappings in arms(study).items():
        for mapping in mappings:
            if mapping.get("method") == REAL and set(mapping) - {"method", "train"}:
                raise ConfigError(f"method {arm}: a real-only arm (method: real) takes a train: block only; got "
                                  f"{sorted(set(mapping) - {'method', 'train'})}")
            for block, cls in BLOCKS.items():
                if block == "generate":
                    values = {k: v for k, v in mapping.items() if k not in (*OWN_BLOCKS, "method", "filter", "model")}
                else:
                    values = mapping.get(block) or {}
                    if not isinstance(values, dict):
                        raise ConfigError(f"method {arm}: {block}: must be a mapping of {cls.__name__} fields")
                _check_block(values, cls, f"method {arm}" + ("" if block == "generate" else f" {block}:"))
            rule = mapping.get("filter")
            if rule is not None:
                if arm == REAL or not isinstance(rule, dict):
                    raise ConfigError(f"method {arm}: filter: must be a mapping of FilterConfig fields (min_confidence or "
                                      f"keep_top) of a generating method")
                _check_block(rule, FilterConfig, f"method {arm} filter:")
    for cands in candidates(study).values():
        for cand in cands:
            _check_candidate(cand)
    compare_pairs(study)


def check_files(study: StudyConfig) -> None:
    """Every weights file the study names is read now (tensors only), not after its units have run for hours."""
    from diffinv.classify.pretrained import read_state_dict

    named = {(str((study.quality or {}).get("inception_weights")), "quality.inception_weights")}
    named.discard(("None", "quality.inception_weights"))
    for cands in candidates(study).values():
        for cand in cands:
            named |= {(str(cand.train["pretrained"]), "train: pretrained")} if cand.train.get("pretrained") else set()
            named |= {(str(cand.generate["image_model"]), "image_model")} if cand.generate.get("image_model") else set()
    for path, flag in sorted(named):
        if path == "hub" or path.startswith("hub:"):
            continue  # read (or fetched) by the run itself
        if not os.path.isabs(path) and study.workdir:
            path = os.path.join(study.workdir, path)
        read_state_dict(path, flag)


def _check_candidate(cand: Candidate) -> None:
    """Each candidate's stage settings as its stages will read them (types, ranges, the method's own rules)."""
    from diffinv.diffusion.methods import get_method
    from diffinv.diffusion.methods.base import GenerationSettings
    from diffinv.errors import UserError

    try:
        load_config(InvertConfig, None, cand.invert)
        load_config(TrainConfig, None, {**cand.train, "synthetic": ("set",) if cand.method else ()})
        if cand.method is not None:
            given = {}  # what the study makes itself: the real-only judge of space judge, the adapters of lora methods
            if cand.generate.get("space") == "judge" and not cand.generate.get("judge"):
                given["judge"] = "judge"
            if cand.finetune is not None:
                given["adapters"] = "adapters"
            config = load_config(GenerateConfig, None, {**cand.generate, "method": cand.method, **given})
            get_method(cand.method).check_settings(GenerationSettings.of(config))
        if cand.filter is not None:
            load_config(FilterConfig, None, {**cand.filter, "set": "set", "judge": "judge"})
        if cand.finetune is not None:
            load_config(FinetuneConfig, None, {**cand.finetune, "store": "store"})
    except UserError as exc:
        raise ConfigError(f"method {cand.arm} ({cand.label}): {exc}") from exc


def _check_block(values: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known - set(STUDY_OWNED[cls.__name__]))}")
    owned = sorted(set(values) & set(STUDY_OWNED[cls.__name__]))
    if owned:
        raise ConfigError(f"{where}: {owned} are set by the study itself (per_class, seeds, data ... at the study's top "
                          f"level; stores and sets are made by the study); remove them from the block")


def _grid(block: dict[str, Any], cls: type, where: str) -> list[tuple[dict[str, Any], list[str]]]:
    """(values, the fields that came from lists) for every point of the grid a block's lists make."""
    hints = typing.get_type_hints(cls)
    varied = {}
    for name, value in block.items():
        listed = typing.get_origin(hints.get(name)) is tuple
        if isinstance(value, list) and (not listed or (value and all(isinstance(v, list) for v in value))):
            if not value:
                raise ConfigError(f"{where}: {name} is an empty list of candidates; give at least one value")
            # One candidate per distinct value as the stage reads it (1 and 1.0 are one guidance), written as first given.
            seen: dict[str, Any] = {}
            for v in value:
                seen.setdefault(repr(_as_read(hints.get(name), v)), v)
            varied[name] = list(seen.values())
    fixed = {k: v for k, v in block.items() if k not in varied}
    names = list(varied)
    return [({**fixed, **dict(zip(names, values))}, names) for values in itertools.product(*(varied[n] for n in names))]


def _as_read(hint: Any, value: Any) -> Any:
    """``value`` as a config field of type ``hint`` reads it (ints widened to floats); as given where it does not fit."""
    from diffinv.config import _coerce

    try:
        return _coerce(hint, value, "") if hint is not None else value
    except ConfigError:
        return value


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def fast(study: StudyConfig) -> StudyConfig:
    """The same study with every count cut to the bone: checks the flow, not the method."""
    train = dict(study.train or {})
    train.update(steps=4, batch_size=16, **{k: min(int(train[k]), 8) for k in ("real_batch", "syn_batch") if train.get(k)})
    return replace(study, seeds=study.seeds[:2], repeats=1, invert={**(study.invert or {}), "steps": 20},
                   generate={**(study.generate or {}), "per_image": 2, "steps": 4}, train=train,
                   finetune={**(study.finetune or {}), "steps": 4})


def parse_candidates(text: str) -> Any:
    """A nested flag's value: "1,2" is two candidates, "0.5" one value (each read as YAML reads it)."""
    from diffinv import safe_yaml

    parts = [safe_yaml.load(p, "a flag's value") for p in text.split(",")]
    return parts if len(parts) > 1 else parts[0]
