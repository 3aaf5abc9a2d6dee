"""How long a study's unfinished units will take on this device: counts of work times rates from a short probe.

The work of each unit is counted in the step it repeats: image-steps of inversion (UNet forward and
backward to the conditioning), image-passes of sampling (one UNet forward; two with guidance) and
classifier steps. The probe times each of those steps here, a few times, at the study's sizes. It is
an estimate: data loading, VAE decoding, evaluation and process start-up are not in it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SAMPLING_FREE = {"retrieval", "real"}  # methods that copy images rather than sample them


@dataclass
class Work:
    """Counts of the repeated steps of some units."""

    inversion: float = 0.0  # image-steps (UNet forward + backward)
    sampling: float = 0.0  # image-passes (UNet forward)
    classifier: dict[tuple[str, int, int], float] = field(default_factory=dict)  # (arch, resolution, batch) -> steps

    def add(self, other: Work) -> None:
        self.inversion += other.inversion
        self.sampling += other.sampling
        for key, steps in other.classifier.items():
            self.classifier[key] = self.classifier.get(key, 0.0) + steps


def plan_work(units: list[Any], n_classes: int, data_size: int) -> dict[str, Work]:
    """The work of each unit (by key), from its config: the images a set makes follow from its store's."""
    images: dict[str, int] = {}  # folder name (as configs name it) -> images it holds
    work = {}
    for unit in units:
        w, config = Work(), unit.config
        if unit.kind == "store":
            n = (config.per_class or 0) * n_classes
            images[unit.folder] = n
            w.inversion = n * config.steps
        elif unit.kind == "adapters":
            w.inversion = config.steps * config.batch_size * n_classes
        elif unit.kind in ("set", "filter"):
            store = _named(images, getattr(config, "store", "") or getattr(config, "set", ""))
            n = config.per_image * store if unit.kind == "set" else store
            images[unit.folder] = n
            if unit.kind == "set" and config.method not in SAMPLING_FREE:
                w.sampling = n * config.steps * (2 if config.guidance != 1 else 1)
        elif unit.kind == "run":
            n_train = (config.per_class or 0) * n_classes + sum(_named(images, str(s)) for s in config.synthetic)
            batch = max(1, min(config.batch_size, n_train or 1))
            steps = config.steps or math.ceil(config.epochs * max(n_train, 1) / batch)
            w.classifier[(config.arch, config.resolution or max(32, data_size), batch)] = float(steps)
        work[unit.key] = w
    return work


def _named(images: dict[str, int], path: str) -> int:
    """Images of the unit whose folder ``path`` ends with (configs name folders absolutely)."""
    return next((n for folder, n in images.items() if path.rstrip("/").endswith(folder)), 0)


@dataclass(frozen=True)
class Rates:
    """Seconds per repeated step, measured here."""

    inversion: float
    sampling: float
    classifier: dict[tuple[str, int, int], float]

    def seconds(self, work: Work) -> float:
        return (work.inversion * self.inversion + work.sampling * self.sampling
                + sum(steps * self.classifier[key] for key, steps in work.classifier.items()))


def _timed(step: Callable[[], Any], repeats: int = 3) -> float:
    step()  # warm-up: first calls allocate and pick kernels
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


MAX_BATCH = 64  # the stages' batch on the CPU (and for --batch-size 0 there): invert's min(64, images), generate's 64


def unit_batch(unit: Any, work: Work) -> int:
    """The images a generating unit puts through the UNet at once, as its stage batches them: the per-image cost of a
    step falls with the batch, so the probe times the batch the units will run at."""
    config = unit.config
    images = work.inversion / max(1, config.steps) if work.inversion else work.sampling / max(1, config.steps)
    if unit.kind == "set":
        images /= 2 if config.guidance != 1 else 1  # guidance doubles the passes, not the images in a batch
    return max(1, min(int(images), getattr(config, "batch_size", 0) or MAX_BATCH))


def probe(backbone: Any, resolution: int | None, data_size: int, device: str, batches: tuple[int, int]) -> Rates:
    """Seconds per inversion image-step and per sampling image-pass of ``backbone`` here, timed at the (inversion,
    sampling) batch sizes its units will use."""
    backbone = backbone.to(device)
    resolution = resolution or backbone.choose_resolution(data_size)

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, *backbone.latent_shape(resolution), device=device)
        t = backbone.process.model_time(torch.full((batch,), backbone.num_train_timesteps // 2, device=device))
        return x, t, torch.zeros(batch, 5 + backbone.extra_tokens, backbone.cond_dim, device=device, requires_grad=True)

    x, t, cond = inputs(batches[0])
    xs, ts, conds = inputs(batches[1])

    def invert_step() -> None:
        backbone.predict(x, t, cond).square().mean().backward()

    def sample_pass() -> None:
        with torch.no_grad():
            backbone.predict(xs, ts, conds.detach())

    return Rates(_timed(invert_step) / batches[0], _timed(sample_pass) / batches[1], {})


def classifier_rates(keys: list[tuple[str, int, int]], n_classes: int, device: str = "cpu") -> dict[tuple[str, int, int], float]:
    """Seconds per SGD step of each (architecture, resolution, batch), timed here."""
    from diffinv.classify.models import build_model

    rates = {}
    for arch, size, batch in keys:
        net = build_model(arch, n_classes, size).to(device)
        optimiser = torch.optim.SGD(net.parameters(), lr=0.01)
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, n_classes, (batch,), device=device)

        def step(net=net, optimiser=optimiser, images=images, labels=labels) -> None:
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(net(images), labels).backward()
            optimiser.step()
        rates[(arch, size, batch)] = _timed(step, repeats=2)
    return rates


MIN_CLASSIFIER_STEPS = 100  # fewer SGD steps and a classifier's accuracy is mostly its initialisation's


def uninformative(work: dict[str, Work], data_size: int, native: int | None, n_classes: int) -> list[str]:
    """What makes a study unable to answer, known before any unit runs: classifier runs too short to learn the data,
    a generator whose images are far smaller than the data's (every synthetic image is an upsampled thumbnail)."""
    notes = []
    steps = [s for w in work.values() for s in w.classifier.values()]
    if steps and min(steps) < MIN_CLASSIFIER_STEPS:
        notes.append(f"some classifier runs take {min(steps):.0f} SGD steps, too few to learn {n_classes} classes (their "
                     f"accuracy is mostly noise, and so are the gains): give train: {{steps: 300}} or more epochs")
    if native is not None and data_size > 2 * native:
        notes.append(f"the model makes {native} px images and the data is {data_size} px: every synthetic image is a "
                     f"{data_size / native:.0f}x upsampled thumbnail; use a model made at {data_size // 2} px or more (or "
                     f"train the classifiers at --train-resolution {native})")
    return notes




# Measured (16 images, docs/guide.md): trained bases +0.9 to +4.7 dB, on their own data and on unseen X-rays; a base
# pretrained 300 steps, whose samples are coloured noise, -0.1 dB on its own data; random weights -15 to -34 dB.
NOISE_DB = 0.5
NOISE_TIMESTEPS = (0.3, 0.5, 0.7)  # fractions of the schedule


def sample_pixels(images: Any, resolution: int, n: int = 16) -> torch.Tensor:
    """``n`` images spread evenly over ``images`` (every class, a fixed choice), [n, 3, R, R] in [-1, 1]."""
    from diffinv.data.real import image_to_uint8

    picks = sorted({round(i * (len(images) - 1) / max(1, n - 1)) for i in range(n)})
    return torch.stack([image_to_uint8(images.image(i), resolution) for i in picks]).float() / 127.5 - 1


@torch.no_grad()
def denoising_gain(backbone: Any, pixels: torch.Tensor, seed: int = 0) -> float:
    """How much better than the per-value Wiener filter ``backbone`` removes noise from these images, unconditioned
    (zero tokens), in dB, averaged over NOISE_TIMESTEPS. Near or below 0: it learned nothing about such images, and its
    samples around them are mostly noise. pixels [B, 3, H, W] in [-1, 1]."""
    from diffinv.diffusion.objective import gain_over_wiener_db, wiener_estimate

    x0 = backbone.encode(pixels).mean
    dims = [0, 2, 3]
    mean, var = x0.mean(dim=dims), x0.var(dim=dims).clamp_min(1e-6)
    generator = torch.Generator().manual_seed(seed)
    cond = torch.zeros(len(x0), 5 + backbone.extra_tokens, backbone.cond_dim, device=x0.device)
    gains = []
    for fraction in NOISE_TIMESTEPS:
        t = torch.full((len(x0),), int(fraction * backbone.num_train_timesteps), device=x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        process = backbone.process
        x_t = process.add_noise(x0, noise, t)
        _, x0_model = process.split(backbone.predict(x_t, process.model_time(t), cond), x_t, t)
        signal, spread = process.levels(t)
        gains.append(gain_over_wiener_db(x0, x0_model, wiener_estimate(x_t, signal.to(x0.device), spread.to(x0.device), mean, var)))
    return sum(gains) / len(gains)


def noise_note(backbone: Any, images: Any, resolution: int) -> tuple[float, str | None]:
    """(the base's :func:`denoising_gain` on ``images``, a warning when it is below NOISE_DB)."""
    gain_db = denoising_gain(backbone, sample_pixels(images, resolution).to(backbone.device))
    if gain_db >= NOISE_DB:
        return gain_db, None
    return gain_db, (f"the model removes noise from these images only {gain_db:+.1f} dB better than a filter that sees one "
                     f"value at a time (our trained bases: +0.9 to +4.7 dB, unseen X-rays included; one pretrained 300 "
                     f"steps, whose samples are coloured noise: -0.1 dB): it has learned little of such images, and what it samples "
                     f"around them will be mostly noise. Pretrain it longer or on data like yours, or choose another --model")
