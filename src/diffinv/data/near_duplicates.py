"""Near-duplicate images: the same picture re-encoded, resized by a few pixels or shifted a little.

Byte or pixel equality misses a test image re-saved as JPEG under another name; web-scale pools are
de-duplicated against test sets by near-duplicate search for that reason. An image's signature is
its RGB thumbnail at 32 x 32 (antialiased, uint8). Two images are near-duplicates when, at one
alignment (whole-pixel shifts of up to 3 pixels), the centre 26 x 26 of one, standardised,
correlates at least ``threshold`` with the window of the other, and their details (each image minus
its Gaussian blur, sigma 1 px) agree there too: correlate at least ``DETAIL``, or differ by at most
``NOISE`` grey levels (a smooth picture's detail is little more than its re-encoding noise). The
first test alone passes any two pictures of one silhouette on a flat background (two pairs of
Fashion-MNIST trousers correlate 0.99); the detail test tells most of them apart, and a brightness
change, JPEG noise or a whole-pixel shift keeps both. A flat image is nobody's near-duplicate
(exact hashes catch those). Every pair cannot be compared at 32 px in a 100,000-image pool, so each
image is first compared with the few references whose low-frequency amplitude spectra (blind to
shifts) are closest to its own. What the rule
catches and what it drops on a clean pool: ``benchmarks/near_duplicates.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIDE, SHIFT = 32, 3  # the thumbnail side and the largest shift, in pixels
THRESHOLD = 0.97
DETAIL = 0.9  # correlation of the detail (the image minus its blur) at the same alignment ...
NOISE = 3.0  # ... or its root mean square difference, in grey levels: a smooth picture's detail is its re-encoding noise
CANDIDATES = 32  # references per image compared at full size: the closest in low-frequency amplitudes
PREFILTER = 0.9  # ... and only those whose amplitudes correlate this much (a near-duplicate's: above 0.95)
FLOOR = 0.9  # the lowest correlation reported: a pair under it is no match (-1), and its details are not compared


def signatures(uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> [N, 3, 32, 32] uint8 RGB thumbnails."""
    x = uint8.float().expand(-1, 3, -1, -1) if uint8.shape[1] == 1 else uint8.float()
    if x.shape[-1] != SIDE or x.shape[-2] != SIDE:
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _unit(w: torch.Tensor) -> torch.Tensor:
    """Rows [..., D] centred and scaled to unit norm (a flat row stays zero)."""
    w = w - w.mean(-1, keepdim=True)
    norm = w.norm(dim=-1, keepdim=True)
    return torch.where(norm > 1e-3 * w.shape[-1] ** 0.5, w / norm.clamp_min(1e-6), torch.zeros_like(w))


def _cross(centres: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Dot product of each query's window [n, 3, C, C] with every window of that size of its candidates [n, k, 3, S, S]:
    [n, k, (S - C + 1)^2]. By FFT: a circular correlation of the zero-padded window, whose first S - C + 1 shifts each
    way never wrap (a grouped convolution did the same several times slower on a CPU)."""
    side, crop = candidates.shape[-1], centres.shape[-1]
    spectra = torch.fft.rfft2(candidates.float()) * torch.fft.rfft2(centres.float(), s=(side, side)).conj()[:, None]
    shifts = side - crop + 1
    return torch.fft.irfft2(spectra.sum(2), s=(side, side))[..., :shifts, :shifts].flatten(2)


def _window_sums(candidates: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and sum of squares over channels of every crop x crop window of candidates [n, k, 3, S, S]: [n, k, P^2] each."""
    x = candidates.float()

    def box(v: torch.Tensor) -> torch.Tensor:  # summed-area table: every window's sum in O(S^2)
        table = F.pad(v.sum(2).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        return (table[..., crop:, crop:] - table[..., :-crop, crop:] - table[..., crop:, :-crop]
                + table[..., :-crop, :-crop]).flatten(2)

    return box(x), box(x * x)


def _shifted_correlations(centres: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Correlation of each query's standardised centre window [n, 3 C^2] with every window of the same size of its
    candidates [n, k, 3, S, S]: [n, k, (S - C + 1)^2] (no window is copied out)."""
    n, k, c, side, _ = candidates.shape
    crop = int(round((centres.shape[1] / c) ** 0.5))
    # The centre is zero-mean, so its dot product with a window equals the dot product with the centred window.
    dots = _cross(centres.view(n, c, crop, crop), candidates)
    s1, s2 = _window_sums(candidates, crop)
    norm = (s2 - s1 * s1 / (c * crop * crop)).clamp_min(0).sqrt()
    return torch.where(norm > 1e-3, dots / norm.clamp_min(1e-6), torch.zeros_like(norm))


def _shifted_rms(centres: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Root mean square difference between each query's centre window [n, 3, C, C] and every window of the same size of
    its candidates [n, k, 3, S, S]: [n, k, (S - C + 1)^2]."""
    own = _window_sums(candidates, centres.shape[-1])[1]
    square = own + centres.float().pow(2).flatten(1).sum(1)[:, None, None] - 2 * _cross(centres, candidates)
    return (square.clamp_min(0) / centres[0].numel()).sqrt()


def _detail(images: torch.Tensor) -> torch.Tensor:
    """[..., C, S, S] -> the images minus their Gaussian blur (sigma 1 px, edges replicated): what a silhouette lacks."""
    side = images.shape[-1]
    x = images.float().reshape(-1, 1, side, side)
    taps = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / 2)
    weights = (taps / taps.sum()).tolist()
    padded = F.pad(x, (3, 3, 3, 3), mode="replicate")[:, 0]
    # Separable, as sums of shifted slices: a 7-tap blur of single-channel planes is slow as a CPU convolution.
    rows = torch.stack([w * padded[:, :, j:j + side] for j, w in enumerate(weights)]).sum(0)
    blur = torch.stack([w * rows[:, j:j + side, :] for j, w in enumerate(weights)]).sum(0)
    return (x[:, 0] - blur).view(images.shape)


def _centre(images: torch.Tensor, shift: int) -> torch.Tensor:
    crop = images.shape[-1] - 2 * shift
    return _unit(images[..., shift:shift + crop, shift:shift + crop].flatten(-3).float())


def _spectrum(images: torch.Tensor, keep: int = 6) -> torch.Tensor:
    """[N, 3, S, S] -> [N, 3 (2 keep - 1) keep] standardised amplitudes of the lowest spatial frequencies of each channel.

    A shift changes only the phases of an image's Fourier transform (exactly for circular shifts), so near-duplicates
    that are shifted copies keep nearly the same amplitudes."""
    amp = torch.fft.rfft2(images.float() - images.float().mean(dim=(2, 3), keepdim=True)).abs()
    low = torch.cat([amp[..., :keep, :keep], amp[..., -keep + 1:, :keep]], dim=-2)
    return _unit(low.flatten(1).sqrt())


@torch.no_grad()
def best_match(query: torch.Tensor, reference: torch.Tensor, chunk: int = 32, detail: float = DETAIL,
               noise: float = NOISE, spectra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query signature's [N, 3, 32, 32] highest correlation with a reference [M, 3, 32, 32] at any shift where their
    details agree (see the module), and which reference: ([N] float, [N] int64; -1 and 0 where no reference reaches
    ``FLOOR`` or the image is flat). ``spectra``: the references' :func:`reference_spectra`, when kept from before."""
    best = torch.full((len(query),), -1.0)
    which = torch.zeros(len(query), dtype=torch.int64)
    if len(reference) == 0 or len(query) == 0:
        return best, which
    ref_small = reference_spectra(reference) if spectra is None else spectra
    k = min(CANDIDATES, len(reference))
    for start in range(0, len(query), chunk):
        part = query[start:start + chunk]
        # 1. Candidates: the references whose low-frequency amplitude spectra (blind to shifts) correlate best; an image
        #    whose spectrum is far from every reference's is no near-duplicate, and skips step 2.
        close, cand = (_spectrum(part) @ ref_small.T).topk(k, dim=1)  # [n, k]
        rows = (close[:, 0] >= PREFILTER).nonzero()[:, 0]
        if len(rows) == 0:
            continue
        # 2. Full size, every whole-pixel shift of each candidate.
        sims = _shifted_correlations(_centre(part[rows], SHIFT), reference[cand[rows]])  # [r, k, shifts]
        sims[close[rows] < PREFILTER] = -1.0
        # 3. A shift counts only where the details agree too, checked for the pairs that come near at all.
        sims = sims.masked_fill(~_details_agree(part[rows], reference, cand[rows], sims.amax(2) >= FLOOR, detail, noise), -1.0)
        value, at = sims.amax(2).max(1)
        flat = _centre(part[rows], SHIFT).abs().sum(1) == 0
        best[start + rows] = torch.where(flat, torch.full_like(value, -1.0), value)
        which[start + rows] = cand[rows].gather(1, at[:, None])[:, 0]
    return best, which


def _details_agree(part: torch.Tensor, reference: torch.Tensor, cand: torch.Tensor, near: torch.Tensor, detail: float,
                   noise: float) -> torch.Tensor:
    """[r, k, shifts] bool: whether each query's detail [r, 3, S, S] agrees with its candidate's (``reference[cand]``,
    [r, k]) at each shift, for the pairs ``near`` [r, k] (the others: False)."""
    agree = torch.zeros(*cand.shape, (2 * SHIFT + 1) ** 2, dtype=torch.bool)
    r, c = near.nonzero(as_tuple=True)
    if len(r):
        mine, theirs = _detail(part[r]), _detail(reference[cand[r, c]])[:, None]  # [h, 3, S, S], [h, 1, 3, S, S]
        window = mine[..., SHIFT:-SHIFT, SHIFT:-SHIFT]
        agree[r, c] = ((_shifted_correlations(_centre(mine, SHIFT), theirs) >= detail)
                       | (_shifted_rms(window, theirs) <= noise))[:, 0]
    return agree


def reference_spectra(reference: torch.Tensor) -> torch.Tensor:
    """What :func:`best_match` computes of its references first (half its time against a large test split): worth
    keeping where one reference set is checked again and again."""
    return _spectrum(reference)


def near_duplicates(query: torch.Tensor, reference: torch.Tensor, threshold: float = THRESHOLD,
                    spectra: torch.Tensor | None = None) -> torch.Tensor:
    """[N] bool: which query signatures [N, 3, 32, 32] are near-duplicates of some reference signature."""
    return best_match(query, reference, spectra=spectra)[0] >= threshold
