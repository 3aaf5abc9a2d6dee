"""Reading and writing generators: every model file format, into a :class:`~diffinv.diffusion.backbone.Backbone`.

Accepted model specs (:func:`load_backbone`):

* a diffusers folder (``unet/``, optional ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``), or an
  SD3-structured one (``transformer/`` of an ``SD3Transformer2DModel``, ``vae/``, a flow-matching ``scheduler/``)
* a single UNet folder (``config.json`` of a ``UNet2DConditionModel``): a pixel-space model
* a ``.safetensors`` file: either diffinv's packed format (configs in the file's metadata) or an
  original Stable Diffusion checkpoint, read by diffusers' ``from_single_file``
* a Hugging Face hub id: from the local cache, else downloaded into it (``HF_HUB_OFFLINE`` respected)

Weights are read from safetensors only; a pickle is refused with what to do instead.
:func:`save_folder` and :func:`save_packed` write what :func:`load_backbone` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from diffinv.diffusion.backbone import SCHEDULER_DEFAULTS, Backbone, ModelError

PACKED_FORMAT = "diffinv-packed-v1"


def _freeze(module: Any) -> Any:
    if module is not None:
        module.requires_grad_(False)
        module.eval()
    return module


def load_backbone(spec: str | Path, *, with_text_encoder: bool = False, original_config: str = "",
                  prediction_type: str = "") -> Backbone:
    """Load a frozen generator from a folder, a ``.safetensors`` file or a hub id.

    The text encoder is only loaded with ``with_text_encoder=True``: inversion never needs it.
    ``original_config`` (an original-format checkpoint's inference YAML) says a single file's
    architecture and prediction type; ``prediction_type`` is the caller's override, which also
    settles an SD 2.x file that has no YAML (SD 2.x ships as 512 px epsilon and 768 px v-prediction
    models with the same weights layout).
    """
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # load-time advice about accelerate/dtypes is noise to our users
    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise ModelError(f"{spec}: pickle checkpoints are not loaded (they can run code); convert it to .safetensors")
        if path.suffix != ".safetensors":
            raise ModelError(f"{spec}: a model file must be .safetensors")
        backbone = _load_single_file(path, with_text_encoder, original_config, prediction_type)
    elif original_config:
        raise ModelError(f"--original-config is for single-file checkpoints (.safetensors); {spec} carries its own configs")
    elif path.is_dir():
        if (path / "unet").is_dir() or (path / "transformer").is_dir():
            backbone = _load_folder(path, spec, with_text_encoder)
        elif (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            if config.get("_class_name") != "UNet2DConditionModel":
                raise ModelError(f"{spec}/config.json describes a {config.get('_class_name')}, not a UNet2DConditionModel")
            backbone = Backbone(_freeze(_from_pretrained(diffusers.UNet2DConditionModel, path)), None, dict(SCHEDULER_DEFAULTS), spec)
        else:
            raise ModelError(f"{spec} is a folder but holds neither unet/ nor transformer/ (a diffusers pipeline) nor a UNet "
                             f"config.json")
    elif spec.count("/") == 1 and not spec.startswith((".", "/")) and not path.parent.is_dir():
        backbone = _load_hub(spec, with_text_encoder)
    elif path.parent.is_dir():  # "bases/nope": a folder here, mistyped; never a hub id
        near = sorted(p.name for p in path.parent.iterdir() if p.is_dir())[:8]
        raise ModelError(f"--model {spec} does not exist; {path.parent}/ holds {', '.join(near) or 'no folders'}")
    else:
        raise ModelError(f"--model {spec} does not exist; give a diffusers folder, a .safetensors file or a hub id")
    _check_finite(backbone)
    return backbone


def load_vae(spec: str | Path) -> Any:
    """A frozen ``AutoencoderKL`` from a VAE folder (``diffinv pretrain-vae``'s ``vae/``, or the folder above it) or a model
    folder's ``vae/``; safetensors only."""
    import diffusers

    path = Path(spec)
    folder = path / "vae" if (path / "vae").is_dir() else path
    if not path.is_dir():
        raise ModelError(f"--vae {spec} does not exist; give the folder `diffinv pretrain-vae` wrote (or a model folder with vae/)")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if config.get("_class_name") != "AutoencoderKL":
        raise ModelError(f"--vae {spec} holds no AutoencoderKL (vae/config.json); give the folder `diffinv pretrain-vae` wrote")
    return _freeze(_from_pretrained(diffusers.AutoencoderKL, folder))


def _from_pretrained(cls: Any, folder: Path) -> Any:
    """``cls.from_pretrained(folder)``, safetensors weights only, with one clear error for whatever is wrong with the folder."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; it is not a diffusers model folder (export it with save_pretrained)")
    if not list(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        detail = f" ({', '.join(pickles)} are pickles, which can run code, and are not loaded)" if pickles else ""
        raise ModelError(f"{folder} has no .safetensors weights{detail}; convert them with diffusers' save_pretrained("
                         f"safe_serialization=True)")
    try:
        return cls.from_pretrained(folder, use_safetensors=True)
    except Exception as exc:  # diffusers and safetensors raise OSError, ValueError, SafetensorError ... for a bad folder
        raise ModelError(f"{folder} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); the weights may be truncated or "
                         f"of another architecture than its config.json") from exc


def _check_finite(backbone: Backbone) -> None:
    """Refuse weights that are not finite (a corrupt file), once at load, rather than a NaN loss much later."""
    for name, module in (("UNet", backbone.unet), ("VAE", backbone.vae)):
        if module is None:
            continue
        bad = sum(int((~torch.isfinite(p)).sum()) for p in module.parameters())
        if bad:
            raise ModelError(f"the {name} of {backbone.source} has {bad} weights that are not finite: the file is corrupt; "
                             f"download or export it again")


def _denoiser(path: Path, spec: str) -> Any:
    """The folder's denoising network: ``unet/`` (a UNet2DConditionModel) or ``transformer/`` (SD3's; others refused)."""
    import diffusers

    if (path / "unet").is_dir():
        return _from_pretrained(diffusers.UNet2DConditionModel, path / "unet")
    config_file = path / "transformer" / "config.json"
    kind = json.loads(config_file.read_text()).get("_class_name") if config_file.is_file() else None
    if kind != "SD3Transformer2DModel":
        raise ModelError(f"{spec}/transformer holds a {kind or 'model without config.json'}; diffinv drives UNets and "
                         f"SD3-structured transformers (SD3Transformer2DModel). FLUX-class transformers (packed latents, a "
                         f"guidance embedding, a size-dependent schedule) are not driven yet")
    return _from_pretrained(diffusers.SD3Transformer2DModel, path / "transformer")


def _load_folder(path: Path, spec: str, with_text_encoder: bool) -> Backbone:
    import diffusers

    unet = _denoiser(path, spec)
    vae = _from_pretrained(diffusers.AutoencoderKL, path / "vae") if (path / "vae").is_dir() else None
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else dict(SCHEDULER_DEFAULTS)
    text_encoder = tokenizer = None
    if with_text_encoder and getattr(unet.config, "addition_embed_type", None) == "text_time":
        raise ModelError(f"{spec} is an SDXL model: prompts would need both of its text encoders and the pooled prompt "
                         f"embedding, which diffinv does not drive yet (--method prompt, --init text); compare with di, "
                         f"img2img or class-inversion and start from --init random or uniform")
    if with_text_encoder and (path / "transformer").is_dir():
        raise ModelError(f"{spec} is an SD3-structured model: prompts would need its three text encoders (two CLIPs and "
                         f"T5) and the pooled prompt embedding, which diffinv does not drive (--method prompt / "
                         f"sdedit-prompt, finetune --prompt, --init text); compare with di, img2img, class-inversion, lora "
                         f"or retrieval and start from --init random or uniform")
    if with_text_encoder:
        if not (path / "text_encoder").is_dir() or not (path / "tokenizer").is_dir():
            raise ModelError(f"{spec} has no text_encoder/ and tokenizer/; prompt-based methods need them")
        try:
            import transformers
        except ImportError as exc:
            raise ModelError("prompt-based methods need transformers: pip install 'diffusion-inversion[text]'") from exc

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # a load bar per small file is noise
        text_encoder = transformers.CLIPTextModel.from_pretrained(path / "text_encoder")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(path / "tokenizer")
    return Backbone(_freeze(unet), _freeze(vae), sched, spec, _freeze(text_encoder), tokenizer)


def hub_files(with_text_encoder: bool) -> list[str]:
    """What to fetch of a hub pipeline: the denoiser, VAE and scheduler, safetensors only (no pickles); the (first) text
    encoder and tokenizer only for prompts. SD3's T5 encoder alone is ~9.5 GB that inversion never reads."""
    parts = ["unet", "transformer", "vae"] + (["text_encoder"] if with_text_encoder else [])
    return (["model_index.json", "scheduler/*.json"] + [f"{p}/*.json" for p in parts] + [f"{p}/*.safetensors" for p in parts]
            + (["tokenizer/*"] if with_text_encoder else []))



def _load_hub(repo_id: str, with_text_encoder: bool) -> Backbone:
    """A diffusers repo id: from the local Hugging Face cache, else downloaded into it (unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True, allow_patterns=hub_files(with_text_encoder))
    except Exception:  # the hub client raises many types for "not cached"
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ModelError(
                f"hub id {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it where "
                f"there is internet (huggingface-cli download {repo_id}) and pass the folder or unset HF_HUB_OFFLINE") from None
        try:
            folder = snapshot_download(repo_id, local_files_only=False, allow_patterns=hub_files(with_text_encoder))
        except Exception as exc:  # no network, no such repo, a gated repo without a token ...
            raise ModelError(
                f"hub id {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
                f"({type(exc).__name__}: {_words(str(exc), 160)}); download it where there is internet "
                f"(huggingface-cli download {repo_id}), log in for a gated model, or pass a local folder") from exc
    return _load_folder(Path(folder), repo_id, with_text_encoder)


def _words(text: str, limit: int) -> str:
    """``text`` on one line, cut at a word boundary near ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _load_single_file(path: Path, with_text_encoder: bool, original_config: str = "", prediction_type: str = "") -> Backbone:
    import diffusers
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            family = ldm_family({k: fh.get_slice(k).get_shape() for k in fh.keys()})
    except Exception as exc:  # SafetensorError for a truncated or foreign file
        raise ModelError(f"{path} is not a readable .safetensors file ({exc}); it may be truncated: download or export it again") from exc
    if meta.get("format") == PACKED_FORMAT:
        if original_config:
            raise ModelError(f"{path} is a diffinv packed model, which carries its own configs; drop --original-config")
        return _load_packed(path, meta)
    if family is None:
        raise ModelError(f"{path} is neither a diffinv packed model nor an original-format Stable Diffusion checkpoint (no "
                         f"model.diffusion_model.* weights); give a diffusers folder")
    if original_config:
        return _load_with_original_config(path, Path(original_config), with_text_encoder)
    if family == "sd2" and not prediction_type:
        raise ModelError(
            f"{path} is an SD 2.x checkpoint, which exists as 512 px epsilon models (2.0/2.1-base) and 768 px v-prediction "
            f"models (2.0-v/2.1) with the same weights; say which: --original-config v2-inference.yaml (epsilon) or "
            f"v2-inference-v.yaml (v-prediction), the YAML published with the model, or --prediction-type epsilon|v_prediction")
    try:
        pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelError(
            f"diffusers could not read {path} as a {family} checkpoint offline ({type(exc).__name__}: {str(exc)[:200]}); pass "
            f"--original-config with the model's inference YAML (e.g. v1-inference.yaml), or convert it to a diffusers "
            f"folder where the configs are available") from exc
    te, tok = (pipe.text_encoder, pipe.tokenizer) if with_text_encoder else (None, None)
    return Backbone(_freeze(pipe.unet), _freeze(pipe.vae), dict(pipe.scheduler.config), str(path), _freeze(te), tok)


def ldm_family(shapes: dict[str, list[int]]) -> str | None:
    """sd1, sd2 or sdxl for an original-format (CompVis / SGM) checkpoint's tensor shapes by name; None if it is not one.

    SDXL has the size/pooled-text embedding (``label_emb``); SD 2.x projects into its transformers
    with linear layers (SD 1.x with 1x1 convolutions) and cross-attends to 1,024-wide text.
    """
    unet = {k[len("model.diffusion_model."):]: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    if not unet:
        return None
    if any(k.startswith("label_emb.") for k in unet) or any(k.startswith("conditioner.") for k in shapes):
        return "sdxl"
    proj = [v for k, v in unet.items() if k.endswith(".proj_in.weight")]
    context = [v[-1] for k, v in unet.items() if k.endswith("attn2.to_k.weight")]
    return "sd2" if (proj and len(proj[0]) == 2) or (context and context[0] == 1024) else "sd1"


def scheduler_from_original(config: dict[str, Any]) -> dict[str, Any]:
    """The training noise schedule and prediction type an original inference YAML states (SD's defaults where it is silent)."""
    params = config.get("model", {}).get("params", {})
    v = params.get("parameterization") == "v" or "VScaling" in str(params.get("denoiser_config", ""))
    return {**SCHEDULER_DEFAULTS, "num_train_timesteps": int(params.get("timesteps", 1000)),
            "beta_start": float(params.get("linear_start", SCHEDULER_DEFAULTS["beta_start"])),
            "beta_end": float(params.get("linear_end", SCHEDULER_DEFAULTS["beta_end"])),
            "prediction_type": "v_prediction" if v else "epsilon"}


def _load_with_original_config(path: Path, yaml_path: Path, with_text_encoder: bool) -> Backbone:
    """UNet and VAE of an original-format checkpoint, their architecture and schedule read from its inference YAML (offline)."""
    import diffusers
    import yaml

    if with_text_encoder:
        raise ModelError(f"prompts (--method prompt, --init text) need the text encoder, which diffinv does not read from "
                         f"single-file checkpoints; convert {path} to a diffusers folder, or use di, img2img or class-inversion")
    try:
        from diffinv import safe_yaml

        config = safe_yaml.read(yaml_path)
        config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ModelError(f"--original-config {yaml_path} is not a Stable Diffusion inference YAML ({type(exc).__name__}: {exc}); "
                         f"give the one published with the checkpoint (e.g. v1-inference.yaml)") from exc
    try:
        unet = diffusers.UNet2DConditionModel.from_single_file(str(path), original_config=config, local_files_only=True)
        vae = diffusers.AutoencoderKL.from_single_file(str(path), original_config=config, local_files_only=True)
    except Exception as exc:  # diffusers raises many types for weights that do not fit the YAML's architecture
        raise ModelError(f"{path} does not fit --original-config {yaml_path} ({type(exc).__name__}: {str(exc)[:200]}); is it "
                         f"the YAML of this model (v1 / v2 / v2-v / SDXL)?") from exc
    return Backbone(_freeze(unet), _freeze(vae), scheduler_from_original(config), str(path))


def _load_packed(path: Path, meta: dict[str, str]) -> Backbone:
    import diffusers
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    unet = diffusers.UNet2DConditionModel.from_config(json.loads(meta["unet_config"]))
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    vae = None
    if "vae_config" in meta:
        vae = diffusers.AutoencoderKL.from_config(json.loads(meta["vae_config"]))
        vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    return Backbone(_freeze(unet), _freeze(vae), json.loads(meta["scheduler_config"]), str(path))


def save_folder(backbone: Backbone, out: str | Path) -> Path:
    """Write the backbone as a diffusers folder (``unet/``, ``vae/``, ``scheduler/``) that :func:`load_backbone` reads."""
    import diffusers

    out = Path(out)
    backbone.unet.save_pretrained(out / "unet")
    if backbone.vae is not None:
        backbone.vae.save_pretrained(out / "vae")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler if backbone.process.name == "flow" else diffusers.DDPMScheduler
    scheduler.from_config(backbone.scheduler_config).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({"_class_name": "DiffinvModel", "source": backbone.source}, indent=2))
    return out


def save_packed(backbone: Backbone, path: str | Path) -> None:
    """Write UNet (+ VAE) weights and all configs into one ``.safetensors`` file."""
    from diffinv.runs import write_safetensors

    tensors = {f"unet.{k}": v for k, v in backbone.unet.state_dict().items()}
    meta = {"format": PACKED_FORMAT, "unet_config": json.dumps(dict(backbone.unet.config), default=str),
            "scheduler_config": json.dumps(backbone.scheduler_config, default=str)}
    if backbone.vae is not None:
        tensors.update({f"vae.{k}": v for k, v in backbone.vae.state_dict().items()})
        meta["vae_config"] = json.dumps(dict(backbone.vae.config), default=str)
    write_safetensors(path, tensors, meta)


def load_store_model(store: Any, model: str = "", *, also: tuple[Any, ...] = (), with_text_encoder: bool = False,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, check: bool = True) -> Backbone:
    """The model an :class:`~diffinv.diffusion.store.EmbeddingStore` was inverted with, as it used it (its single-file
    config, its prediction type), on ``device``: ``model`` if given, else the one the store names. With ``check``, refused
    unless its weights are the ones ``store`` and the stores in ``also`` were made with."""
    from diffinv.diffusion.store import StoreError

    info = store.info
    model = model or info.get("model_path", info["model"])
    backbone = load_backbone(model, with_text_encoder=with_text_encoder, original_config=info.get("original_config", ""),
                             prediction_type=info.get("prediction_type", "")).to(device, dtype)
    backbone.with_prediction_type(info.get("prediction_type", ""))  # what the store was inverted against
    backbone.check_supported()
    for s in (store, *also) if check else ():
        if s.info["model_fingerprint"] not in backbone.fingerprints():
            raise StoreError(f"{s.root} was made with another model ({s.info['model']}), not {model}; use the store's "
                             f"model or invert again with this one")
    return backbone
