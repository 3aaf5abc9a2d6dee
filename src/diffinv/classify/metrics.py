"""Classification metrics as pure functions, and evaluation of a classifier on an in-memory set."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts; row = true class, column = predicted class. ``preds``, ``labels``: [N] int."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


DEGENERATE_SHARE = 0.95  # a classifier that puts this share of its predictions in one class has not learnt the task


def metrics_of(confusion: torch.Tensor, loss: float, probs: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Accuracy metrics of a confusion matrix [C, C] (rows true, columns predicted), and AUC from ``probs``.

    Top-1; balanced accuracy and macro-F1 over the classes present; per-class recall (None for a
    class absent from the set); the largest share of predictions in one class and the
    ``degenerate`` flag (>= 95%); with ``probs`` [N, C] (softmax) and ``labels`` [N], ROC AUC
    (two classes: of class 1; more: the mean of one-vs-rest AUCs).
    """
    per_class_total = confusion.sum(1)
    predicted = confusion.sum(0)
    correct = confusion.diagonal()
    total = int(per_class_total.sum())
    present = per_class_total > 0
    recall = correct.double() / per_class_total.clamp(min=1)
    precision = correct.double() / predicted.clamp(min=1)
    f1 = torch.where(recall + precision > 0, 2 * recall * precision / (recall + precision).clamp(min=1e-12), torch.zeros_like(recall))
    top_share = float(predicted.max()) / max(total, 1)
    out = {
        "loss": loss,
        "top1": float(correct.sum()) / max(total, 1),
        "balanced_accuracy": float(recall[present].mean()) if bool(present.any()) else 0.0,
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
        "per_class": [float(c) / int(t) if int(t) else None for c, t in zip(correct, per_class_total)],
        "top_prediction_share": top_share,
        "degenerate": top_share >= DEGENERATE_SHARE and int(present.sum()) > 1,
        "confusion": confusion.tolist(),
        "n": total,
    }
    if probs is not None and labels is not None:
        out["auc"] = auc(probs, labels)
    return out


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` [N] for the boolean ``positive`` [N] (ties count half).

    The Mann-Whitney statistic: the chance that a random positive scores above a random negative.
    None when one side is empty.
    """
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = scores.double().argsort()
    sorted_scores = scores.double()[order]
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Tied scores share the mean of their ranks.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(probs: torch.Tensor, labels: torch.Tensor) -> float | None:
    """ROC AUC of class probabilities [N, C]: class 1's for two classes, else the mean one-vs-rest AUC."""
    if probs.shape[1] == 2:
        return roc_auc(probs[:, 1], labels == 1)
    values = [v for c in range(probs.shape[1]) if (v := roc_auc(probs[:, c], labels == c)) is not None]
    return sum(values) / len(values) if values else None


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
    """:func:`metrics_of` of ``model`` on uint8 ``images`` [N, 3, S, S], ``labels`` [N] (loss, accuracies, AUC, confusion).

    ``images`` may live on the CPU; batches are moved to the model's device.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    probs = []
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
        probs.append(logits.softmax(1).cpu())
    model.train(was_training)
    return metrics_of(confusion, loss_sum / max(images.shape[0], 1), torch.cat(probs) if probs else None, labels.cpu())
