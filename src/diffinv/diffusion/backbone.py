"""The one place that loads a generator through diffusers: a frozen model behind three operations.

``encode`` (pixels -> latent moments), ``predict_noise`` (the UNet with a given conditioning in
place of the text encoder output) and ``decode`` (latents -> pixels). Latent models (Stable
Diffusion 1.x / 2.x, epsilon or v-prediction) and pixel-space models (a UNet without a VAE) go
through the same interface, so inversion and sampling never branch on the model kind.
(New models are built from diffusers' classes in :mod:`~diffinv.diffusion.pretrain` and
:mod:`~diffinv.diffusion.tiny`; everything else reaches diffusers through this module.)

Accepted model specs:

* a diffusers folder (``unet/``, optional ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``)
* a single UNet folder (``config.json`` of a ``UNet2DConditionModel``): a pixel-space model
* a ``.safetensors`` file: either diffinv's packed format (configs in the file's metadata) or an
  original Stable Diffusion checkpoint, read by diffusers' ``from_single_file``
* a Hugging Face hub id: from the local cache, else downloaded into it (``HF_HUB_OFFLINE`` respected)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffinv.config import SAMPLERS
from diffinv.errors import UserError

SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "prediction_type": "epsilon"}
PACKED_FORMAT = "diffinv-packed-v1"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention's projections, as DataDream adapts
class ModelError(UserError, ValueError):
    """The model spec cannot be loaded; the message says what to give instead."""


@dataclass
class LatentMoments:
    """Posterior of an image's latent: ``mean`` and ``std`` [B, C, h, w] (std = 0 in pixel space)."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class Backbone:
    """A frozen diffusion model behind a narrow interface. Build with :func:`load_backbone`."""

    unet: Any
    vae: Any | None
    scheduler_config: dict[str, Any]
    source: str
    text_encoder: Any | None = None
    tokenizer: Any | None = None
    dtype: torch.dtype = torch.float32
    _alphas_cumprod: torch.Tensor | None = field(default=None, repr=False)
    _loaded_fingerprint: str | None = field(default=None, repr=False)  # of the weights as loaded, before any precision cast

    # -- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def cond_dim(self) -> int:
        """Width D of one conditioning token (the UNet's cross-attention dimension)."""
        dim = self.unet.config.cross_attention_dim
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """[T] float32 cumulative signal fractions of the training noise schedule, on device."""
        if self._alphas_cumprod is None or self._alphas_cumprod.device != self.device:
            from diffusers import DDPMScheduler

            sched = DDPMScheduler.from_config(self.scheduler_config)
            self._alphas_cumprod = sched.alphas_cumprod.to(self.device, torch.float32)
        return self._alphas_cumprod

    @property
    def family(self) -> str:
        """pixel, sd1, sd2, sdxl or latent (another latent model), read from the UNet's config."""
        config = self.unet.config
        if getattr(config, "addition_embed_type", None) == "text_time":
            return "sdxl"
        if self.vae is None:
            return "pixel"
        return {768: "sd1", 1024: "sd2"}.get(self.cond_dim, "latent")

    def with_prediction_type(self, prediction_type: str) -> "Backbone":
        """Use ``prediction_type`` (epsilon or v_prediction) instead of the scheduler config's; "" keeps it."""
        if prediction_type:
            self.scheduler_config = {**self.scheduler_config, "prediction_type": prediction_type}
        return self

    # SDXL's UNet takes, besides the K x D token sequence, a pooled text vector [P] and six size/crop
    # "time ids". A conditioning here is then K + 1 rows of width D: the last row's first P values
    # are the pooled vector (P = 1280 <= D = 2048 for SDXL), learned per image like the tokens, so
    # stores, perturbation, mean-embedding guidance and every method work on it unchanged.
    @property
    def extra_tokens(self) -> int:
        """Rows of a conditioning beyond its K tokens: 1 (the pooled vector) for SDXL, else 0."""
        return 1 if self.family == "sdxl" else 0

    @property
    def pooled_dim(self) -> int:
        """SDXL: width P of the pooled text vector (the added embedding's input minus its six time ids)."""
        config = self.unet.config
        return int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)

    def check_supported(self) -> None:
        """Refuse, before any work, what the engine cannot drive (rather than failing inside diffusers)."""
        if self.family == "sdxl" and not 0 < self.pooled_dim <= self.cond_dim:
            raise ModelError(f"{self.source}: an SDXL-style UNet whose pooled embedding ({self.pooled_dim}) is wider than its "
                             f"token width ({self.cond_dim}) cannot be learned as an extra token; not supported")

    @property
    def native_resolution(self) -> int:
        """The image size the model was trained at: the UNet's sample size, times the VAE's downsampling."""
        size = self.unet.config.sample_size
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        return size if self.vae is None else size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def choose_resolution(self, data_size: int) -> int:
        """The inversion resolution for images of side ``data_size``: a pixel model's own size; for latent
        models the paper's choice (128 px for images up to 32 px, 256 up to 96, else the data's), capped
        at the model's native size and never below an 8 x 8 latent."""
        native = self.native_resolution
        if self.vae is None:
            return native
        wanted = 128 if data_size <= 32 else 256 if data_size <= 96 else data_size
        factor = native // int(self.unet.config.sample_size if not isinstance(self.unet.config.sample_size, (list, tuple))
                                else self.unet.config.sample_size[0])
        wanted = max(min(wanted, native), 8 * factor)
        return wanted - wanted % factor

    def check_resolution(self, resolution: int, log=print) -> None:
        """Refuse a resolution far above the model's native size (slow and meaningless); warn far below it."""
        native = self.native_resolution
        if resolution > 4 * native:
            raise ModelError(f"--resolution {resolution} is {resolution / native:g}x the {native} px this model was trained at: "
                             f"each step costs {(resolution / native) ** 2:.0f}x as much and the model has never seen such "
                             f"images. Use --resolution {native} (or a model trained at this size)")
        if resolution * 4 < native:
            log(f"warning: --resolution {resolution} is a quarter of the {native} px this model was trained at or less; "
                f"its samples may be meaningless (try --resolution {native})")

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along a side: 1 in pixel space, 8 for SD's VAE."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """Shape (C, h, w) of the latent of a ``resolution`` x ``resolution`` image."""
        if self.vae is None:
            return (self.unet.config.in_channels, resolution, resolution)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % factor:
            raise ModelError(f"resolution {resolution} must be a multiple of the VAE's downsampling factor {factor}")
        return (self.vae.config.latent_channels, resolution // factor, resolution // factor)

    def fingerprint(self) -> str:
        """Identity of the model weights and configs, as loaded (the same in any precision): stores made with another
        model are refused."""
        return self._loaded_fingerprint or self._weights_fingerprint()

    def fingerprints(self) -> set[str]:
        """This model's fingerprint, and the one of its weights in the working precision (what stores made before
        fingerprints were taken as loaded recorded)."""
        return {self.fingerprint(), self._weights_fingerprint()}

    def _weights_fingerprint(self) -> str:
        # Private config keys (``_name_or_path``, versions) say where it was loaded from, not what it is.
        config = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for module in (self.unet, self.vae):
            if module is None:
                continue
            params = list(module.parameters())
            for p in (params[0], params[-1]):
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def make_scheduler(self, sampler: str, clip_x0: bool = False) -> Any:
        """A fresh diffusers scheduler (``set_timesteps``/``scale_model_input``/``step``/``add_noise``)
        for ``sampler`` (a key of :data:`SAMPLERS`), on this model's training noise schedule.

        ``clip_x0`` (pixel models, ddim / dpm++2m): every step's predicted clean image is clipped
        to [-1, 1], through diffusers' thresholding with a ceiling of 1 (which is exactly a clip).
        """
        import diffusers

        if sampler not in SAMPLERS:
            raise ModelError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        name, extra = SAMPLERS[sampler]
        # No x0 clipping unless asked: it is wrong for latents, and the saved configs of DDPM-trained
        # pixel models (ours included) switch it on for every sampler that reads the flag.
        config = {**self.scheduler_config, **extra, "clip_sample": False, "thresholding": False}
        if clip_x0:
            if self.vae is not None:
                raise ModelError("--clip-x0 is for pixel-space models: latents have no [-1, 1] range to clip to")
            if "thresholding" not in inspect.signature(getattr(diffusers, name).__init__).parameters:
                raise ModelError(f"the {sampler} sampler cannot clip x0; use ddim or dpm++2m")
            config.update(thresholding=True, sample_max_value=1.0)  # the percentile is then moot: the ceiling is 1
        return getattr(diffusers, name).from_config(config)

    # -- the three operations -----------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> LatentMoments:
        """pixels [B, 3, H, W] in [-1, 1] -> latent moments [B, C, h, w], already scaled."""
        pixels = pixels.to(self.device, self.dtype)
        if self.image_channels == 1:
            pixels = pixels.mean(dim=1, keepdim=True)
        if self.vae is None:
            return LatentMoments(pixels.float(), torch.zeros_like(pixels, dtype=torch.float32))
        dist = self.vae.encode(pixels).latent_dist
        scale = float(self.vae.config.scaling_factor)
        shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        return LatentMoments(((dist.mean - shift) * scale).float(), (dist.std * scale).float())

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """UNet output (epsilon or v, see :attr:`prediction_type`) [B, C, h, w].

        x_t [B, C, h, w], t [B] integer timesteps, cond [B, K, D] used as the cross-attention
        context in place of the text encoder output. Differentiable w.r.t. ``cond``.
        """
        cond = cond.to(self.dtype)
        extra = {}
        if self.family == "sdxl":
            # The last row carries the pooled vector; time ids say "a full, uncropped image at this size".
            side = x_t.shape[-1] * self.vae_factor
            time_ids = torch.tensor([side, side, 0, 0, side, side], device=x_t.device, dtype=self.dtype).expand(len(x_t), 6)
            extra = {"added_cond_kwargs": {"text_embeds": cond[:, -1, : self.pooled_dim], "time_ids": time_ids}}
            cond = cond[:, :-1]
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond, return_dict=False, **extra)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, h, w] -> pixels [B, 3, H, W] in [-1, 1]."""
        latents = latents.to(self.device, self.dtype)
        if self.vae is None:
            pixels = latents
        else:
            scale = float(self.vae.config.scaling_factor)
            shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
            pixels = self.vae.decode(latents / scale + shift, return_dict=False)[0]
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return pixels.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text -> conditioning [B, L, D] through the model's own tokenizer and text encoder."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ModelError(f"{self.source} was loaded without a text encoder/tokenizer; prompts need both")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0].float()

    @torch.no_grad()
    def encode_prompt_tokens(self, prompts: list[str], k: int) -> torch.Tensor:
        """Each prompt's last ``k`` token outputs up to and including its end token: [B, k, D].

        The text encoder is causal, so the end of the prompt is where the class name and what
        comes after it have seen the whole prompt; a prompt shorter than ``k`` tokens is
        padded with the positions that follow it (the encoder's padding outputs).
        """
        if self.text_encoder is None or self.tokenizer is None:
            raise ModelError(f"{self.source} has no text encoder/tokenizer; --init text needs both (use --init random)")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        out = self.text_encoder(tokens.input_ids.to(self.device))[0].float()
        length = tokens.attention_mask.sum(dim=1)  # real tokens, the end token included
        first = (length - k).clamp(min=0)
        return torch.stack([out[b, int(first[b]): int(first[b]) + k] for b in range(len(prompts))])

    # -- LoRA adapters of the UNet's attention projections, through diffusers' peft integration -------------
    def add_lora(self, name: str, rank: int, alpha: float, seed: int = 0) -> list[torch.nn.Parameter]:
        """A fresh adapter, made active; its parameters. The down-projections are drawn from ``seed`` (peft would
        draw them from the global RNG), the up-projections are zero: the UNet is unchanged until trained."""
        try:
            from peft import LoraConfig
        except ImportError as exc:
            raise ModelError("LoRA adapters need peft: pip install 'diffusion-inversion[lora]' (or pip install peft)") from exc
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS),
                                         init_lora_weights="gaussian"), adapter_name=name)
        self.use_lora(name)
        named = sorted((n, p) for n, p in self.unet.named_parameters() if f".{name}." in n and "lora_" in n)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in named:
                if ".lora_A." in n:
                    p.copy_(torch.randn(p.shape, generator=g) / rank)
        for _, p in named:
            p.requires_grad_(True)
        return [p for _, p in named]

    def use_lora(self, name: str | None) -> None:
        """Run the UNet through adapter ``name``, or through none (the frozen base) with None."""
        if not getattr(self.unet, "_hf_peft_config_loaded", False):
            if name is not None:
                raise ModelError(f"the UNet has no LoRA adapter {name!r}")
            return
        if name is None:
            self.unet.disable_adapters()
        else:
            self.unet.enable_adapters()
            self.unet.set_adapter(name)

    def lora_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors, named without the adapter (as peft saves them)."""
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet, adapter_name=name).items()}

    def load_lora(self, name: str, state: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
        """Adapter ``name`` with the tensors of :meth:`lora_state`; refuses tensors that do not fit this UNet."""
        from peft.utils import set_peft_model_state_dict

        self.add_lora(name, rank, alpha)
        result = set_peft_model_state_dict(self.unet, {k: v.to(self.dtype) for k, v in state.items()}, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected:
            raise ModelError(f"LoRA adapter {name!r} does not fit this model's UNet (e.g. {unexpected[:2]}); "
                             f"it was fitted on another model")
        for p in self.unet.parameters():
            p.requires_grad_(False)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "Backbone":
        """Move every part to ``device``; the UNet (and VAE) run in ``dtype``."""
        if self._loaded_fingerprint is None:
            self._loaded_fingerprint = self._weights_fingerprint()
        self.dtype = dtype
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype if module is not self.text_encoder else torch.float32)
        self._alphas_cumprod = None
        return self


def _freeze(module: Any) -> Any:
    if module is not None:
        module.requires_grad_(False)
        module.eval()
    return module


def load_backbone(spec: str | Path, *, with_text_encoder: bool = False, original_config: str = "",
                  prediction_type: str = "") -> Backbone:
    """Load a frozen generator from a folder, a ``.safetensors`` file or a hub id.

    The text encoder is only loaded with ``with_text_encoder=True``: inversion never needs it.
    ``original_config`` (an original-format checkpoint's inference YAML) says a single file's
    architecture and prediction type; ``prediction_type`` is the caller's override, which also
    settles an SD 2.x file that has no YAML (SD 2.x ships as 512 px epsilon and 768 px v-prediction
    models with the same weights layout).
    """
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # load-time advice about accelerate/dtypes is noise to our users
    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise ModelError(f"{spec}: pickle checkpoints are not loaded (they can run code); convert it to .safetensors")
        if path.suffix != ".safetensors":
            raise ModelError(f"{spec}: a model file must be .safetensors")
        backbone = _load_single_file(path, with_text_encoder, original_config, prediction_type)
    elif original_config:
        raise ModelError(f"--original-config is for single-file checkpoints (.safetensors); {spec} carries its own configs")
    elif path.is_dir():
        if (path / "unet").is_dir():
            backbone = _load_folder(path, spec, with_text_encoder)
        elif (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            if config.get("_class_name") != "UNet2DConditionModel":
                raise ModelError(f"{spec}/config.json describes a {config.get('_class_name')}, not a UNet2DConditionModel")
            backbone = Backbone(_freeze(_from_pretrained(diffusers.UNet2DConditionModel, path)), None, dict(SCHEDULER_DEFAULTS), spec)
        else:
            raise ModelError(f"{spec} is a folder but holds neither unet/ (a diffusers pipeline) nor a UNet config.json")
    elif spec.count("/") == 1 and not spec.startswith((".", "/")):
        backbone = _load_hub(spec, with_text_encoder)
    else:
        raise ModelError(f"--model {spec} does not exist; give a diffusers folder, a .safetensors file or a hub id")
    _check_finite(backbone)
    return backbone


def _from_pretrained(cls: Any, folder: Path) -> Any:
    """``cls.from_pretrained(folder)``, safetensors weights only, with one clear error for whatever is wrong with the folder."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; it is not a diffusers model folder (export it with save_pretrained)")
    if not list(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        detail = f" ({', '.join(pickles)} are pickles, which can run code, and are not loaded)" if pickles else ""
        raise ModelError(f"{folder} has no .safetensors weights{detail}; convert them with diffusers' save_pretrained("
                         f"safe_serialization=True)")
    try:
        return cls.from_pretrained(folder, use_safetensors=True)
    except Exception as exc:  # diffusers and safetensors raise OSError, ValueError, SafetensorError ... for a bad folder
        raise ModelError(f"{folder} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); the weights may be truncated or "
                         f"of another architecture than its config.json") from exc


def _check_finite(backbone: "Backbone") -> None:
    """Refuse weights that are not finite (a corrupt file), once at load, rather than a NaN loss much later."""
    for name, module in (("UNet", backbone.unet), ("VAE", backbone.vae)):
        if module is None:
            continue
        bad = sum(int((~torch.isfinite(p)).sum()) for p in module.parameters())
        if bad:
            raise ModelError(f"the {name} of {backbone.source} has {bad} weights that are not finite: the file is corrupt; "
                             f"download or export it again")


def _load_folder(path: Path, spec: str, with_text_encoder: bool) -> Backbone:
    import diffusers

    unet = _from_pretrained(diffusers.UNet2DConditionModel, path / "unet")
    vae = _from_pretrained(diffusers.AutoencoderKL, path / "vae") if (path / "vae").is_dir() else None
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else dict(SCHEDULER_DEFAULTS)
    text_encoder = tokenizer = None
    if with_text_encoder and getattr(unet.config, "addition_embed_type", None) == "text_time":
        raise ModelError(f"{spec} is an SDXL model: prompts would need both of its text encoders and the pooled prompt "
                         f"embedding, which diffinv does not drive yet (--method prompt, --init text); compare with di, "
                         f"img2img or class-inversion and start from --init random or uniform")
    if with_text_encoder:
        if not (path / "text_encoder").is_dir() or not (path / "tokenizer").is_dir():
            raise ModelError(f"{spec} has no text_encoder/ and tokenizer/; prompt-based methods need them")
        try:
            import transformers
        except ImportError as exc:
            raise ModelError("prompt-based methods need transformers: pip install 'diffusion-inversion[text]'") from exc

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # a load bar per small file is noise
        text_encoder = transformers.CLIPTextModel.from_pretrained(path / "text_encoder")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(path / "tokenizer")
    return Backbone(_freeze(unet), _freeze(vae), sched, spec, _freeze(text_encoder), tokenizer)


HUB_FILES = ["model_index.json", "*/config.json", "*/*.safetensors", "scheduler/*.json", "tokenizer/*"]  # no pickles


def _load_hub(repo_id: str, with_text_encoder: bool) -> Backbone:
    """A diffusers repo id: from the local Hugging Face cache, else downloaded into it (unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_FILES)
    except Exception:  # the hub client raises many types for "not cached"
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ModelError(
                f"hub id {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it where "
                f"there is internet (huggingface-cli download {repo_id}) and pass the folder or unset HF_HUB_OFFLINE") from None
        try:
            folder = snapshot_download(repo_id, local_files_only=False, allow_patterns=HUB_FILES)
        except Exception as exc:  # no network, no such repo, a gated repo without a token ...
            raise ModelError(
                f"hub id {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
                f"({type(exc).__name__}: {str(exc)[:160]}); download it where there is internet "
                f"(huggingface-cli download {repo_id}), log in for a gated model, or pass a local folder") from exc
    return _load_folder(Path(folder), repo_id, with_text_encoder)


def _load_single_file(path: Path, with_text_encoder: bool, original_config: str = "", prediction_type: str = "") -> Backbone:
    import diffusers
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            family = ldm_family({k: fh.get_slice(k).get_shape() for k in fh.keys()})
    except Exception as exc:  # SafetensorError for a truncated or foreign file
        raise ModelError(f"{path} is not a readable .safetensors file ({exc}); it may be truncated: download or export it again") from exc
    if meta.get("format") == PACKED_FORMAT:
        if original_config:
            raise ModelError(f"{path} is a diffinv packed model, which carries its own configs; drop --original-config")
        return _load_packed(path, meta)
    if family is None:
        raise ModelError(f"{path} is neither a diffinv packed model nor an original-format Stable Diffusion checkpoint (no "
                         f"model.diffusion_model.* weights); give a diffusers folder")
    if original_config:
        return _load_with_original_config(path, Path(original_config), with_text_encoder)
    if family == "sd2" and not prediction_type:
        raise ModelError(
            f"{path} is an SD 2.x checkpoint, which exists as 512 px epsilon models (2.0/2.1-base) and 768 px v-prediction "
            f"models (2.0-v/2.1) with the same weights; say which: --original-config v2-inference.yaml (epsilon) or "
            f"v2-inference-v.yaml (v-prediction), the YAML published with the model, or --prediction-type epsilon|v_prediction")
    try:
        pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelError(
            f"diffusers could not read {path} as a {family} checkpoint offline ({type(exc).__name__}: {str(exc)[:200]}); pass "
            f"--original-config with the model's inference YAML (e.g. v1-inference.yaml), or convert it to a diffusers "
            f"folder where the configs are available") from exc
    te, tok = (pipe.text_encoder, pipe.tokenizer) if with_text_encoder else (None, None)
    return Backbone(_freeze(pipe.unet), _freeze(pipe.vae), dict(pipe.scheduler.config), str(path), _freeze(te), tok)


def ldm_family(shapes: dict[str, list[int]]) -> str | None:
    """sd1, sd2 or sdxl for an original-format (CompVis / SGM) checkpoint's tensor shapes by name; None if it is not one.

    SDXL has the size/pooled-text embedding (``label_emb``); SD 2.x projects into its transformers
    with linear layers (SD 1.x with 1x1 convolutions) and cross-attends to 1,024-wide text.
    """
    unet = {k[len("model.diffusion_model."):]: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    if not unet:
        return None
    if any(k.startswith("label_emb.") for k in unet) or any(k.startswith("conditioner.") for k in shapes):
        return "sdxl"
    proj = [v for k, v in unet.items() if k.endswith(".proj_in.weight")]
    context = [v[-1] for k, v in unet.items() if k.endswith("attn2.to_k.weight")]
    return "sd2" if (proj and len(proj[0]) == 2) or (context and context[0] == 1024) else "sd1"


def scheduler_from_original(config: dict[str, Any]) -> dict[str, Any]:
    """The training noise schedule and prediction type an original inference YAML states (SD's defaults where it is silent)."""
    params = config.get("model", {}).get("params", {})
    v = params.get("parameterization") == "v" or "VScaling" in str(params.get("denoiser_config", ""))
    return {**SCHEDULER_DEFAULTS, "num_train_timesteps": int(params.get("timesteps", 1000)),
            "beta_start": float(params.get("linear_start", SCHEDULER_DEFAULTS["beta_start"])),
            "beta_end": float(params.get("linear_end", SCHEDULER_DEFAULTS["beta_end"])),
            "prediction_type": "v_prediction" if v else "epsilon"}


def _load_with_original_config(path: Path, yaml_path: Path, with_text_encoder: bool) -> Backbone:
    """UNet and VAE of an original-format checkpoint, their architecture and schedule read from its inference YAML (offline)."""
    import diffusers
    import yaml

    if with_text_encoder:
        raise ModelError(f"prompts (--method prompt, --init text) need the text encoder, which diffinv does not read from "
                         f"single-file checkpoints; convert {path} to a diffusers folder, or use di, img2img or class-inversion")
    try:
        config = yaml.safe_load(yaml_path.read_text())
        config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ModelError(f"--original-config {yaml_path} is not a Stable Diffusion inference YAML ({type(exc).__name__}: {exc}); "
                         f"give the one published with the checkpoint (e.g. v1-inference.yaml)") from exc
    try:
        unet = diffusers.UNet2DConditionModel.from_single_file(str(path), original_config=config, local_files_only=True)
        vae = diffusers.AutoencoderKL.from_single_file(str(path), original_config=config, local_files_only=True)
    except Exception as exc:  # diffusers raises many types for weights that do not fit the YAML's architecture
        raise ModelError(f"{path} does not fit --original-config {yaml_path} ({type(exc).__name__}: {str(exc)[:200]}); is it "
                         f"the YAML of this model (v1 / v2 / v2-v / SDXL)?") from exc
    return Backbone(_freeze(unet), _freeze(vae), scheduler_from_original(config), str(path))


def _load_packed(path: Path, meta: dict[str, str]) -> Backbone:
    import diffusers
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    unet = diffusers.UNet2DConditionModel.from_config(json.loads(meta["unet_config"]))
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    vae = None
    if "vae_config" in meta:
        vae = diffusers.AutoencoderKL.from_config(json.loads(meta["vae_config"]))
        vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    return Backbone(_freeze(unet), _freeze(vae), json.loads(meta["scheduler_config"]), str(path))


def save_folder(backbone: Backbone, out: str | Path) -> Path:
    """Write the backbone as a diffusers folder (``unet/``, ``vae/``, ``scheduler/``) that :func:`load_backbone` reads."""
    import diffusers

    out = Path(out)
    backbone.unet.save_pretrained(out / "unet")
    if backbone.vae is not None:
        backbone.vae.save_pretrained(out / "vae")
    diffusers.DDPMScheduler.from_config(backbone.scheduler_config).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({"_class_name": "DiffinvModel", "source": backbone.source}, indent=2))
    return out


def save_packed(backbone: Backbone, path: str | Path) -> None:
    """Write UNet (+ VAE) weights and all configs into one ``.safetensors`` file."""
    from diffinv.runs import write_safetensors

    tensors = {f"unet.{k}": v for k, v in backbone.unet.state_dict().items()}
    meta = {"format": PACKED_FORMAT, "unet_config": json.dumps(dict(backbone.unet.config), default=str),
            "scheduler_config": json.dumps(backbone.scheduler_config, default=str)}
    if backbone.vae is not None:
        tensors.update({f"vae.{k}": v for k, v in backbone.vae.state_dict().items()})
        meta["vae_config"] = json.dumps(dict(backbone.vae.config), default=str)
    write_safetensors(path, tensors, meta)
