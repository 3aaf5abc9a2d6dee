"""A classifier run's pure parts: keyed batch order, evaluation steps, train/test overlap."""

from __future__ import annotations

import hashlib

import torch

from diffinv.rng import key_of


def overlap_notes(real: torch.Tensor, ids: list[str], test: torch.Tensor, split: str) -> list[str]:
    """Training images that are byte for byte test images: the test score would partly be a memory test."""

    def digest(x: torch.Tensor) -> bytes:
        return hashlib.blake2b(x.numpy().tobytes(), digest_size=12).digest()

    seen = {digest(t) for t in test}
    same = [i for i, x in zip(ids, real) if digest(x) in seen]
    if not same:
        return []
    return [f"{len(same)} training image(s) are identical to images of the {split!r} split ({', '.join(same[:3])}"
            f"{' ...' if len(same) > 3 else ''}): the test split overlaps the training data; remove the duplicates"]

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

def eval_steps(total: int, every: int) -> set[int]:
    """Steps (1-based counts of finished steps) after which to evaluate; always includes the last."""
    if every:
        return set(range(every, total + 1, every)) | {total}
    return {max(1, round(total * k / 10)) for k in range(1, 11)}
