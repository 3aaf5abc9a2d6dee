"""The model interface: a frozen diffusion model behind three operations.

``encode`` (pixels -> latent moments), ``predict`` (the denoising network with a given conditioning
in place of the text encoders' output) and ``decode`` (latents -> pixels). Latent models (Stable
Diffusion 1.x / 2.x / XL, SD3-structured flow transformers) and pixel-space models (a UNet without a
VAE) go through the same interface, so inversion and sampling never branch on the model kind. The
model's noise process (:mod:`~diffinv.diffusion.process`: DDPM or rectified flow) says how to noise,
what the network predicts and how to sample. Besides them: prompts through the model's text encoder,
and LoRA adapters of the network.

Reading and writing models (every file format) is :mod:`~diffinv.diffusion.model_io`. diffusers is
imported by these modules, by :mod:`~diffinv.diffusion.process` (its schedulers), and by
:mod:`~diffinv.diffusion.pretrain` and :mod:`~diffinv.diffusion.tiny`, which build new models from its
classes (``tests/test_layout.py``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from diffinv.diffusion.families import Family, family_of
from diffinv.diffusion.process import Process, make_process
from diffinv.errors import UserError

SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "prediction_type": "epsilon"}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention's projections, as DataDream adapts
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # the CLIP text encoder's


class ModelError(UserError, ValueError):
    """The model spec cannot be loaded; the message says what to give instead."""


@dataclass
class LatentMoments:
    """Posterior of an image's latent: ``mean`` and ``std`` [B, C, h, w] (std = 0 in pixel space)."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class Backbone:
    """A frozen diffusion model behind a narrow interface. Build with :func:`~diffinv.diffusion.model_io.load_backbone`."""

    unet: Any
    vae: Any | None
    scheduler_config: dict[str, Any]
    source: str
    text_encoder: Any | None = None
    tokenizer: Any | None = None
    dtype: torch.dtype = torch.float32
    _process: Process | None = field(default=None, repr=False)
    _loaded_fingerprint: str | None = field(default=None, repr=False)  # of the weights as loaded, before any precision cast
    _compiled: Any = field(default=None, repr=False)  # the UNet through torch.compile (see :meth:`compile`)
    _memory_format: torch.memory_format = field(default=torch.contiguous_format, repr=False)  # see :meth:`channels_last`

    # -- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def kind(self) -> Family:
        """The model family that drives the network (:mod:`~diffinv.diffusion.families`)."""
        return family_of(self.unet)

    @property
    def cond_dim(self) -> int:
        """Width D of one conditioning token (the network's cross-attention / joint-attention width)."""
        return self.kind.cond_dim(self.unet)

    @property
    def process(self) -> Process:
        """The noise process the model was trained with (read from its scheduler config), on the model's device."""
        if self._process is None:  # made again by :meth:`to`
            self._process = make_process(self.scheduler_config, self.device)
        return self._process

    @property
    def prediction_type(self) -> str:
        """What the network predicts: epsilon, v_prediction (DDPM) or flow_prediction (rectified flow)."""
        return self.process.prediction

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels)

    @property
    def family(self) -> str:
        """pixel, sd1, sd2, sdxl, sd3 or latent (another latent model), read from the network's class and config."""
        return self.kind.label(self.unet, self.vae is not None)

    def with_prediction_type(self, prediction_type: str) -> Backbone:
        """Use ``prediction_type`` (epsilon or v_prediction) instead of the scheduler config's; "" keeps it."""
        if prediction_type and prediction_type != self.prediction_type:
            if self.process.name != "ddpm":
                raise ModelError(f"{self.source} is a rectified-flow model: it predicts the flow's velocity, not "
                                 f"{prediction_type}; leave --prediction-type out")
            self.scheduler_config = {**self.scheduler_config, "prediction_type": prediction_type}
            self._process = None
        return self

    @property
    def extra_tokens(self) -> int:
        """Rows of a conditioning beyond its K tokens: 1 (the pooled vector) for SDXL and SD3, else 0."""
        return self.kind.extra_tokens

    @property
    def pooled_dim(self) -> int:
        """SDXL / SD3: width P of the pooled text vector that a conditioning's last row carries in its first P values."""
        return self.kind.pooled_dim(self.unet)

    def check_supported(self) -> None:
        """Refuse, before any work, what the engine cannot drive (rather than failing inside diffusers)."""
        if self.extra_tokens and not 0 < self.pooled_dim <= self.cond_dim:
            raise ModelError(f"{self.source}: a {self.family} network whose pooled embedding ({self.pooled_dim}) is wider than "
                             f"its token width ({self.cond_dim}) cannot be learned as an extra token; not supported")

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
        """A fresh diffusers scheduler for ``sampler`` on this model's noise process (see its ``scheduler``)."""
        try:
            return self.process.scheduler(sampler, clip_x0, latent=self.vae is not None)
        except UserError as exc:
            raise ModelError(str(exc)) from None

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

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The network's output [B, C, h, w] (what :attr:`prediction_type` says: noise, v or velocity).

        x_t [B, C, h, w]; t [B] the network's time input (a sampler's timesteps, or the process's
        ``model_time`` of training positions); cond [B, K, D] used as the attention context in place of
        the text encoders' output. Differentiable w.r.t. ``cond``.
        """
        net = self.unet if self._compiled is None else self._compiled
        x_t = x_t.to(self.dtype).contiguous(memory_format=self._memory_format)
        out = self.kind.call(net, x_t, t, cond.to(self.dtype), x_t.shape[-1] * self.vae_factor, self.dtype)
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

    def encode_prompts(self, prompts: list[str], grad: bool = False) -> torch.Tensor:
        """Text -> conditioning [B, L, D] through the model's own tokenizer and text encoder (differentiable with
        ``grad``: a text encoder's adapter is fitted through it)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ModelError(f"{self.source} was loaded without a text encoder/tokenizer; prompts need both")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        with torch.set_grad_enabled(grad):
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

    # -- LoRA adapters of the UNet's (and the text encoder's) attention projections, through peft ----------------
    def add_lora(self, name: str, rank: int, alpha: float, seed: int = 0, text_encoder: bool = False) -> list[torch.nn.Parameter]:
        """A fresh adapter of the UNet (and, with ``text_encoder``, of the text encoder), made active; its parameters.
        The down-projections are drawn from ``seed`` (peft would draw them from the global RNG), the up-projections
        are zero: the model is unchanged until trained."""
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise ModelError("LoRA adapters need peft: pip install 'diffusion-inversion[lora]' (or pip install peft)") from exc
        if text_encoder and self.text_encoder is None:
            raise ModelError(f"{self.source} was loaded without a text encoder; its LoRA needs one")
        with warnings.catch_warnings():  # one adapter per class is the design: peft's "multiple adapters" warning is not news
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            # peft annotates lora_alpha as int and takes any number.
            self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS),  # type: ignore[arg-type]
                                             init_lora_weights="gaussian"), adapter_name=name)
            if text_encoder and self.text_encoder is not None:  # peft's own injection: transformers' add_adapter asks for
                # a newer peft than many installs have
                inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha,  # type: ignore[arg-type]
                                                   target_modules=list(TEXT_LORA_TARGETS),
                                                   init_lora_weights="gaussian"), self.text_encoder, adapter_name=name)
        self.use_lora(name)
        named = self._lora_parameters(name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in named:
                if ".lora_A." in n:
                    p.copy_(torch.randn(p.shape, generator=g) / rank)
        for _, p in named:
            p.requires_grad_(True)
        return [p for _, p in named]

    def _lora_parameters(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        """Adapter ``name``'s parameters by name: the UNet's, then the text encoder's (prefixed ``text_encoder.``), each
        sorted, so a UNet adapter starts the same with or without one of the text encoder."""
        found = sorted((n, p) for n, p in self.unet.named_parameters() if f".{name}." in n and "lora_" in n)
        if self.text_encoder is not None:
            found += sorted((f"text_encoder.{n}", p) for n, p in self.text_encoder.named_parameters()
                            if f".{name}." in n and "lora_" in n)
        return found

    def use_lora(self, name: str | None) -> None:
        """Run the model through adapter ``name``, or through none (the frozen base) with None."""
        if not getattr(self.unet, "_hf_peft_config_loaded", False):
            if name is not None:
                raise ModelError(f"the UNet has no LoRA adapter {name!r}")
            return
        if name is None:
            self.unet.disable_adapters()
        else:
            self.unet.enable_adapters()
            self.unet.set_adapter(name)
        if self.text_encoder is not None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for layer in (m for m in self.text_encoder.modules() if isinstance(m, BaseTunerLayer)):
                adapters = getattr(layer, "lora_A", {})  # a LoRA layer's adapters by name
                layer.enable_adapters(name in adapters)  # a UNet-only adapter leaves the text encoder as it is
                if name is not None and name in adapters:
                    layer.set_adapter(name)

    def lora_state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors, named without the adapter (as peft saves them); the text encoder's prefixed."""
        from peft.utils import get_peft_model_state_dict

        state = dict(get_peft_model_state_dict(self.unet, adapter_name=name))
        state.update({n.replace(f".{name}.", "."): p for n, p in self._lora_parameters(name) if n.startswith("text_encoder.")})
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def load_lora(self, name: str, state: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
        """Adapter ``name`` with the tensors of :meth:`lora_state`; refuses tensors that do not fit this model."""
        from peft.utils import set_peft_model_state_dict

        text = {k: v for k, v in state.items() if k.startswith("text_encoder.")}
        self.add_lora(name, rank, alpha, text_encoder=bool(text))
        unet = {k: v.to(self.dtype) for k, v in state.items() if k not in text}
        result = set_peft_model_state_dict(self.unet, unet, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        own = {n.replace(f".{name}.", "."): p for n, p in self._lora_parameters(name) if n.startswith("text_encoder.")}
        unexpected += [k for k in text if k not in own or own[k].shape != text[k].shape]
        if unexpected:
            raise ModelError(f"LoRA adapter {name!r} does not fit this model (e.g. {unexpected[:2]}); it was fitted on another model")
        with torch.no_grad():
            for k, v in text.items():
                own[k].copy_(v)
        for module in (self.unet, self.text_encoder):
            if module is not None:
                module.requires_grad_(False)

    def unfused_attention(self) -> list[str]:
        """The UNet's attention processors that do not call a fused kernel (PyTorch's SDPA, xFormers): the slow path
        a custom or old processor leaves in place. Empty when every attention is fused, as diffusers' default is."""
        names = {type(p).__name__ for p in getattr(self.unet, "attn_processors", {}).values()}
        return sorted(n for n in names if not (n.endswith("2_0") or "XFormers" in n or "SDPA" in n or "Flash" in n))

    def channels_last(self, on: bool = True) -> Backbone:
        """Run the UNet's weights and inputs in channels-last layout (NHWC), which cuDNN's convolutions prefer on
        tensor-core GPUs (``on=False``: back to the default layout); the same model, results equal within float rounding."""
        self._memory_format = torch.channels_last if on else torch.contiguous_format
        self.unet.to(memory_format=self._memory_format)
        return self

    def compile(self, backend: str = "inductor") -> Backbone:
        """Run the UNet through ``torch.compile`` with static shapes (a graph per batch shape: callers keep one); on CUDA
        in mode ``reduce-overhead``, i.e. CUDA graphs, which remove the kernel launches small steps wait on."""
        mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
        self._compiled = torch.compile(self.unet, mode=mode, backend=backend, dynamic=False)
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Backbone:
        """Move every part to ``device``; the UNet (and VAE) run in ``dtype``."""
        if self._loaded_fingerprint is None:
            self._loaded_fingerprint = self._weights_fingerprint()
        self.dtype = dtype
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype if module is not self.text_encoder else torch.float32)
        self._process = None
        return self
