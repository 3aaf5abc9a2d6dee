"""Counter-based random numbers keyed by identity.

``torch.Generator`` streams depend on how many numbers were drawn before, so a batch of images
would not get the same noise as the same images run one by one. Here every number is a pure
hash of (key, step, stream, element index): an image's noise depends only on its own identity,
never on its batch, shard, or device, costs no host sync, and needs no state to resume.

All arithmetic stays in int64 with values below 2**32 and multipliers below 2**31, so no
product overflows and CPU and CUDA give bit-identical integers.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D  # odd multipliers < 2**31 (lowbias32-style avalanche, adapted to int64)
_M2 = 0x68E31DA5
_GOLDEN = 0x1E3779B9

# Streams: independent draws for the same (key, step).
STREAM_NOISE = 1
STREAM_TIMESTEP = 2
STREAM_LATENT = 3
STREAM_INIT = 4
STREAM_EVAL = 5
STREAM_DROPOUT = 6
STREAM_PICK = 7  # which image a shared (class) conditioning trains on
STREAM_PARTNER = 8  # generation: the interpolation partner
STREAM_PERTURB = 9  # generation: the Gaussian added to the conditioning
STREAM_SAMPLER = 10  # generation: the sampler's own noise (DDIM eta > 0), offset by step
STREAM_VIEW = 11  # pretraining: the encoder's augmented view
STREAM_TOKEN_NOISE = 12  # pretraining: noise on the encoder's tokens
STREAM_TIMESTEP_PILOT = 13  # inversion: the order and place of an image's pilot timesteps (importance sampling)
STREAM_POSTERIOR = 14  # pretraining: the draw from a VAE's latent posterior


def mix32(x):
    """Avalanche hash of 32-bit values; works on Python ints and int64 tensors alike."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def key_of(seed: int, identity: str) -> int:
    """A 32-bit key for an identity string (an image id, a sample id) under ``seed``."""
    digest = hashlib.blake2b(f"{seed}\x1f{identity}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def keys_tensor(seed: int, identities: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """[B] int64 keys for a list of identities."""
    return torch.tensor([key_of(seed, i) for i in identities], dtype=torch.int64, device=device)


def _base(keys: torch.Tensor, step: int | torch.Tensor, stream: int) -> torch.Tensor:
    salt = mix32(mix32(step * _GOLDEN + 0x9E37) ^ (stream * 0x85EB))
    return mix32(mix32(keys) ^ salt)


def keyed_uniform(keys: torch.Tensor, step: int | torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform (0, 1) floats [B, *shape], element e of row b a function of (keys[b], step, stream, e).

    ``step`` is one int for the whole batch, or an int64 tensor [B] when each row is at its own
    step (row b then draws exactly what it would alone at step[b]).
    """
    numel = math.prod(shape)
    counter = torch.arange(numel, device=keys.device, dtype=torch.int64)
    bits = mix32(_base(keys, step, stream)[:, None] ^ mix32(counter * _GOLDEN + 1)[None, :])
    # 24 bits are exact in float32; +0.5 keeps the value strictly inside (0, 1) for log().
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return u.view(keys.shape[0], *shape)


def keyed_normal(keys: torch.Tensor, step: int | torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal floats [B, *shape] (Box-Muller on two keyed uniforms)."""
    numel = math.prod(shape)
    u = keyed_uniform(keys, step, stream, (2, numel))
    z = torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos((2.0 * math.pi) * u[:, 1])
    return z.view(keys.shape[0], *shape)


def keyed_randint(keys: torch.Tensor, step: int | torch.Tensor, stream: int, high: int) -> torch.Tensor:
    """One integer in [0, high) per key: [B] int64."""
    u = keyed_uniform(keys, step, stream, (1,))[:, 0]
    return (u * high).long().clamp_(max=high - 1)
