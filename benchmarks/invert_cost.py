"""Inversion cost: how many image-steps each recipe needs to reach the paper recipe's final loss.

Every recipe inverts the same images on the same base; the mean evaluation loss (fixed keyed
draws at 8 evenly spaced timesteps, so recipes are compared on identical noise) is measured at a
grid of steps. "image-steps" counts gradients: one image, one denoising loss, one backward. The
paper recipe (``--preset paper``: U(+-0.1) start, groups of 100 in batches of 50, lr 3e-2 constant,
so 3,000 gradients per image are 6,000 optimiser updates) runs ``--paper-steps``; the others
``--steps``. Seconds exclude the evaluations. Prints one JSON object (also written to ``--out``)
and a one-line summary.

    python benchmarks/invert_cost.py                                   # autoencoder digits base, 100 digits
    python benchmarks/invert_cost.py --base src/diffinv/assets/digits-base --recipes ours   # the embedded (invariant) one

On a random-weight model the loss curves mean nothing (there is nothing to fit); use a trained
base. The GPU suite measures the per-step part on an SD 1.x-sized model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffinv import rng
from diffinv.config import InvertConfig, load_config
from diffinv.data.real import load_pixels, open_images, select
from diffinv.diffusion.inversion import InversionSettings, invert_batch
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.objective import evaluation_loss

# Recipe name -> InvertConfig overrides, spelled out in full so that a recipe keeps its meaning when
# the library's defaults change. "ours" is whatever the library's defaults are.
_PAPER_OPT = {"init": "random", "update": "own", "lr_schedule": "constant", "warmup": 0, "timesteps": "uniform",
              "draws": "independent"}
_COSINE = {"init": "random", "update": "own", "lr_schedule": "cosine", "warmup": 10, "draws": "independent"}
RECIPES: dict[str, dict] = {
    "paper": {"preset": "paper"},
    "ours": {},
    "former-default": {**_PAPER_OPT, "lr": 3e-2},
    "uniform-init": {**_PAPER_OPT, "lr": 3e-2, "init": "uniform", "group_size": 100},
    "lr0.1": {**_PAPER_OPT, "lr": 0.1},
    "lr0.1-cosine": {**_COSINE, "lr": 0.1, "timesteps": "uniform"},
    "lr0.1-cosine-strat": {**_COSINE, "lr": 0.1, "timesteps": "stratified"},
    "lr0.3-cosine-strat": {**_COSINE, "lr": 0.3, "timesteps": "stratified"},
    "lr1-cosine-strat": {**_COSINE, "lr": 1.0, "timesteps": "stratified"},
    "encoder-lr0.3-cosine-strat": {**_COSINE, "lr": 0.3, "timesteps": "stratified", "init": "encoder"},
    "encoder-lr0.1-cosine-strat": {**_COSINE, "lr": 0.1, "timesteps": "stratified", "init": "encoder"},
    # Antithetic pairs (the default since 2026-11-26): step 2k+1 reuses step 2k's timestep with the noise negated.
    "lr0.3-cosine-strat-anti": {**_COSINE, "lr": 0.3, "timesteps": "stratified", "draws": "antithetic"},
    "encoder-lr0.3-cosine-strat-anti": {**_COSINE, "lr": 0.3, "timesteps": "stratified", "draws": "antithetic", "init": "encoder"},
    "encoder-lr0.1-cosine-strat-anti": {**_COSINE, "lr": 0.1, "timesteps": "stratified", "draws": "antithetic", "init": "encoder"},
    "encoder-lr1-cosine-strat-anti": {**_COSINE, "lr": 1.0, "timesteps": "stratified", "draws": "antithetic", "init": "encoder"},
    # Importance-sampled timesteps (--timesteps importance): a pilot draw per tenth of the schedule, then
    # t drawn in proportion to the root of the image's gradient second moment there, loss reweighted.
    "lr0.3-cosine-imp-anti": {**_COSINE, "lr": 0.3, "timesteps": "importance", "draws": "antithetic"},
    "encoder-lr0.3-cosine-imp-anti": {**_COSINE, "lr": 0.3, "timesteps": "importance", "draws": "antithetic", "init": "encoder"},
    # Per-image early stopping (--early-stop): an image stops when its loss fell by less than 1% over
    # its last check; image-steps are then the sum of each image's own steps.
    "ours-early": {"early_stop": 0.01, "check_every": 25},
    "former-default-early": {**_PAPER_OPT, "lr": 3e-2, "early_stop": 0.01, "check_every": 100},
}
# The README's figures were measured on the digits base embedded until 2026-11-26, a diffusion
# autoencoder (its tokens redraw the image); it stays the default so its commands reproduce them.
AE_BASE = Path(__file__).resolve().parents[1] / "bases" / "digits-8-ae"
GRID = (0, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000)


def run_recipe(name: str, backbone, pixels: torch.Tensor, keys: torch.Tensor, base: str, steps: int,
               encoder=None) -> dict:
    """Invert ``pixels`` [N, 3, R, R] with one recipe; its loss curve and timings."""
    from diffinv.diffusion.encoder import encoder_tokens

    config = load_config(InvertConfig, None, {"model": base, "data": "-", "resolution": pixels.shape[-1], "steps": steps,
                                              "checkpoint_every": 1, "log_every": steps,
                                              "tokens": encoder_tokens(base) or InvertConfig.tokens, **RECIPES[name]})
    clean = backbone.encode(pixels).mean
    curve, spent = [], {"eval": 0.0}

    def measure(step: int, embeddings: torch.Tensor) -> None:
        t = time.perf_counter()
        loss = evaluation_loss(backbone, clean, embeddings.to(clean.device), keys).mean().item()
        spent["eval"] += time.perf_counter() - t
        curve.append({"step": step, "image_steps": step * len(keys), "seconds": round(time.perf_counter() - start - spent["eval"], 2),
                      "loss": loss})

    def checkpoint(step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if step in GRID:
            measure(step, tensors["embeddings"])

    init = None
    if config.init == "encoder":
        with torch.no_grad():
            init = encoder(pixels).float()
    start = time.perf_counter()
    if config.early_stop:  # one end point: each image stopped at its own step
        result = invert_batch(backbone, pixels, keys, InversionSettings.of(config), slots=len(keys), init=init)
        seconds = round(time.perf_counter() - start, 2)
        curve = [{"step": 0, "image_steps": 0, "seconds": 0.0, "loss": result.loss_init.mean().item()},
                 {"step": round(sum(result.steps) / len(keys), 1), "image_steps": sum(result.steps), "seconds": seconds,
                  "loss": result.loss_final.mean().item(), "steps_min_max": [min(result.steps), max(result.steps)]}]
        return {"recipe": name, "settings": {k: v for k, v in vars(config).items() if k in InvertConfig.__dataclass_fields__},
                "curve": curve, "final_loss": curve[-1]["loss"], "seconds": seconds}
    embeddings, loss_init, _, _ = invert_batch(backbone, pixels, keys, InversionSettings.of(config), checkpoint=checkpoint,
                                               init=init)
    curve.insert(0, {"step": 0, "image_steps": 0, "seconds": 0.0, "loss": loss_init.mean().item()})
    measure(steps, embeddings)
    return {"recipe": name, "settings": {k: v for k, v in vars(config).items() if k in InvertConfig.__dataclass_fields__},
            "curve": curve, "final_loss": curve[-1]["loss"], "seconds": curve[-1]["seconds"]}


def reached(curve: list[dict], target: float) -> dict | None:
    """The first measured point at or below ``target``."""
    return next((p for p in curve if p["loss"] <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="", help="base model (default: bases/digits-8-ae)")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--per-class", type=int, default=10, help="images per class (10 digits classes: one paper group of 100)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the base's own size")
    parser.add_argument("--paper-steps", type=int, default=3000, help="gradients per image of the paper recipe")
    parser.add_argument("--steps", type=int, default=300, help="steps of the other recipes")
    parser.add_argument("--recipes", default="ours,former-default", help=f"comma list of {', '.join(r for r in RECIPES if r != 'paper')}")
    parser.add_argument("--paper-from", default="", help="reuse the paper recipe's run from an earlier JSON of this script "
                        "(same base, data and images; it is the slow part)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument("--out", default="", help="JSON file to write")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = args.base or str(AE_BASE)
    backbone = load_backbone(base)
    images = select(open_images(args.data), args.per_class, seed=0)
    resolution = args.resolution or backbone.choose_resolution(min(images.image(0).size))
    pixels = load_pixels(images, resolution)
    keys = rng.keys_tensor(0, images.ids)
    encoder = None
    names = [r for r in args.recipes.split(",") if r]
    if any(RECIPES[n].get("init") == "encoder" for n in names):
        from diffinv.diffusion.encoder import load_encoder

        encoder = load_encoder(base)

    if args.paper_from:
        earlier = json.loads(Path(args.paper_from).read_text())
        if (earlier["base"], earlier["data"], earlier["images"], earlier["resolution"]) != (base, args.data, len(images), resolution):
            raise SystemExit(f"{args.paper_from} measured another base, data, image count or resolution")
        paper = next(r for r in earlier["recipes"] if r["recipe"] == "paper")
        args.paper_steps = paper["settings"]["steps"]
    else:
        paper = run_recipe("paper", backbone, pixels, keys, base, args.paper_steps)
    target = paper["final_loss"]
    results = [paper]
    for name in names:
        result = run_recipe(name, backbone, pixels, keys, base, args.steps, encoder)
        hit = reached(result["curve"], target)
        result["reaches_paper_loss_at"] = hit
        if hit and hit["step"] == 0:
            result["image_step_ratio"] = result["seconds_ratio"] = None  # its start is already there
        elif hit:
            result["image_step_ratio"] = round(paper["curve"][-1]["image_steps"] / max(hit["image_steps"], 1), 2)
            result["seconds_ratio"] = round(paper["seconds"] / max(hit["seconds"], 1e-9), 2)
        results.append(result)
    report = {"base": base, "data": args.data, "images": len(images), "resolution": resolution, "torch_threads": torch.get_num_threads(),
              "paper_final_loss": target, "recipes": results}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    for r in results[1:]:
        hit = r["reaches_paper_loss_at"]
        if hit and hit["step"] == 0:
            print(f"{r['recipe']}: starts below the paper recipe's final loss {target:.4f} ({r['curve'][0]['loss']:.4f} before any step)")
            continue
        print(f"{r['recipe']}: " + (f"reaches the paper recipe's final loss {target:.4f} ({args.paper_steps} gradients/image) at "
                                    f"{hit['step']} steps: {r['image_step_ratio']}x fewer image-steps, {r['seconds_ratio']}x less time"
                                    if hit else f"does not reach {target:.4f} in {args.steps} steps (final {r['final_loss']:.4f})"))


if __name__ == "__main__":
    main()
