"""``diffinv finetune``: one LoRA adapter of the UNet per class, fitted on that class's real images.

DataDream's step on our models: each class's adapter (rank ``--rank`` on every attention
projection) is trained with the denoising loss on the class's real images, conditioned by the
class's learned embedding from a per-class store (``diffinv invert --target class``), whose
config names the real images, the model and the resolution; or, on a model with a text encoder,
by a class prompt (``--prompt``), the text encoder adapted too with ``--text-encoder``, as
DataDream fits SD. The base stays frozen. Each class's
adapter is written atomically when it is done, so a re-run after a kill fits only the missing
ones. ``generate --method lora`` or ``di+lora`` with ``--adapters OUT`` samples through them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from diffinv import rng
from diffinv.config import FinetuneConfig, config_to_dict
from diffinv.data.real import load_pixels, open_images, real_subset
from diffinv.data.synthetic import slug
from diffinv.device import resolve_device
from diffinv.diffusion.lora import fit_lora
from diffinv.diffusion.methods.base import Adapter
from diffinv.diffusion.model_io import load_store_model
from diffinv.diffusion.objective import evaluation_loss
from diffinv.diffusion.store import EmbeddingStore, StoreError
from diffinv.progress import bar as progress_bar
from diffinv.runs import add_cost, atomic_write, file_sha256, open_output, read_json, read_yaml, write_json, write_yaml
from diffinv.stages import Stage

MARKER = "finetune.json"


def finetune_classes(config: FinetuneConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                     progress: bool = True, log: Callable[[str], None] = print) -> Path:
    out = Path(out)
    # 1. The class store and what it was inverted from; refused before anything slow.
    store = EmbeddingStore.open(config.store)
    if store.info.get("target", "image") != "class" and not config.prompt:
        raise StoreError(f"--store {config.store} holds one embedding per image; finetune conditions each class's adapter on "
                         f"its class embedding: run `diffinv invert --target class` on the same data and pass that store "
                         f"(or condition on a class prompt: --prompt 'a photo of a {{}}', for a model with a text encoder)")
    made = read_yaml(Path(store.root) / "config.yaml") or {}
    if open_output(out, MARKER, config, noun="adapter folder", resume=resume, overwrite=overwrite) == "done":
        return out
    device = resolve_device(config.device)
    model = store.info.get("model_path", store.info["model"])
    backbone = load_store_model(store, model, with_text_encoder=bool(config.prompt), device=device)
    source = open_images(made["data"], made.get("format", "auto"), made.get("split", "train"))
    images = real_subset(source, made.get("per_class"), int(made.get("subset_seed", 0)), made.get("bad_images", "skip"),
                         int(made.get("val_per_class") or 0), warn=log)
    resolution = int(store.info["resolution"])
    with torch.no_grad():
        moments = backbone.encode(load_pixels(images, resolution))
    write_yaml(out / "config.yaml", config_to_dict(config))
    if not (out / MARKER).is_file():
        write_json(out / MARKER, {"status": "running", "store": str(Path(config.store).resolve())})
    alpha = config.alpha or float(config.rank)

    # 2. One adapter per class, each written when fitted (a re-run skips those already there).
    classes = list(store.classes)
    record = read_json(out / "progress.json") if (out / "progress.json").is_file() else {}
    bar = progress_bar(total=len(classes) * config.steps, desc="finetune (LoRA per class)", unit="step", disable=not progress)
    for c, name in enumerate(classes):
        path = out / "adapters" / f"{slug(name)}.safetensors"
        if path.is_file() and name in record:
            bar.update(config.steps)
            continue
        own = torch.as_tensor(images.labels) == c
        members = type(moments)(moments.mean[own], moments.std[own])
        record[name] = fit_class(backbone, f"class{c}", members, _condition(backbone, store, config, c, device), config, alpha,
                                 lambda *_: bar.update(1))
        state = backbone.lora_state(f"class{c}")
        atomic_write(path, partial(_save, state=state, name=name, config=config, alpha=alpha))
        write_json(out / "progress.json", record)
        add_cost(out, record[name]["seconds"], 1, str(device), "classes")  # a study counts it in LoRA's cost
        backbone.use_lora(None)
    bar.close()

    # 3. The marker last: what was fitted, on what, at what cost.
    write_json(out / MARKER, {"status": "complete", "classes": classes, "store": str(Path(config.store).resolve()),
                              "model": model, "model_fingerprint": backbone.fingerprint(), "rank": config.rank,
                              "alpha": alpha, "resolution": resolution, "n_images": len(images), "device": str(device),
                              "prompt": config.prompt, "text_encoder": config.text_encoder,
                              "seconds": round(sum(r["seconds"] for r in record.values()), 3), "per_class": record})
    return out


def _condition(backbone: Any, store: EmbeddingStore, config: FinetuneConfig, c: int,
               device: torch.device) -> torch.Tensor | Callable[[], torch.Tensor]:
    """Class ``c``'s conditioning [K, D]: its row of the class store, or its prompt through the text encoder (recomputed
    each step when the text encoder's adapter is fitted too)."""
    if not config.prompt:
        return store.embeddings[int(torch.nonzero(store.labels == c)[0])].to(device)
    prompt = config.prompt.format(store.classes[c])
    if config.text_encoder:
        return lambda: backbone.encode_prompts([prompt], grad=True)[0]
    return backbone.encode_prompts([prompt])[0]


def fit_class(backbone: Any, adapter: str, moments: Any, cond: torch.Tensor | Callable[[], torch.Tensor],
              config: FinetuneConfig, alpha: float, progress: Callable[[int, float], None]) -> dict[str, Any]:
    """Fit one class's adapter; its denoising loss on fixed draws before and after, and the seconds it took."""
    started = time.perf_counter()
    seed = rng.key_of(config.seed, adapter) % 2**63  # per class: a class's adapter is the same whatever was fitted before
    params = backbone.add_lora(adapter, config.rank, alpha, seed, text_encoder=config.text_encoder)
    keys = rng.keys_tensor(config.seed, [f"{adapter}|{i}" for i in range(len(moments.mean))]).to(moments.mean.device)

    def loss() -> float:
        with torch.no_grad():
            condition = (cond() if callable(cond) else cond).expand(len(moments.mean), -1, -1)
            return float(evaluation_loss(backbone, moments.mean, condition, keys).mean())

    before = loss()
    losses = fit_lora(backbone, params, moments, cond, steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                      seed=seed, progress=progress)
    after = loss()
    return {"images": len(moments.mean), "loss_before": round(before, 6), "loss_after": round(after, 6),
            "last_loss": round(losses[-1], 6), "seconds": round(time.perf_counter() - started, 3)}


def _save(path: Path, state: dict[str, torch.Tensor], name: str, config: FinetuneConfig, alpha: float) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"class": name, "rank": str(config.rank), "alpha": str(alpha), "prompt": config.prompt})


def adapter_prompt(folder: str | Path) -> str:
    """The prompt an adapter folder was fitted under ("": the class embeddings; also for a folder not finished yet,
    which :func:`read_adapters` then refuses)."""
    marker = Path(folder) / MARKER
    return str(read_json(marker).get("prompt", "")) if marker.is_file() else ""


def read_adapters(folder: str | Path, classes: list[str], fingerprints: set[str] | list[str]) -> tuple[list[Adapter], dict[str, Any]]:
    """A finished adapter folder's adapters, one per class in class order, checked to be of this model and these
    classes; and what they are (path, rank, fitting cost, checksums) for the manifest of a set sampled through them."""
    from safetensors import safe_open

    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file() or read_json(marker).get("status") != "complete":
        raise StoreError(f"--adapters {folder} is not a finished `diffinv finetune` folder (no complete {MARKER})")
    info = read_json(marker)
    if info["model_fingerprint"] not in fingerprints:
        raise StoreError(f"--adapters {folder} were fitted on another model ({info['model']}); fit them on this one")
    if list(info["classes"]) != list(classes):
        raise StoreError(f"--adapters {folder} are of the classes {info['classes']}, the store of {classes}")
    adapters = []
    for name in classes:
        with safe_open(str(folder / "adapters" / f"{slug(name)}.safetensors"), framework="pt", device="cpu") as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        adapters.append(Adapter(state, int(meta["rank"]), float(meta["alpha"])))
    return adapters, {"adapters": str(folder.resolve()), "rank": info["rank"], "fit_seconds": info["seconds"],
                      "fit_device": info["device"], "store": info["store"], "prompt": info.get("prompt", ""),
                      "text_encoder": bool(info.get("text_encoder", False)),
                      "adapters_sha256": {name: file_sha256(folder / "adapters" / f"{slug(name)}.safetensors") for name in classes}}


def _run(config: FinetuneConfig, out: Path, *, resume: bool, overwrite: bool, progress: bool, log: Callable[[str], None],
         **_: Any) -> Path:
    return finetune_classes(config, out, resume=resume, overwrite=overwrite, progress=progress, log=log)


def _summary(config: FinetuneConfig, out: Path) -> str:
    info = read_json(out / MARKER)
    per = info["per_class"].values()
    before = sum(r["loss_before"] for r in per) / len(per)
    after = sum(r["loss_after"] for r in per) / len(per)
    return (f"adapters {out}: {len(info['classes'])} classes, rank {info['rank']}, denoising loss {before:.4f} -> {after:.4f} "
            f"(mean over classes), {info['seconds']:.1f} s; sample with `diffinv generate --method lora --adapters {out}`")


STAGE = Stage(name="finetune", config=FinetuneConfig, marker=MARKER, run=_run, summary=_summary, path_fields=("store",),
              outputs=("adapter folder to write", "fit the classes an interrupted run left", "replace an existing adapter folder"))
