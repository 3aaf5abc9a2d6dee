"""The commands a new user runs first, timed as they run them: every default, from the CLI, one JSON.

    python benchmarks/user_path.py --out runs/user-path            # on a GPU: an SD 1.x-sized random model
    python benchmarks/user_path.py --cpu-check --out /tmp/up       # every command at toy sizes on the CPU

Builds the model locally (``diffinv tiny-model --kind sd1``: Stable Diffusion 1.x's sizes, random
weights; nothing is downloaded), then ``invert`` with every default (``--batch-size 0``: on CUDA it
probes the free memory and picks the batch), ``generate`` with di and img2img, and ``train`` on real
+ DI. Each command runs in this process as the CLI runs it; recorded per command: exit status, wall
seconds, peak GPU memory (CUDA), and for invert the batch it chose. Random weights: only speed,
memory and the exit statuses mean anything.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def run(name: str, argv: list[str], results: list[dict], out: Path) -> int:
    """``diffinv ARGV`` in this process: its status, seconds and peak GPU memory appended to ``results``."""
    from diffinv.cli import main

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    try:
        code = main([str(a) for a in argv])
    except Exception as exc:  # a traceback is a finding, recorded; the next commands still run
        code, error = 1, f"{type(exc).__name__}: {str(exc)[:300]}"
    else:
        error = None
    row = {"command": name, "argv": " ".join(map(str, argv)), "exit": code, "seconds": round(time.perf_counter() - began, 2)}
    if error:
        row["error"] = error
    if torch.cuda.is_available():
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results.append(row)
    print(json.dumps(row), flush=True)
    (out / "user_path.json").write_text(json.dumps({"benchmark": "user_path", "commands": results}, indent=1))
    return code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/user-path")
    ap.add_argument("--cpu-check", action="store_true", help="toy sizes on the CPU: checks the commands, measures nothing")
    ap.add_argument("--per-class", type=int, default=10)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    toy = args.cpu_check
    kind, k = ("latent", 2) if toy else ("sd1", args.per_class)
    results: list[dict] = []
    model, store = out / "model", out / "store"
    quiet = ["--quiet"]
    run("tiny-model", ["tiny-model", "--kind", kind, "--out", model, "--overwrite"], results, out)
    # Every default: the user's first command (toy: fewer steps, so the check takes seconds).
    steps = ["--steps", "3"] if toy else []
    if run("invert", ["invert", "--model", model, "--data", "digits", "--per-class", k, *steps, "--out", store, *quiet],
           results, out) == 0:
        import yaml

        saved = yaml.safe_load((store / "config.yaml").read_text())
        results[-1].update(batch_size_chosen=saved.get("batch_size"), resolution=saved.get("resolution"))
    for method in ("di", "img2img"):
        run(f"generate {method}", ["generate", "--store", store, "--method", method, *(["--steps", "2"] if toy else []),
                                   "--out", out / f"set-{method}", *quiet], results, out)
    run("train", ["train", "--data", "digits", "--per-class", k, "--synthetic", out / "set-di",
                  *(["--steps", "2"] if toy else []), "--out", out / "run", *quiet], results, out)
    failed = [r["command"] for r in results if r["exit"] != 0]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not toy else "cpu"
    summary = {"benchmark": "user_path", "device": device, "model": kind, "commands": results, "failed": failed}
    (out / "user_path.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    chosen = next((r.get("batch_size_chosen") for r in results if r["command"] == "invert"), None)
    print(f"user_path on {device}: {len(results) - len(failed)} of {len(results)} commands ok"
          f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}; invert chose --batch-size {chosen}; "
          + ", ".join(f"{r['command']} {r['seconds']:.0f} s" for r in results))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
