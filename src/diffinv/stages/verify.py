"""``diffinv verify PATH``: check a store or a synthetic set completely (checksums, finite embeddings, files <-> manifest).

Opening a store or set already checks the cheap things (counts, sizes); this reads every byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffinv.data import synthetic
from diffinv.diffusion import store
from diffinv.runs import RunError, file_sha256, read_json
from diffinv.stages import Stage


def verify(path: str | Path) -> tuple[str, list[str]]:
    """(what the folder is, its problems): an empty list means every file is there and intact."""
    root = Path(path)
    if (root / store.MARKER).is_file():
        return "store", _store_problems(root)
    if (root / synthetic.MARKER).is_file():
        return "synthetic set", _set_problems(root)
    raise RunError(f"{root} is neither an embedding store (store.json) nor a generated set (generate.json)")


def _store_problems(root: Path) -> list[str]:
    from safetensors.torch import load_file

    info = read_json(root / store.MARKER)
    if info.get("status") != "complete":
        return [f"unfinished ({info.get('status')}): run the `diffinv invert` command again with --resume"]
    try:
        rows = store.read_rows(root)
    except store.StoreError as exc:
        return [str(exc)]
    problems = [p for p in store.damage(root, info, rows) if "checksum" not in p] + store.tampering(root, info, rows)
    listed = {r["part"] for r in rows} | {p.stem for p in (root / "failed").glob("part-*.json")}
    for path in sorted((root / "parts").glob("part-*.safetensors")):
        if path.stem not in listed:
            problems.append(f"parts/{path.name} is in no manifest row")
    for name in sorted({r["part"] for r in rows}):
        path = root / "parts" / f"{name}.safetensors"
        mine = [r for r in rows if r["part"] == name]
        if not path.is_file():
            continue  # damage() said so
        expected = mine[0].get("part_sha256")
        if expected and file_sha256(path) != expected:
            problems.append(f"parts/{path.name} does not match its checksum")
            continue
        try:
            tensor = load_file(str(path))["embeddings"]
        except Exception as exc:  # safetensors' own error types
            problems.append(f"parts/{path.name} cannot be read ({exc})")
            continue
        bad = [r["id"] for r in mine if not bool(tensor[r["row"]].isfinite().all())]
        if bad:
            problems.append(f"parts/{path.name}: embeddings of {', '.join(bad[:3])} are not finite")
    return problems


def _set_problems(root: Path) -> list[str]:
    info = read_json(root / synthetic.MARKER)
    if info.get("status") != "complete":
        return [f"unfinished ({info.get('status')}): run the `diffinv generate` command again"]
    try:
        rows = synthetic.read_manifest(root)
    except ValueError as exc:  # JSONDecodeError, or the manifest missing (DataError)
        return [f"manifest.jsonl cannot be read ({exc})"]
    problems = synthetic.damage(root, rows)
    made_from = Path(info.get("store", ""))
    if info.get("store_identity") and (made_from / "manifest.jsonl").is_file() and store.identity(made_from) != info["store_identity"]:
        problems.append(f"it was made from another version of the store {made_from} (the store was made again since)")
    for r in rows:
        path = root / r["file"]
        if path.is_file() and r.get("sha256") and file_sha256(path) != r["sha256"]:
            problems.append(f"{r['file']} does not match its checksum")
    listed = {r["file"] for r in rows}
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png") if p.relative_to(root).as_posix() not in listed)
    problems += [f"{name} is in no manifest row" for name in extra]
    return problems


def _command(args) -> int:
    kind, problems = verify(args.folder)
    for problem in problems:
        print(f"{args.folder}: {problem}", file=sys.stderr)
    print(f"{args.folder}: {kind} {'ok' if not problems else f'has {len(problems)} problem(s)'}")
    return 2 if problems else 0


STAGE = Stage(name="verify", cli="folder", command=_command,
              folder="a store (from invert) or a synthetic set (from generate)")
