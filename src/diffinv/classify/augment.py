"""Batched augmentation on the training device: kornia for geometry and policies, torchvision for MixUp/CutMix.

Both libraries draw from torch's global generator; the training loop reseeds it from
(seed, step) before every batch, so a step's augmentation does not depend on what ran before
it and a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffinv.config import AUGS

# kornia draws one AutoAugment/RandAugment sub-policy per call; calling it on chunks of this many
# images gives a batch several policies instead of one (per-image calls would be slow on a GPU).
POLICY_CHUNK = 16


class Augmenter(nn.Module):
    """Images [B, 3, S, S] in [0, 1] and labels [B] -> augmented images [B, 3, S, S] and soft labels [B, C].

    ``aug``: ``none``, ``crop-flip`` (pad S/8, random crop, horizontal flip: the paper's),
    ``autoaugment`` (CIFAR-10 policy) or ``randaugment`` (N=2, M=10), the last two after
    crop-flip. ``mixup`` / ``cutmix`` are the Beta(alpha, alpha) parameters (0 = off); with
    both on, each batch uses one of them at random. Soft labels always sum to one.
    """

    def __init__(self, aug: str, size: int, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0):
        super().__init__()
        if aug not in AUGS:  # the config checks this too; the class is also used on its own
            raise ValueError(f"aug must be one of {', '.join(AUGS)}; got {aug!r}")
        import kornia.augmentation as K

        self.num_classes = num_classes
        self.geometry = None
        if aug != "none":
            self.geometry = K.AugmentationSequential(
                K.RandomCrop((size, size), padding=max(1, size // 8), padding_mode="reflect"),
                K.RandomHorizontalFlip(),
            )
        self.policy: Any = None  # kornia's AutoAugment or RandAugment
        if aug == "autoaugment":
            from kornia.augmentation.auto import AutoAugment

            self.policy = AutoAugment("cifar10")
        elif aug == "randaugment":
            from kornia.augmentation.auto import RandAugment

            self.policy = RandAugment(n=2, m=10)
        self.mix = None
        if mixup > 0 or cutmix > 0:
            from torchvision.transforms import v2

            choices = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
                      ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
            self.mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.geometry is not None:
            x = self.geometry(x)
        if self.policy is not None:
            x = torch.cat([self.policy(chunk) for chunk in x.split(POLICY_CHUNK)]).clamp_(0, 1)
        if self.mix is not None and x.shape[0] > 1:
            return self.mix(x, y)
        return x, nn.functional.one_hot(y, self.num_classes).to(x.dtype)
