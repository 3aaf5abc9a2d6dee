"""Studies: a grid of training runs from one YAML, finished cells skipped, results as mean and std over seeds.

A study YAML (every key but ``datasets`` and ``methods`` is optional)::

    datasets:                       # name: real data (train split is subset, test split evaluates)
      digits: {data: digits}
    per_class: [5, 10, 20]          # real images per class; null = all
    seeds: [0, 1, 2]
    archs: [resnet18]
    augs: [crop-flip]
    methods:                        # name: synthetic folder(s), {dataset} and {per_class} filled in
      real: null                    #   null = real images only (the baseline)
      real-more: {per_class: [40, 80]}  # a method may list its own sizes (here: a longer real-only curve)
      di: runs/{dataset}-di-k{per_class}
      prompt: {synthetic: [runs/{dataset}-prompt-k{per_class}], use: both}
    train: {steps: 300}             # TrainConfig fields shared by every cell
    quality: {inception_weights: null}

Cells live in ``OUT/runs/<dataset>/<method>/k<K>/<arch>/<aug>/s<seed>``; results go to
``results.{csv,json}`` (one row per cell), ``summary.{csv,json}`` (mean and std over seeds)
and ``quality.json`` (synthetic-set metrics, judged by the real-only run with the most images).
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from diffinv.classify.models import check_arch
from diffinv.config import ConfigError, TrainConfig, load_config
from diffinv.runs import RunError, Units, read_json, read_yaml, write_json, write_text, write_yaml
from diffinv.shards import Shard
from diffinv.stages import Stage

GROUP_KEYS = ("dataset", "method", "per_class", "arch", "aug")


@dataclass(frozen=True)
class Study:
    """A parsed, validated study YAML."""

    datasets: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]  # name -> {"synthetic": [templates], **TrainConfig overrides}
    per_class: tuple[int | None, ...] = (10,)
    seeds: tuple[int, ...] = (0,)
    archs: tuple[str, ...] = ("resnet18",)
    augs: tuple[str, ...] = ("crop-flip",)
    train: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: str
    per_class: int | None
    arch: str
    aug: str
    seed: int
    config: TrainConfig

    @property
    def path(self) -> str:
        k = "all" if self.per_class is None else f"k{self.per_class}"
        return f"runs/{self.dataset}/{self.method}/{k}/{self.arch.replace(':', '-')}/{self.aug}/s{self.seed}"


def load_study(path: str | Path, base: str | Path | None = None) -> Study:
    """Parse a study YAML. Relative data and synthetic paths are relative to the working directory
    (as every other path on the command line), or to ``base`` when given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {path} must hold a mapping")
    known = {f.name for f in fields(Study)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown study key(s) {unknown}; known: {sorted(known)}")
    if not raw.get("datasets") or not raw.get("methods"):
        raise ConfigError("a study needs 'datasets' (name: {data: PATH}) and 'methods' (name: synthetic folder or null)")
    def where(p: str) -> str:
        # Special sources ("digits", "hf:...") and absolute paths stay as written.
        special = base is None or p == "digits" or ":" in p or Path(p).is_absolute()
        return p if special else str(Path(base) / p)

    datasets = {}
    for name, spec in raw["datasets"].items():
        spec = {"data": spec} if isinstance(spec, str) else dict(spec or {})
        if "data" not in spec:
            raise ConfigError(f"dataset {name!r} needs data: PATH")
        datasets[str(name)] = {**spec, "data": where(str(spec["data"]))}
    methods = {}
    for name, spec in raw["methods"].items():
        if spec is None:
            spec = {"synthetic": []}
        elif isinstance(spec, (str, list)):
            spec = {"synthetic": spec}
        spec = dict(spec)
        folders = spec.get("synthetic") or []
        spec["synthetic"] = [where(str(f)) for f in ([folders] if isinstance(folders, str) else folders)]
        if "per_class" in spec:
            sizes = spec["per_class"]
            spec["per_class"] = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        methods[str(name)] = spec

    def listed(key: str, default: tuple) -> tuple:
        value = raw.get(key, list(default))
        return tuple(value if isinstance(value, list) else [value])

    study = Study(datasets=datasets, methods=methods, per_class=listed("per_class", (10,)), seeds=listed("seeds", (0,)),
                  archs=listed("archs", ("resnet18",)), augs=listed("augs", ("crop-flip",)),
                  train=dict(raw.get("train") or {}), quality=dict(raw.get("quality") or {}))
    cells(study)  # every cell's config is validated before anything runs
    return study


def cells(study: Study) -> list[Cell]:
    """Every (dataset, method, K, arch, aug, seed) of the grid with its resolved TrainConfig."""
    out = []
    for dname, dspec in study.datasets.items():
        for mname, mspec in study.methods.items():
            for k in mspec.get("per_class", study.per_class):
                for arch in study.archs:
                    for aug in study.augs:
                        for seed in study.seeds:
                            synthetic = tuple(s.format(dataset=dname, per_class="all" if k is None else k)
                                              for s in mspec["synthetic"])
                            overrides = {**study.train, **{a: b for a, b in dspec.items()},
                                         **{a: b for a, b in mspec.items() if a not in ("synthetic", "per_class")},
                                         "per_class": k, "arch": arch, "aug": aug, "seed": seed, "synthetic": synthetic,
                                         "use": mspec.get("use", "both" if synthetic else "real")}
                            try:
                                check_arch(arch)
                                config = load_config(TrainConfig, None, overrides)
                            except ConfigError as exc:
                                raise ConfigError(f"study cell {dname}/{mname}/k{k}/{arch}/{aug}/s{seed}: {exc}") from exc
                            out.append(Cell(dname, mname, k, arch, aug, seed, config))
    return out


def run_study(study: Study, out: str | Path, progress: bool = True, log: Callable[[str], None] = print,
              on_cell: Callable[[Cell], None] | None = None, shard: Shard | None = None) -> Path | None:
    """Run every unfinished cell, then write the results, the summary and the quality metrics.

    With ``shard`` (I of N) only cells c with c % N == I are trained; the shard that finds
    every cell finished writes the tables. Returns ``out``, or None while other shards' cells
    are still missing.
    """
    from diffinv.stages.train import train_classifier

    out = Path(out)
    shard = shard or Shard()
    out.mkdir(parents=True, exist_ok=True)
    # One process may change a study (add seeds ...) and continue it; shards must all run the same one.
    if not shard.whole and (out / "study.yaml").is_file() and read_yaml(out / "study.yaml") != _study_dict(study):
        raise RunError(f"{out} holds a study with other settings; every shard must run the same study YAML and overrides")
    write_yaml(out / "study.yaml", _study_dict(study))
    grid = cells(study)
    units = _units(out, grid, shard.count)
    for i in (i for i in range(len(grid)) if shard.owns(i)):  # finished cells too: each says it is skipped
        cell = grid[i]
        run = out / cell.path
        finished = (run / "final.json").is_file()
        log(f"[{i + 1}/{len(grid)}] {cell.path}{' (done, skipped)' if finished else ''}")
        train_classifier(cell.config, run, resume=True, progress=progress, log=log)
        if on_cell is not None:
            on_cell(cell)
    if not units.complete(strict=shard.whole, log=log):
        return None
    return _write_results(study, grid, out, log)


def _units(out: Path, grid: list[Cell], shards: int) -> Units:
    return Units(out, "cell", len(grid), lambda i: (out / grid[i].path / "final.json").is_file(), shards)


def _write_results(study: Study, grid: list[Cell], out: Path, log: Callable[[str], None]) -> Path:
    rows = [result_row(cell, out / cell.path) for cell in grid]
    write_table(out / "results", rows)
    write_table(out / "summary", summarise(rows))
    write_json(out / "quality.json", study_quality(study, grid, out, log))
    return out


def finish_study(out: str | Path, log: Callable[[str], None] = print) -> Path:
    """``diffinv merge`` for a study: the tables, once every cell of every shard has finished."""
    out = Path(out)
    study = study_from_dict(read_yaml(out / "study.yaml"))
    grid = cells(study)
    _units(out, grid, 0).complete(strict=True, log=log)  # 0: the study does not record how many shards ran it
    return _write_results(study, grid, out, log)


def study_from_dict(d: dict[str, Any]) -> Study:
    """The Study a ``study.yaml`` written by :func:`run_study` describes (paths already resolved)."""
    listed = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
    return Study(**{**d, **listed})


def _study_dict(study: Study) -> dict[str, Any]:
    d = {f.name: getattr(study, f.name) for f in fields(Study)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def result_row(cell: Cell, run: Path) -> dict[str, Any]:
    final = read_json(run / "final.json")
    return {"dataset": cell.dataset, "method": cell.method, "per_class": cell.per_class, "arch": cell.arch, "aug": cell.aug,
            "seed": cell.seed, "top1": final["top1"], "n_real": final["n_real"], "n_synthetic": final["n_synthetic"],
            "steps": final["steps"], "classes": final["classes"], "per_class_acc": final["per_class"], "run": cell.path}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (0 for one seed) of top-1 and per-class accuracy over seeds, per group."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    summary = []
    for key, members in groups.items():
        accs = [m["top1"] for m in members]
        per_class = [statistics.fmean(v for v in col if v is not None) if any(v is not None for v in col) else None
                     for col in zip(*(m["per_class_acc"] for m in members))]
        summary.append({**dict(zip(GROUP_KEYS, key)), "top1_mean": statistics.fmean(accs),
                        "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n_seeds": len(accs),
                        "n_real": members[0]["n_real"], "n_synthetic": members[0]["n_synthetic"],
                        "classes": members[0]["classes"], "per_class_acc_mean": per_class})
    return summary


def write_table(stem: Path, rows: list[dict[str, Any]]) -> None:
    """``stem.json`` with every field, ``stem.csv`` with the scalar ones."""
    write_json(stem.with_suffix(".json"), rows)
    if not rows:
        return
    scalar = [k for k, v in rows[0].items() if not isinstance(v, (list, dict))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=scalar, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(stem.with_suffix(".csv"), buffer.getvalue())


def study_quality(study: Study, grid: list[Cell], out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Quality of every distinct synthetic source, judged by the dataset's real-only run with the most images."""
    import torch

    from diffinv.data.real import load_uint8, open_images, select
    from diffinv.data.synthetic import open_synthetic
    from diffinv.quality.measures import synthetic_quality
    from diffinv.stages.train import load_classifier

    report: dict[str, Any] = {}
    for dname in study.datasets:
        judges = [c for c in grid if c.dataset == dname and not c.config.synthetic]
        if not judges:
            log(f"quality of {dname}: left out, the study has no real-only method to judge with")
            continue
        judge_cell = max(judges, key=lambda c: (float("inf") if c.per_class is None else c.per_class, -c.seed))
        judge, meta = load_classifier(out / judge_cell.path)
        res = meta["resolution"]
        done: set[tuple] = set()
        for cell in grid:
            key = (cell.method, cell.per_class, cell.config.synthetic)
            if cell.dataset != dname or not cell.config.synthetic or key in done:
                continue
            done.add(key)
            cfg = cell.config
            real_set = select(open_images(cfg.data, cfg.format, cfg.split), cfg.per_class, cfg.subset_seed, cfg.bad_images, warn=log)
            test_set = open_images(cfg.data, cfg.format, cfg.eval_split)
            syn_sets = [open_synthetic(root, meta["classes"]) for root in cfg.synthetic]
            syn = torch.cat([load_uint8(s, res) for s in syn_sets])
            syn_labels = torch.cat([torch.from_numpy(s.labels) for s in syn_sets])
            q = synthetic_quality(judge, meta, syn, syn_labels, load_uint8(real_set, res), torch.from_numpy(real_set.labels),
                                  load_uint8(test_set, res), study.quality.get("inception_weights"))
            k = "all" if cell.per_class is None else f"k{cell.per_class}"
            report[f"{dname}/{cell.method}/{k}"] = {"dataset": dname, "method": cell.method, "per_class": cell.per_class,
                                                   "judge": judge_cell.path, "synthetic": list(cfg.synthetic), **q}
            log(f"quality {dname}/{cell.method}/{k}: label fidelity {q['label_fidelity']:.3f}, diversity "
                f"{q['diversity_ratio'] if q['diversity_ratio'] is None else round(q['diversity_ratio'], 3)}, "
                f"{q['near_copies']} near copies; {q['fid_note']}")
    return report


def with_overrides(study: Study, **train: Any) -> Study:
    """The same study with extra shared TrainConfig fields (the CLI's --steps etc.)."""
    return replace(study, train={**study.train, **{k: v for k, v in train.items() if v is not None}})


def absolute_paths(study: Study) -> Study:
    """The study with its data and synthetic paths absolute (Ray workers do not share the driver's working directory).

    Paths may be templates ("runs/{dataset}-di") that exist only once filled in, so they are joined, not resolved.
    """
    import os

    def path(value: str) -> str:
        special = value == "digits" or ":" in value or os.path.isabs(value)
        return value if special else os.path.abspath(value)

    datasets = {name: {**spec, "data": path(spec["data"])} for name, spec in study.datasets.items()}
    methods = {name: {**spec, "synthetic": [path(f) for f in spec["synthetic"]]} for name, spec in study.methods.items()}
    return replace(study, datasets=datasets, methods=methods)


def _count_done(out: Path, seen: dict[str, int]) -> tuple[int, int | None]:
    total = len(cells(study_from_dict(read_yaml(out / "study.yaml")))) if (out / "study.yaml").is_file() else None
    return len(list((out / "runs").rglob("final.json"))), total


def _summary(study: Study, out: Path) -> str:
    lines = [f"{r['dataset']:>10} {r['method']:>16} k={'all' if r['per_class'] is None else r['per_class']:<5} {r['arch']} "
             f"{r['aug']}: top-1 {100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f} % over {r['n_seeds']} seed(s)"
             for r in read_json(out / "summary.json")]
    return "\n".join(lines + [f"study {out}: results.csv, summary.csv, quality.json"])


def _run(study: Study, out: Path, *, shard: Shard, progress: bool, log: Callable[[str], None], hook: Any = None,
         **_: Any) -> Path | None:
    return run_study(study, out, progress=progress, log=log, on_cell=hook, shard=shard)


STAGE = Stage(name="experiment", config=Study, marker="study.yaml", run=_run, finish=finish_study, count_done=_count_done,
              summary=_summary, unit="cell", shardable=True, absolute=absolute_paths,
              help="run a study grid (datasets x real sizes x methods x archs x augs x seeds): mean and std")
