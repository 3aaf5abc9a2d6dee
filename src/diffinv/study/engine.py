"""Running a study: its jobs, then the choice on validation, the test of the kept candidates, the tables.

1. jobs      every (size, replicate): its stores, its candidates' sets, its classifier runs (no test read)
2. select    each method's candidate with the best mean validation score       -> selection.json
3. test      the kept candidates' runs scored on the test split, once           -> runs/*/final.json
4. tables    results, summary (gains, head to head), quality, the result table -> results.*, summary.*, results.md
5. report    OUT/report/report.html

Every unit is one stage call with resume on, so a killed study continues where it stopped when the
same command is run again, and a finished one only prints its table. Shard I of N runs the jobs j
with j % N == I; whichever finds every job finished does steps 2-5 (``diffinv merge`` does them by hand).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from diffinv.config import ConfigError, StudyConfig, config_to_dict, load_config, result_fields
from diffinv.report.cost import cost_lines, human_duration
from diffinv.runs import RunError, Units, read_json, read_yaml, write_bytes, write_json, write_text, write_yaml
from diffinv.shards import Shard
from diffinv.study.plan import Backbones, Plan, Trial, Unit, build_plan, data_fingerprint, embedded_base, local_path, stat_fingerprint
from diffinv.study.spec import REAL, candidates, check_files, compare_pairs
from diffinv.study.workers import process_pool, run_all, workers_for

Log = Callable[[str], None]
PLURAL = {"store": "stores", "adapters": "LoRA adapter sets", "set": "sets", "filter": "filtered sets", "run": "runs"}


def run_study(study: StudyConfig, out: str | Path, *, shard: Shard | None = None, progress: bool = True, log: Log = print,
              hook: Callable[[Unit], None] | None = None) -> Path | None:
    """Run every unfinished job of this shard, then (once every job is finished) steps 2-5; returns ``out``,
    or None while other shards' jobs are still missing. ``hook(unit)`` is called after every unit."""
    out = Path(out)
    shard = shard or Shard()
    backbones = Backbones()
    plan = build_plan(study, out, backbones)
    check_splits(study)
    check_files(study)  # hours of units must not run before a file read at the end is found unreadable
    mine = [j for j in range(len(plan.jobs)) if shard.owns(j)]
    todo = [j for j in mine if not all(u.done(out) for u in plan.job_units(j))]
    log(plan_line(study, plan, len(mine) - len(todo), len(mine)) + ("" if shard.whole else f" (shard {shard})"))
    check_sizes(study)  # a size the data cannot give is said before any estimate or unit
    estimate = estimate_units(study, plan, out, [u for j in todo for u in plan.job_units(j)], log, backbones) if todo else None
    backbones.clear()  # the jobs load their own; a large generator is not held through the study
    if estimate is not None and not study.yes:
        refuse_large(estimate)
    record(study, plan, out, shard)
    if estimate is not None and shard.whole:
        write_json(out / "estimate.json", estimate)
    workers = min(workers_for(study.processes, study.device), max(1, len(todo)))
    said = out / ".said" / str(os.getpid())  # the notes this invocation printed, shared by its worker processes
    try:
        return _run_jobs(study, plan, out, todo, workers, said, shard, progress, log, hook)
    finally:
        shutil.rmtree(said, ignore_errors=True)
        if said.parent.is_dir() and not any(said.parent.iterdir()):
            said.parent.rmdir()


def eta_line(done: int, total: int, elapsed: float) -> str:
    """The study's progress over its jobs, with the time left if the rest go as those done did."""
    return (f"study: {done} of {total} jobs done in {human_duration(elapsed)}, about "
            f"{human_duration(elapsed / done * (total - done))} left")


def plan_line(study: StudyConfig, plan: Plan, finished: int, jobs: int) -> str:
    counts = {kind: sum(1 for u in plan.units.values() if u.kind == kind) for kind in ("store", "adapters", "set", "filter", "run")}
    filtered = f" ({counts['filter']} of them filtered)" if counts["filter"] else ""
    fitted = f", {counts['adapters']} LoRA adapter sets" if counts["adapters"] else ""
    return (f"study {study.name}: {len(plan.jobs)} jobs (size x replicate), {counts['store']} stores{fitted}, "
            f"{counts['set'] + counts['filter']} synthetic sets{filtered}, {counts['run']} classifier runs; {finished} of {jobs} "
            f"jobs finished")


def estimate_units(study: StudyConfig, plan: Plan, out: Path, units: list[Unit], log: Log,
                   backbones: Backbones | None = None) -> dict[str, Any]:
    """The estimated time of ``units`` (those not finished) on this device, from a probe timed here; logged. Each generator
    of the study is probed for the inversion and sampling done with it; the classifiers once. ``backbones``: the models
    the plan already read."""
    from diffinv.data.real import open_images
    from diffinv.device import resolve_device
    from diffinv.study.estimate import Rates, classifier_rates, plan_work, uninformative

    units = [u for u in units if not u.done(out)]
    images = open_images(local_path(study, study.data), study.format, study.split)
    data_size = images.image(0).size[0]
    work = plan_work(list(plan.units.values()), len(images.classes), data_size)
    by_model = generator_work(plan, units, work)
    device = resolve_device(study.device)
    backbones = backbones or Backbones()
    notes = uninformative({u.key: work[u.key] for u in units}, data_size, _native(plan, backbones), len(images.classes))
    classifier = {k: v for u in units for k, v in work[u.key].classifier.items()}
    rates = Rates(0.0, 0.0, classifier_rates(list(classifier), len(images.classes), str(device)))
    seconds = sum(steps * rates.classifier[key] for u in units for key, steps in work[u.key].classifier.items())
    gains, probes = {}, {}
    for model, (resolution, todo, batches) in by_model.items():
        gain_db, model_rates, note = _probe_generator(backbones(model), resolution, images, data_size, device, batches)
        gains[model], probes[model] = gain_db, model_rates
        notes += [note] if note else []
        seconds += todo.inversion * model_rates.inversion + todo.sampling * model_rates.sampling
    for note in notes:
        log(f"warning: {note}")
    first = next(iter(probes.values()), rates)
    per_kind = {kind: sum(1 for u in units if u.kind == kind) for kind in ("store", "adapters", "set", "filter", "run")}
    rate_text = "; ".join(f"{Path(m).name}: {r.inversion * 1e3:.1f} ms per inversion image-step, {r.sampling * 1e3:.1f} ms per "
                          f"sampling image-pass" for m, r in probes.items()) or "no inversion or sampling left"
    log(f"estimate: about {human_duration(seconds)} of {device.type.upper()} time for {len(units)} unfinished units "
        f"({', '.join(f'{n} {PLURAL[k]}' for k, n in per_kind.items() if n)}), from a probe timed here: "
        f"{rate_text}, {_classifier_rates(rates)}; it leaves out data loading, decoding and evaluation, and splits over "
        f"the processes")
    return {"seconds": seconds, "units": len(units), "device": device.type,
            "denoising_gain_db": next((g for g in gains.values() if g is not None), None),
            "denoising_gain_db_by_model": gains,
            "inversion_image_steps": sum(t.inversion for _, t, _ in by_model.values()),
            "sampling_image_passes": sum(t.sampling for _, t, _ in by_model.values()),
            "classifier_steps": sum(classifier.values()),
            "seconds_per_inversion_image_step": first.inversion, "seconds_per_sampling_image_pass": first.sampling}


def generator_work(plan: Plan, units: list[Unit], work: dict[str, Any]) -> dict[str, tuple[int | None, Any, tuple[int, int]]]:
    """The inversion and sampling work of ``units`` by the generator that does it (model path -> (its stores' resolution,
    Work, the (inversion, sampling) batch its units run at)): a store's own model; adapters and sets their store's."""
    from diffinv.study.estimate import Work, unit_batch

    stores = {u.folder: u.config for u in plan.units.values() if u.kind == "store"}
    out: dict[str, tuple[int | None, Any, tuple[int, int]]] = {}
    for unit in units:
        w = work[unit.key]
        if not (w.inversion or w.sampling):
            continue
        store = unit.config if unit.kind == "store" else next(
            (c for folder, c in stores.items() if str(getattr(unit.config, "store", "")).rstrip("/").endswith(folder)), None)
        if store is None or not store.model:
            continue
        resolution, todo, (invert_batch, sample_batch) = out.setdefault(store.model, (store.resolution, Work(), (1, 1)))
        todo.add(Work(w.inversion, w.sampling))
        batch = unit_batch(unit, w)
        batches = (max(invert_batch, batch), sample_batch) if w.inversion else (invert_batch, max(sample_batch, batch))
        out[store.model] = (resolution, todo, batches)
    return out


def _native(plan: Plan, backbones: Backbones) -> int | None:
    """The first generator's native resolution (what the warnings about too-small images compare with)."""
    store = next((u.config for u in plan.units.values() if u.kind == "store"), None)
    return backbones(store.model).native_resolution if store is not None and store.model else None


def _probe_generator(backbone: Any, resolution: int | None, images: Any, data_size: int, device: Any,
                     batches: tuple[int, int]) -> tuple[float | None, Any, str | None]:
    """(its noise check in dB, its rates at the (inversion, sampling) batch its units run at, the noise warning if any)
    for one generator."""
    from diffinv.study.estimate import noise_note, probe

    backbone = backbone.to(device)
    resolution = resolution or backbone.choose_resolution(data_size)
    gain_db, note = noise_note(backbone, images, resolution)
    return gain_db, probe(backbone, resolution, data_size, str(device), batches), note


def _classifier_rates(rates) -> str:
    parts = [f"{seconds * 1e3:.0f} ms per {arch} step (batch {batch}, {size} px)" for (arch, size, batch), seconds in
             rates.classifier.items()]
    return ", ".join(parts) or "no classifier steps"


def refuse_large(estimate: dict[str, Any]) -> None:
    """A study beyond PLAN_UNITS units or PLAN_HOURS hours starts only with --yes."""
    from diffinv.config import PLAN_HOURS, PLAN_UNITS

    if estimate["units"] > PLAN_UNITS or estimate["seconds"] > PLAN_HOURS * 3600:
        raise RunError(f"this study would run {estimate['units']} units, about {human_duration(estimate['seconds'])} here "
                       f"(more than {PLAN_UNITS} units or {PLAN_HOURS} h): add --yes to start it, --plan to see the plan, "
                       f"or cut candidates, sizes or replicates")


def show_plan(study: StudyConfig, out: str | Path, log: Log = print) -> None:
    """``--plan``: what the study would make and reuse, and how long that would take here; nothing is written."""
    out = Path(out)
    backbones = Backbones()
    plan = build_plan(study, out, backbones)
    check_splits(study)
    done = [u for u in plan.units.values() if u.done(out)]
    finished = sum(1 for j in range(len(plan.jobs)) if all(u.done(out) for u in plan.job_units(j)))
    log(plan_line(study, plan, finished, len(plan.jobs)))
    todo = [u for u in plan.units.values() if not u.done(out)]
    log(f"plan: {len(todo)} units to make, {len(done)} finished to reuse in {out}")
    for kind in ("store", "adapters", "set", "filter", "run"):
        mine = [u for u in todo if u.kind == kind]
        if mine:
            log(f"  {len(mine):>5} {PLURAL[kind]} to make, e.g. {mine[0].folder}")
    if todo:
        estimate = estimate_units(study, plan, out, todo, log, backbones)
        from diffinv.config import PLAN_HOURS, PLAN_UNITS
        if estimate["units"] > PLAN_UNITS or estimate["seconds"] > PLAN_HOURS * 3600:
            log(f"starting it will need --yes (more than {PLAN_UNITS} units or {PLAN_HOURS} h)")


def _run_jobs(study: StudyConfig, plan: Plan, out: Path, todo: list[int], workers: int, said: Path, shard: Shard,
              progress: bool, log: Log, hook: Callable[[Unit], None] | None) -> Path | None:
    with process_pool(workers) if workers > 1 else nullcontext() as pool:
        if pool is not None:
            log(f"running {len(todo)} jobs in {workers} processes")
            run_all(pool, run_job, [(plan.job_units(j), out, _job_name(plan, j), said) for j in todo])
        else:
            started = time.monotonic()
            for done, j in enumerate(todo, 1):
                run_job(plan.job_units(j), out, _job_name(plan, j), said, progress=progress, log=log, hook=hook)
                if done < len(todo):
                    log(eta_line(done, len(todo), time.monotonic() - started))
        if not _units(plan, out, shard.count).complete(strict=shard.whole, log=log):
            return None
        return finish(study, plan, out, log=log, pool=pool)


def run_job(units: list[Unit], out: Path, name: str, said: Path | None = None, *, progress: bool = False,
            log: Log = print, hook: Callable[[Unit], None] | None = None) -> None:
    """One job's units in order (stores, then the sets made from them, then the runs that read them).

    ``said``: a folder shared by the jobs of one invocation, so a note every unit makes is printed once.
    """
    from diffinv.stages.filter import filter_set
    from diffinv.stages.finetune import finetune_classes
    from diffinv.stages.generate import generate_dataset
    from diffinv.stages.invert import invert_dataset
    from diffinv.stages.train import train_classifier

    stage_log = log if said is None else once(said, log)
    for unit in units:
        if unit.done(out):
            continue
        log(f"{name}: {unit.kind} {unit.folder}")
        folder = out / unit.folder
        if unit.kind == "store":
            invert_dataset(unit.config, folder, resume=True, progress=progress, log=stage_log)
        elif unit.kind == "set":
            generate_dataset(unit.config, folder, progress=progress, log=stage_log)
        elif unit.kind == "filter":  # not done though finished: an image is missing; filtering again is cheap
            finished = (folder / "generate.json").is_file() and read_json(folder / "generate.json").get("status") == "complete"
            filter_set(unit.config, folder, resume=not finished, overwrite=finished, log=stage_log)
        elif unit.kind == "adapters":
            finetune_classes(unit.config, folder, resume=True, progress=progress, log=stage_log)
        else:
            train_classifier(unit.config, folder, resume=True, progress=progress, log=stage_log, test=False)
        if hook is not None:
            hook(unit)


def once(said: Path, log: Log) -> Log:
    """``log``, but each message only by the first of the processes sharing ``said`` to make it."""
    import hashlib

    def say(message: str) -> None:
        said.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(said / hashlib.sha256(message.encode()).hexdigest()[:16], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        log(message)

    return say


def finish(study: StudyConfig, plan: Plan, out: Path, *, log: Log = print, pool: Any = None) -> Path:
    """Steps 2-5, from the finished runs: the choice reads validation only; the test is read after it."""
    from diffinv.report.summary import summarise_study
    from diffinv.report.table import chosen_text, generator_lines, result_table, verdict_lines

    selection = select_candidates(plan, out, log)
    kept = [t for t in plan.trials if selection[t.arm][str(t.per_class)]["chosen"] == t.label]
    warn_overlap(plan, out, log)
    test_runs([plan.units[t.run] for t in kept], out, log, pool)
    rows = [result_row(study, plan, t, out) for t in kept]
    write_table(out / "results", rows)
    summary = summarise_study(rows, compare_pairs(study), baselines_of(plan))
    write_table(out / "summary", summary)
    write_json(out / "quality.json", study_quality(study, plan, selection, out, log))
    chosen = chosen_text(selection)
    write_text(out / "results.md", result_table(summary) + (f"\n\nSettings chosen on validation:\n{chosen}" if chosen else "")
               + f"\n\nOn the test split (95% intervals over {len(study.seeds)} replicates, paired):\n{verdict_lines(summary)}\n"
               + (f"\nWhich generator:\n{generator_lines(summary)}\n" if generator_lines(summary) else ""))
    costs = study_costs(plan, out, summary)
    write_json(out / "costs.json", costs)
    for line in cost_lines(costs):
        log(line)
    if study.report:
        from diffinv.report.build import build_report

        build_report(out)  # the closing summary names it
    return out


def study_costs(plan: Plan, out: Path, summary: list[dict[str, Any]]) -> dict[str, Any]:
    """What the study cost, from its units' cost.json: the measured total beside the estimate made before, each method's
    time per synthetic set (its inversion included), and each kept method's gain over real only per hour of the device
    that made its data (accuracy bought per GPU- or CPU-hour). Written as costs.json; the log and the report show it."""
    seconds = {u.key: _unit_seconds(out, u) for u in plan.units.values()}
    estimate = read_json(out / "estimate.json") if (out / "estimate.json").is_file() else None
    per_method: dict[str, list[float]] = {}
    for unit in plan.units.values():
        if unit.kind == "set":
            per_method.setdefault(unit.config.method, []).append(sum(seconds[k] for k in _made_from(plan, [unit.key])))
    gains = []
    for row in summary:
        gain = (row.get("gain") or {}).get(row.get("headline", "top1"))
        if gain is None or row.get("baseline", "real") != "real":
            continue
        trials = [t for t in plan.trials_of(row["method"], row["setting"], row["per_class"]) if t.sets]
        per_replicate = [sum(seconds[k] for k in _made_from(plan, list(t.sets))) for t in trials]
        device = next((read_json(out / plan.units[k].folder / "cost.json").get("device", "cpu") for t in trials for k in t.sets
                       if (out / plan.units[k].folder / "cost.json").is_file()), "cpu")
        if per_replicate and statistics.mean(per_replicate) > 0:
            gains.append({"method": row["method"], "per_class": row["per_class"], "gain_points": gain["mean"] * 100,
                          "seconds_per_replicate": statistics.mean(per_replicate),
                          # a replicate made while the machine was busy or paused weighs on the mean, not the median
                          "median_seconds_per_replicate": statistics.median(per_replicate),
                          "device": "GPU" if device.startswith("cuda") else device.upper()})
    return {"measured_seconds": sum(seconds.values()), "estimate": estimate,
            "seconds_per_set": {m: statistics.mean(v) for m, v in sorted(per_method.items())},
            "median_seconds_per_set": {m: statistics.median(v) for m, v in sorted(per_method.items())}, "gains": gains}


def _made_from(plan: Plan, keys: list[str]) -> set[str]:
    """``keys`` and every unit they were made from, each once: a set's store, a LoRA set's adapters and the class store
    those were fitted on (what a replicate of the method cost). A method that does not read the store's embeddings
    (retrieval: the study shares the store only for its list of real images) is not charged its inversion."""
    from diffinv.diffusion.methods import get_method

    folders = {u.folder: k for k, u in plan.units.items() if u.kind in ("store", "adapters")}
    found: set[str] = set()
    todo = list(keys)
    while todo:
        key = todo.pop()
        if key in found:
            continue
        found.add(key)
        config = plan.units[key].config
        method = getattr(config, "method", None) if plan.units[key].kind == "set" else None
        fields = ("store", "class_store", "adapters") if method is None or get_method(method).uses_embeddings else ("adapters",)
        for field in fields:
            path = str(getattr(config, field, "") or "")
            todo += [k for folder, k in folders.items() if path and path.rstrip("/").endswith(folder)]
    return found


def _unit_seconds(out: Path, unit: Unit) -> float:
    """A unit's measured seconds. Made before their cost.json counted it: adapters keep their fitting in their marker,
    retrieval sets their search in theirs."""
    from diffinv.runs import COST

    folder = out / unit.folder
    cost = read_json(folder / COST) if (folder / COST).is_file() else {}
    seconds = float(cost.get("seconds", 0.0))
    if not cost and unit.kind == "adapters" and (folder / "finetune.json").is_file():
        seconds = float(read_json(folder / "finetune.json").get("seconds", 0.0))
    if cost and unit.kind == "set" and "load_seconds" not in cost and (folder / "generate.json").is_file():
        seconds += float((read_json(folder / "generate.json").get("retrieval") or {}).get("seconds", 0.0))
    return seconds


def check_sizes(study: StudyConfig) -> None:
    """Every class has the largest real size asked for, beside its validation hold-out (counted from labels: no image read)."""
    import numpy as np

    from diffinv.data.real import DataError, open_images

    images = open_images(local_path(study, study.data), study.format, study.split)
    counts = np.bincount(images.labels, minlength=len(images.classes))
    largest = max(study.per_class + study.real_sizes)
    for name, count in zip(images.classes, counts.tolist()):
        if count - study.val_per_class < largest:
            held = f" (after the {study.val_per_class} held out for validation)" if study.val_per_class else ""
            raise DataError(f"class {name!r} has only {count - study.val_per_class} image(s){held}, fewer than --per-class "
                            f"{largest}; lower --per-class / real_sizes{' or --val-per-class' if study.val_per_class else ''}")


def check_splits(study: StudyConfig) -> None:
    """The validation and test splits the study names exist, before any unit runs (each message names its field)."""
    from diffinv.data.real import open_images

    data = local_path(study, study.data)
    for split, field in ((study.val_split, "val_split (--val-split)"), (study.eval_split, "eval_split (--eval-split)")):
        if split:
            open_images(data, study.format, split, field)


def record(study: StudyConfig, plan: Plan, out: Path, shard: Shard) -> None:
    """Write the study and its plan beside its units; shards of one study must all run the same one."""
    saved = out / "study.yaml"
    if saved.is_file():
        previous = read_study(out)
        if previous.name != study.name and not _grows(out, plan):
            raise RunError(f"{out} holds study {previous.name or '(unnamed)'!r}, not {study.name or '(unnamed)'!r}, and this "
                           f"one does not contain it: its tables and report would be overwritten. Use another --out (a study "
                           f"run again, or grown by more candidates, sizes or replicates, may come back under any name)")
        if not shard.whole and result_fields(previous) != result_fields(study):
            raise RunError(f"{out} holds a study with other settings; every shard must run the same study file and flags")
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        older = " (a demo of an older diffinv: delete it to run the demo again)" if (out / "demo.yaml").is_file() else ""
        raise RunError(f"--out {out} is a non-empty folder that is not a study{older}; choose an empty or new folder")
    # Units are of the data and the model they were made with: either changed under the folder, they would be mixed.
    before = read_json(out / "plan.json") if (out / "plan.json").is_file() else {}
    identity: dict[str, str] = {}
    named = [("data", study.data, local_path(study, study.data)),
             ("model", study.model or "(the embedded base)", local_path(study, study.model) if study.model else str(embedded_base()))]
    others = dict.fromkeys([*study.models[1:], *(c.model for cs in candidates(study).values() for c in cs if c.model)])
    named += [(f"model {m}", m, local_path(study, m)) for m in others if m != study.model]  # the other generators
    for what, name, path in named:
        identity[f"{what}_stat"] = stat_fingerprint(path)
        # Bytes are read only when names, sizes or times moved (a copy, a clone, a remount): times alone prove nothing.
        same_stat = before.get(f"{what}_stat") == identity[f"{what}_stat"] and f"{what}_fingerprint" in before
        now = before[f"{what}_fingerprint"] if same_stat else data_fingerprint(path)
        identity[f"{what}_fingerprint"] = now
        if before.get(f"{what}_fingerprint") not in (None, now) and not _legacy_match(before, what, path):
            kind = what.split()[0]
            raise RunError(f"the {kind} {name} changed since {out} was made (files added, removed or rewritten): its "
                           f"stores, sets and runs are of the old {kind}. Use a new --out (or delete {out})")
    write_yaml(saved, config_to_dict(study))
    write_json(out / "plan.json", {**plan.to_json(), **identity})


def _legacy_match(before: dict[str, Any], what: str, path: str) -> bool:
    """A folder recorded before fingerprints were of content holds a stat one; only those times can vouch for it."""
    return f"{what}_stat" not in before and before.get(f"{what}_fingerprint") == stat_fingerprint(path)


def _grows(out: Path, plan: Plan) -> bool:
    """Whether ``plan`` holds every unit of the study recorded in ``out``: the same study, grown."""
    recorded = read_json(out / "plan.json") if (out / "plan.json").is_file() else {}
    return {u["key"] for u in recorded.get("units", [])} <= set(plan.units)


def read_study(out: Path) -> StudyConfig:
    """The study a study folder records, with a clear message for folders of another kind or an older diffinv."""
    raw = read_yaml(out / "study.yaml")
    if isinstance(raw, dict) and "datasets" in raw:
        raise RunError(f"{out} is a study of an older diffinv (per-path methods); run its study again into a new --out")
    try:
        return load_config(StudyConfig, None, raw)
    except ConfigError as exc:
        raise RunError(f"{out}/study.yaml cannot be read as a study ({exc}); run the study into a new --out") from exc


def finish_study(out: str | Path, log: Log = print) -> Path:
    """``diffinv merge`` for a study: steps 2-5, once every job of every shard has finished."""
    out = Path(out)
    study = read_study(out)
    plan = build_plan(study, out)
    _units(plan, out, 0).complete(strict=True, log=log)  # 0: the study does not record how many shards ran it
    return finish(study, plan, out, log=log)


def _units(plan: Plan, out: Path, shards: int) -> Units:
    return Units(out, "job", len(plan.jobs), lambda j: all(u.done(out) for u in plan.job_units(j)), shards)


def _job_name(plan: Plan, job: int) -> str:
    k, r = plan.jobs[job]
    return f"[job {job + 1}/{len(plan.jobs)}: {k} per class, replicate {r}]"


# ----------------------------------------------------------------------------- 2. the choice, on validation only


def select_candidates(plan: Plan, out: Path, log: Log) -> dict[str, dict[str, Any]]:
    """Per method and size, the candidate with the best mean validation score over the replicates (ties: the
    first listed). Reads each run's ``validation.json`` and nothing else; writes ``selection.json``."""
    from diffinv.report.stats import headline_metric, paired_gain

    scores: dict[tuple, dict[int, float]] = {}  # (arm, label, K) -> replicate -> mean over its repeats
    metric = None
    for arm, cands in plan.candidates.items():
        for k in plan.sizes(arm):
            for cand in cands:
                by_rep: dict[int, list[float]] = {}
                for t in plan.trials_of(arm, cand.label, k):
                    val = read_json(out / plan.units[t.run].folder / "validation.json")
                    metric = metric or headline_metric(val["class_counts"])
                    by_rep.setdefault(t.replicate, []).append(val[metric])
                scores[(arm, cand.label, k)] = {r: statistics.fmean(v) for r, v in by_rep.items()}
    selection: dict[str, dict[str, Any]] = {}
    for arm, cands in plan.candidates.items():  # real first: the others' validation gains are over its choice
        for k in plan.sizes(arm):
            means = {c.label: statistics.fmean(scores[(arm, c.label, k)].values()) for c in cands}
            best = max(means, key=lambda label: means[label])
            real = scores.get((REAL, selection.get(REAL, {}).get(str(k), {}).get("chosen"), k))
            listed = []
            for c in cands:
                mine = scores[(arm, c.label, k)]
                gain = None
                if arm != REAL and real:
                    shared = sorted(set(mine) & set(real))
                    gain = paired_gain([mine[r] for r in shared], [real[r] for r in shared])
                listed.append({"label": c.label, "settings": {"invert": c.invert, "generate": c.generate, "train": c.train},
                               "validation_mean": means[c.label], "validation_gain": gain, "replicates": len(mine)})
            selection.setdefault(arm, {})[str(k)] = {"chosen": best, "metric": metric, "candidates": listed}
            if len(cands) > 1:
                log(f"selected {arm} ({best}) at {k} per class on validation ({100 * means[best]:.2f}, best of {len(cands)})")
    write_json(out / "selection.json", selection)
    return selection


# ----------------------------------------------------------------------------- 3-4. the test, once; the tables


def test_runs(units: list[Unit], out: Path, log: Log, pool: Any = None) -> None:
    """``final.json`` of every kept run that has none: the study's only reads of the test split."""
    todo = [u for u in units if not (out / u.folder / "final.json").is_file()]
    if not todo:
        return
    log(f"scoring the {len(todo)} runs of the kept settings on the test split")
    if pool is not None:
        run_all(pool, _test, [(todo[i::4], out) for i in range(min(4, len(todo)))])
    else:
        _test(todo, out, log)


def warn_overlap(plan: Plan, out: Path, log: Log) -> None:
    """Say once, before the test is read, when real training images of any replicate are test images or look like copies
    of them (compared at 32 px or more, whatever the classifier's resolution: at 16 px look-alikes pass for copies)."""
    from diffinv.classify.batches import overlap_notes, overlap_pairs
    from diffinv.data.near_duplicates import SIDE
    from diffinv.data.real import load_uint8, open_images, real_subset
    from diffinv.report.plots import PAIRS_SHOWN, pair_grid
    from diffinv.stages.train_data import load_test_split, test_split_ids

    configs = list({(u.config.per_class, u.config.subset_seed): u.config for u in plan.runs()}.values())
    trained = read_json(out / plan.runs()[0].folder / "trained.json")
    resolution = max(trained["resolution"], SIDE)
    test, _ = load_test_split(configs[0], resolution, trained["classes"], log)
    source = open_images(configs[0].data, configs[0].format, configs[0].split)
    chosen = sorted({i for c in configs for i in real_subset(source, c.per_class, c.subset_seed, c.bad_images, c.val_per_class,
                                                                warn=lambda m: None).ids})
    index = {image_id: i for i, image_id in enumerate(source.ids)}
    real = load_uint8(source.subset([index[i] for i in chosen]), resolution)
    pairs = sorted(overlap_pairs(real, test), key=lambda p: -p[3])  # identical first, then the closest
    notes = overlap_notes(real, chosen, test, configs[0].eval_split, pairs=pairs)
    if pairs:  # the pairs to look at, side by side: a warning that says "check them" shows them
        test_ids = test_split_ids(configs[0], trained["classes"])
        write_table(out / "overlap", [{"training_image": chosen[i], "test_image": test_ids[j], "how": how, "correlation": round(c, 4)}
                                      for i, j, how, c in pairs])
        write_bytes(out / "overlap.png", pair_grid(real, test, pairs))
        notes = [f"{n} (every pair: {out / 'overlap.csv'}; the first {min(len(pairs), PAIRS_SHOWN)} side by side: "
                 f"{out / 'overlap.png'})" for n in notes]
    else:
        for stale in ("overlap.csv", "overlap.json", "overlap.png"):  # from a run before the data was cleaned
            (out / stale).unlink(missing_ok=True)
    for note in notes:
        log(f"warning: {note}")


def _test(units: list[Unit], out: Path, log: Log = print) -> None:
    from diffinv.stages.train import test_classifier

    for unit in units:
        test_classifier(unit.config, out / unit.folder, log=log)


def result_row(study: StudyConfig, plan: Plan, t: Trial, out: Path) -> dict[str, Any]:
    from diffinv.report.summary import METRICS

    unit = plan.units[t.run]
    final = read_json(out / unit.folder / "final.json")
    return {"dataset": study.name, "method": t.arm, "setting": t.label, "per_class": t.per_class,
            "arch": unit.config.arch, "aug": unit.config.aug, "seed": t.replicate, "repeat": t.repeat,
            "subset_seed": unit.config.subset_seed, **{m: final.get(m) for m in METRICS},
            "degenerate": bool(final.get("degenerate")), "n_real": final["n_real"], "n_synthetic": final["n_synthetic"],
            "steps": final["steps"], "classes": final["classes"], "per_class_acc": final["per_class"],
            "class_counts": final.get("class_counts"),
            "validation": {m: (final.get("validation") or {}).get(m) for m in METRICS} if final.get("validation") else None,
            "run": unit.folder, "sets": [plan.units[s].folder for s in t.sets]}


def write_table(stem: Path, rows: list[dict[str, Any]]) -> None:
    """``stem.json`` with every field, ``stem.csv`` with the scalar ones."""
    import csv
    import io

    write_json(stem.with_suffix(".json"), rows)
    if not rows:
        return
    scalar = [k for k, v in rows[0].items() if not isinstance(v, (list, dict))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=scalar, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(stem.with_suffix(".csv"), buffer.getvalue())


def study_quality(study: StudyConfig, plan: Plan, selection: dict[str, Any], out: Path, log: Log) -> dict[str, Any]:
    """Every candidate's sets judged by the kept real-only run with the most images (replicate 0's).

    Label fidelity, diversity and near copies read no test image, so they are measured for every
    candidate (the fidelity / diversity frontier); the distances to the test split only for kept ones.
    """
    import torch

    from diffinv.data.real import load_uint8, open_images, real_subset
    from diffinv.data.synthetic import open_synthetic
    from diffinv.quality.measures import judge_features, synthetic_quality
    from diffinv.stages.train import load_classifier

    real = [t for t in plan.trials if t.arm == REAL and t.repeat == 0 and selection[REAL][str(t.per_class)]["chosen"] == t.label]
    judge = max(real, key=lambda t: (t.per_class, -t.replicate))
    model, meta = load_classifier(out / plan.units[judge.run].folder)
    res = meta["resolution"]
    report: dict[str, Any] = {}
    test = test_f = None  # the judge's features of the test split: once, not once per kept set (8 s each on 10,000 images)
    notes = set()
    for t in plan.trials:
        if t.arm == REAL or t.repeat or not t.sets:
            continue
        kept = selection[t.arm][str(t.per_class)]["chosen"] == t.label
        cfg = plan.units[t.run].config
        if kept and test is None:
            test = load_uint8(open_images(cfg.data, cfg.format, cfg.eval_split), res)
            test_f = judge_features(model, test, meta["mean"], meta["std"])[0]
        source = open_images(cfg.data, cfg.format, cfg.split)
        real_set = real_subset(source, cfg.per_class, cfg.subset_seed, cfg.bad_images, cfg.val_per_class, warn=log)
        sets = [open_synthetic(root, meta["classes"]) for root in cfg.synthetic]
        q = synthetic_quality(model, meta, torch.cat([load_uint8(s, res) for s in sets]),
                              torch.cat([torch.from_numpy(s.labels) for s in sets]), load_uint8(real_set, res),
                              torch.from_numpy(real_set.labels), test if kept else None, study.quality.get("inception_weights")
                              if study.quality else None, test_f if kept else None)
        notes.add(q["fid_note"])
        q.update(label_precision_of_sets(out, [plan.units[s].folder for s in t.sets]))
        name = f"{t.arm}/k{t.per_class}/r{t.replicate}" if kept else f"{t.arm} [{t.label}]/k{t.per_class}/r{t.replicate}"
        report[name] = {"dataset": study.name, "method": t.arm, "setting": t.label, "kept": kept, "per_class": t.per_class,
                        "replicate": t.replicate, "judge": plan.units[judge.run].folder,
                        "synthetic": [plan.units[s].folder for s in t.sets], **q}
    if report:
        kept_q = [q for q in report.values() if q["kept"]]
        log(f"quality of {len(report)} synthetic sets (judge: {plan.units[judge.run].folder}); kept settings' label fidelity "
            + ", ".join(f"{q['method']} {q['label_fidelity']:.2f}" for q in kept_q[:6]) + (" ..." if len(kept_q) > 6 else ""))
    for note in sorted(notes):
        log(note)
    return report


def baselines_of(plan: Plan) -> dict[str, str]:
    """Each generating method's real-only baseline: the first real-only arm trained exactly as every candidate of it is
    (``real`` for the study's own classifier; e.g. ``real-ft`` for methods fine-tuned from the same backbone)."""
    real_arms = {arm: cands[0].train for arm, cands in plan.candidates.items()
                 if cands and cands[0].method is None and len(cands) == 1}
    out = {}
    for arm, cands in plan.candidates.items():
        if cands and cands[0].method is not None:
            out[arm] = next((real for real, train in real_arms.items() if all(c.train == train for c in cands)), REAL)
    return out


def label_precision_of_sets(out: Path, folders: list[str]) -> dict[str, float]:
    """Retrieval sets from a labelled pool: the share of their images whose pool label is the one they were given."""
    from diffinv.data.synthetic import read_manifest

    rows = [r for folder in folders for r in read_manifest(out / folder) if r.get("pool_class") is not None]
    return {"label_precision": sum(r["pool_class"] == r["class"] for r in rows) / len(rows)} if rows else {}


def count_done(out: Path, seen: dict[str, int]) -> tuple[int, int | None]:
    """(finished, planned) classifier runs, for progress bars, from ``plan.json``."""
    plan = read_json(out / "plan.json")
    runs = [u for u in plan["units"] if u["kind"] == "run"]
    done = sum(1 for u in runs if (out / u["folder"] / "train.json").is_file()
               and read_json(out / u["folder"] / "train.json").get("status") == "complete")
    return done, len(runs)
