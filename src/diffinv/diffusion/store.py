"""The embedding store: what ``diffinv invert`` writes and ``diffinv generate`` reads.

Layout of a store folder::

    store.json            format, model fingerprint, conditioning shape, classes, status
    config.yaml           the resolved InvertConfig
    parts/part-<h>.safetensors + part-<h>.json   embeddings [n, K, D] + their manifest rows
    failed/part-<h>.json  images whose loss stayed non-finite after the retries (left out, reported)
    checkpoints/batch-<h>.safetensors            batches in progress (one per shard at most)
    manifest.jsonl        every image's row, written when the store is complete

A part counts as finished only once its ``.json`` exists, and that is written (atomically)
after its tensors, so a kill never leaves a part that looks finished but is not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffinv.errors import UserError
from diffinv.runs import file_sha256, read_checkpoint, read_json, save_checkpoint, write_json, write_safetensors, write_text

if TYPE_CHECKING:  # imported where tensors are made, so that opening a folder (verify, report) needs no torch
    import torch

STORE_FORMAT = "diffinv-store-v1"
CLASS_PREFIX = "class:"  # the id of a per-class row (``invert --target class``): "class:<name>"
MARKER = "store.json"


class StoreError(UserError, ValueError):
    """A store is missing, unfinished, or does not fit the model or data it is used with."""


@dataclass
class EmbeddingStore:
    """A finished store loaded in memory: ``embeddings`` [N, K, D] float32, row i for ``ids[i]``."""

    root: Path
    info: dict[str, Any]
    rows: list[dict[str, Any]]
    embeddings: torch.Tensor

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]

    @property
    def labels(self) -> torch.Tensor:
        import torch

        return torch.tensor([r["label"] for r in self.rows], dtype=torch.int64)

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    def mean_embedding(self) -> torch.Tensor:
        """[K, D]: the unconditional input for classifier-free guidance (the paper's choice)."""
        return self.embeddings.mean(dim=0)

    @classmethod
    def open(cls, root: str | Path, allow_partial: bool = False) -> EmbeddingStore:
        root = Path(root)
        if not (root / MARKER).is_file():
            raise StoreError(f"{root} is not an embedding store (no {MARKER}); make one with `diffinv invert`")
        info = read_json(root / MARKER)
        if info.get("format") != STORE_FORMAT:
            raise StoreError(f"{root}: unknown store format {info.get('format')!r}")
        if info.get("status") != "complete" and not allow_partial:
            raise StoreError(f"{root} is unfinished; finish it with `diffinv invert ... --resume`")
        rows = read_rows(root)
        problems = damage(root, info, rows) if info.get("status") == "complete" else []
        if problems:
            raise StoreError(f"{root} is damaged: {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. Run the "
                             f"`diffinv invert` command that made it again with --resume: it redoes what is missing")
        edits = tampering(root, info, rows) if info.get("status") == "complete" else []
        if edits:
            raise StoreError(f"{root} changed since it was made: {'; '.join(edits)}. Which version is right cannot be told: "
                             f"make it again (the `diffinv invert` command that made it, with --overwrite)")
        import torch
        from safetensors.torch import load_file

        parts = {}
        for name in {r["part"] for r in rows}:
            try:
                parts[name] = load_file(str(root / "parts" / f"{name}.safetensors"))["embeddings"]
            except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
                raise StoreError(f"{root}/parts/{name}.safetensors cannot be read ({exc}); run the `diffinv invert` command "
                                 f"that made the store again with --resume to redo it") from exc
        embeddings = torch.stack([parts[r["part"]][r["row"]] for r in rows]) if rows else torch.empty(0, *info["cond_shape"])
        bad = [r["id"] for r, e in zip(rows, embeddings) if not bool(torch.isfinite(e).all())]
        if bad:
            # One NaN row would make the mean embedding (guidance's input) NaN and every generated image black.
            raise StoreError(f"{root}: the embeddings of {len(bad)} image(s) are not finite ({', '.join(bad[:3])}); invert them "
                             f"again (delete their parts and run `diffinv invert ... --resume`) or drop them")
        return cls(root, info, rows, embeddings)


def damage(root: Path, info: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """What is wrong with a finished store that a resume repairs: missing rows, part files missing, of the wrong size or
    not matching their checksum (a few MB per store: cheap enough for every open)."""
    problems = []
    failed = read_rows(root, "failed")
    expected = info.get("n_items", info.get("n_images"))
    if expected is not None and len(rows) + len(failed) != expected:
        problems.append(f"{expected - len(rows) - len(failed)} of {expected} images have no part (parts/*.json deleted?)")
    for name, size in {r["part"]: r.get("part_bytes") for r in rows}.items():
        path = root / "parts" / f"{name}.safetensors"
        if not path.is_file():
            problems.append(f"parts/{name}.safetensors is missing")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"parts/{name}.safetensors has {path.stat().st_size} bytes, {size} expected")
        elif not _intact(path, next(r.get("part_sha256") for r in rows if r["part"] == name)):
            problems.append(f"parts/{name}.safetensors does not match its checksum")
    return problems


def _intact(path: Path, sha256: str | None) -> bool:
    return not sha256 or file_sha256(path) == sha256


def tampering(root: Path, info: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """What was edited in a finished store since it was made: its parts' rows against the manifest, the manifest
    against the identity the header records."""
    problems = []
    manifest = root / "manifest.jsonl"
    if manifest.is_file():
        try:
            listed = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError:
            return ["manifest.jsonl is not valid JSON lines (damaged or edited)"]
        if listed != rows:
            problems.append("parts/*.json differ from manifest.jsonl (edited after the store was made?)")
        if info.get("identity") and info["identity"] != identity(root):
            problems.append("manifest.jsonl differs from the identity store.json records (edited?)")
    return problems


def identity(root: str | Path) -> str:
    """A finished store's identity: the digest of its manifest, which holds every row and every part's checksum.

    A synthetic set records it, so a set is never continued from, or checked against, another store at the same path.
    """
    return hashlib.sha256((Path(root) / "manifest.jsonl").read_bytes()).hexdigest()[:16]


def read_rows(root: str | Path, folder: str = "parts", strict: bool = True) -> list[dict[str, Any]]:
    """Manifest rows of every finished part, in image order, without loading any tensor.

    ``folder="failed"`` lists the images that were given up on instead. A part file that is not valid JSON
    raises :class:`StoreError` (``strict=False``: it is left out, so that a resume redoes its images).
    """
    rows = []
    for meta in (Path(root) / folder).glob("part-*.json"):
        try:
            rows += read_json(meta)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if strict:
                raise StoreError(f"{meta} is not valid JSON (damaged or edited); run the `diffinv invert` command that made "
                                 f"the store again with --resume: it redoes that part") from None
    return sorted(rows, key=lambda r: r["index"])


def part_name(ids: list[str]) -> str:
    """A batch's stable name: the same images give the same name in any process."""
    return "part-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]


class StoreWriter:
    """Writes a store part by part; safe to kill at any point and resume."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "parts").mkdir(parents=True, exist_ok=True)

    def start(self, info: dict[str, Any]) -> None:
        write_json(self.root / MARKER, {**info, "format": STORE_FORMAT, "status": "in-progress"})

    def info(self) -> dict[str, Any]:
        return read_json(self.root / MARKER)

    def finished_ids(self) -> set[str]:
        """Ids with a result: in an intact part, or given up on (retrying those would fail the same way).

        A part whose tensor file is missing or of the wrong size does not count, so ``--resume`` redoes it.
        """
        rows = read_rows(self.root, strict=False)
        parts = {r["part"]: self.root / "parts" / f"{r['part']}.safetensors" for r in rows}
        ok = {name for name, path in parts.items() if path.is_file() and all(
            r.get("part_bytes") in (None, path.stat().st_size) for r in rows if r["part"] == name)}
        ok = {name for name in ok if _intact(parts[name], next(r.get("part_sha256") for r in rows if r["part"] == name))}
        intact = [r for r in rows if r["part"] in ok]
        return {r["id"] for r in intact} | {r["id"] for r in read_rows(self.root, "failed")}

    def reopen(self) -> None:
        """Mark a finished store unfinished again, so that what is missing from it can be redone."""
        write_json(self.root / MARKER, {**self.info(), "status": "in-progress"})

    def write_part(self, embeddings: torch.Tensor, rows: list[dict[str, Any]], failed: Sequence[dict[str, Any]] = ()) -> str:
        """Atomically add embeddings [n, K, D] with their manifest rows (and the batch's failed images)."""
        name = part_name([r["id"] for r in rows] + [r["id"] for r in failed])
        if failed:
            # Written first: a kill between the two writes leaves the batch unfinished, and it is redone.
            write_json(self.root / "failed" / f"{name}.json", list(failed))
        path = self.root / "parts" / f"{name}.safetensors"
        write_safetensors(path, {"embeddings": embeddings.float()})
        # The tensor file's size and checksum travel with its rows: opening checks the size, `diffinv verify` the sum.
        stamp = {"part_bytes": path.stat().st_size, "part_sha256": file_sha256(path)}
        rows = [{**r, "part": name, "row": j, **stamp} for j, r in enumerate(rows)]
        write_json(self.root / "parts" / f"{name}.json", rows)
        return name

    # -- batches in progress ------------------------------------------------------------------
    # One file holds tensors and metadata, so the pair can never be torn by a kill. Each batch
    # has its own file, so shards writing into one store never touch each other's checkpoints.
    def _checkpoint_path(self, batch: str) -> Path:
        return self.root / "checkpoints" / f"{batch}.safetensors"

    def save_checkpoint(self, batch: str, tensors: dict[str, torch.Tensor], optimiser: torch.optim.Optimizer | None,
                        meta: dict[str, Any]) -> None:
        save_checkpoint(self._checkpoint_path(batch), tensors, optimiser, meta)

    def load_checkpoint(self, batch: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        path = self._checkpoint_path(batch)
        return read_checkpoint(path) if path.is_file() else None

    def clear_checkpoint(self, batch: str) -> None:
        self._checkpoint_path(batch).unlink(missing_ok=True)

    def finish(self, expected: int) -> None:
        """Write the manifest once all ``expected`` items have a part or a failure record; idempotent."""
        rows, failed = read_rows(self.root), read_rows(self.root, "failed")
        if len(rows) + len(failed) != expected:
            raise StoreError(f"{self.root}: expected {expected} images, found {len(rows) + len(failed)}")
        write_text(self.root / "manifest.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        write_json(self.root / MARKER, {**self.info(), "status": "complete", "n_items": expected, "n_images": len(rows),
                                         "failed": [{"id": r["id"], "error": r["error"]} for r in failed],
                                         "identity": identity(self.root)})
