"""Typed, frozen configs, one per stage.

Precedence: dataclass defaults < YAML file (``--config``) < command-line flags. The resolved
config is written beside every output so a result can always be traced to what made it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value or file is wrong; the message says which and what to do."""


@dataclass(frozen=True)
class InvertConfig:
    """Stage 1: learn one conditioning (tokens x width) per real image.

    Fields that change the result are listed in :attr:`RESULT_FIELDS`; the others (device,
    batch size, logging) only change how fast it is computed.
    """

    model: str = ""
    data: str = ""
    format: str = "auto"
    split: str = "train"
    per_class: int | None = None
    subset_seed: int = 0
    resolution: int = 32
    tokens: int = 5
    steps: int = 3000
    lr: float = 3e-2
    weight_decay: float = 1e-2
    init_std: float = 1.0
    # "random": keyed N(0, init_std^2), the paper's start. "encoder": the tokens the base's own
    # encoder gives the image (bases from `diffinv pretrain-base` only), then optimised as usual.
    init: str = "random"
    latent: str = "sample"  # "sample": draw from the VAE posterior each step (paper); "mean"
    eval_timesteps: int = 8
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    # Execution-only fields (do not change the result).
    batch_size: int = 64
    device: str = "auto"
    checkpoint_every: int = 200
    log_every: int = 25
    bad_images: str = "skip"  # skip | error
    # "image": one conditioning per image (Diffusion Inversion). "class": one per class, learned
    # from all of the class's images (textual inversion / DA-Fusion), the rival it must beat.
    target: str = "image"
    # An image whose loss is not finite is inverted again at lr/10, then lr/100 ...; after this
    # many retries it is reported and left out of the store (its row says which lr it used).
    nan_retries: int = 2

    RESULT_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "model", "data", "format", "split", "per_class", "subset_seed", "resolution", "tokens",
        "steps", "lr", "weight_decay", "init_std", "init", "latent", "eval_timesteps", "seed", "precision", "target",
    )

    def __post_init__(self) -> None:
        _check(self.tokens >= 1, "tokens must be >= 1")
        _check(self.steps >= 1, "steps must be >= 1")
        _check(self.resolution >= 8, "resolution must be >= 8 pixels")
        _check(self.batch_size >= 1, "batch-size must be >= 1")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.per_class is None or self.per_class >= 1, "per-class must be >= 1")
        _check(self.eval_timesteps >= 1, "eval-timesteps must be >= 1")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint/log intervals must be >= 1")
        _check(self.nan_retries >= 0, "nan-retries must be >= 0")
        _one_of("latent", self.latent, ("sample", "mean"))
        _one_of("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _one_of("bad-images", self.bad_images, ("skip", "error"))
        _one_of("target", self.target, ("image", "class"))
        _one_of("init", self.init, ("random", "encoder"))
        _check(self.init == "random" or self.target == "image", "--init encoder is for per-image inversion (--target image)")


METHODS = ("di", "prompt", "class-inversion", "img2img")
SAMPLERS = ("ddim", "dpm++2m", "euler", "pndm")
CLIPPING_SAMPLERS = ("ddim", "dpm++2m")  # diffusers schedulers with x0 thresholding
# pretrain-base's noise schedules: name -> (beta_start, beta_end), as diffusers' beta_schedule names them.
BETA_SCHEDULES = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}


@dataclass(frozen=True)
class GenerateConfig:
    """Stage 2: sample new images around the learned conditionings of a store.

    ``method`` picks Diffusion Inversion (``di``) or one of the rivals it is compared with,
    all through the same sampler, guidance and output code so the comparison is fair.
    """

    store: str = ""
    model: str = ""  # empty: the model the store was made with
    method: str = "di"
    per_image: int = 5
    interp: float = 0.1  # s: c_i + s (c_j - c_i)
    interp_mode: str = "linear"  # linear | spherical
    noise: float = 0.1  # sigma of the Gaussian added to the conditioning
    guidance: float = 2.0
    uncond: str = "mean"  # CFG's unconditional input: mean of the store | mean of the sample's class
    sampler: str = "ddim"  # deterministic (eta 0); see benchmarks/sample_speed.py for why
    steps: int = 25
    eta: float = 0.0  # DDIM only: 0 is deterministic
    # Pixel-space models: clip every step's predicted clean image to [-1, 1] (DDPM's clip_sample).
    # It keeps a small base's diverging trajectories in range; wrong for latents, so refused there.
    clip_x0: bool = False
    # Rescale each sample's starting noise to RMS 1, its expected size. At 16 px (768 values) the
    # RMS of a draw varies by +-2.6%, and a small pixel base amplifies the excess ~12x on its first
    # step into a diverging sample; SD's 16,384 latent values vary 5x less, so it changes little there.
    unit_noise: bool = False
    strength: float = 0.5  # img2img: how far each real image is noised before denoising
    img2img_embedding: str = "own"  # img2img: the image's own embedding, or its class's (needs class_store)
    class_store: str = ""  # a store from `diffinv invert --target class`
    templates: tuple[str, ...] = ("a photo of a {}",)  # prompt method; {} is the class name
    save_size: int | None = None  # None: the inversion resolution
    seed: int = 0
    precision: str = "auto"
    # Execution-only fields.
    batch_size: int = 64
    device: str = "auto"

    RESULT_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "store", "model", "method", "per_image", "interp", "interp_mode", "noise", "guidance", "uncond", "sampler",
        "steps", "eta", "clip_x0", "unit_noise", "strength", "img2img_embedding", "class_store", "templates", "save_size",
        "seed", "precision",
    )

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        _one_of("sampler", self.sampler, SAMPLERS)
        _check(not self.clip_x0 or self.sampler in CLIPPING_SAMPLERS,
               f"clip-x0 needs --sampler {' or '.join(CLIPPING_SAMPLERS)} (the schedulers that can clip x0)")
        _one_of("interp-mode", self.interp_mode, ("linear", "spherical"))
        _one_of("uncond", self.uncond, ("mean", "class-mean"))
        _one_of("img2img-embedding", self.img2img_embedding, ("own", "class"))
        _one_of("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check(self.per_image >= 1, "per-image must be >= 1")
        _check(0.0 <= self.interp <= 1.0, f"interp must be in [0, 1]; got {self.interp}")
        _check(self.noise >= 0.0, f"noise must be >= 0; got {self.noise}")
        _check(self.guidance >= 0.0, f"guidance must be >= 0 (1 = no guidance); got {self.guidance}")
        _check(1 <= self.steps <= 1000, f"steps must be in [1, 1000]; got {self.steps}")
        _check(0.0 <= self.eta <= 1.0, f"eta must be in [0, 1]; got {self.eta}")
        _check(0.0 < self.strength <= 1.0, f"strength must be in (0, 1]; got {self.strength}")
        _check(self.save_size is None or self.save_size >= 1, "save-size must be >= 1")
        _check(self.batch_size >= 1, "batch-size must be >= 1")
        _check(len(self.templates) >= 1 and all("{}" in t for t in self.templates),
               "every prompt template must contain {} where the class name goes, e.g. 'a photo of a {}'")


ARCHS = ("resnet18", "resnet50", "vgg16", "mobilenetv2", "efficientnet-b0", "shufflenetv2")
AUGS = ("none", "crop-flip", "autoaugment", "randaugment")


@dataclass(frozen=True)
class TrainConfig:
    """Stage 3: a classifier trained on real, synthetic or both, evaluated on the real test split.

    Real images are a seeded subset of ``per_class`` per class (the same rule as ``invert``, so
    ``subset_seed`` picks the images a store was made from). With ``real_batch`` and
    ``syn_batch`` both set, every batch holds that many of each (the paper's fixed split);
    otherwise real and synthetic images are pooled.
    """

    data: str = ""
    format: str = "auto"
    split: str = "train"
    eval_split: str = "test"
    per_class: int | None = None
    subset_seed: int = 0
    synthetic: tuple[str, ...] = ()  # folders from `diffinv generate`
    use: str = "auto"  # auto (both if synthetic is given, else real) | real | synthetic | both
    real_batch: int = 0
    syn_batch: int = 0
    arch: str = "resnet18"  # or timm:<name>
    stem: str = "auto"  # auto: small-image stem below 64 px
    resolution: int | None = None  # None: the data's own size, at least 32 px
    epochs: float = 30.0
    steps: int = 0  # > 0 overrides epochs
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.05  # fraction of the steps with linear warm-up, then cosine to zero
    label_smoothing: float = 0.0
    aug: str = "crop-flip"
    mixup: float = 0.0  # Beta alpha; 0 = off
    cutmix: float = 0.0
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; bf16 also pays off on CPUs with AMX
    # Execution-only fields.
    eval_every: int = 0  # steps between evaluations; 0: ten over the run
    eval_batch_size: int = 500
    checkpoint_every: int = 0  # steps; 0: at every evaluation
    channels_last: bool = True
    device: str = "auto"
    bad_images: str = "skip"

    RESULT_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "data", "format", "split", "eval_split", "per_class", "subset_seed", "synthetic", "use", "real_batch", "syn_batch",
        "arch", "stem", "resolution", "epochs", "steps", "batch_size", "lr", "momentum", "weight_decay", "warmup",
        "label_smoothing", "aug", "mixup", "cutmix", "seed", "precision",
    )

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS or self.arch.startswith("timm:"),
               f"arch must be one of {', '.join(ARCHS)} or timm:<name>; got {self.arch!r}")
        _one_of("stem", self.stem, ("auto", "cifar", "imagenet"))
        _one_of("use", self.use, ("auto", "real", "synthetic", "both"))
        _one_of("aug", self.aug, AUGS)
        _one_of("precision", self.precision, ("auto", "fp32", "bf16"))
        _one_of("bad-images", self.bad_images, ("skip", "error"))
        _check(self.per_class is None or self.per_class >= 1, "per-class must be >= 1")
        _check(self.resolution is None or self.resolution >= 8, "resolution must be >= 8 pixels")
        _check(self.epochs > 0 or self.steps > 0, "give epochs > 0 or steps > 0")
        _check(self.steps >= 0 and self.batch_size >= 1 and self.eval_batch_size >= 1, "steps and batch sizes must be >= 0 / >= 1")
        _check(self.real_batch >= 0 and self.syn_batch >= 0, "real-batch and syn-batch must be >= 0")
        _check((self.real_batch > 0) == (self.syn_batch > 0), "give both --real-batch and --syn-batch (the split of every batch), or neither")
        _check(self.lr > 0 and 0.0 <= self.warmup < 1.0, "lr must be > 0 and warmup a fraction in [0, 1)")
        _check(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix are Beta alphas >= 0 (0 = off)")
        _check(0.0 <= self.label_smoothing < 1.0, "label-smoothing must be in [0, 1)")
        _check(self.eval_every >= 0 and self.checkpoint_every >= 0, "eval/checkpoint intervals must be >= 0")
        _check(self.use not in ("synthetic", "both") or bool(self.synthetic), f"use {self.use} needs --synthetic folders")



@dataclass(frozen=True)
class PretrainConfig:
    """The project's own base generator: a diffusion autoencoder trained on unlabeled images.

    A small SD-architecture UNet (diffusers ``UNet2DConditionModel`` with cross-attention) in
    pixel space reads K tokens that a small encoder makes from the training image; the tokens
    are dropped with probability ``cond_dropout`` so classifier-free guidance has an
    unconditional mode. Labels are never read, and the test split is refused.
    """

    data: str = "digits"
    format: str = "auto"
    split: str = "train"
    resolution: int = 8  # digits are 8 x 8; natural images want 32 or more
    channels: tuple[int, ...] = (32, 64)  # UNet block widths; every block has cross-attention
    layers_per_block: int = 2
    cross_attention_dim: int = 64  # D of a conditioning token
    tokens: int = 5  # K
    prediction_type: str = "epsilon"
    # Noise schedule: scaled_linear is Stable Diffusion's (betas 0.00085-0.012, sqrt(alpha_bar_T) =
    # 0.068), linear is DDPM's pixel-space one (1e-4-0.02, 0.006). On the 1,400-step PneumoniaMNIST
    # base, linear did not cure the diverging samples (bases/README.md), so SD's stays the default.
    beta_schedule: str = "scaled_linear"
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    cond_dropout: float = 0.1
    ema: float = 0.999  # decay of the weights' exponential moving average (what is saved)
    hflip: bool = False  # random horizontal flips: off for digits and text, on for natural images
    # More unlabeled training images (train splits, never test), e.g. MNIST beside digits: a base
    # that has seen more than the target data has more to fill in around an inverted image.
    extra_data: tuple[str, ...] = ()
    # "same": the encoder sees the image the UNet denoises (a diffusion autoencoder; its tokens can
    # pin the whole image). "invariant": the encoder sees a strongly augmented view (crop, small
    # rotation, colour jitter) and the UNet an independently flipped original, so the tokens keep
    # content and lose pose and colour, which sampling then varies (see diffusion/views.py).
    views: str = "same"
    view_min_area: float = 0.35  # smallest crop of the encoder's view, as a fraction of the area
    token_noise: float = 0.0  # std of Gaussian noise on the (unit-scale) tokens in training: a lossy bottleneck
    image_channels: int = 0  # 0: 1 when every training image is grey (R = G = B), else 3
    seed: int = 0
    precision: str = "auto"
    # Execution-only fields.
    device: str = "auto"
    checkpoint_every: int = 250
    log_every: int = 50
    bad_images: str = "skip"
    # Stop after this many seconds of training (0: never) and save what was reached; the saved
    # config then says the steps actually taken, so the same command with --steps N reproduces it
    # (the learning rate is constant after warm-up, so stopping early is a valid shorter run).
    max_seconds: float = 0.0

    RESULT_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "data", "format", "split", "resolution", "channels", "layers_per_block", "cross_attention_dim", "tokens",
        "prediction_type", "beta_schedule", "steps", "batch_size", "lr", "warmup", "cond_dropout", "ema", "hflip",
        "extra_data", "views", "view_min_area", "token_noise", "image_channels", "seed", "precision",
    )

    def __post_init__(self) -> None:
        _check(self.split != "test", "pretraining never reads a test split; use the training split (--split train)")
        _check(self.resolution >= 8 and self.resolution % 2 ** (len(self.channels) - 1) == 0,
               f"resolution must be >= 8 and a multiple of {2 ** (len(self.channels) - 1)} (one halving per extra block)")
        _check(len(self.channels) >= 2 and all(c >= 8 and c % 8 == 0 for c in self.channels),
               "channels: two or more block widths, each a multiple of 8")
        _check(self.layers_per_block >= 1 and self.tokens >= 1 and self.cross_attention_dim >= 8,
               "layers-per-block and tokens must be >= 1, cross-attention-dim >= 8")
        _check(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0 and self.warmup >= 0, "steps, batch-size, lr must be positive")
        _check(0.0 <= self.cond_dropout < 1.0, "cond-dropout must be in [0, 1)")
        _check(0.0 <= self.ema < 1.0, "ema must be in [0, 1) (0 = no averaging)")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint/log intervals must be >= 1")
        _one_of("prediction-type", self.prediction_type, ("epsilon", "v_prediction"))
        _one_of("beta-schedule", self.beta_schedule, tuple(BETA_SCHEDULES))
        _one_of("views", self.views, ("same", "invariant"))
        _check(0.05 <= self.view_min_area <= 1.0, f"view-min-area must be in [0.05, 1]; got {self.view_min_area}")
        _check(self.token_noise >= 0.0, f"token-noise must be >= 0; got {self.token_noise}")
        _check(self.image_channels in (0, 1, 3), "image-channels must be 0 (auto), 1 or 3")
        _check(self.max_seconds >= 0.0, "max-seconds must be >= 0 (0 = no limit)")
        _one_of("precision", self.precision, ("auto", "fp32", "bf16"))
        _one_of("bad-images", self.bad_images, ("skip", "error"))



@dataclass(frozen=True)
class DemoConfig:
    """The one-command proof: few-shot real data, inverted into a base, variants generated, classifiers compared.

    Every cell trains the same classifier on real only, real + Diffusion Inversion, and real +
    the rival (img2img / SDEdit from each real image with its own embedding, as in DA-Fusion),
    over ``seeds``; equal synthetic counts for both generators.
    """

    data: str = "digits"
    base: str = ""  # empty: the base model embedded in the package (digits)
    # Real images per class; several sizes make a sample-efficiency study (each size is inverted
    # and generated on its own; the seeded subsets are nested, 5 of 10 of 20).
    per_class: tuple[int, ...] = (5,)
    # Extra real-only sizes, so the real-only curve reaches past the sizes given synthetic data
    # and "worth N real images per class" is interpolated rather than a lower bound.
    real_sizes: tuple[int, ...] = ()
    subset_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    invert_steps: int = 200
    invert_init: str = "random"  # or "encoder": start c_i from the base's encoder tokens
    per_image: int = 5
    sample_steps: int = 25
    guidance: float = 2.0
    noise: float = 0.1
    interp: float = 0.1
    strength: float = 0.5  # the rival's img2img strength
    clip_x0: bool = False  # both generators: clip predicted clean images to [-1, 1] (pixel bases)
    unit_noise: bool = False  # both generators: starting noise rescaled to RMS 1 per sample
    arch: str = "shufflenetv2"  # ~5x ResNet-18's speed on a CPU at 16 px
    # The paper's 0.1 is for batches of 128 on whole datasets; on 50 images in batches of 32 it
    # diverged (MobileNetV2: 29% real-only at 0.1, 73% at 0.02; ShuffleNetV2 at 0.05: 81%).
    train_lr: float = 0.05
    train_steps: int = 100
    train_batch: int = 32
    # Runs with synthetic data take this many real images in every batch, the rest synthetic (the
    # paper's fixed split); 0 pools real and synthetic. Pooled, 50 real images among 250 variants
    # are seen a sixth as often as in the real-only run.
    train_real_batch: int = 16
    train_resolution: int = 16
    device: str = "auto"

    def __post_init__(self) -> None:
        _one_of("invert-init", self.invert_init, ("random", "encoder"))
        _check(0 <= self.train_real_batch < self.train_batch, "train-real-batch must be >= 0 and below train-batch")
        _check(len(self.per_class) >= 1 and min(self.per_class + self.real_sizes) >= 1 and len(self.seeds) >= 1,
               "per-class and real-sizes must be >= 1, and at least one size and one seed given")
        _check(self.invert_steps >= 1 and self.per_image >= 1 and self.sample_steps >= 1 and self.train_steps >= 1,
               "step counts and per-image must be >= 1")
        _check(self.arch in ARCHS or self.arch.startswith("timm:"), f"arch must be one of {', '.join(ARCHS)} or timm:<name>")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """Build ``cls`` from its defaults, an optional YAML file, then non-None ``overrides``.

    Unknown YAML keys are an error (a typo must not be silently ignored).
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of option: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{k: _coerce(hints[k], v, k) for k, v in values.items()})
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ConfigError(str(exc)) from exc


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """YAML already types values; this only widens ints to floats and checks the rest."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if typing.get_origin(hint) in (tuple, list):
        item = args[0] if args else str
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        if item is int and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            # From a flag: "64,128" or "64 128".
            value = [v for part in value for v in part.replace(",", " ").split()]
            if not all(v.isdigit() for v in value):
                raise ConfigError(f"option {name} must be a list of integers, got {value!r}")
            value = [int(v) for v in value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            kind = "strings" if item is str else "integers"
            raise ConfigError(f"option {name} must be a list of {kind}, got {value!r}")
        return tuple(value)
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    wrong_type = target in (int, str, bool) and not isinstance(value, target)
    if wrong_type or (target is int and isinstance(value, bool)):  # bool is an int subclass; "true" is not a count
        raise ConfigError(f"option {name} must be {target.__name__}, got {value!r}")
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML-safe values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def result_fields(config: Any) -> dict[str, Any]:
    """The subset of a config that determines its result (for resume / mismatch checks)."""
    names = getattr(config, "RESULT_FIELDS", None) or [f.name for f in fields(config)]
    return {n: getattr(config, n) for n in names}
