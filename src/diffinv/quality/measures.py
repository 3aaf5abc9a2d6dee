"""How good is a synthetic set, beside the accuracy it buys: fidelity, diversity, memorisation, FID/KID.

* label fidelity: accuracy of a classifier trained on real images (the "judge"), evaluated on the
  synthetic images: do they look like their class?
* diversity: mean pairwise feature distance within each class, synthetic over real (1 = as
  varied as the real images; far below 1 = collapsed variations).
* memorisation: RMS pixel distance of every synthetic image to its nearest real training image,
  beside the same distance between real images; ``near_copies`` counts distances under 2/255.
* Frechet / kernel distances between synthetic and real test features. With the judge's
  features they are reported as ``fd_judge`` / ``kd_judge``; the standard FID/KID needs
  Inception-v3 weights, which are used only when given as a local file. Without them the metric
  is left out with a note, never replaced by a number from another network.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffinv.classify.metrics import confusion_matrix, normalise
from diffinv.classify.models import penultimate

NEAR_COPY = 2.0 / 255.0


@torch.no_grad()
def judge_features(model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, F], predictions [N]) of uint8 ``images`` [N, 3, S, S] under a trained classifier."""
    device = next(model.parameters()).device
    feats, preds = [], []
    for part in images.split(batch_size):
        f, logits = penultimate(model, normalise(part.to(device), mean.to(device), std.to(device)))
        feats.append(f.float().cpu())
        preds.append(logits.argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


def judge_probabilities(model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        batch_size: int = 500) -> torch.Tensor:
    """[N, C] class probabilities of uint8 ``images`` [N, 3, S, S] under a trained classifier."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(normalise(part.to(device), mean.to(device), std.to(device))).float().softmax(1).cpu()
                          for part in images.split(batch_size)])


def mean_pairwise_distance(features: torch.Tensor) -> float | None:
    """Mean L2 distance over all distinct pairs of rows of [N, F]; None with fewer than two rows."""
    n = features.shape[0]
    if n < 2:
        return None
    d = torch.cdist(features.double(), features.double())
    return float(d.sum() / (n * (n - 1)))


def nearest_distances(queries: torch.Tensor, references: torch.Tensor, exclude_self: bool = False,
                      chunk: int = 256) -> torch.Tensor:
    """[Q] RMS pixel distance (on [0, 1]) of each uint8 query image to its nearest reference image."""
    ref = references.flatten(1).float().div(255.0)
    dims = ref.shape[1]
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk].flatten(1).float().div(255.0)
        d = torch.cdist(q, ref)
        if exclude_self:
            rows = torch.arange(q.shape[0])
            d[rows, rows + start] = float("inf")
        out.append(d.min(1).values / dims ** 0.5)
    return torch.cat(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets [N, F] and [M, F] (the FID formula)."""
    from scipy import linalg

    x, y = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = x.mean(0), y.mean(0)
    cov_a, cov_b = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            # Fewer samples than feature dimensions make the product singular; a small ridge keeps the
            # square root defined (the usual FID fallback).
            ridge = np.eye(cov_a.shape[0]) * 1e-6
            covmean = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean.real))


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 10, subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (the KID formula), averaged over random subsets."""
    a, b = a.double(), b.double()
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    dims = a.shape[1]
    total = 0.0
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=g)[:m]]
        y = b[torch.randperm(b.shape[0], generator=g)[:m]]
        kxx = (x @ x.T / dims + 1) ** 3
        kyy = (y @ y.T / dims + 1) ** 3
        kxy = (x @ y.T / dims + 1) ** 3
        total += float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                       + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())
    return total / subsets


def inception_extractor(weights: str | Path | None) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """(extractor of 2048-d Inception-v3 pool features from uint8 images, note). None when no weights are on disk."""
    if not weights:
        return None, ("FID/KID left out: no Inception-v3 weights given (nothing is downloaded); pass "
                      "quality.inception_weights: PATH to a local torchvision inception_v3 state dict")
    path = Path(weights)
    if not path.is_file():
        return None, f"FID/KID left out: Inception weights {path} do not exist"
    from torchvision.models import inception_v3

    from diffinv.classify.pretrained import read_state_dict

    state = read_state_dict(path, "quality.inception_weights")
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(state)
    net.fc = nn.Identity()
    net.eval()
    from diffinv.classify.pretrained import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        out = []
        for part in images.split(64):
            x = nn.functional.interpolate(part.float().div(255.0), size=(299, 299), mode="bilinear", align_corners=False)
            out.append(net((x - mean) / std))
        return torch.cat(out)

    return extract, f"FID/KID on Inception-v3 features from {path}"


def synthetic_quality(judge: nn.Module, meta: dict[str, Any], syn: torch.Tensor, syn_labels: torch.Tensor,
                      real: torch.Tensor, real_labels: torch.Tensor, test: torch.Tensor | None,
                      inception_weights: str | None = None, test_features: torch.Tensor | None = None) -> dict[str, Any]:
    """Every quality metric of one synthetic set. Images are uint8 [N, 3, S, S] at the judge's resolution.

    ``real`` are the real training images the set was made from (memorisation, diversity),
    ``test`` the real test images (the reference distribution of the feature distances; None leaves
    those distances out, for sets whose settings were not kept and so never meet the test split);
    ``test_features``: the judge's features of ``test`` when already computed (:func:`judge_features`).
    """
    classes = meta["classes"]
    c = len(classes)
    syn_f, syn_pred = judge_features(judge, syn, meta["mean"], meta["std"])
    real_f, _ = judge_features(judge, real, meta["mean"], meta["std"])
    test_f = None
    if test is not None:
        test_f = test_features if test_features is not None else judge_features(
            judge, test, meta["mean"], meta["std"])[0]
    confusion = confusion_matrix(syn_pred, syn_labels, c)
    per_class_total = confusion.sum(1)
    diversity = {}
    for k, name in enumerate(classes):
        s = mean_pairwise_distance(syn_f[syn_labels == k])
        r = mean_pairwise_distance(real_f[real_labels == k])
        diversity[name] = s / r if s is not None and r else None
    ratios = [v for v in diversity.values() if v is not None]
    nn_syn = nearest_distances(syn, real)
    nn_real = nearest_distances(real, real, exclude_self=True) if real.shape[0] > 1 else torch.tensor([float("nan")])
    result: dict[str, Any] = {
        "n_synthetic": int(syn.shape[0]),
        "label_fidelity": float(confusion.diagonal().sum()) / max(int(per_class_total.sum()), 1),
        "label_fidelity_per_class": [float(d) / int(t) if int(t) else None for d, t in zip(confusion.diagonal(), per_class_total)],
        "diversity_ratio": float(np.mean(ratios)) if ratios else None,
        "diversity_ratio_per_class": diversity,
        "nn_distance_syn_to_real": float(nn_syn.mean()),
        "nn_distance_real_to_real": float(nn_real.mean()),
        "near_copies": int((nn_syn < NEAR_COPY).sum()),
        "fd_judge": None if test_f is None else frechet_distance(syn_f, test_f),
        "kd_judge": None if test_f is None else kernel_distance(syn_f, test_f),
    }
    extract, note = inception_extractor(inception_weights)
    result["fid_note"] = note
    if extract is not None and test is not None:
        syn_i, test_i = extract(syn), extract(test)
        result["fid"] = frechet_distance(syn_i, test_i)
        result["kid"] = kernel_distance(syn_i, test_i)
    else:
        result["fid"] = result["kid"] = None
    return result
