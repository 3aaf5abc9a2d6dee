"""Studies: a grid of training runs from one YAML, finished cells skipped, results as mean and std over seeds.

A study YAML (every key but ``datasets`` and ``methods`` is optional)::

    datasets:                       # name: real data (train split is subset, test split evaluates)
      digits: {data: digits}
    per_class: [5, 10, 20]          # real images per class; null = all
    seeds: [0, 1, 2, 3, 4]          # replicates (the default: five)
    replicates: auto                # data | classifier | auto (see below)
    archs: [resnet18]
    augs: [crop-flip]
    methods:                        # name: synthetic folder(s), {dataset}, {per_class}, {seed} filled in
      real: null                    #   null = real images only (the baseline)
      real-more: {per_class: [40, 80]}  # a method may list its own sizes (here: a longer real-only curve)
      di: runs/{dataset}-di-k{per_class}-r{seed}
      prompt: {synthetic: [runs/{dataset}-prompt-k{per_class}-r{seed}], use: both}
    train: {steps: 300, val_per_class: 20}   # TrainConfig fields shared by every cell
    select: {lr: [0.02, 0.05], real_batch: [8, 16]}   # candidates, chosen per group on validation only
    repeats: 1                      # classifiers per replicate (own seeds), averaged before the statistics
    compare: {di: prompt}           # head to head: di minus prompt, paired by replicate, in summary.json
    quality: {inception_weights: null}

Replicates: with ``replicates: data`` seed r is a replicate that draws its own real subset
(``subset_seed + r``, the same for every method of that replicate) and its own classifier seed,
so the spread over seeds includes the choice of images, which at a few images per class is the
largest source of variance; synthetic sets are then made per replicate (``{seed}`` in their
paths). ``classifier`` varies only the classifier on one subset (it understates the noise);
``auto`` is ``data`` when every synthetic path has ``{seed}``, else ``classifier``.

Repeats: with ``repeats: N`` every replicate trains N classifiers (classifier seeds ``seed + 1000 j``,
the same N for every method, so the pairing holds) and its metrics are their mean; the intervals stay
over replicates (the independent units), but each replicate's gain carries less classifier noise.

Selection: every combination of the ``select`` candidates (TrainConfig fields) is trained, and
for each (dataset, method, K, arch, aug) the one with the best mean validation metric over the
replicates is kept (``selection.json`` says which, with every candidate's validation score). It
reads only the runs' ``validation.json``; the test metrics of the kept runs are read after that,
once, for the tables. It needs validation data: ``train: {val_per_class: K}`` or ``val_split``.

Cells live in ``OUT/runs/<dataset>/<method>/k<K>/<arch>/<aug>/s<seed>`` (``.../<variant>/s<seed>``
with ``select``); results go to
``results.{csv,json}`` (one row per cell), ``summary.{csv,json}`` (mean and std over seeds, and
each method's gain over real only paired by replicate with its 95% t-interval) and
``quality.json`` (synthetic-set metrics, judged by the real-only run with the most images).
"""

from __future__ import annotations

import csv
import io
import itertools
import statistics
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from diffinv.classify.models import check_arch
from diffinv.config import ConfigError, TrainConfig, load_config
from diffinv.report.stats import headline_metric, paired_gain
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
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # five replicates: enough for a t-interval that can exclude 0
    archs: tuple[str, ...] = ("resnet18",)
    augs: tuple[str, ...] = ("crop-flip",)
    train: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    replicates: str = "auto"  # data | classifier | auto: see the module docstring
    select: dict[str, list[Any]] = field(default_factory=dict)  # TrainConfig field -> candidates, chosen on validation
    repeats: int = 1  # classifiers per replicate, averaged: less classifier noise in each replicate's gain
    compare: dict[str, str] = field(default_factory=dict)  # method -> rival: their paired difference ("versus")

    def vary_data(self) -> bool:
        """Whether each seed draws its own real subset (``replicates`` resolved)."""
        per_replicate = all("{seed}" in f for m in self.methods.values() for f in m["synthetic"])
        if self.replicates == "data" and not per_replicate:
            raise ConfigError("replicates: data gives every seed its own real subset, so every synthetic set must be made "
                              "per replicate: put {seed} in its path (e.g. runs/di-k{per_class}-r{seed}), or use "
                              "replicates: classifier")
        return self.replicates == "data" or (self.replicates == "auto" and per_replicate)


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: str
    per_class: int | None
    arch: str
    aug: str
    seed: int
    config: TrainConfig
    variant: str = ""  # the ``select`` candidate, e.g. "lr=0.05,real_batch=16"
    repeat: int = 0  # which of the replicate's ``repeats`` classifiers

    @property
    def path(self) -> str:
        k = "all" if self.per_class is None else f"k{self.per_class}"
        variant = f"/{self.variant}" if self.variant else ""
        repeat = f"-c{self.repeat}" if self.repeat else ""  # repeat 0 keeps the path studies without repeats use
        return f"runs/{self.dataset}/{self.method}/{k}/{self.arch.replace(':', '-')}/{self.aug}{variant}/s{self.seed}{repeat}"

    @property
    def group(self) -> tuple:
        return (self.dataset, self.method, self.per_class, self.arch, self.aug)


def load_study(path: str | Path, base: str | Path | None = None) -> Study:
    """Parse a study YAML. Relative data and synthetic paths are relative to the working directory
    (as every other path on the command line), or to ``base`` when given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    try:
        raw = read_yaml(path) or {}
    except yaml.YAMLError as exc:
        # The usual cause: a path with {seed} inside [...] or {...}, where YAML reads the braces as a mapping.
        raise ConfigError(f"study file {path} is not valid YAML ({' '.join(str(exc).split())}); quote paths that contain "
                          f"{{per_class}} or {{seed}}, e.g. synthetic: [\"runs/di-k{{per_class}}-r{{seed}}\"]") from exc
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

    if raw.get("replicates", "auto") not in ("auto", "data", "classifier"):
        raise ConfigError(f"replicates must be data, classifier or auto; got {raw['replicates']!r}")
    compare = {str(k): str(v) for k, v in (raw.get("compare") or {}).items()}
    for method, rival in compare.items():
        if method not in methods or rival not in methods:
            raise ConfigError(f"compare: {method}: {rival} names a method the study does not have; methods: {sorted(methods)}")
    repeats = raw.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ConfigError(f"repeats (classifiers per replicate) must be a whole number >= 1; got {repeats!r}")
    select = {str(k).replace("-", "_"): (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in (raw.get("select") or {}).items()}
    train_fields = {f.name for f in fields(TrainConfig)}
    if set(select) - train_fields:
        raise ConfigError(f"select: {sorted(set(select) - train_fields)} are not training settings; known: {sorted(train_fields)}")
    study = Study(datasets=datasets, methods=methods, per_class=listed("per_class", (10,)), seeds=listed("seeds", (0, 1, 2, 3, 4)),
                  archs=listed("archs", ("resnet18",)), augs=listed("augs", ("crop-flip",)),
                  train=dict(raw.get("train") or {}), quality=dict(raw.get("quality") or {}),
                  replicates=str(raw.get("replicates", "auto")), select=select, repeats=repeats, compare=compare)
    cells(study)  # every cell's config is validated before anything runs
    return study


def cells(study: Study) -> list[Cell]:
    """Every (dataset, method, K, arch, aug, seed) of the grid with its resolved TrainConfig."""
    out = []
    vary_data = study.vary_data()
    names = sorted(study.select)
    variants = [dict(zip(names, values)) for values in itertools.product(*(study.select[n] for n in names))]
    for dname, dspec in study.datasets.items():
        for mname, mspec in study.methods.items():
            for k in mspec.get("per_class", study.per_class):
                for arch in study.archs:
                    for aug, variant, seed, repeat in itertools.product(study.augs, variants, study.seeds,
                                                                         range(study.repeats)):
                        synthetic = tuple(s.format(dataset=dname, per_class="all" if k is None else k, seed=seed)
                                          for s in mspec["synthetic"])
                        overrides = {**study.train, **{a: b for a, b in dspec.items()},
                                     **{a: b for a, b in mspec.items() if a not in ("synthetic", "per_class")},
                                     "per_class": k, "arch": arch, "aug": aug, "seed": seed + 1000 * repeat,
                                     "synthetic": synthetic,
                                     "use": mspec.get("use", "both" if synthetic else "real")}
                        if vary_data:  # replicate `seed` draws its own subset, the same for every method
                            overrides["subset_seed"] = int(overrides.get("subset_seed", 0)) + seed
                        overrides.update(variant)
                        name = ",".join(f"{a}={b}" for a, b in variant.items())
                        try:
                            check_arch(arch)
                            config = load_config(TrainConfig, None, overrides)
                        except ConfigError as exc:
                            raise ConfigError(f"study cell {dname}/{mname}/k{k}/{arch}/{aug}/{name}/s{seed}: {exc}") from exc
                        if variants != [{}] and not (config.val_per_class or config.val_split):
                            raise ConfigError("select: chooses on validation data; give train: {val_per_class: K} (a hold-out "
                                              "of the training split) or val_split")
                        out.append(Cell(dname, mname, k, arch, aug, seed, config, name, repeat))
    return out


def run_study(study: Study, out: str | Path, progress: bool = True, log: Callable[[str], None] = print,
              on_cell: Callable[[Cell], None] | None = None, shard: Shard | None = None, tables: bool = True) -> Path | None:
    """Run every unfinished cell, then write the results, the summary and the quality metrics.

    With ``shard`` (I of N) only cells c with c % N == I are trained; the shard that finds
    every cell finished writes the tables. Returns ``out``, or None while other shards' cells
    are still missing. ``tables=False`` only trains (a caller that runs the shards itself
    writes the tables once with :func:`finish_study`).
    """
    from diffinv.stages.train import train_classifier

    out = Path(out)
    shard = shard or Shard()
    out.mkdir(parents=True, exist_ok=True)
    # One process may change a study (add seeds ...) and continue it; shards must all run the same one.
    if not shard.whole and (out / "study.yaml").is_file() and read_yaml(out / "study.yaml") != _study_dict(study):
        raise RunError(f"{out} holds a study with other settings; every shard must run the same study YAML and overrides")
    write_study(study, out)
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
    if not tables or not units.complete(strict=shard.whole, log=log):
        return None
    return _write_results(study, grid, out, log)


def write_study(study: Study, out: str | Path) -> None:
    """Record ``study`` as the one ``out`` runs: a launcher that changed it (more seeds ...) does so before its shards start."""
    Path(out).mkdir(parents=True, exist_ok=True)
    write_yaml(Path(out) / "study.yaml", _study_dict(study))


def _units(out: Path, grid: list[Cell], shards: int) -> Units:
    return Units(out, "cell", len(grid), lambda i: (out / grid[i].path / "final.json").is_file(), shards)


def _write_results(study: Study, grid: list[Cell], out: Path, log: Callable[[str], None]) -> Path:
    # Selection first, from validation files only; the kept runs' test metrics are read after it.
    grid = select_variants(grid, out, log)
    rows = [result_row(cell, out / cell.path) for cell in grid]
    write_table(out / "results", rows)
    write_table(out / "summary", summarise(rows, study.compare))
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


METRICS = ("top1", "balanced_accuracy", "macro_f1", "auc")


def select_variants(grid: list[Cell], out: Path, log: Callable[[str], None]) -> list[Cell]:
    """The cells of the chosen variant of every group: the best mean validation metric over its replicates.

    Reads each run's ``validation.json`` and nothing else, and writes ``selection.json``. A grid
    without ``select`` candidates is returned as it is.
    """
    if all(not c.variant for c in grid):
        return grid
    chosen: list[Cell] = []
    record = {}
    for group in dict.fromkeys(c.group for c in grid):
        members = [c for c in grid if c.group == group]
        scores: dict[str, list[float]] = {}
        for cell in members:
            val = read_json(out / cell.path / "validation.json")
            scores.setdefault(cell.variant, []).append(val[headline_metric(val["class_counts"])])
        means = {v: statistics.fmean(x) for v, x in scores.items()}
        best = max(means, key=means.get)  # ties: the first candidate listed
        chosen += [c for c in members if c.variant == best]
        key = "/".join("all" if g is None else str(g) for g in group)
        record[key] = {"chosen": best, "validation_mean": means}
        log(f"selected {best} for {key} on validation ({means[best]:.4f})")
    write_json(out / "selection.json", record)
    return chosen


def result_row(cell: Cell, run: Path) -> dict[str, Any]:
    final = read_json(run / "final.json")
    return {"dataset": cell.dataset, "method": cell.method, "per_class": cell.per_class, "arch": cell.arch, "aug": cell.aug,
            "seed": cell.seed, "repeat": cell.repeat, "subset_seed": cell.config.subset_seed, "variant": cell.variant,
            **{m: final.get(m) for m in METRICS},
            "degenerate": bool(final.get("degenerate")), "n_real": final["n_real"], "n_synthetic": final["n_synthetic"],
            "steps": final["steps"], "classes": final["classes"], "per_class_acc": final["per_class"],
            "class_counts": final.get("class_counts"),
            "validation": {m: (final.get("validation") or {}).get(m) for m in METRICS} if final.get("validation") else None,
            "run": cell.path}


def per_replicate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per seed (replicate): the mean of its repeats' metrics; rows without repeats pass unchanged.

    A replicate is degenerate when any of its classifiers is, so a one-class predictor is never averaged away.
    """
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(r)
    def mean(values: list[Any]) -> float | None:
        return None if any(v is None for v in values) else statistics.fmean(values)

    out = []
    for members in by_seed.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        row = {**members[0], **{m: mean([x.get(m) for x in members]) for m in METRICS},
               "degenerate": any(x["degenerate"] for x in members), "repeats": len(members),
               "per_class_acc": [mean(list(col)) for col in zip(*(x["per_class_acc"] for x in members))]}
        if all(x.get("validation") for x in members):
            row["validation"] = {m: mean([x["validation"].get(m) for x in members]) for m in METRICS}
        out.append(row)
    return out


def summarise(rows: list[dict[str, Any]], compare: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Per group (dataset, method, K, arch, aug): mean and std over seeds of each metric, degenerate runs, and
    for methods with synthetic data the gain over real only at the same K, paired by seed (a replicate)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    groups = {key: per_replicate(members) for key, members in groups.items()}
    summary = []
    for key, members in groups.items():
        accs = [m["top1"] for m in members]
        per_class = [statistics.fmean(v for v in col if v is not None) if any(v is not None for v in col) else None
                     for col in zip(*(m["per_class_acc"] for m in members))]
        entry = {**dict(zip(GROUP_KEYS, key)), "top1_mean": statistics.fmean(accs),
                 "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n_seeds": len(accs),
                 "n_real": members[0]["n_real"], "n_synthetic": members[0]["n_synthetic"],
                 "classes": members[0]["classes"], "per_class_acc_mean": per_class}
        for metric in METRICS[1:]:
            values = [m[metric] for m in members if m.get(metric) is not None]
            if len(values) == len(members):
                entry[f"{metric}_mean"] = statistics.fmean(values)
                entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        # Validation means, so settings compared as methods (samplers, guidance ...) are chosen on them, not on test.
        for metric in METRICS:
            values = [(m.get("validation") or {}).get(metric) for m in members]
            if values and all(v is not None for v in values):
                entry[f"val_{metric}_mean"] = statistics.fmean(values)
        counts = members[0].get("class_counts")
        entry["headline"] = headline_metric(counts) if counts else "top1"
        entry["degenerate_runs"] = sum(1 for m in members if m.get("degenerate"))
        entry["seeds"] = [m["seed"] for m in members]
        summary.append(entry)
    _add_gains(summary, groups)
    for method, rival in (compare or {}).items():
        _add_versus(summary, groups, method, rival)
    return summary


def _paired(mine: dict[int, dict[str, Any]], theirs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Paired gains (per metric) of one group's replicates over another's, on the seeds both have."""
    seeds = sorted(set(mine) & set(theirs))
    out = {}
    for metric in ("top1", "balanced_accuracy"):
        if all(mine[s].get(metric) is not None and theirs[s].get(metric) is not None for s in seeds) and seeds:
            gain = paired_gain([mine[s][metric] for s in seeds], [theirs[s][metric] for s in seeds])
            # A degenerate run (one class predicted) on either side is not evidence of anything.
            gain["degenerate"] = any(mine[s].get("degenerate") or theirs[s].get("degenerate") for s in seeds)
            gain["beyond_noise"] = gain["beyond_noise"] and not gain["degenerate"]
            out[metric] = gain
    return out


def _add_versus(summary: list[dict[str, Any]], groups: dict[tuple, list[dict[str, Any]]], method: str, rival: str) -> None:
    """``entry["versus"][rival]``: ``method`` minus ``rival`` at the same (dataset, K, arch, aug), paired by replicate."""
    for entry in summary:
        if entry["method"] != method:
            continue
        other = (entry["dataset"], rival, entry["per_class"], entry["arch"], entry["aug"])
        if other in groups:
            mine = {r["seed"]: r for r in groups[tuple(entry[k] for k in GROUP_KEYS)]}
            entry.setdefault("versus", {})[rival] = _paired(mine, {r["seed"]: r for r in groups[other]})


def _add_gains(summary: list[dict[str, Any]], groups: dict[tuple, list[dict[str, Any]]]) -> None:
    """Each synthetic method's gain over the real-only method of its (dataset, K, arch, aug), paired by seed."""
    baselines = {}
    for entry in summary:
        if entry["n_synthetic"] == 0:
            where = (entry["dataset"], entry["per_class"], entry["arch"], entry["aug"])
            if where not in baselines or entry["method"] == "real":  # several real-only methods: "real" is the one
                baselines[where] = entry
    for entry in summary:
        base = baselines.get((entry["dataset"], entry["per_class"], entry["arch"], entry["aug"]))
        if entry["n_synthetic"] == 0 or base is None:
            continue
        mine = {r["seed"]: r for r in groups[tuple(entry[k] for k in GROUP_KEYS)]}
        theirs = {r["seed"]: r for r in groups[tuple(base[k] for k in GROUP_KEYS)]}
        entry["baseline"] = base["method"]
        entry["gain"] = _paired(mine, theirs)


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

    from diffinv.data.real import load_uint8, open_images, select, validation_ids
    from diffinv.data.synthetic import open_synthetic
    from diffinv.quality.measures import synthetic_quality
    from diffinv.stages.train import load_classifier

    report: dict[str, Any] = {}
    per_replicate = study.vary_data()
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
            source = open_images(cfg.data, cfg.format, cfg.split)
            real_set = select(source, cfg.per_class, cfg.subset_seed, cfg.bad_images, warn=log,
                              exclude=validation_ids(source, cfg.val_per_class))
            test_set = open_images(cfg.data, cfg.format, cfg.eval_split)
            syn_sets = [open_synthetic(root, meta["classes"]) for root in cfg.synthetic]
            syn = torch.cat([load_uint8(s, res) for s in syn_sets])
            syn_labels = torch.cat([torch.from_numpy(s.labels) for s in syn_sets])
            q = synthetic_quality(judge, meta, syn, syn_labels, load_uint8(real_set, res), torch.from_numpy(real_set.labels),
                                  load_uint8(test_set, res), study.quality.get("inception_weights"))
            k = "all" if cell.per_class is None else f"k{cell.per_class}"
            name = f"{dname}/{cell.method}/{k}" + (f"/r{cell.seed}" if per_replicate else "")  # one set per replicate
            report[name] = {"dataset": dname, "method": cell.method, "per_class": cell.per_class, "replicate": cell.seed,
                            "judge": judge_cell.path, "synthetic": list(cfg.synthetic), **q}
            log(f"quality {name}: label fidelity {q['label_fidelity']:.3f}, diversity "
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
