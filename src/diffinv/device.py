"""Where and in what precision things run: device and dtype choice, bf16 warnings, out-of-memory halving."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from diffinv.errors import UserError

T = TypeVar("T")
R = TypeVar("R")
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class DeviceError(UserError, ValueError):
    """A device or precision cannot be used here; the message says what to pass instead."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {device!r}: diffinv runs on cpu, cuda (cuda:N) or mps; use one of those or auto")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible (cuda:0 ...)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device} asked for, but MPS is not available here; use --device cpu")
    return resolved


# Compiling costs minutes (89 s for the embedded base on this project's CPU, for 1.06x there); on a GPU it is
# assumed to repay itself beyond this many UNet passes (about 2x faster after ~2 minutes), until the GPU suite measures it.
AUTO_COMPILE_PASSES = 200_000
COMPILE_CHOICES = ("auto", "on", "off")


def compile_wanted(choice: str, device: torch.device, passes: int) -> bool:
    """Whether to run the UNet through torch.compile: ``on``, ``off``, or ``auto`` (CUDA runs of enough UNet passes)."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, not {choice!r}")
    return choice == "on" or (choice == "auto" and device.type == "cuda" and passes >= AUTO_COMPILE_PASSES)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU with bf16 units (compute capability 8.0 and up: A100, H100 ...), else fp32.

    ``torch.cuda.is_bf16_supported()`` also says yes on T4 / V100, where bf16 is emulated and slow;
    fp16 is never chosen by itself (it needs a gradient scaler, see :func:`check_precision`).
    """
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_precision(dtype: torch.dtype, optimising: bool) -> None:
    """Refuse fp16 where gradients are taken: without a loss scaler small gradients underflow to 0 silently."""
    if optimising and dtype == torch.float16:
        raise DeviceError("--precision fp16 is refused for inversion: fp16 gradients underflow without a loss scaler and the "
                          "loss stays finite, so nothing would tell you; use bf16 (GPUs from the A100 on) or fp32")


def slow_bf16_warning(dtype: torch.dtype, device: torch.device) -> str | None:
    """A warning when bf16 is asked for on a CPU without bf16 units (AMX / AVX512-BF16).

    Without them PyTorch emulates bf16 and a step is ~10x slower than fp32 (measured: ResNet-18
    at 32 px, 1.9 vs 25.8 img/s on an AVX2-only EPYC; with AMX bf16 was 3x *faster*).
    """
    if dtype != torch.bfloat16 or device.type != "cpu":
        return None
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if "amx_bf16" in flags or "avx512_bf16" in flags:
        return None
    return ("bf16 on this CPU is emulated (no AMX or AVX512-BF16 units) and about 10x slower than fp32; "
            "use --precision fp32 (the CPU default) unless you measured otherwise")


def halving_on_oom(run: Callable[[Sequence[T]], R], items: Sequence[T], *, what: str, log: Callable[[str], None],
                   device: torch.device | None = None) -> list[tuple[Sequence[T], R]]:
    """``run(items)``; out of GPU memory, ``run`` on each half instead, recursively.

    Returns (items, result) pairs in order. Correct only where an item's result does not depend
    on its batch-mates, which keyed randomness guarantees for inversion and sampling. ``what``
    names the work in the messages ("inverting", "generating").
    """
    try:
        return [(items, run(items))]
    except OUT_OF_MEMORY as exc:
        if len(items) == 1:
            raise DeviceError(f"out of memory {what} a single item ({exc}); lower the resolution or use a smaller model") from exc
        half = len(items) // 2
        log(f"out of memory on a batch of {len(items)}; continuing in batches of {half} and {len(items) - half} "
            f"(pass a smaller --batch-size to avoid the retry)")
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
        return (halving_on_oom(run, items[:half], what=what, log=log, device=device)
                + halving_on_oom(run, items[half:], what=what, log=log, device=device))


def batch_that_fits(peak_bytes: Callable[[int], int], free_bytes: int, *, cap: int, probes: tuple[int, int] = (8, 16),
                    headroom: float = 0.8) -> int:
    """The largest batch (at most ``cap``) whose peak memory fits ``headroom`` of ``free_bytes``.

    ``peak_bytes(b)`` measures one step on ``b`` rows; memory is taken as linear in the batch, a
    fixed part plus a part per row, from the two ``probes``. At 8 rows or more the result is a
    multiple of 8 (tensor-core tiles); a batch that still runs out of memory is halved as before.
    """
    small, large = probes
    low, high = peak_bytes(small), peak_bytes(large)
    per_row = max(1.0, (high - low) / (large - small))
    fixed = max(0.0, low - per_row * small)
    fits = int((headroom * free_bytes - fixed) // per_row)
    if fits >= 8:
        fits -= fits % 8
    return max(1, min(cap, fits))


def peak_cuda_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Bytes of CUDA memory ``step()`` allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)
