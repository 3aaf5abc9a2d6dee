"""Stage 3: train a classifier on real, synthetic or both, with every image held in memory.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch import nn

from diffinv.classify.augment import Augmenter
from diffinv.classify.metrics import channel_stats, evaluate, normalise
from diffinv.classify.models import build_model
from diffinv.config import TrainConfig, config_to_dict
from diffinv.data.real import DataError, load_uint8, open_images, select
from diffinv.data.synthetic import open_synthetic, read_manifest
from diffinv.diffusion.backbone import resolve_device, slow_bf16_warning
from diffinv.diffusion.rng import key_of
from diffinv.runs import RunError, open_output, write_json, write_safetensors, write_text, write_yaml

MARKER = "train.json"
MIN_RESOLUTION = 32  # the smallest side on which every listed architecture keeps a spatial map


class TrainingError(RuntimeError):
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
    notes: list[str] = field(default_factory=list)


def load_train_data(config: TrainConfig, progress: bool = False, log: Callable[[str], None] = print) -> TrainData:
    """Real subset, synthetic sets (mapped to the real label space) and the evaluation split."""
    source = open_images(config.data, config.format, config.split)
    classes = source.classes
    use = _use(config)
    real_set = select(source, config.per_class, config.subset_seed, config.bad_images, warn=log)
    test_set = select(open_images(config.data, config.format, config.eval_split), None, 0, config.bad_images, warn=log)
    if test_set.classes != classes:
        raise DataError(f"the {config.eval_split} split has classes {test_set.classes}, the {config.split} split {classes}")
    resolution = config.resolution or max(MIN_RESOLUTION, *real_set.image(0).size)
    syn_sets = [open_synthetic(root, classes) for root in (config.synthetic if use != "real" else ())]
    notes = []
    if use == "both":
        # Synthetic images made from real images outside this run's subset would smuggle in more real data.
        chosen = set(real_set.ids)
        outside = {r["source"] for root in config.synthetic for r in read_manifest(root)
                   if r.get("source") and r["source"] not in chosen}
        if outside:
            notes.append(f"{len(outside)} synthetic source image(s) are not in the real subset (per-class "
                         f"{config.per_class}, subset-seed {config.subset_seed}); pass the settings the store was inverted with")
    for note in notes:
        log(f"warning: {note}")
    empty = torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
    real = load_uint8(real_set, resolution, progress, "real images") if use != "synthetic" else empty
    syn = torch.cat([load_uint8(s, resolution, progress, "synthetic images") for s in syn_sets]) if syn_sets else empty
    syn_labels = torch.cat([torch.from_numpy(s.labels) for s in syn_sets]) if syn_sets else torch.empty(0, dtype=torch.int64)
    return TrainData(
        classes=classes, resolution=resolution,
        real=real, real_labels=torch.from_numpy(real_set.labels) if use != "synthetic" else torch.empty(0, dtype=torch.int64),
        syn=syn, syn_labels=syn_labels,
        test=load_uint8(test_set, resolution, progress, "test images"), test_labels=torch.from_numpy(test_set.labels),
        notes=notes,
    )


def _use(config: TrainConfig) -> str:
    return ("both" if config.synthetic else "real") if config.use == "auto" else config.use


# ----------------------------------------------------------------------------- pure schedule parts


def lr_at(step: int, total: int, warmup_steps: int, base: float) -> float:
    """Linear warm-up from base/warmup to base over ``warmup_steps``, then cosine to zero at ``total``."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


class Stream:
    """Batches of ``batch`` indices into ``size`` items: one seeded permutation per pass, last partial batch dropped."""

    def __init__(self, size: int, batch: int, seed: int, name: str):
        self.size, self.batch, self.seed, self.name = size, min(batch, size), seed, name
        self.per_pass = size // self.batch
        self._cached: tuple[int, torch.Tensor] | None = None

    def indices(self, step: int) -> torch.Tensor:
        """[batch] int64 indices used at ``step`` (a pure function of seed, name and step)."""
        n_pass, j = divmod(step, self.per_pass)
        if self._cached is None or self._cached[0] != n_pass:
            g = torch.Generator().manual_seed(key_of(self.seed, f"order/{self.name}/{n_pass}"))
            self._cached = (n_pass, torch.randperm(self.size, generator=g))
        return self._cached[1][j * self.batch:(j + 1) * self.batch]


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


def eval_steps(total: int, every: int) -> set[int]:
    """Steps (1-based counts of finished steps) after which to evaluate; always includes the last."""
    if every:
        return set(range(every, total + 1, every)) | {total}
    return {max(1, round(total * k / 10)) for k in range(1, 11)}


# ----------------------------------------------------------------------------- the run


def train_classifier(config: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                     progress: bool = True, log: Callable[[str], None] = print,
                     on_step: Callable[[int], None] | None = None) -> Path:
    """Train one classifier into the run folder ``out``; returns ``out``.

    ``on_step(finished_steps)`` is called after every step (tests use it to interrupt a run).
    """
    out = Path(out)
    if not config.data:
        raise DataError("--data is required: the real data set (its train split is subset, its test split evaluates)")
    state = open_output(out, MARKER, config, noun="run", resume=resume, overwrite=overwrite)
    if state == "done":
        return out

    # 1. Data, held in memory; the model, optimiser and augmentation on the device.
    data = load_train_data(config, progress, log)
    device = resolve_device(config.device)
    autocast = torch.bfloat16 if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda") else None
    if autocast is not None and (warning := slow_bf16_warning(autocast, device)):
        log(f"warning: {warning}")
    channels_last = config.channels_last
    num_classes = len(data.classes)
    streams, total = plan_streams(config, len(data.real), len(data.syn))
    pool = torch.cat([data.real, data.syn]).to(device)
    pool_labels = torch.cat([data.real_labels, data.syn_labels]).to(device)
    offsets = {"real": 0, "syn": len(data.real), "pool": 0}  # a "synthetic" run has no real images: pool = syn
    mean, std = channel_stats(pool.cpu())
    mean, std = mean.to(device), std.to(device)

    torch.manual_seed(key_of(config.seed, "init"))
    model = build_model(config.arch, num_classes, data.resolution, config.stem).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    augment = Augmenter(config.aug, data.resolution, num_classes, config.mixup, config.cutmix).to(device)
    warmup_steps = round(config.warmup * total)
    evals = eval_steps(total, config.eval_every)
    checkpoints = set(range(config.checkpoint_every, total, config.checkpoint_every)) if config.checkpoint_every else evals

    # 2. Start or resume.
    start, rows = 0, []
    if state == "resume" and (out / "checkpoint.safetensors").is_file():
        start, rows = _load_checkpoint(out / "checkpoint.safetensors", model, optimiser)
        log(f"resuming {out} at step {start}/{total}")
    else:
        write_yaml(out / "config.yaml", config_to_dict(config))
        write_json(out / MARKER, {"status": "running", "classes": data.classes, "resolution": data.resolution})
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=f"train {config.arch}", unit="step", dynamic_ncols=True)
    model.train()
    running = None
    for step in range(start, total):
        # 3. The step's learning rate and randomness.
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, total, warmup_steps, config.lr)
        torch.manual_seed(key_of(config.seed, f"step/{step}"))

        # 4. The batch: indices of each stream, augmented on the device.
        idx = torch.cat([s.indices(step) + offsets[name] for name, s in streams]).to(device)
        x, y = augment(pool[idx].float().div_(255.0), pool_labels[idx])
        x = normalise(x, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        # 5. Forward, soft-target cross-entropy (MixUp/CutMix give soft labels), SGD step.
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        value = float(loss.detach())  # one host sync per step: the NaN check needs it anyway
        if not math.isfinite(value):
            raise TrainingError(f"the loss became {value} at step {step}; lower --lr (now {config.lr}) "
                                "or use --precision fp32. Finished checkpoints are kept: fix it and pass --resume")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        running = value if running is None else 0.95 * running + 0.05 * value

        # 6. Evaluate and checkpoint.
        done = step + 1
        if done in evals:
            result = evaluate(model, data.test, data.test_labels, mean, std, num_classes, config.eval_batch_size,
                              autocast, channels_last)
            rows.append({"step": done, "epoch": done / max(s.per_pass for _, s in streams), "train_loss": running,
                         "lr": optimiser.param_groups[0]["lr"], **result})
            write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if done in checkpoints and done < total:
            _save_checkpoint(out / "checkpoint.safetensors", model, optimiser, done, rows)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", acc=f"{rows[-1]['top1']:.3f}" if rows else "-")
        if on_step is not None:
            on_step(done)
    if bar is not None:
        bar.close()

    # 7. Final weights (with what is needed to use them) and the summary.
    meta = {"arch": config.arch, "stem": config.stem, "classes": json.dumps(data.classes),
            "resolution": str(data.resolution), "mean": json.dumps(mean.tolist()), "std": json.dumps(std.tolist())}
    write_safetensors(out / "model.safetensors", model.state_dict(), meta)
    final = rows[-1]
    write_json(out / "final.json", {
        "top1": final["top1"], "per_class": final["per_class"], "loss": final["loss"], "steps": total,
        "classes": data.classes, "n_real": len(data.real), "n_synthetic": len(data.syn), "n_test": len(data.test),
        "resolution": data.resolution, "notes": data.notes,
    })
    write_json(out / MARKER, {"status": "complete", "classes": data.classes, "resolution": data.resolution})
    (out / "checkpoint.safetensors").unlink(missing_ok=True)
    return out


def _save_checkpoint(path: Path, model: nn.Module, optimiser: torch.optim.Optimizer, step: int, rows: list[dict]) -> None:
    """One atomic file: weights, momentum buffers, the step and the metrics so far."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(p for g in optimiser.param_groups for p in g["params"]):
        buf = optimiser.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{i}"] = buf
    write_safetensors(path, tensors, {"step": str(step), "rows": json.dumps(rows)})


def _load_checkpoint(path: Path, model: nn.Module, optimiser: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    device = next(model.parameters()).device
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(p for g in optimiser.param_groups for p in g["params"]):
        if f"momentum.{i}" in tensors:
            optimiser.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].to(device)
    return int(meta["step"]), json.loads(meta["rows"])


def load_classifier(run: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a finished run and its metadata (classes, resolution, mean, std)."""
    path = Path(run) / "model.safetensors"
    if not path.is_file():
        raise RunError(f"{run} has no model.safetensors; finish the run with `diffinv train ... --resume`")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    meta = {"arch": raw["arch"], "stem": raw["stem"], "classes": json.loads(raw["classes"]),
            "resolution": int(raw["resolution"]), "mean": torch.tensor(json.loads(raw["mean"])),
            "std": torch.tensor(json.loads(raw["std"]))}
    model = build_model(meta["arch"], len(meta["classes"]), meta["resolution"], meta["stem"])
    model.load_state_dict(weights)
    return model.to(device).eval(), meta
