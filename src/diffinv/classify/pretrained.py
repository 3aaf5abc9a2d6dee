"""Start a classifier from local pretrained weights: load what fits, leave the new head fresh.

Weights are a ``.safetensors`` file or a torch state dict (``.pt`` / ``.pth``, read with
``weights_only=True``, which loads tensors and refuses code). Tensors are matched by name and shape,
and the classification head is always left fresh (a checkpoint's classes are not the data's); the
tensors left fresh are returned, and the optimiser gives them the full learning rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffinv.classify.models import build_model, check_arch, classification_head
from diffinv.errors import UserError


class PretrainedError(UserError):
    pass


def read_state_dict(path: str | Path, flag: str = "--pretrained") -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, with the wrappers checkpoints often add removed (``flag`` names it in messages)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(
            f"{flag} {path} does not exist; pass a local .safetensors or .pth state dict (nothing is downloaded: "
            f"where there is internet, e.g. `python -c \"import torchvision; torchvision.models.resnet50(weights='DEFAULT')\"` "
            f"leaves it in ~/.cache/torch/hub/checkpoints/, or save `timm.create_model(NAME, pretrained=True).state_dict()`)")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pt", ".pth", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise PretrainedError(f"{flag} {path}: weights must be .safetensors, .pt or .pth")
    except PretrainedError:
        raise
    except Exception as exc:  # a truncated file, a pickle with code in it (refused by weights_only) ...
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            # torch's own advice (weights_only=False) would run the file's code: never pass it on.
            raise PretrainedError(f"{flag} {path} is a pickle that holds more than tensors (code or objects), so it was "
                                  f"not loaded; convert it to .safetensors where you trust it (safetensors.torch.save_file("
                                  f"model.state_dict(), 'model.safetensors'))") from None
        raise PretrainedError(f"{flag} {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{flag} {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


HUB = "hub"  # --pretrained hub[:TAG]: the published weights of a timm: or torchvision: architecture


def pretrained_state(arch: str, spec: str, flag: str = "--pretrained") -> dict[str, torch.Tensor]:
    """The tensors ``spec`` names: a local file, or ``hub`` / ``hub:TAG`` (the hubs' own weights and caches)."""
    if spec == HUB or spec.startswith(HUB + ":"):
        return hub_state_dict(arch, spec[len(HUB) + 1:], flag)
    return read_state_dict(spec, flag)


def hub_state_dict(arch: str, tag: str = "", flag: str = "--pretrained") -> dict[str, torch.Tensor]:
    """Published weights of ``timm:NAME`` (its pretrained tag; CLIP image towers are timm models too, e.g.
    ``vit_base_patch16_clip_224.openai``) or ``torchvision:NAME`` (a weights enum member, default DEFAULT),
    downloaded into the hub's own cache where there is internet; offline, a refusal saying what to run where there is."""
    if arch.startswith("timm:"):
        name = arch[len("timm:"):] + (f".{tag}" if tag else "")
        fetch = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
        try:
            import timm

            return _downloaded(lambda: timm.create_model(name, pretrained=True).state_dict(), flag, arch, fetch)
        except ImportError:
            raise PretrainedError(f"{flag} {HUB} with {arch} needs timm: pip install 'diffusion-inversion[timm]'") from None
    if arch.startswith("torchvision:"):
        import torchvision

        name = arch[len("torchvision:"):]
        try:
            weights = torchvision.models.get_model_weights(name)
            chosen = weights[tag] if tag else weights.DEFAULT
        except (ValueError, KeyError):
            raise PretrainedError(f"{flag} {HUB}{':' + tag if tag else ''}: torchvision publishes no such weights for {name} "
                                  f"(its tags: see torchvision.models.get_model_weights('{name}'))") from None
        fetch = f"python -c \"import torchvision; torchvision.models.{name}(weights='{chosen.name}')\""
        return _downloaded(lambda: chosen.get_state_dict(progress=False), flag, arch, fetch)
    raise PretrainedError(f"{flag} {HUB} takes the published weights of a timm:NAME or torchvision:NAME --arch; {arch} is "
                          f"trained here only (give a local file instead)")


def _downloaded(get, flag: str, arch: str, fetch: str) -> dict[str, torch.Tensor]:
    try:
        return get()
    except PretrainedError:
        raise
    except Exception as exc:  # no network: urllib, requests and huggingface_hub each raise their own types
        raise PretrainedError(f"{flag} {HUB}: the weights of {arch} are not in the local cache and cannot be downloaded here "
                              f"({type(exc).__name__}); where there is internet run `{fetch}` (it fills the same cache), "
                              f"or give a local .safetensors file") from None


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the weights") -> list[str]:
    """Copy every tensor of ``state`` whose name and shape match into ``model``, except the head's; returns the names left fresh.

    The head is always fresh: even with as many classes, a checkpoint's classes are not the data's.
    Refuses weights of another architecture (fewer than half of the model's tensors found).
    """
    head = classification_head(model)
    head_keys = {name for name, module in model.named_modules() if module is head}
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not any(k.startswith(h + ".") for h in head_keys)}
    if len(fits) < len(own) / 2:
        unmatched = [k for k in own if k not in fits][:3]
        raise PretrainedError(f"{source} fit only {len(fits)} of the model's {len(own)} tensors (e.g. not {unmatched}): "
                              f"they are of another architecture than --arch; pass the matching --arch")
    model.load_state_dict(fits, strict=False)
    return [k for k in own if k not in fits]


def param_groups(model: nn.Module, fresh: list[str], backbone_lr: float) -> list[dict]:
    """Optimiser groups: the pretrained parameters at ``backbone_lr`` times the rate, the fresh ones at the full rate."""
    fresh_set = set(fresh)
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n not in fresh_set], "scale": backbone_lr, "pretrained": True},
              {"params": [p for n, p in named if n in fresh_set], "scale": 1.0, "pretrained": False}]
    return [g for g in groups if g["params"]]


# What ImageNet checkpoints (timm's and torchvision's) were trained on; diffinv's own runs record theirs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def feature_model(path: str | Path, arch: str = "", image_size: int = 224,
                  device: str | torch.device = "cpu") -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """An image model from local weights, for its penultimate features: (model in eval mode, mean, std, arch).

    A ``model.safetensors`` of ``diffinv train`` names its own architecture and normalisation; any other
    state dict (a timm or torchvision checkpoint) needs ``arch`` and is normalised as ImageNet.
    """
    state = read_state_dict(path, "--image-model")
    meta = _diffinv_metadata(path)
    arch = arch or meta.get("arch", "")
    if not arch:
        raise PretrainedError(f"{path} does not say its architecture; give it (e.g. timm:resnet18, torchvision:resnet50, "
                              f"or small-cnn for a `diffinv train` run's weights)")
    check_arch(arch)
    model = build_model(arch, 1, image_size, meta.get("stem", "auto"))  # the head is not used: features enter it
    load_pretrained(model, state, source=str(path))
    mean = torch.tensor(json.loads(meta["mean"]) if "mean" in meta else IMAGENET_MEAN)
    std = torch.tensor(json.loads(meta["std"]) if "std" in meta else IMAGENET_STD)
    return model.to(device).eval(), mean, std, arch


def _diffinv_metadata(path: str | Path) -> dict[str, str]:
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})
