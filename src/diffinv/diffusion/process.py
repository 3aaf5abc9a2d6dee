"""Noise processes: how a model's training noised clean latents, and everything that follows from it.

One object per process owns adding noise, the training target, reading a model output as (noise,
clean latent), the network's time input, the samplers (diffusers schedulers) and inversion of a clean
latent to its start noise. Two processes:

* :class:`DDPM`: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n over a discrete schedule of cumulative signal
  fractions a_t (Stable Diffusion 1.x / 2.x / XL, our pixel and latent bases), the network predicting
  the noise n (``epsilon``) or v = sqrt(a_t) n - sqrt(1 - a_t) x0 (``v_prediction``); inversion is DDIM's.
* :class:`RectifiedFlow`: x_s = (1 - s) x0 + s n on a straight path, the network predicting the
  velocity n - x0 (SD3.x, FLUX-class models); inversion integrates the flow's ODE from s = 0 to 1.

Both are indexed the same way: a training draw is an integer position t in [0, T) along the
schedule (T = ``num_train_timesteps``), so timestep sampling, importance weights and keyed draws are
the same code for both. The DDPM vocabulary (cumulative alphas, betas) lives in this module only
(``tests/test_layout.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffinv.config import SAMPLERS
from diffinv.errors import UserError

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, the network's time input) -> its output


class ProcessError(UserError, ValueError):
    """The model's noise process or a sampler asked of it is not supported; the message says what to use."""


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-image values [B] (or a scalar) shaped to broadcast over ``like`` [B, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1))) if v.dim() else v


@dataclass
class DDPM:
    """A discrete DDPM schedule (cumulative signal fractions ``alphas_cumprod`` [T]) with its prediction type."""

    config: dict[str, Any]  # the model's diffusers scheduler config
    alphas_cumprod: torch.Tensor
    prediction: str = "epsilon"
    name = "ddpm"

    @property
    def steps(self) -> int:
        return len(self.alphas_cumprod)

    def _a(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _col(self.alphas_cumprod[t.to(self.alphas_cumprod.device)].to(like.device), like)

    def levels(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal scale, noise scale) [B] at positions t [B]: x_t = signal x0 + noise n."""
        a = self.alphas_cumprod[t.to(self.alphas_cumprod.device)]
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t [B, ...] of clean x0 and noise [B, ...] at positions t [B]."""
        a = self._a(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at t: the noise, or v."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v_prediction":
            a = self._a(t, x0)
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        raise ProcessError(f"prediction type {self.prediction!r} is not supported (epsilon or v_prediction)")

    def split(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output at x_t read as (noise, clean latent)."""
        return _split(out, x_t, self._a(t, x_t), self.prediction)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network was trained with at positions t: the integer timestep itself."""
        return t

    def scheduler(self, sampler: str, clip_x0: bool = False, latent: bool = True) -> Any:
        """A fresh diffusers scheduler for ``sampler`` (a key of :data:`SAMPLERS`) on this schedule.

        ``clip_x0`` (pixel models, ddim / dpm++2m): each step's clean-image prediction is clipped to [-1, 1],
        through diffusers' thresholding with a ceiling of 1 (which is exactly a clip).
        """
        import diffusers

        if sampler not in SAMPLERS:
            raise ProcessError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        name, extra = SAMPLERS[sampler]
        # No x0 clipping unless asked: it is wrong for latents, and the saved configs of DDPM-trained
        # pixel models (ours included) switch it on for every sampler that reads the flag.
        config = {**self.config, **extra, "clip_sample": False, "thresholding": False}
        if clip_x0:
            if latent:
                raise ProcessError("--clip-x0 is for pixel-space models: latents have no [-1, 1] range to clip to")
            if "thresholding" not in inspect.signature(getattr(diffusers, name).__init__).parameters:
                raise ProcessError(f"the {sampler} sampler cannot clip x0; use ddim or dpm++2m")
            config.update(thresholding=True, sample_max_value=1.0)  # the percentile is then moot: the ceiling is 1
        return getattr(diffusers, name).from_config(config)

    def describe(self) -> str:
        c = self.config
        return (f"DDPM: {c.get('beta_schedule', 'linear')} betas {c.get('beta_start')}-{c.get('beta_end')}, {self.steps} steps, "
                f"predicting {self.prediction}")

    def initial(self, scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
        return noise * scheduler.init_noise_sigma

    def partial(self, scheduler: Any, start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A clean latent noised to the scheduler's time t (img2img's start)."""
        return scheduler.add_noise(start, noise, t)

    def model_input(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(x, t)

    def stochastic(self, sampler: str) -> bool:
        """Whether ``sampler`` takes DDIM's eta (per-step noise)."""
        return sampler == "ddim"

    @torch.no_grad()
    def invert(self, predict: Predict, latents: torch.Tensor, steps: int) -> torch.Tensor:
        """The start noise from which ``steps`` DDIM steps (eta 0) return ``latents``: DDIM's update run backwards
        along the sampler's own timesteps, each step's noise predicted at the less noisy point (the usual
        approximation, exact as the steps shrink)."""
        scheduler = self.scheduler("ddim")
        scheduler.set_timesteps(steps, device=latents.device)
        alphas = scheduler.alphas_cumprod.to(latents.device)
        final = torch.as_tensor(scheduler.final_alpha_cumprod, device=latents.device)  # where sampling ends
        stride = scheduler.config.num_train_timesteps // steps  # DDIM's step from t goes to t - stride
        x = latents.float()
        for t in reversed(scheduler.timesteps):
            # 1. Noise and clean latent predicted at the level sampling's step from t ends on.
            a_prev = alphas[t - stride] if t - stride >= 0 else final
            eps, x0 = _split(predict(x, t), x, a_prev, self.prediction)
            # 2. Up to t's level: the same clean latent and noise, as that step reads them.
            a_t = alphas[t]
            x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        return x


def _split(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    if prediction == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
    return out, (x - (1 - a).sqrt() * out) / a.sqrt()


@dataclass
class RectifiedFlow:
    """The straight path x_s = (1 - s) x0 + s n, the network predicting the velocity n - x0.

    Position t in [0, T) is the noise level s = shift u / (1 + (shift - 1) u), u = (t + 1) / T: diffusers'
    ``FlowMatchEulerDiscreteScheduler`` schedule (SD3 ships shift 3), whose network time input is s T.
    """

    config: dict[str, Any]
    steps: int = 1000
    shift: float = 1.0
    prediction = "flow_prediction"
    name = "flow"

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        u = (t.double() + 1) / self.steps
        return (self.shift * u / (1 + (self.shift - 1) * u)).float()

    def levels(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma(t)
        return 1 - s, s

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _col(self.sigma(t).to(x0.device), x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def split(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = _col(self.sigma(t).to(x_t.device), x_t)
        return x_t + (1 - s) * out, x_t - s * out

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t).to(t.device) * self.steps

    def scheduler(self, sampler: str, clip_x0: bool = False, latent: bool = True) -> Any:
        """Euler along the flow for ``euler`` and ``ddim`` (DDIM with eta 0 is the Euler step of the same ODE), DPM-Solver++
        in its flow form for ``dpm++2m``; pndm has no flow form."""
        import diffusers

        if clip_x0:
            raise ProcessError("--clip-x0 is for pixel-space DDPM models; a flow model's samplers do not clip")
        if self.config.get("use_dynamic_shifting"):
            raise ProcessError("this flow model shifts its schedule with the image size (FLUX's dynamic shifting), which "
                               "diffinv does not drive yet; SD3-structured models (a fixed shift) are supported")
        if sampler in ("euler", "ddim"):
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.config)
        if sampler == "dpm++2m":
            return diffusers.DPMSolverMultistepScheduler(
                num_train_timesteps=self.steps, prediction_type="flow_prediction", use_flow_sigmas=True,
                flow_shift=self.shift, algorithm_type="dpmsolver++", solver_order=2)
        raise ProcessError(f"the {sampler} sampler has no rectified-flow form; use euler, ddim (the same Euler step) or dpm++2m")

    def describe(self) -> str:
        return f"rectified flow: shift {self.shift:g}, {self.steps} steps, predicting the velocity (noise - clean)"

    def initial(self, scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
        return noise * float(getattr(scheduler, "init_noise_sigma", 1.0))

    def partial(self, scheduler: Any, start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if hasattr(scheduler, "scale_noise"):
            return scheduler.scale_noise(start, t, noise)
        return scheduler.add_noise(start, noise, t)

    def model_input(self, scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x

    def stochastic(self, sampler: str) -> bool:
        return False

    @torch.no_grad()
    def invert(self, predict: Predict, latents: torch.Tensor, steps: int) -> torch.Tensor:
        """The start noise from which ``steps`` Euler steps return ``latents``: the flow's ODE integrated from s = 0
        up the sampler's own levels, each velocity taken at the less noisy end (as for DDIM)."""
        scheduler = self.scheduler("euler")
        scheduler.set_timesteps(steps, device=latents.device)
        sigmas = scheduler.sigmas.to(latents.device, torch.float32)  # descending, ending at 0
        x = latents.float()
        for i in reversed(range(len(sigmas) - 1)):
            low, high = sigmas[i + 1], sigmas[i]
            x = x + (high - low) * predict(x, (low * self.steps).reshape(1))
        return x


Process = DDPM | RectifiedFlow


def make_process(config: dict[str, Any], device: torch.device | str = "cpu") -> Process:
    """The noise process of a diffusers scheduler config (its class name says which)."""
    steps = int(config.get("num_train_timesteps", 1000))
    if "FlowMatch" in str(config.get("_class_name", "")):
        return RectifiedFlow(dict(config), steps, float(config.get("shift", 1.0)))
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_config(config).alphas_cumprod.to(device, torch.float32)
    return DDPM(dict(config), alphas, config.get("prediction_type", "epsilon"))


def flow_scheduler_config(steps: int = 1000, shift: float = 1.0) -> dict[str, Any]:
    """The scheduler config a rectified-flow model is saved with (diffusers' FlowMatchEulerDiscreteScheduler)."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": steps, "shift": shift}
