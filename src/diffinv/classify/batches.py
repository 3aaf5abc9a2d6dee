"""A classifier run's pure parts: keyed batch order, evaluation steps, train/test overlap."""

from __future__ import annotations

import hashlib

import torch

from diffinv.rng import key_of

_TEST_SIDES: dict[bytes, tuple[set[bytes], torch.Tensor, torch.Tensor]] = {}  # a study's runs check one test split


def _digest(x: torch.Tensor) -> bytes:
    return hashlib.blake2b(x.numpy().tobytes(), digest_size=12).digest()


def _test_side(test: torch.Tensor) -> tuple[set[bytes], torch.Tensor, torch.Tensor]:
    """The test split's image digests, near-duplicate signatures and their spectra, computed once per process."""
    from diffinv.data.near_duplicates import reference_spectra, signatures

    key = hashlib.blake2b(test.numpy().tobytes()).digest() + repr(tuple(test.shape)).encode()
    if key not in _TEST_SIDES:
        while len(_TEST_SIDES) >= 2:
            _TEST_SIDES.pop(next(iter(_TEST_SIDES)))
        sig = signatures(test)
        _TEST_SIDES[key] = ({_digest(t) for t in test}, sig, reference_spectra(sig))
    return _TEST_SIDES[key]


def overlap_pairs(real: torch.Tensor, test: torch.Tensor) -> list[tuple[int, int, str, float]]:
    """(training index, test index, "identical" or "looks like a copy", correlation) for each training image (uint8
    [N, 3, R, R]) that is a test image or looks like a copy of one (:mod:`diffinv.data.near_duplicates`)."""
    from diffinv.data.near_duplicates import THRESHOLD, best_match, signatures

    seen, test_sig, spectra = _test_side(test)
    if not len(real) or not len(test):
        return []
    score, which = best_match(signatures(real), test_sig, spectra=spectra)
    digests = [_digest(x) for x in real]
    first = {_digest(t): j for j, t in reversed(list(enumerate(test)))} if seen.intersection(digests) else {}
    pairs = []
    for i, d in enumerate(digests):
        if d in first:
            pairs.append((i, first[d], "identical", 1.0))
        elif float(score[i]) >= THRESHOLD:
            pairs.append((i, int(which[i]), "looks like a copy", float(score[i])))
    return pairs


def overlap_notes(real: torch.Tensor, ids: list[str], test: torch.Tensor, split: str, what: str = "training",
                  pairs: list[tuple[int, int, str, float]] | None = None) -> list[str]:
    """Training images (uint8 [N, 3, R, R]) that are test images, identical or near-duplicates (re-encoded, resized,
    shifted copies): the test score would partly be a memory test. ``pairs``: :func:`overlap_pairs`, when known."""
    pairs = overlap_pairs(real, test) if pairs is None else pairs
    same = [ids[i] for i, _, how, _ in pairs if how == "identical"]
    close = [ids[i] for i, _, how, _ in pairs if how != "identical"]
    def listed(found: list[str]) -> str:
        return f"({', '.join(found[:3])}{' ...' if len(found) > 3 else ''})"

    notes = []
    if same:
        notes.append(f"{len(same)} {what} image(s) are identical to images of the {split!r} split {listed(same)}: the test "
                     f"split overlaps the training data; remove them")
    if close:
        notes.append(f"{len(close)} {what} image(s) look like copies (re-encoded, resized or shifted) of images of the {split!r} "
                     f"split {listed(close)}: where they are, the test score is partly a memory test; check them by eye and "
                     f"remove the copies (pictures of one product or silhouette can look alike without being copies)")
    return notes

def conflicting_labels(images: torch.Tensor, labels, ids: list[str], classes: list[str]) -> list[str]:
    """One picture (equal pixels) listed under two or more labels: the classifier is taught both answers."""
    first: dict[bytes, tuple[int, str]] = {}
    clashes = []
    for x, label, image_id in zip(images, [int(v) for v in labels], ids):
        key = hashlib.blake2b(x.numpy().tobytes(), digest_size=12).digest()
        seen = first.setdefault(key, (label, image_id))
        if seen[0] != label:
            clashes.append(f"{seen[1]} ({classes[seen[0]]}) = {image_id} ({classes[label]})")
    if not clashes:
        return []
    return [f"{len(clashes)} training image(s) appear under two labels ({'; '.join(clashes[:2])}"
            f"{' ...' if len(clashes) > 2 else ''}): the same picture is taught as two classes; keep it under one"]


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
