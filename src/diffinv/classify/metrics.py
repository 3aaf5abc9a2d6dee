"""Classification metrics as pure functions, and evaluation of a classifier on an in-memory set."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts; row = true class, column = predicted class. ``preds``, ``labels``: [N] int."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def summarise(confusion: torch.Tensor, loss: float) -> dict[str, Any]:
    """Top-1, per-class accuracy (NaN-free: a class absent from the set gets None) and the matrix."""
    per_class_total = confusion.sum(1)
    correct = confusion.diagonal()
    total = int(per_class_total.sum())
    return {
        "loss": loss,
        "top1": float(correct.sum()) / max(total, 1),
        "per_class": [float(c) / int(t) if int(t) else None for c, t in zip(correct, per_class_total)],
        "confusion": confusion.tolist(),
        "n": total,
    }


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images [B, 3, S, S] -> standardised floats, per channel."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [3] of uint8 images [N, 3, S, S], on [0, 1], in float64 for large N."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for part in images.split(chunk):
        x = part.double().div_(255.0)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return mean.float(), std.float()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             num_classes: int, batch_size: int = 500, autocast: torch.dtype | None = None,
             channels_last: bool = False) -> dict[str, Any]:
    """Loss, top-1, per-class accuracy and confusion of ``model`` on uint8 ``images`` [N, 3, S, S], ``labels`` [N].

    ``images`` may live on the CPU; batches are moved to the model's device.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = normalise(images[start:start + batch_size].to(device), mean.to(device), std.to(device))
        y = labels[start:start + batch_size].to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        confusion += confusion_matrix(logits.argmax(1).cpu(), y.cpu(), num_classes)
    model.train(was_training)
    return summarise(confusion, loss_sum / max(images.shape[0], 1))
