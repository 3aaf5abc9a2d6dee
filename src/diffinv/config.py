"""Typed, frozen configs, one per stage, each field with its help, choices and whether it changes the result.

Precedence: dataclass defaults < YAML file (``--config``) < command-line flags. The resolved
config is written beside every output so a result can always be traced to what made it. The
command line is generated from these fields (:mod:`diffinv.cli`), so a new field is one line
here: its flag, help and choices follow, and it counts in the resume check unless it is marked
``execution_only`` (fields that change only how fast or where a result is computed).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from diffinv.errors import UserError, brief

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")  # autocast: fp16 would need a gradient scaler
BAD_IMAGES = ("skip", "error")
# Sampler name -> (diffusers scheduler class, settings). PNDM without its Runge-Kutta warm-up is
# what Stable Diffusion v1-4 (and the paper's code) uses; DDIM with eta 0 is our default.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
CLIPPING_SAMPLERS = ("ddim", "dpm++2m")  # diffusers schedulers with x0 thresholding
# pretrain-base's noise schedules: name -> (beta_start, beta_end), as diffusers' beta_schedule names them.
BETA_SCHEDULES = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}
AUGS = ("none", "crop-flip", "autoaugment", "randaugment")


class ConfigError(UserError, ValueError):
    """A config value or file is wrong; the message says which and what to do."""


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, execution_only: bool = False,
        flag: str | None = None, action: str | None = None, metavar: str | None = None, cli: bool = True) -> Any:
    """A config field with what the command line and the resume check need to know of it.

    ``help`` and ``choices`` make its flag; ``execution_only`` fields (device, batch sizes,
    logging) do not change the result, so an output may be continued with other values;
    ``flag`` and ``action`` override the generated flag (e.g. ``--template`` appended to ``templates``);
    ``cli=False`` fields have no flag (YAML only).
    """
    return field(default=default, metadata={"help": help, "choices": choices, "execution_only": execution_only,
                                            "flag": flag, "action": action, "metavar": metavar, "cli": cli})


@dataclass(frozen=True)
class InvertConfig:
    """Stage 1: learn one conditioning (tokens x width) per real image."""

    model: str = opt("", "diffusers folder, .safetensors file or hub id (downloaded into the Hugging Face cache when online)")
    data: str = opt("", "image folder, .npz, .csv, idx folder, 'digits' or 'hf:NAME'")
    format: str = opt("auto", "how to read --data")  # choices: diffinv.data.real.OPENERS, given by the CLI
    split: str = opt("train", "data split to read")
    per_class: int | None = opt(None, "seeded subset of K images per class (default: all)")
    subset_seed: int = opt(0, "seed of the per-class subset")
    val_per_class: int = opt(0, "images per class held out for validation, never drawn into a subset (as train's)")
    preset: str = opt("", "paper: the official code's recipe (its init, group update pattern, fp32); flags and --config "
                      "still override single settings", choices=("", "paper"))
    resolution: int | None = opt(None, "images are resized (bicubic) to R x R (default: chosen from the model and the data: "
                                 "a pixel model's own size; for latent models 128 px for images up to 32 px, 256 up to 96, "
                                 "capped at the model's size)")
    tokens: int = opt(5, "conditioning tokens K per image")
    # A tenth of the paper's 3,000 steps reaches its loss with this schedule (docs/performance.md, "Inversion cost").
    steps: int = opt(300, "gradients per image (--update group: each is group-size/group-batch optimiser updates; "
                          "0 with --init encoder|text|class keeps the start: the no-inversion ablation)")
    lr: float = opt(0.3, "AdamW peak learning rate")
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    init_std: float = opt(1.0, "std of the random initial conditioning (--init random)")
    # The official code's embeddings are the columns of an nn.Linear(n, K*D) with PyTorch's default
    # init, U(-1/sqrt(n), 1/sqrt(n)) for groups of n images: about +-0.1, ten times smaller than N(0, 1).
    init: str = opt("random", "start c_i from keyed N(0, init-std^2), from U(+-1/sqrt(group-size)) (the official code's), "
                    "from the base's encoder tokens (pretrain-base models) or from the text encoder's tokens of "
                    "--init-template (text-to-image models), or from its class's row of --init-store",
                    choices=("random", "uniform", "encoder", "text", "class"))
    init_template: str = opt("a photo of a {}", "--init text: the prompt, {} is the class name; its last K tokens are the start")
    # A short class-level inversion shared by the class: `invert --target class` first, then
    # every image of a class starts from that class's conditioning.
    init_store: str = opt("", "--init class: a store made by `diffinv invert --target class` on the same model and classes")
    # "own": every image gets a gradient and an AdamW update at every step (batch-invariant).
    # "group": the official loop: groups of group_size images share one AdamW, and each optimiser
    # step trains one batch of group_batch of them in order; AdamW (momentum, weight decay) moves
    # every embedding of the group every step, so 3000 gradients per image are 6000 updates.
    update: str = opt("own", "own: each image a gradient and an update per step; group: the official loop's pattern "
                      "(groups of --group-size share one AdamW, each step trains --group-batch of them in order)",
                      choices=("own", "group"))
    group_size: int = opt(100, "--update group: images per group (results depend on it)")
    group_batch: int = opt(50, "--update group: images per optimiser step (results depend on it)")
    lr_schedule: str = opt("cosine", "learning rate over an image's steps: cosine to 0, or constant (the paper)",
                           choices=("constant", "cosine"))
    warmup: int = opt(10, "steps of linear learning-rate warm-up (at most a tenth of the steps)")
    # Importance sampling lowers the loss at a fixed step count (docs/performance.md, "Inversion cost").
    timesteps: str = opt("importance", "an image's training timesteps: stratified along its steps, i.i.d. uniform (the paper), "
                         "or importance: after one pilot draw per tenth of the schedule, drawn where its gradients are "
                         "largest and reweighted (same expected loss, less gradient noise)",
                         choices=("uniform", "stratified", "importance"))
    # Antithetic pairs cancel part of the noise draw's variance (docs/performance.md, "Inversion cost").
    draws: str = opt("antithetic", "an image's training noise: antithetic pairs (step 2k+1 reuses step 2k's timestep and "
                     "latent draw, noise negated) or independent draws (the paper)", choices=("independent", "antithetic"))
    # Per-image early stopping: an image whose evaluation loss (fixed draws) has not fallen by this fraction
    # below its best for `patience` checks in a row is finished, and the next image takes its slot.
    early_stop: float = opt(0.0, "finish an image when --patience checks in a row did not lower its evaluation loss by this "
                            "fraction (e.g. 0.01; 0: every image runs --steps); the next image takes its slot")
    check_every: int = opt(25, "--early-stop: steps between an image's loss checks (each costs eval-timesteps forward passes)")
    patience: int = opt(2, "--early-stop: checks without improvement before an image is finished")
    latent: str = opt("sample", "sample the VAE posterior each step (the paper) or use its mean", choices=("sample", "mean"))
    eval_timesteps: int = opt(8, "timesteps of the final per-image loss")
    seed: int = opt(0, "seed of all noise and initialisation")
    precision: str = opt("auto", "auto: bf16 on GPUs with bf16 units, else fp32", choices=PRECISIONS)
    # An SD 2.x checkpoint read without its scheduler config may say v_prediction for a 512 px epsilon
    # model (or the reverse); the store records the type used and generation follows it.
    prediction_type: str = opt("", "what the UNet predicts, overriding the model's scheduler config (default: the model's)",
                               choices=("", "epsilon", "v_prediction"))
    # Original-format (CompVis) single files carry no diffusers configs; offline, their inference YAML
    # is what says the architecture, the noise schedule and (SD 2.x) epsilon vs v-prediction.
    original_config: str = opt("", "a single-file checkpoint's original inference YAML (e.g. v1-inference.yaml, "
                               "v2-inference-v.yaml): its architecture, schedule and prediction type")
    # "image": one conditioning per image (Diffusion Inversion). "class": one per class, learned
    # from all of the class's images (textual inversion / DA-Fusion), the rival it must beat.
    target: str = opt("image", "one conditioning per image (Diffusion Inversion) or per class (the class-inversion rival)",
                      choices=("image", "class"))
    batch_size: int = opt(0, "images optimised together; does not change results. 0: on a GPU the largest batch that "
                             "fits its free memory (one step measured), 64 on a CPU", execution_only=True)
    channels_last: bool = opt(False, "the UNet in channels-last memory layout (faster convolutions on some GPUs; "
                                     "benchmarks/gpu_suite.py measures it)", execution_only=True)
    compile: str = opt("auto", "torch.compile the UNet (CUDA graphs on CUDA; the last batch padded to --batch-size): on, off, "
                               "or auto (on for CUDA runs of 200,000 image-steps or more, off on CPU, where it does not pay)",
                       choices=("auto", "on", "off"), execution_only=True)
    device: str = opt("auto", "auto, cpu, cuda, cuda:1 ...", execution_only=True)
    checkpoint_every: int = opt(200, "checkpoint the batch in progress every N steps", execution_only=True)
    log_every: int = opt(25, "progress / NaN check interval in steps", execution_only=True)
    bad_images: str = opt("skip", "unreadable images: skip them (reported) or stop", choices=BAD_IMAGES, execution_only=True)
    # An image whose loss is not finite is inverted again at lr/10, then lr/100 ...; after this
    # many retries it is reported and left out of the store (its row says which lr it used).
    nan_retries: int = opt(2, "re-invert an image whose loss is not finite at lr/10, lr/100 ... this many times",
                           execution_only=True)

    def __post_init__(self) -> None:
        _check(self.tokens >= 1, "tokens must be >= 1")
        # 0 steps keeps a computed start as it is: with --init encoder that is "DI with the encoder's own
        # tokens", the ablation that says whether inversion itself is needed.
        _check(self.steps >= 1 or (self.steps == 0 and self.init in ("encoder", "text", "class") and not self.early_stop),
               f"steps must be >= 1 (0 only with --init encoder, text or class: the start kept as it is); got {self.steps}")
        _check(self.resolution is None or self.resolution >= 8, "resolution must be >= 8 pixels")
        _check(self.batch_size >= 0, "batch-size must be >= 1, or 0 for the largest that fits the GPU")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.per_class is None or self.per_class >= 1, "per-class must be >= 1")
        _check(self.eval_timesteps >= 1, "eval-timesteps must be >= 1")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint/log intervals must be >= 1")
        _check(self.nan_retries >= 0, "nan-retries must be >= 0")
        _check(self.val_per_class >= 0, "val-per-class must be >= 0")
        _check_choices(self)
        _check(self.init != "encoder" or self.target == "image", "--init encoder is for per-image inversion (--target image)")
        _check(self.init != "text" or "{}" in self.init_template, "--init-template must contain {} where the class name goes")
        _check(self.init != "class" or (bool(self.init_store) and self.target == "image"),
               "--init class needs --init-store (a store from `diffinv invert --target class`) and per-image inversion")
        _check(self.update == "own" or self.target == "image", "--update group is for per-image inversion (--target image)")
        _check(0 <= self.early_stop < 1 and self.check_every >= 1 and self.patience >= 1,
               "early-stop must be in [0, 1), check-every and patience >= 1")
        _check(not self.early_stop or (self.update == "own" and self.target == "image"),
               "--early-stop is for per-image inversion with --update own (a group or class shares one optimiser)")
        _check(self.update == "own" or (self.group_size >= 1 and 1 <= self.group_batch <= self.group_size),
               f"group-batch must be in [1, group-size]; got {self.group_batch} of {self.group_size}")
        _check(self.warmup >= 0, f"warmup must be >= 0; got {self.warmup}")


@dataclass(frozen=True)
class GenerateConfig:
    """Stage 2: sample new images around the learned conditionings of a store.

    ``method`` picks Diffusion Inversion (``di``) or one of the rivals it is compared with
    (:mod:`diffinv.diffusion.methods`), all through the same sampler, guidance and output code.
    """

    store: str = opt("", "embedding store from `diffinv invert` (per class for --method class-inversion)")
    model: str = opt("", "model (default: the one the store was made with)")
    method: str = opt("di", "di (Diffusion Inversion) or a rival: the registered generation methods")
    preset: str = opt("", "paper: the official code's sampling (PNDM 100 steps, guidance 2 on the mean embedding, s = sigma "
                      "= 0.1, its partner rule); flags and --config still override single settings", choices=("", "paper"))
    # "one": each sample its own keyed partner, another image of its class. "paper": the official
    # rule: an image's per_image partners are drawn from its class without replacement, itself
    # included; a class with fewer than per_image other images gives all of them, the rest drawn
    # from other classes.
    partners: str = opt("one", "partner rule: one keyed same-class partner per sample, or the official code's (per image, "
                        "without replacement, itself included)", choices=("one", "paper"))
    per_image: int = opt(5, "samples per real image; per-class methods make as many per class")
    interp: float = opt(0.1, "s, the step towards a same-class partner: c_i + s (c_j - c_i)")
    interp_mode: str = opt("linear", "interpolation of the partner step", choices=("linear", "spherical"))
    noise: float = opt(0.1, "sigma of the Gaussian added to the conditioning")
    guidance: float = opt(2.0, "classifier-free guidance scale (1 = none)")
    uncond: str = opt("mean", "guidance's unconditional input: mean embedding of the store or of the sample's class",
                      choices=("mean", "class-mean"))
    # Chosen by downstream accuracy on validation (configs/studies/digits-k5-sampler.yaml; docs/performance.md).
    sampler: str = opt("dpm++2m", "dpm++2m (DPM-Solver++ 2M), ddim (deterministic, eta 0), euler or pndm (the paper's); "
                                  "--method ddim-inversion samples with ddim unless told otherwise", choices=tuple(SAMPLERS))
    steps: int = opt(10, "sampling steps (one batched UNet call each, guidance included)")
    eta: float = opt(0.0, "DDIM noise (0 = deterministic)")
    # Pixel-space models: clip every step's predicted clean image to [-1, 1] (DDPM's clip_sample).
    # It keeps a small base's diverging trajectories in range; wrong for latents, so refused there.
    clip_x0: bool = opt(False, "pixel models, ddim/dpm++2m: clip every step's predicted clean image to [-1, 1]")
    # Rescale each sample's starting noise to RMS 1: small pixel bases amplify a draw's excess size into
    # a diverging sample (bases/README.md); SD's larger latents vary less, so it changes little there.
    unit_noise: bool = opt(False, "rescale each sample's starting noise to RMS 1 (steadies small pixel bases)")
    strength: float = opt(0.5, "img2img: fraction of the schedule each real image is noised to")
    img2img_embedding: str = opt("own", "img2img: the image's own embedding or its class's (needs --class-store)",
                                 choices=("own", "class"))
    class_store: str = opt("", "per-class store (`diffinv invert --target class`) for --img2img-embedding class")
    adapters: str = opt("", "lora / di+lora: a folder of `diffinv finetune` (one LoRA adapter of the UNet per class)")
    pool: tuple[str, ...] = opt((), "retrieval: images to retrieve from (a dataset or an image folder; repeat for several); "
                                "default: the data the base was pretrained on", action="append")
    space: str = opt("encoder", "retrieval: where neighbours are nearest: the base's token encoder (its VAE latents without "
                     "one), --judge's features, --image-model's features, or raw pixels",
                     choices=("encoder", "judge", "model", "pixels"))
    judge: str = opt("", "retrieval --space judge: a `diffinv train` run whose penultimate features are the space")
    image_model: str = opt("", "retrieval --space model: local weights of an image model (.safetensors or .pth state dict, "
                               "e.g. a timm / torchvision checkpoint) whose penultimate features are the space")
    image_arch: str = opt("", "retrieval --space model: its architecture (timm:NAME, torchvision:NAME or a registered one); "
                              "read from the file for a `diffinv train` model.safetensors")
    image_size: int = opt(0, "retrieval --space model: images are resized to PX x PX for it (0: the store's resolution; "
                             "ImageNet models expect 224)")
    pool_cache: str = opt("", "retrieval: folder caching pool features (default $DIFFINV_CACHE or ~/.cache/diffinv)",
                          execution_only=True)
    bad_images: str = opt("skip", "retrieval: unreadable pool images are skipped (counted) or stop the run",
                          choices=BAD_IMAGES, execution_only=True)
    templates: tuple[str, ...] = opt(("a photo of a {}",), "prompt method: a template with {} for the class name; "
                                     "repeat for several", flag="--template", action="append")
    save_size: int | None = opt(None, "resize the saved images to PX x PX (default: the inversion resolution)")
    seed: int = opt(0, "seed of every sample's randomness")
    precision: str = opt("auto", "auto: bf16 on GPU, fp32 on CPU", choices=PRECISIONS)
    batch_size: int = opt(64, "samples per batch; does not change the images", execution_only=True)
    channels_last: bool = opt(False, "the UNet in channels-last memory layout (faster convolutions on some GPUs; "
                                     "benchmarks/gpu_suite.py measures it)", execution_only=True)
    compile: str = opt("auto", "torch.compile the UNet (CUDA graphs on CUDA; the last batch padded to --batch-size): on, off, "
                               "or auto (on for CUDA runs of 200,000 UNet passes or more, off on CPU)",
                       choices=("auto", "on", "off"), execution_only=True)
    device: str = opt("auto", "auto, cpu, cuda, cuda:1 ...", execution_only=True)

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.method == "ddim-inversion" and self.sampler == "dpm++2m":
            # It runs DDIM's deterministic path backwards, so DDIM is its sampler; the default one cannot be.
            object.__setattr__(self, "sampler", "ddim")
        _check(not self.clip_x0 or self.sampler in CLIPPING_SAMPLERS,
               f"clip-x0 needs --sampler {' or '.join(CLIPPING_SAMPLERS)} (the schedulers that can clip x0)")
        _check(self.per_image >= 1, "per-image must be >= 1")
        _check(0.0 <= self.interp <= 1.0, f"interp must be in [0, 1]; got {self.interp}")
        _check(self.noise >= 0.0, f"noise must be >= 0; got {self.noise}")
        _check(self.guidance >= 0.0, f"guidance must be >= 0 (1 = no guidance); got {self.guidance}")
        _check(1 <= self.steps <= 1000, f"steps must be in [1, 1000]; got {self.steps}")
        _check(0.0 <= self.eta <= 1.0, f"eta must be in [0, 1]; got {self.eta}")
        _check(0.0 < self.strength <= 1.0, f"strength must be in (0, 1]; got {self.strength}")
        _check(self.save_size is None or self.save_size >= 1, "save-size must be >= 1")
        _check(self.image_size >= 0, "image-size must be >= 0 (0: the store's resolution)")
        _check(self.batch_size >= 1, "batch-size must be >= 1")
        _check(len(self.templates) >= 1 and all("{}" in t for t in self.templates),
               "every prompt template must contain {} where the class name goes, e.g. 'a photo of a {}'")


@dataclass(frozen=True)
class TrainConfig:
    """Stage 3: a classifier trained on real, synthetic or both, evaluated on the real test split.

    Real images are a seeded subset of ``per_class`` per class (the same rule as ``invert``, so
    ``subset_seed`` picks the images a store was made from). With ``real_batch`` and
    ``syn_batch`` both set, every batch holds that many of each (the paper's fixed split);
    otherwise real and synthetic images are pooled.
    """

    data: str = opt("", "real data (as for invert); its --split is subset, its --eval-split evaluates")
    format: str = opt("auto", "how to read --data")  # choices: diffinv.data.real.OPENERS, given by the CLI
    split: str = opt("train", "training split")
    eval_split: str = opt("test", "evaluation split")
    per_class: int | None = opt(None, "seeded subset of K real images per class (default: all)")
    subset_seed: int = opt(0, "seed of the subset; the same rule as invert")
    # Settings are chosen on validation data, never on the test split: either a hold-out of the
    # training split (the same images for every seed, never in a subset) or the data's own split.
    val_per_class: int = opt(0, "hold out K images per class of the training split for validation (never in a subset)")
    val_split: str = opt("", "validate on this split of --data instead (e.g. val for MedMNIST)")
    synthetic: tuple[str, ...] = opt((), "a folder from `diffinv generate`; repeat for several", action="append")
    use: str = opt("auto", "what to train on (auto: both if --synthetic)", choices=("auto", "real", "synthetic", "both"))
    real_batch: int = opt(0, "real images in every batch (with --syn-batch; the paper's fixed split)")
    syn_batch: int = opt(0, "synthetic images in every batch")
    arch: str = opt("resnet18", "a registered architecture (diffinv.classify.models), timm:<name> or torchvision:<name>")
    pretrained: str = opt("", "weights to fine-tune from: a local .safetensors (or .pth state dict), or hub / hub:TAG for "
                              "the published weights of a timm:NAME or torchvision:NAME --arch (downloaded into the hub's "
                              "cache where online); the head is fitted to the classes")
    backbone_lr: float = opt(1.0, "with --pretrained: the pretrained layers' lr as a fraction of --lr (the new head: all of it)")
    probe_steps: int = opt(0, "with --pretrained: the first steps train the new head only (a linear probe), then all")
    preset: str = opt("", "few-shot: the usual recipe on a pretrained backbone: a linear probe (100 steps), then all layers "
                          "at a tenth of --lr; flags and --config override it")
    stem: str = opt("auto", "auto: small-image stem below 64 px", choices=("auto", "cifar", "imagenet"))
    resolution: int | None = opt(None, "train at R x R (default: the data's size, at least 32)")
    epochs: float = opt(30.0, "passes over the training set")
    steps: int | None = opt(None, "SGD steps (overrides --epochs)")
    batch_size: int = opt(128, "batch size when pooling")
    lr: float = opt(0.1, "peak SGD learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "weight decay")
    warmup: float = opt(0.05, "fraction of steps of linear warm-up before the cosine")
    label_smoothing: float = opt(0.0, "label smoothing")
    aug: str = opt("crop-flip", "crop-flip, autoaugment / randaugment (both after crop-flip) or none", choices=AUGS)
    mixup: float = opt(0.0, "MixUp Beta alpha (0 = off)")
    cutmix: float = opt(0.0, "CutMix Beta alpha (0 = off)")
    seed: int = opt(0, "seed of initialisation, batch order and augmentation")
    precision: str = opt("auto", "auto: bf16 autocast on GPU, fp32 on CPU; bf16 also pays off on CPUs with AMX",
                         choices=TRAIN_PRECISIONS)
    eval_every: int = opt(0, "steps between evaluations (0: ten over the run)", execution_only=True)
    eval_batch_size: int = opt(500, "images per evaluation batch", execution_only=True)
    checkpoint_every: int = opt(0, "steps between checkpoints (0: at every evaluation)", execution_only=True)
    channels_last: bool = opt(True, "channels-last memory layout", flag="--no-channels-last", execution_only=True)
    device: str = opt("auto", "auto, cpu, cuda ...", execution_only=True)
    bad_images: str = opt("skip", "unreadable images: skip them (reported) or stop", choices=BAD_IMAGES, execution_only=True)

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(self.per_class is None or self.per_class >= 1, "per-class must be >= 1")
        _check(self.resolution is None or self.resolution >= 8, "resolution must be >= 8 pixels")
        _check(self.epochs > 0, "epochs must be > 0")
        _check(self.backbone_lr >= 0 and self.probe_steps >= 0, "backbone-lr and probe-steps must be >= 0")
        _check(bool(self.pretrained) or (self.backbone_lr == 1.0 and self.probe_steps == 0),
               "--backbone-lr and --probe-steps fine-tune pretrained layers: give --pretrained PATH")
        # Refused rather than read as "use --epochs", which would train for 30 epochs without a word.
        _check(self.steps is None or self.steps >= 1, f"steps must be >= 1 (leave it out to train for --epochs); got {self.steps}")
        _check(self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1")
        _check(self.split != self.eval_split, f"the evaluation split cannot be the training split ({self.split!r})")
        _check(self.real_batch >= 0 and self.syn_batch >= 0, "real-batch and syn-batch must be >= 0")
        _check((self.real_batch > 0) == (self.syn_batch > 0),
               "give both --real-batch and --syn-batch (the split of every batch), or neither")
        _check(self.lr > 0 and 0.0 <= self.warmup < 1.0, "lr must be > 0 and warmup a fraction in [0, 1)")
        _check(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix are Beta alphas >= 0 (0 = off)")
        _check(0.0 <= self.label_smoothing < 1.0, "label-smoothing must be in [0, 1)")
        _check(self.eval_every >= 0 and self.checkpoint_every >= 0, "eval/checkpoint intervals must be >= 0")
        _check(self.use not in ("synthetic", "both") or bool(self.synthetic), f"use {self.use} needs --synthetic folders")
        _check(self.val_per_class >= 0, "val-per-class must be >= 0")
        _check(not (self.val_per_class and self.val_split), "give --val-per-class or --val-split, not both")
        _check(self.val_split != self.eval_split or not self.val_split, "the validation split cannot be the test split")


@dataclass(frozen=True)
class _Pretraining:
    """What both pretraining stages (pretrain-base, pretrain-vae) read the same way: their images, seed, precision,
    and where and how often a run saves itself."""

    data: str = opt("digits", "training images (as for invert; labels ignored)")
    format: str = opt("auto", "how to read --data")  # choices: diffinv.data.real.OPENERS, given by the CLI
    split: str = opt("train", "training split (test is refused)")
    seed: int = opt(0, "seed of initialisation, batches and noise")
    precision: str = opt("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=TRAIN_PRECISIONS)
    device: str = opt("auto", "auto, cpu, cuda ...", execution_only=True)
    checkpoint_every: int = opt(250, "steps between checkpoints (and a checkpoint at a logged step every 5 minutes)", execution_only=True)
    log_every: int = opt(50, "steps per logged loss", execution_only=True)
    bad_images: str = opt("skip", "unreadable images: skip them (reported) or stop", choices=BAD_IMAGES, execution_only=True)
    # Stop after this many seconds of training (0: never) and save what was reached; the saved
    # config then says the steps actually taken, so the same command with --steps N reproduces it
    # (the learning rate is constant after warm-up, so stopping early is a valid shorter run).
    max_seconds: float = opt(0.0, "stop training after this many seconds and save (0: no limit)", execution_only=True)

    def __post_init__(self) -> None:
        _check(self.split != "test", "pretraining never reads a test split; use the training split (--split train)")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint/log intervals must be >= 1")
        _check(self.max_seconds >= 0.0, "max-seconds must be >= 0 (0 = no limit)")


@dataclass(frozen=True)
class PretrainConfig(_Pretraining):
    """The project's own base generator: a diffusion autoencoder trained on unlabeled images.

    A small SD-architecture UNet (diffusers ``UNet2DConditionModel`` with cross-attention) in
    pixel space reads K tokens that a small encoder makes from the training image; the tokens
    are dropped with probability ``cond_dropout`` so classifier-free guidance has an
    unconditional mode. Labels are never read, and the test split is refused.
    """

    resolution: int = opt(8, "pixel resolution of the model (digits are 8 x 8; natural images want 32 or more)")
    channels: tuple[int, ...] = opt((32, 64), "UNet block widths, e.g. 32,64; every block has cross-attention")
    layers_per_block: int = opt(2, "resnet layers per UNet block")
    cross_attention_dim: int = opt(64, "width D of a conditioning token")
    tokens: int = opt(5, "conditioning tokens K")
    prediction_type: str = opt("epsilon", "what the UNet predicts (ddpm)", choices=("epsilon", "v_prediction"))
    process: str = opt("ddpm", "noise process: ddpm (SD 1.x / 2.x's, predicting --prediction-type) or flow (rectified flow, "
                       "predicting the velocity: SD3's objective)", choices=("ddpm", "flow"))
    flow_shift: float = opt(1.0, "flow: the schedule's shift towards noise (SD3 uses 3 at 1024 px; 1 is the plain flow)")
    # scaled_linear is Stable Diffusion's schedule, linear DDPM's pixel-space one; linear did not cure
    # the small bases' diverging samples (bases/README.md), so SD's stays the default.
    beta_schedule: str = opt("scaled_linear", "noise schedule: scaled_linear (Stable Diffusion's) or linear (DDPM's, "
                             "near-pure noise at t = T; see bases/README.md for how it compared)", choices=tuple(BETA_SCHEDULES))
    steps: int = opt(4000, "optimiser steps")
    batch_size: int = opt(64, "images per step")
    lr: float = opt(1e-3, "AdamW learning rate after warm-up")
    warmup: int = opt(200, "steps of linear warm-up")
    cond_dropout: float = opt(0.1, "probability of dropping the tokens (the unconditional mode guidance needs)")
    ema: float = opt(0.999, "decay of the saved (bias-corrected) weight average; 0 saves the last weights")
    hflip: bool = opt(False, "random horizontal flips: off for digits and text, on for natural images")
    # More unlabeled training images (train splits, never test), e.g. MNIST beside digits: a base
    # that has seen more than the target data has more to fill in around an inverted image.
    extra_data: tuple[str, ...] = opt((), "more unlabeled training images (train splits), e.g. MNIST beside digits",
                                      action="extend")
    # "same": the encoder sees the image the UNet denoises (a diffusion autoencoder; its tokens can
    # pin the whole image). "invariant": the encoder sees a strongly augmented view (crop, small
    # rotation, colour jitter) and the UNet an independently flipped original, so the tokens keep
    # content and lose pose and colour, which sampling then varies (see diffusion/views.py).
    views: str = opt("same", "same: the encoder sees the image the UNet denoises; invariant: it sees a strongly augmented "
                     "view, so the tokens keep content and lose pose and colour", choices=("same", "invariant"))
    view_min_area: float = opt(0.35, "smallest crop of the encoder's view, as a fraction of the area")
    token_noise: float = opt(0.0, "std of Gaussian noise on the (unit-scale) tokens in training: a lossy bottleneck")
    image_channels: int = opt(0, "0: 1 when every training image is grey (R = G = B), else 3")
    # Stable Diffusion's way: the UNet denoises a frozen autoencoder's latents (from `diffinv pretrain-vae`), which
    # is then saved beside it as vae/, so the base is loaded, inverted and sampled exactly as a latent SD model is.
    vae: str = opt("", "a VAE folder from `diffinv pretrain-vae` (or a model folder with vae/): train in its latent space, "
                   "as Stable Diffusion is; empty: pixel space")

    def __post_init__(self) -> None:
        super().__post_init__()
        # In latent space the UNet's own size is checked against the VAE's factor when the VAE is read.
        _check(bool(self.vae) or (self.resolution >= 8 and self.resolution % 2 ** (len(self.channels) - 1) == 0),
               f"resolution must be >= 8 and a multiple of {2 ** (len(self.channels) - 1)} (one halving per extra block)")
        _check(len(self.channels) >= 2 and all(c >= 8 and c % 8 == 0 for c in self.channels),
               "channels: two or more block widths, each a multiple of 8")
        _check(self.layers_per_block >= 1 and self.tokens >= 1 and self.cross_attention_dim >= 8,
               "layers-per-block and tokens must be >= 1, cross-attention-dim >= 8")
        _check(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0 and self.warmup >= 0, "steps, batch-size, lr must be positive")
        _check(0.0 <= self.cond_dropout < 1.0, "cond-dropout must be in [0, 1)")
        _check(0.0 <= self.ema < 1.0, "ema must be in [0, 1) (0 = no averaging)")
        _check_choices(self)
        _check(0.05 <= self.view_min_area <= 1.0, f"view-min-area must be in [0.05, 1]; got {self.view_min_area}")
        _check(self.flow_shift > 0, f"flow-shift must be > 0 (1: the plain flow); got {self.flow_shift}")
        _check(self.token_noise >= 0.0, f"token-noise must be >= 0; got {self.token_noise}")
        _check(self.image_channels in (0, 1, 3), "image-channels must be 0 (auto), 1 or 3")


@dataclass(frozen=True)
class VaeConfig(_Pretraining):
    """``diffinv pretrain-vae``: the latent autoencoder of a base, trained on unlabeled images (Stable Diffusion's first stage).

    A diffusers ``AutoencoderKL`` (one halving per block after the first: blocks 32,64,64 make a
    factor-4 latent, 8 x 8 x ``latent_channels`` at 32 px) trained on the L1 pixel error of its
    reconstructions plus ``kl_weight`` times the KL term (both summed per image, as SD's VAE loss);
    its latent scaling factor is measured on the training images afterwards (1 / std of the latent
    means), as SD's 0.18215 was. Labels are never read, and the test split is refused.
    """

    extra_data: tuple[str, ...] = opt((), "more unlabeled training images (train splits)", action="extend")
    resolution: int = opt(32, "pixel resolution of the autoencoder")
    channels: tuple[int, ...] = opt((32, 64, 64), "block widths; each block after the first halves the size (3 blocks: factor 4)")
    layers_per_block: int = opt(1, "resnet layers per block")
    latent_channels: int = opt(4, "channels of the latent (Stable Diffusion 1.x/2.x: 4)")
    kl_weight: float = opt(1e-6, "weight of the KL term against the summed pixel error (Stable Diffusion's VAE: 1e-6)")
    steps: int = opt(4000, "optimiser steps")
    batch_size: int = opt(64, "images per step")
    lr: float = opt(1e-3, "AdamW learning rate after warm-up")
    warmup: int = opt(100, "steps of linear warm-up")
    ema: float = opt(0.999, "decay of the saved (bias-corrected) weight average; 0 saves the last weights")
    hflip: bool = opt(False, "random horizontal flips")

    def __post_init__(self) -> None:
        super().__post_init__()
        factor = 2 ** (len(self.channels) - 1)
        _check(len(self.channels) >= 2 and all(c >= 8 and c % 8 == 0 for c in self.channels),
               "channels: two or more block widths, each a multiple of 8")
        _check(self.resolution % factor == 0 and self.resolution // factor >= 4,
               f"resolution must be a multiple of the latent factor {factor} and give a latent of at least 4 x 4")
        _check(self.layers_per_block >= 1 and self.latent_channels >= 1, "layers-per-block and latent-channels must be >= 1")
        _check(self.kl_weight >= 0, "kl-weight must be >= 0")
        _check(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0 and self.warmup >= 0, "steps, batch-size, lr must be positive")
        _check(0.0 <= self.ema < 1.0, "ema must be in [0, 1) (0 = no averaging)")
        _check_choices(self)


PLAN_UNITS, PLAN_HOURS = 500, 8  # a study beyond either asks for --yes

# What a study sets for every stage itself (from its own fields); its invert:, generate:, train: blocks may not.
STUDY_OWNED = {
    "InvertConfig": ("model", "data", "format", "split", "per_class", "subset_seed", "val_per_class", "device"),
    "GenerateConfig": ("store", "model", "method", "adapters", "device"),
    "TrainConfig": ("data", "format", "split", "eval_split", "per_class", "subset_seed", "val_per_class", "val_split",
                    "synthetic", "use", "seed", "device"),
    "FilterConfig": ("set", "judge", "device"),
    "FinetuneConfig": ("store", "device"),
}


@dataclass(frozen=True)
class StudyConfig:
    """A study: which synthetic data helps a classifier on this data, by how much, with which settings.

    The study inverts each replicate's real subset, generates every method's candidate sets, trains
    the classifiers, keeps each method's candidate with the best validation score, reads the test
    split for the kept ones only and writes the tables and the report. ``invert``, ``generate`` and
    ``train`` hold those stages' own fields; a list value is a list of candidates (see
    :mod:`diffinv.study.spec`).
    """

    name: str = opt("", "the study's name, the report's title (default: the study file's name)")
    data: str = opt("digits", "labelled real data (as for invert): its train split is subset, its test split scores")
    format: str = opt("auto", "how to read --data")  # choices: diffinv.data.real.OPENERS, given by the CLI
    split: str = opt("train", "training split (real subsets are drawn from it)")
    eval_split: str = opt("test", "test split: read once, after settings are chosen, for the kept settings only")
    model: str = opt("", "base or SD-family model every method generates with (default: the digits base in the package)")
    models: tuple[str, ...] = opt((), "generators to compare, e.g. --models A B: every generating method runs with each, its "
                                  "setting chosen per generator, with head-to-head rows between them (a study file: "
                                  "model: [A, B])", action="extend", metavar="MODEL")
    per_class: tuple[int, ...] = opt((5,), "real images per class, e.g. 5,10: each size gets every method")
    real_sizes: tuple[int, ...] = opt((), "extra real-only sizes per class for the efficiency curve, e.g. 20,40")
    seeds: tuple[int, ...] = opt((0, 1, 2, 3, 4), "replicates: replicate r draws its own real subset (subset-seed + r)")
    subset_seed: int = opt(0, "seed of replicate 0's real subset")
    val_per_class: int = opt(20, "images per class held out of the training split for validation (never in a subset)")
    val_split: str = opt("", "validate on this split of --data instead (e.g. val for MedMNIST); sets --val-per-class 0")
    repeats: int = opt(1, "classifiers per replicate and setting (own seeds), averaged before the intervals")
    methods: dict = opt(None, "method name -> its generate settings (lists are candidates); YAML only", cli=False)
    compare: dict = opt(None, "method -> rival(s) for head-to-head rows (default: di against every other method)", cli=False)
    invert: dict = opt(None, "invert settings of every store (InvertConfig fields; lists are candidates)", cli=False)
    generate: dict = opt(None, "generate settings of every method (GenerateConfig fields; lists are candidates)", cli=False)
    train: dict = opt(None, "classifier settings of every run (TrainConfig fields; lists are candidates)", cli=False)
    finetune: dict = opt(None, "LoRA fitting of lora / di+lora (FinetuneConfig fields; lists are candidates)", cli=False)
    quality: dict = opt(None, "quality settings, e.g. {inception_weights: PATH} for FID/KID", cli=False)
    fast: bool = opt(False, "every count cut to the bone (2 replicates, few steps): checks the flow, not the method")
    report: bool = opt(True, "--no-report skips OUT/report/report.html, written at the end by default (a study file: "
                       "report: false)", flag="--no-report", execution_only=True)
    plan: bool = opt(False, "print the plan (units to make and to reuse) and its estimated time on this device, then exit",
                     execution_only=True)
    yes: bool = opt(False, f"start a study over {PLAN_UNITS} units or {PLAN_HOURS} estimated hours (asked for otherwise)",
                    execution_only=True)
    device: str = opt("auto", "auto, cpu, cuda ...", execution_only=True)
    processes: int = opt(0, "processes for the replicates (0: one per torch thread up to 4, 1 on a GPU)", execution_only=True)
    workdir: str = opt("", "folder relative paths are read from (default: the working directory)", execution_only=True,
                       cli=False)

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(len(self.per_class) >= 1 and min(self.per_class + self.real_sizes) >= 1 and len(self.seeds) >= 1,
               "per-class and real-sizes must be >= 1, and at least one size and one seed given")
        _check(len(set(self.seeds)) == len(self.seeds), f"seeds must not repeat; got {list(self.seeds)}")
        _check(self.repeats >= 1, f"repeats (classifiers per replicate) must be >= 1; got {self.repeats}")
        _check(self.processes >= 0, "processes must be >= 0 (0: one per torch thread up to 4)")
        _check(self.val_per_class >= 0, "val-per-class must be >= 0")
        _check(bool(self.val_per_class) or bool(self.val_split),
               "a study chooses settings on validation data: give --val-per-class K (a hold-out of the training split) "
               "or --val-split NAME")
        _check(self.val_split != self.eval_split, "the validation split cannot be the test split")
        _check(not self.models or (len(set(self.models)) == len(self.models) >= 2 and self.model in ("", self.models[0])),
               f"models (generators to compare) must be two or more different models, the first one also model if given; "
               f"got models {list(self.models)}, model {self.model!r}")
        for name in ("methods", "compare", "invert", "generate", "train", "finetune", "quality"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, dict), f"{name} must be a mapping; got {value!r}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_choices(config: Any) -> None:
    """Every field with choices holds one of them (the message names the field as its flag does)."""
    for f in fields(config):
        if f.metadata.get("choices"):
            _one_of(f.name.replace("_", "-"), getattr(config, f.name), f.metadata["choices"])
# --preset NAME: field values applied over the defaults and under --config and flags. "paper" is the
# official code (yongchaoz/diffusion_inversion): nn.Linear init, groups of 100 in batches of 50,
# fp32, lr 3e-2, wd 1e-2, 3000 gradients per image; PNDM 100 steps, guidance 2 on the mean
# embedding, s = sigma = 0.1, 5 samples per image with its partner rule.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "InvertConfig": {"tokens": 5, "steps": 3000, "lr": 3e-2, "weight_decay": 1e-2, "init": "uniform", "update": "group",
                         "group_size": 100, "group_batch": 50, "lr_schedule": "constant", "warmup": 0, "timesteps": "uniform",
                         "draws": "independent", "latent": "sample", "precision": "fp32"},
        "GenerateConfig": {"method": "di", "sampler": "pndm", "steps": 100, "guidance": 2.0, "uncond": "mean", "interp": 0.1,
                           "interp_mode": "linear", "noise": 0.1, "per_image": 5, "partners": "paper", "unit_noise": False,
                           "clip_x0": False},
    },
    # Few-shot fine-tuning of a pretrained classifier: train the new head alone first (so its random
    # gradients do not wreck the features), then everything with the backbone at a tenth of the rate.
    "few-shot": {"TrainConfig": {"probe_steps": 100, "backbone_lr": 0.1}},
}


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """Build ``cls`` from its defaults, its ``preset``'s values, an optional YAML file, then non-None ``overrides``.

    Unknown YAML keys are an error (a typo must not be silently ignored).
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        from diffinv import safe_yaml

        try:
            loaded = safe_yaml.read(path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {brief(' '.join(str(exc).split()), 300)}") from exc
        if loaded is None:
            raise ConfigError(f"config file {path} is empty (or only comments); give the options it should set, or leave "
                              f"--config out to use every default")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of option: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    preset = values.get("preset")
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        values = {**PRESETS[preset].get(cls.__name__, {}), **values}
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
                raise ConfigError(f"option {name} must be a list of integers, got {brief(value)}")
            value = [int(v) for v in value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            kind = "strings" if item is str else "integers"
            raise ConfigError(f"option {name} must be a list of {kind}, got {brief(value)}")
        return tuple(value)
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    if target is float and isinstance(value, str):
        # PyYAML reads "1e-3" (no dot) as a string; a number written so is still a number.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"option {name} must be a number, got {brief(value)}") from None
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    wrong_type = target in (int, str, bool) and not isinstance(value, target)
    if wrong_type or (target is int and isinstance(value, bool)):  # bool is an int subclass; "true" is not a count
        raise ConfigError(f"option {name} must be {target.__name__}, got {brief(value)}")
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML-safe values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def result_fields(config: Any) -> dict[str, Any]:
    """The fields of a config that determine its result (for resume / mismatch checks): all but the execution-only ones."""
    return {f.name: getattr(config, f.name) for f in fields(config) if not f.metadata.get("execution_only")}


@dataclass(frozen=True)
class LaunchConfig:
    """How a shardable stage runs: the whole job here, one shard of it, or every shard on Ray. Never changes a result."""

    shard: str = opt("", "run shard I of N (0-based); default: RANK/WORLD_SIZE from torchrun or accelerate, SLURM array / "
                     "srun task ids, else the whole job", metavar="I/N")
    backend: str = opt("local", "ray: run --workers shards as Ray tasks (pip install ray)", choices=("local", "ray"))
    workers: int = opt(2, "shards (= Ray tasks) with --backend ray")
    ray_address: str = opt("", "join a running Ray cluster (e.g. HEAD:6379 or 'auto'); default: start a local one")
    gpus_per_shard: float | None = opt(None, "GPUs each Ray task asks for (default: 1 when the cluster has GPUs)")
    attempts: int = opt(3, "tries per Ray shard before the job gives up on it")


@dataclass(frozen=True)
class TinyModelConfig:
    """``diffinv tiny-model``: a small random model of Stable Diffusion's architecture, for trying things offline."""

    kind: str = opt("latent", "latent: tiny UNet + VAE; pixel: UNet only; sd1: SD 1.x-sized random UNet + VAE; "
                    "sd15-tiny / sd21-tiny / sdxl-tiny: SD's structure and scheduler configs at toy widths; "
                    "sd3-tiny: SD3's (a joint-attention transformer on 16-channel latents, a rectified flow)",
                    choices=("latent", "pixel", "sd1", "sd15-tiny", "sd21-tiny", "sdxl-tiny", "sd3-tiny"))
    prediction_type: str = opt("epsilon", "what the UNet predicts", choices=("epsilon", "v_prediction"))
    text_encoder: bool = opt(False, "also save a tiny CLIP text encoder + tokenizer")
    seed: int = opt(0, "seed of the random weights")


@dataclass(frozen=True)
class FinetuneConfig:
    """``diffinv finetune``: one LoRA adapter of the UNet per class, fitted on that class's real images (DataDream-style).

    Each adapter is trained with the denoising loss under its class's learned embedding, from a
    per-class store (``diffinv invert --target class``), whose config names the real images, or
    under a class prompt through the model's text encoder (``--prompt``, optionally with a LoRA of
    the text encoder too); the base model stays frozen. ``generate --method lora|di+lora --adapters
    OUT`` samples through them.
    """

    store: str = opt("", "a per-class store (`diffinv invert --target class`): its class embeddings condition the adapters "
                         "(with --prompt any store: it names the real images and the model)")
    prompt: str = opt("", "condition each class's adapter on this prompt ({} is the class name) through the model's text "
                          "encoder instead of a class embedding (Stable Diffusion; DataDream's way)")
    text_encoder: bool = opt(False, "also fit a LoRA of the text encoder's attention projections (needs --prompt)")
    rank: int = opt(4, "LoRA rank of every attention projection (to_q, to_k, to_v, to_out)")
    alpha: float = opt(0.0, "LoRA alpha (0: equal to --rank, a scale of 1)")
    steps: int = opt(200, "AdamW steps per class")
    lr: float = opt(1e-4, "AdamW learning rate of the adapters")
    batch_size: int = opt(8, "images per step, drawn from the class's real images")
    seed: int = opt(0, "seed of the batches, timesteps and noise (per class)")
    device: str = opt("auto", "auto, cpu, cuda ... (fitted in fp32: AdamW on low-precision adapters loses its updates)",
                      execution_only=True)

    def __post_init__(self) -> None:
        _check(bool(self.store), "give --store: a per-class store from `diffinv invert --target class`")
        _check(not self.prompt or "{}" in self.prompt, "--prompt must contain {} where the class name goes, e.g. 'a photo of a {}'")
        _check(not self.text_encoder or bool(self.prompt), "--text-encoder fits the text encoder through a prompt: give --prompt")
        _check(self.rank >= 1 and self.alpha >= 0, "rank must be >= 1 and alpha >= 0 (0: alpha = rank)")
        _check(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0, "steps and batch-size must be >= 1, lr > 0")


@dataclass(frozen=True)
class FilterConfig:
    """``diffinv filter``: a new set of the synthetic images a real-only classifier trusts; the source set is left as it is."""

    set: str = opt("", "a synthetic set from `diffinv generate` (read, never changed)")
    judge: str = opt("", "a run of `diffinv train` on the real images alone (no --synthetic): it scores every image")
    min_confidence: float = opt(0.0, "keep the images whose own class gets at least this probability from the judge")
    keep_top: float = opt(0.0, "or keep this fraction of each class (0-1), the images the judge is surest of")
    batch_size: int = opt(500, "images per judge batch", execution_only=True)
    device: str = opt("auto", "auto, cpu, cuda ...", execution_only=True)

    def __post_init__(self) -> None:
        _check(bool(self.set) and bool(self.judge), "give --set (a generated set) and --judge (a real-only run)")
        _check((self.min_confidence > 0) != (self.keep_top > 0),
               "give one rule: --min-confidence P (0 < P <= 1) or --keep-top Q (0 < Q <= 1)")
        _check(self.min_confidence <= 1 and 0 <= self.keep_top <= 1, "--min-confidence and --keep-top are fractions in (0, 1]")


@dataclass(frozen=True)
class ExportConfig:
    """``diffinv export``: a synthetic set (and the real images it was made from) in a format other training code reads."""

    set: str = opt("", "a synthetic set from `diffinv generate` or `diffinv filter` (read, never changed)")
    to: str = opt("imagefolder", "imagefolder (class folders), hf (a Hugging Face dataset) or webdataset (tar shards)")
    with_real: bool = opt(False, "add the real images the set was made from (the store's subset), origin 'real'")
    shard_size: int = opt(10_000, "images per WebDataset tar shard")
    push_to_hub: str = opt("", "with --to hf: also push the dataset to this Hugging Face repo id (needs internet and a token)")

    def __post_init__(self) -> None:
        _check(bool(self.set), "give --set (a generated set to export)")
        _check(self.shard_size >= 1, "shard-size must be >= 1")
        _check(not self.push_to_hub or self.to == "hf", "--push-to-hub goes with --to hf")
