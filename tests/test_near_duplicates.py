"""Near-duplicates: copies of a picture match it; two pictures of one silhouette (Fashion-MNIST's trousers) do not."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from diffinv.data.near_duplicates import best_match, near_duplicates, signatures


def _garment(pattern: str, seed: int = 0) -> np.ndarray:
    """A 28 px grey garment on black: one silhouette, its fabric plain or checked (what a look-alike differs in)."""
    rs = np.random.RandomState(seed)
    img = np.zeros((28, 28), np.float32)
    img[3:25, 7:21] = 190.0
    img[14:25, 13:15] = 0.0  # between the legs
    if pattern == "checked":
        yy, xx = np.mgrid[0:28, 0:28]
        img += np.where((yy // 2 + xx // 2) % 2 == 0, 35.0, -35.0) * (img > 0)
    img += rs.randn(28, 28) * 2 * (img > 0)
    return np.clip(img, 0, 255).astype(np.uint8)


def _sig(*images: np.ndarray) -> torch.Tensor:
    return signatures(torch.from_numpy(np.stack(images))[:, None])


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def test_a_look_alike_of_one_silhouette_is_no_copy_but_a_re_encoded_shifted_copy_is():
    plain, checked = _garment("plain"), _garment("checked", seed=1)
    reference = _sig(checked)
    shifted = np.roll(_jpeg(checked, 75), 1, axis=1)
    # The silhouettes alone correlate above the threshold: the detail test is what tells the fabrics apart.
    silhouettes_only = best_match(_sig(plain), reference, detail=-1.0)[0]
    assert float(silhouettes_only[0]) >= 0.97
    found = near_duplicates(_sig(plain, _jpeg(checked, 75), shifted), reference)
    assert found.tolist() == [False, True, True]  # before: the plain garment was a "near-duplicate" of the checked one


def test_a_flat_image_and_an_empty_reference_match_nothing():
    flat = np.full((28, 28), 90, np.uint8)
    assert near_duplicates(_sig(flat), _sig(flat)).tolist() == [False]
    assert near_duplicates(_sig(_garment("checked")), torch.empty(0, 3, 32, 32, dtype=torch.uint8)).tolist() == [False]


def test_the_shifted_correlations_are_those_of_every_window_computed_one_by_one():
    from diffinv.data.near_duplicates import SHIFT, _centre, _shifted_correlations, _shifted_rms

    gen = torch.Generator().manual_seed(0)
    query, cands = torch.rand(2, 3, 32, 32, generator=gen) * 255, torch.rand(2, 4, 3, 32, 32, generator=gen) * 255
    crop = 32 - 2 * SHIFT
    fast, rms = _shifted_correlations(_centre(query, SHIFT), cands), _shifted_rms(query[..., SHIFT:-SHIFT, SHIFT:-SHIFT], cands)
    for i, k, dy, dx in ((0, 0, 0, 0), (1, 3, 6, 2), (0, 2, 3, 5)):
        window = cands[i, k, :, dy:dy + crop, dx:dx + crop]
        a, b = query[i, :, SHIFT:-SHIFT, SHIFT:-SHIFT].flatten(), window.flatten()
        slow = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(float(fast[i, k, dy * (2 * SHIFT + 1) + dx] - slow)) < 1e-4
        assert abs(float(rms[i, k, dy * (2 * SHIFT + 1) + dx] - (a - b).pow(2).mean().sqrt())) < 1e-2


def test_a_test_split_checked_again_is_read_from_the_cache_and_a_changed_one_is_not():
    from diffinv.classify import batches

    def rgb(*images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack(images))[:, None].expand(-1, 3, -1, -1).contiguous()

    real = rgb(_jpeg(_garment("checked"), 75))
    with_copy = rgb(_garment("checked"), _garment("plain", seed=1), _garment("plain", seed=2))
    without = rgb(_garment("plain", seed=3), _garment("plain", seed=1), _garment("plain", seed=2))
    assert "look like copies" in batches.overlap_notes(real, ["r0"], with_copy, "test")[0]
    assert len(batches._TEST_SIDES) >= 1 and batches.overlap_notes(real, ["r0"], with_copy.clone(), "test")
    assert batches.overlap_notes(real, ["r0"], without, "test") == []  # same shape, other pixels: not the cached split
