"""``diffinv train``: a classifier trained on real, synthetic or both, evaluated on the real test split.

Small data sets fit on the device as uint8 tensors (CIFAR-10 is 150 MB), so there is no data
loader: each step indexes the tensors, augments the batch on the device and takes one SGD step.
Everything random in a step is a function of (seed, step): batch order comes from keyed
permutations and the global generator is reseeded before the step, so a resumed run is the
same as an uninterrupted one.

Run folder: ``config.yaml``, ``train.json`` (status), ``metrics.jsonl`` (one row per
evaluation), ``checkpoint.safetensors`` (while running), ``model.safetensors`` and
``final.json`` (when done).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffinv.classify.augment import Augmenter
from diffinv.classify.batches import eval_steps
from diffinv.classify.metrics import channel_stats, evaluate, normalise
from diffinv.classify.models import build_model, check_arch, load_trained
from diffinv.classify.pretrained import load_pretrained, param_groups, pretrained_state
from diffinv.config import TrainConfig, config_to_dict
from diffinv.data.real import DataError
from diffinv.device import resolve_device, slow_bf16_warning
from diffinv.rng import key_of
from diffinv.runs import (
    RunError,
    add_cost,
    load_optimiser_tensors,
    open_output,
    prefixed,
    read_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
    write_safetensors,
    write_text,
    write_yaml,
)
from diffinv.schedule import lr_factor
from diffinv.stages import Stage
from diffinv.stages.train_data import TrainingError, load_test_split, load_train_data, plan_streams

MARKER = "train.json"
TRAINED = "trained.json"  # what the run was (sizes, validation), written before any test


@dataclass
class _Session:
    """What the steps of one run share: the images on the device, the model, its optimiser and schedule."""

    model: nn.Module
    optimiser: torch.optim.Optimizer
    augment: Augmenter
    pool: torch.Tensor
    pool_labels: torch.Tensor
    offsets: dict[str, int]
    streams: list
    mean: torch.Tensor
    std: torch.Tensor
    total: int
    warmup_steps: int
    evals: set[int]
    checkpoints: set[int]
    autocast: torch.dtype | None
    channels_last: bool
    num_classes: int


def train_classifier(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                     progress: bool = True, log: Callable[[str], None] = print,
                     on_step: Callable[[int], None] | None = None, test: bool = True) -> Path:
    """Train one classifier into the run folder ``out``; returns ``out``.

    ``on_step(finished_steps)`` is called after every step (tests use it to interrupt a run).
    ``test=False`` (with validation data) stops before the test split: a study reads it later, with
    :func:`test_classifier`, for the settings it kept only.
    """
    if not test and not (config.val_per_class or config.val_split):
        raise RunError("a run whose test is deferred needs validation data (--val-per-class or --val-split)")
    out = Path(out)
    check_arch(config.arch)
    if not config.data:
        raise DataError("--data is required: the real data set (its train split is subset, its test split evaluates)")
    state = open_output(out, MARKER, config, noun="run", resume=resume, overwrite=overwrite)
    if state == "done":
        if test and not (out / "final.json").is_file():
            test_classifier(config, out, log=log)
        return out

    # 1. Data, held in memory; the model, optimiser and augmentation on the device.
    data = load_train_data(config, progress, log, with_test=test)
    run = _session(config, data, log)

    # 2. Start or resume.
    start, rows, running = 0, [], None
    if state == "resume" and (out / "checkpoint.safetensors").is_file():
        tensors, saved = read_checkpoint(out / "checkpoint.safetensors")
        run.model.load_state_dict(prefixed(tensors, "model"))
        load_optimiser_tensors(run.optimiser, tensors)
        # The running loss too, so a resumed run's metrics.jsonl equals an uninterrupted run's.
        start, rows, running = int(saved["step"]), saved["rows"], saved.get("running")
        log(f"resuming {out} at step {start}/{run.total}")
    else:
        write_yaml(out / "config.yaml", config_to_dict(config))
        write_json(out / MARKER, {"status": "running", "classes": data.classes, "resolution": data.resolution})
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    # 3-6. The steps, each evaluated and checkpointed on schedule.
    started = time.perf_counter()
    rows = _steps(config, out, run, data, start, rows, running, progress, on_step)
    add_cost(out, time.perf_counter() - started, run.total - start, str(run.pool.device), "steps")

    # 7. Final weights (with what is needed to use them), what the run was, then (unless deferred) the test.
    _finish(config, out, run, data, rows, test)
    return out


def _session(config: TrainConfig, data: Any, log: Callable[[str], None]) -> _Session:
    """The images on the device, the model (from --pretrained weights where given), its optimiser and schedule."""
    device = resolve_device(config.device)
    autocast = torch.bfloat16 if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda") else None
    if autocast is not None and (warning := slow_bf16_warning(autocast, device)):
        log(f"warning: {warning}")
    num_classes = len(data.classes)
    streams, total = plan_streams(config, len(data.real), len(data.syn))
    pool = torch.cat([data.real, data.syn]).to(device)
    pool_labels = torch.cat([data.real_labels, data.syn_labels]).to(device)
    offsets = {"real": 0, "syn": len(data.real), "pool": 0}  # a "synthetic" run has no real images: pool = syn
    mean, std = channel_stats(pool.cpu())

    torch.manual_seed(key_of(config.seed, "init"))
    model = build_model(config.arch, num_classes, data.resolution, config.stem)
    fresh = [k for k, _ in model.named_parameters()]
    if config.pretrained:
        fresh = load_pretrained(model, pretrained_state(config.arch, config.pretrained), config.pretrained)
        log(f"fine-tuning from {config.pretrained}: {len(fresh)} tensors left fresh (the head)")
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(param_groups(model, fresh, config.backbone_lr), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    augment = Augmenter(config.aug, data.resolution, num_classes, config.mixup, config.cutmix).to(device)
    evals = eval_steps(total, config.eval_every)
    checkpoints = set(range(config.checkpoint_every, total, config.checkpoint_every)) if config.checkpoint_every else evals
    return _Session(model, optimiser, augment, pool, pool_labels, offsets, streams, mean.to(device), std.to(device), total,
                    round(config.warmup * total), evals, checkpoints, autocast, config.channels_last, num_classes)


def _steps(config: TrainConfig, out: Path, run: _Session, data: Any, start: int, rows: list[dict], running: float | None,
           progress: bool, on_step: Callable[[int], None] | None) -> list[dict]:
    """Steps ``start`` .. the end; returns the evaluation rows (metrics.jsonl)."""
    bar = None
    if progress:
        from diffinv.progress import bar as progress_bar

        bar = progress_bar(total=run.total, initial=start, desc=f"train {config.arch}", unit="step", dynamic_ncols=True)
    run.model.train()
    for step in range(start, run.total):
        value = _step(config, run, step)
        running = value if running is None else 0.95 * running + 0.05 * value

        # 6. Evaluate and checkpoint.
        done = step + 1
        if done in run.evals:
            # With validation data the test split is not looked at before the end (settings are chosen on validation).
            watched = (data.val, data.val_labels) if data.val is not None else (data.test, data.test_labels)
            result = evaluate(run.model, *watched, run.mean, run.std, run.num_classes, config.eval_batch_size, run.autocast,
                              run.channels_last)
            rows.append({"step": done, "epoch": done / max(s.per_pass for _, s in run.streams), "train_loss": running,
                         "lr": run.optimiser.param_groups[0]["lr"],
                         "split": "validation" if data.val is not None else config.eval_split, **result})
            write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if done in run.checkpoints and done < run.total:
            save_checkpoint(out / "checkpoint.safetensors", {f"model.{k}": v for k, v in run.model.state_dict().items()},
                            run.optimiser, {"step": done, "rows": rows, "running": running})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", acc=f"{rows[-1]['top1']:.3f}" if rows else "-")
        if on_step is not None:
            on_step(done)
    if bar is not None:
        bar.close()
    return rows


def _step(config: TrainConfig, run: _Session, step: int) -> float:
    """One SGD step (3-5); returns its loss."""
    # 3. The step's learning rate and randomness.
    for group in run.optimiser.param_groups:  # pretrained layers wait out the linear probe, then run at their fraction
        probing = group["pretrained"] and step < config.probe_steps
        group["lr"] = 0.0 if probing else group["scale"] * (config.lr * lr_factor(step, run.total, "cosine", run.warmup_steps))
    if run.pool.device.type == "cpu":  # torch.manual_seed also seeds every accelerator backend: ~1 ms, a tenth of a small CNN's step
        torch.default_generator.manual_seed(key_of(config.seed, f"step/{step}"))
    else:
        torch.manual_seed(key_of(config.seed, f"step/{step}"))

    # 4. The batch: indices of each stream, augmented on the device.
    idx = torch.cat([s.indices(step) + run.offsets[name] for name, s in run.streams]).to(run.pool.device)
    x, y = run.augment(run.pool[idx].float().div_(255.0), run.pool_labels[idx])
    x = normalise(x, run.mean, run.std)
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    # 5. Forward, soft-target cross-entropy (MixUp/CutMix give soft labels), SGD step.
    with torch.autocast(run.pool.device.type, dtype=run.autocast or torch.float32, enabled=run.autocast is not None):
        logits = run.model(x)
    loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
    value = float(loss.detach())  # one host sync per step: the NaN check needs it anyway
    if not math.isfinite(value):
        raise TrainingError(f"the loss became {value} at step {step}; lower --lr (now {config.lr}) "
                            "or use --precision fp32. Finished checkpoints are kept: fix it and pass --resume")
    run.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if step < config.probe_steps:  # no gradient, no momentum: the pretrained weights stay as loaded
        for group in run.optimiser.param_groups:
            for p in group["params"] if group["pretrained"] else ():
                p.grad = None
    run.optimiser.step()
    return value


def _finish(config: TrainConfig, out: Path, run: _Session, data: Any, rows: list[dict], test: bool) -> None:
    """Step 7: the weights with what is needed to use them, trained.json, validation.json, then the test."""
    meta = {"arch": config.arch, "stem": config.stem, "classes": json.dumps(data.classes),
            "resolution": str(data.resolution), "mean": json.dumps(run.mean.tolist()), "std": json.dumps(run.std.tolist())}
    write_safetensors(out / "model.safetensors", run.model.state_dict(), meta)
    validation = None
    if data.val is not None:
        validation = {k: v for k, v in rows[-1].items() if k not in ("step", "epoch", "train_loss", "lr", "confusion")}
        # Apart from the test metrics, so that choosing settings on validation never has to open them.
        write_json(out / "validation.json",
                   {**validation, "class_counts": torch.bincount(data.val_labels, minlength=run.num_classes).tolist()})
    write_json(out / TRAINED, {"steps": run.total, "validation": validation, "classes": data.classes, "n_real": len(data.real),
                               "n_synthetic": len(data.syn), "resolution": data.resolution, "notes": data.notes})
    if test:
        final = rows[-1] if data.val is None else evaluate(run.model, data.test, data.test_labels, run.mean, run.std,
                                                            run.num_classes, config.eval_batch_size, run.autocast,
                                                            run.channels_last)
        _write_final(out, final, torch.bincount(data.test_labels, minlength=run.num_classes).tolist(), len(data.test))
    write_json(out / MARKER, {"status": "complete", "classes": data.classes, "resolution": data.resolution})
    (out / "checkpoint.safetensors").unlink(missing_ok=True)


def test_classifier(config: TrainConfig, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Score a trained run on its test split (``final.json``): the only time a run reads it."""
    out = Path(out)
    device = resolve_device(config.device)
    autocast = torch.bfloat16 if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda") else None
    model, meta = load_classifier(out, device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, labels = load_test_split(config, meta["resolution"], meta["classes"], log)
    final = evaluate(model, images, labels, meta["mean"].to(device), meta["std"].to(device), len(meta["classes"]),
                     config.eval_batch_size, autocast, config.channels_last)
    _write_final(out, final, torch.bincount(labels, minlength=len(meta["classes"])).tolist(), len(images))
    return out


def _write_final(out: Path, final: dict[str, Any], class_counts: list[int], n_test: int) -> None:
    trained = read_json(out / TRAINED)
    write_json(out / "final.json", {
        "top1": final["top1"], "per_class": final["per_class"], "loss": final["loss"],
        **{k: final.get(k) for k in ("balanced_accuracy", "macro_f1", "auc", "top_prediction_share", "degenerate")},
        "class_counts": class_counts, "n_test": n_test, **trained,
    })


def load_classifier(run: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a finished run and its metadata (classes, resolution, mean, std)."""
    path = Path(run) / "model.safetensors"
    if not path.is_file():
        raise RunError(f"{run} has no model.safetensors; finish the run with `diffinv train ... --resume`")
    return load_trained(path, device)


def _summary(config: TrainConfig, out: Path) -> str:
    final = read_json(out / "final.json")
    worst = min((a, c) for a, c in zip(final["per_class"], final["classes"]) if a is not None)
    return (f"run {out}: {config.arch} on {final['n_real']} real + {final['n_synthetic']} synthetic images, {final['steps']} "
            f"steps; test top-1 {final['top1']:.4f} on {final['n_test']} images (worst class {worst[1]}: {worst[0]:.3f})")


def _run(config: TrainConfig, out: Path, *, resume: bool, overwrite: bool, progress: bool, log: Callable[[str], None],
         **_: Any) -> Path:
    return train_classifier(config, out, resume=resume, overwrite=overwrite, progress=progress, log=log)


STAGE = Stage(name="train", config=TrainConfig, marker=MARKER, run=_run, summary=_summary, path_fields=("data",),
              description=("Train a classifier with all images in memory and augmentation on the device; evaluates on the real "
                          "test split and writes metrics, a confusion matrix and safetensors weights."),
              outputs=("run folder to write", "continue an interrupted run from its last checkpoint", "replace an existing run"))
