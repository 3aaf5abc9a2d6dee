"""``diffinv demo``: the whole method on a few-shot split, offline, in minutes, with error bars.

1. invert the real subset (K per class) into the base model      -> OUT/store
2. generate Diffusion Inversion variants and the rival's           -> OUT/di, OUT/img2img
3. train the same classifier on real, real + DI, real + rival, over seeds -> OUT/study (results, summary)
4. write the report (accuracy table, efficiency, image grids)       -> OUT/study/report

Every stage is the ordinary command's code with resume on, so re-running a killed demo picks up
where it stopped and a finished demo only re-prints its table.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from diffinv.classify.models import check_arch
from diffinv.config import DemoConfig, GenerateConfig, InvertConfig, config_to_dict
from diffinv.runs import RunError, read_json, write_text, write_yaml
from diffinv.shards import Shard
from diffinv.stages import Stage

ASSETS = Path(__file__).parent.parent / "assets"
EMBEDDED_BASE = ASSETS / "digits-base"
RIVAL = "img2img"


def embedded_base() -> Path:
    """The digits base shipped in the package (made by ``diffinv pretrain-base``, see its pretrain.json)."""
    if not (EMBEDDED_BASE / "unet").is_dir():
        raise RunError(f"the embedded base model is missing from {EMBEDDED_BASE}; reinstall the package, or pass "
                       f"--base PATH to a model from `diffinv pretrain-base`")
    return EMBEDDED_BASE


def fast(config: DemoConfig) -> DemoConfig:
    """The same flow with every count cut to the bone: for tests and a first look, not for conclusions."""
    return replace(config, seeds=config.seeds[:2], invert_steps=20, per_image=2, sample_steps=4, train_steps=4,
                   train_batch=16, train_real_batch=min(config.train_real_batch, 8), train_repeats=1)


def run_demo(config: DemoConfig, out: str | Path, *, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Run the demo into ``out``; returns the study folder (with results, summary and report).

    Replicate r of real size K draws its own subset (``subset_seed + r``) into
    ``out/kK/rR/{store,di,img2img}``; one study trains every size's and replicate's cells, and
    every method of a replicate uses that replicate's images, so gains are paired by replicate.
    """
    from diffinv.data.real import open_images
    from diffinv.diffusion.backbone import load_backbone
    from diffinv.report.build import build_report

    out = Path(out)
    check_arch(config.arch)
    base = config.base or str(embedded_base())
    if config.invert_init == "encoder" and not (Path(base) / "encoder.safetensors").is_file():
        # Checked before any work: the demo starts each c_i from the base's encoder tokens by default.
        raise RunError(f"{base} has no base encoder (encoder.safetensors, saved by `diffinv pretrain-base`), which the "
                       f"demo starts inversion from by default; pass --invert-init random (and more --invert-steps, "
                       f"e.g. 60) for other models")
    workers = demo_workers(config)
    with process_pool(workers) if workers > 1 else nullcontext() as pool:
        # (The workers import torch and diffusers meanwhile.)
        resolution = int(load_backbone(base).unet.config.sample_size)
        native = min(open_images(config.data).image(0).size)  # synthetic images are saved at the data's own size
        write_yaml(out / "demo.yaml", {**config_to_dict(config), "base": base})
        folder = _make_and_train(config, out, base, resolution, native, pool, workers, progress=progress, log=log)

    # 4. The report, from the saved files.
    page = build_report(folder)
    log(f"4/4 report {page}")
    return folder


def _make_and_train(config: DemoConfig, out: Path, base: str, resolution: int, native: int, pool: Any, workers: int, *,
                    progress: bool, log: Callable[[str], None]) -> Path:
    """Steps 1-3 of the demo, in this process or spread over ``pool`` (``workers`` spawned processes); returns the study."""
    from diffinv.stages.experiment import Study, finish_study, run_study, write_study

    # 1-2. Every (size, replicate): invert its real subset, generate DI's and the rival's variants.
    jobs = [(config, base, k, r, out, resolution, native) for k in config.per_class for r in config.seeds]
    if pool is not None:
        log(f"1-2/4 inverting and generating {len(jobs)} replicates in {workers} processes")
        run_all(pool, _replicate, jobs)
    else:
        for job in jobs:
            _replicate(*job, progress=progress, log=log)

    # 3. The same classifier on real, real + DI, real + rival, per replicate; real only also at real_sizes.
    log(f"3/4 training {config.arch} on real / real + di / real + {RIVAL}, replicates {list(config.seeds)}")
    split = {"real_batch": config.train_real_batch, "syn_batch": config.train_batch - config.train_real_batch} if config.train_real_batch else {}
    real_sizes = sorted(set(config.per_class) | set(config.real_sizes))
    escaped = str(out).replace("{", "{{").replace("}", "}}")  # the study fills {per_class}, {seed} in with str.format
    study = Study(
        datasets={"data": {"data": config.data, "subset_seed": config.subset_seed}},
        methods={"real": {"synthetic": [], "per_class": real_sizes},
                 **{m: {"synthetic": [f"{escaped}/k{{per_class}}/r{{seed}}/{m}"], **split} for m in ("di", RIVAL)}},
        per_class=tuple(config.per_class), seeds=tuple(config.seeds), archs=(config.arch,), augs=("crop-flip",),
        train={"steps": config.train_steps, "batch_size": config.train_batch, "lr": config.train_lr,
               "resolution": config.train_resolution, "device": config.device, "val_per_class": config.val_per_class,
               "eval_every": config.train_steps},  # one validation pass at the end: the curve is not what the demo shows
        replicates="data", repeats=config.train_repeats, compare={"di": RIVAL},
    )
    if pool is None:
        return run_study(study, out / "study", progress=progress, log=log)
    write_study(study, out / "study")  # a re-run with more seeds changes the study; its shards must agree on it
    run_all(pool, _train_shard, [(study, out / "study", Shard(i, workers)) for i in range(workers)])
    return finish_study(out / "study", log=log)


def demo_workers(config: DemoConfig) -> int:
    """Processes for the replicates and the classifiers: ``--processes``, else one per core torch uses, up to 4 (1 on a GPU).

    The demo's models are so small that a second torch thread gains little: on 2 cores a
    replicate's inversion and sampling took 13.7 s with 2 threads against 19.5 s with 1 alone
    (~22 s each when two processes share the cores), a classifier 1.85 s against 1.9 s. Results
    depend on the torch threads of the process that makes them, as any CPU run's do (each worker
    has this process's threads / workers of them: 1 on a 2-core machine).
    """
    if config.processes:
        return config.processes
    from diffinv.device import resolve_device

    if resolve_device(config.device).type != "cpu":
        return 1
    return max(1, min(4, _cores()))


def process_pool(workers: int) -> Any:
    """``workers`` fresh (spawned) processes sharing this process's torch threads (at least one each)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, _cores() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(threads,))
    for _ in range(workers):  # start them all now (the pool starts one per waiting job): their imports take seconds
        pool.submit(int)
    return pool


def _cores() -> int:
    # torch's own thread count (cores it may use; OMP_NUM_THREADS), not os.cpu_count(): in a container that is the
    # host's, and 4 workers x 16 threads on a 2-core quota would thrash.
    import torch

    return torch.get_num_threads()


def run_all(pool: Any, fn: Callable[..., Any], jobs: list[tuple]) -> None:
    """``fn(*job)`` for every job on ``pool``; the first failure cancels the jobs not started and is raised here.

    Every finished unit is on disk already (all writes are atomic), so running the demo again continues from it.
    """
    from concurrent.futures import FIRST_EXCEPTION, wait

    futures = [pool.submit(fn, *job) for job in jobs]
    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    failed = [f for f in done if f.exception() is not None]
    if failed:
        for f in futures:
            f.cancel()
        raise failed[0].exception()


def _start_worker(threads: int) -> None:
    import importlib

    import torch

    torch.set_num_threads(threads)
    for stage in ("generate", "invert", "train"):  # what every job needs, imported before the first one arrives
        importlib.import_module(f"diffinv.stages.{stage}")


def _replicate(config: DemoConfig, base: str, k: int, r: int, out: Path, resolution: int, native: int, *,
               progress: bool = False, log: Callable[[str], None] = print) -> None:
    """Replicate r of size k: its subset inverted into ``out/kK/rR/store``, then DI's and the rival's variants."""
    from diffinv.diffusion.encoder import encoder_tokens
    from diffinv.stages.generate import generate_dataset
    from diffinv.stages.invert import invert_dataset

    # 1. Invert replicate r's few-shot real subset: one conditioning per image.
    log(f"1/4 inverting {k} images per class of {config.data} (replicate {r}) with {base} at {resolution} px")
    # As many tokens as the base was pretrained with (its encoder's K); SD-style models: the paper's 5.
    tokens = encoder_tokens(base) or InvertConfig.tokens
    invert = InvertConfig(model=base, data=config.data, per_class=k, subset_seed=config.subset_seed + r, tokens=tokens,
                          val_per_class=config.val_per_class, resolution=resolution, steps=config.invert_steps, lr=config.invert_lr,
                          init=config.invert_init, timesteps=config.invert_timesteps, device=config.device,
                          checkpoint_every=max(1, config.invert_steps // 4))
    store = invert_dataset(invert, out / f"k{k}" / f"r{r}" / "store", resume=True, progress=progress, log=log)

    # 2. Variants: Diffusion Inversion and the rival, same sampler, guidance, count and size.
    for method in ("di", RIVAL):
        log(f"2/4 generating {config.per_image} {method} variants per image ({k} per class, replicate {r})")
        gen = GenerateConfig(store=str(store), method=method, per_image=config.per_image, steps=config.sample_steps,
                             guidance=config.guidance, noise=config.noise, interp=config.interp,
                             strength=config.strength, clip_x0=config.clip_x0, unit_noise=config.unit_noise,
                             save_size=native, device=config.device, batch_size=256)  # small UNet: big batches, 1.35x
        generate_dataset(gen, out / f"k{k}" / f"r{r}" / method, progress=progress, log=log)


def _train_shard(study: Any, folder: Path, shard: Shard) -> None:
    from diffinv.stages.experiment import run_study

    run_study(study, folder, progress=False, shard=shard, tables=False)


def summary_table(study: str | Path) -> str:
    """The demo's result as a Markdown table, one row per (method, real size), in the data's headline metric.

    Gains are paired by replicate (the same real subset and seed with and without the synthetic
    set) with their 95% t-interval; a gain is evidence ("beyond noise") only when that interval
    excludes 0 over >= 3 replicates and no run of either side is degenerate (one class predicted).
    "Worth" reads the real-only curve (how many real images per class reach the same accuracy)
    and is shown only for gains beyond noise.
    """
    from diffinv.report.efficiency import worth_text
    from diffinv.report.stats import METRIC_NAMES

    study = Path(study)
    summary: list[dict[str, Any]] = read_json(study / "summary.json")
    metric = next((r["headline"] for r in summary if r.get("headline")), "top1")
    mean_key = f"{metric}_mean"
    curve = [(float(r["per_class"]), r[mean_key]) for r in summary if r["method"] == "real" and r["per_class"]]
    rows = sorted(summary, key=lambda r: (r["per_class"] or 0, r["method"] != "real"))
    lines = [f"| training data | real / class | images | test {METRIC_NAMES[metric]} % (mean ± std) "
             f"| gain vs real (points, 95% CI) | worth real / class | replicates |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["per_class"]
        what = "real only" if r["method"] == "real" else f"real + {r['method']}"
        n = f"{r['n_real']} + {r['n_synthetic']}" if r["n_synthetic"] else str(r["n_real"])
        gain = worth = ""
        g = (r.get("gain") or {}).get(metric)
        if g is not None:
            gain = f"{100 * g['mean']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]"
            if g["degenerate"]:
                gain += " (degenerate run)"
            elif not g["beyond_noise"]:
                gain += " (within noise)"
            text = worth_text(curve, k, r[mean_key]) if len(curve) >= 2 and k and g["beyond_noise"] else None
            if text is not None:
                worth = f"{text[0]} ({text[1]})"
        std_key = f"{metric}_std"
        mark = " (degenerate)" if r.get("degenerate_runs") else ""
        lines.append(f"| {what} | {'all' if k is None else k} | {n} | {100 * r[mean_key]:.2f} ± {100 * r[std_key]:.2f}{mark} "
                     f"| {gain} | {worth} | {r['n_seeds']} |")
    # Head to head: does DI beat the cheaper rival, paired by replicate?
    for r in rows:
        for rival, versus in (r.get("versus") or {}).items():
            g = versus.get(metric)
            if g is not None:
                note = " (degenerate run)" if g["degenerate"] else ("" if g["beyond_noise"] else " (within noise)")
                k = "all" if r["per_class"] is None else r["per_class"]
                lines.append(f"| {r['method']} minus {rival} | {k} | | | {100 * g['mean']:+.2f} "
                             f"[{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]{note} | | {g['n']} |")
    return "\n".join(lines)


def _run(config: DemoConfig, out: Path, *, progress: bool, log: Callable[[str], None], **_: Any) -> Path:
    study = run_demo(fast(config) if config.fast else config, out, progress=progress, log=log)
    write_text(Path(out) / "results.md", summary_table(study) + "\n")
    return Path(out)


def _summary(config: DemoConfig, out: Path) -> str:
    return ((Path(out) / "results.md").read_text().rstrip()
            + f"\nreport: {Path(out) / 'study' / 'report' / 'report.html'} (and report.md); table: {Path(out) / 'results.md'}")


STAGE = Stage(name="demo", config=DemoConfig, marker="demo.yaml", run=_run, summary=_summary, path_fields=("data", "base"),
              help="the whole method on a few-shot split of digits, offline on CPU: table + report",
              description=("Runs invert, generate (Diffusion Inversion and the img2img rival) and a seeded classifier study, prints "
                          "mean ± std test accuracy and writes a report. Default: 2 digits per class into the base model "
                          "shipped with the package, 8 replicates, 10 variants per image, a few minutes on a CPU. Re-running "
                          "continues an interrupted demo."))
