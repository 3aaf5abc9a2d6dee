"""``diffinv inspect MODEL [--data D]``: what a run would do with a model, before it does it.

Family, prediction type, scheduler, the resolution and latent size chosen for the data, the
precision on this machine, parameter counts, weight memory and counted FLOPs of one inversion
image-step; and the checks invert and generate run at their start.
"""

from __future__ import annotations

from diffinv.config import InvertConfig
from diffinv.stages import Stage


def inspect_model(model: str, data: str = "", resolution: int | None = None, device: str = "auto", *,
                  original_config: str = "", prediction_type: str = "") -> list[tuple[str, str]]:
    """(field, value) lines describing ``model`` as ``diffinv invert`` would use it on ``data``."""
    import torch  # here, not above: `diffinv inspect --help` should not wait for torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffinv.data.real import open_images
    from diffinv.device import resolve_device, resolve_dtype
    from diffinv.diffusion.model_io import load_backbone

    backbone = load_backbone(model, original_config=original_config, prediction_type=prediction_type)
    backbone = backbone.with_prediction_type(prediction_type)
    sd3 = backbone.family == "sd3"
    lines = [("family", backbone.family), ("prediction type", backbone.prediction_type),
             ("noise process", backbone.process.describe()),
             ("conditioning", f"K tokens x {backbone.cond_dim} (the "
                              + ("transformer's joint-attention width)" if sd3 else "UNet's cross-attention width)")
                              + (f" + a pooled vector of {backbone.pooled_dim}" + (" (SD3" if sd3 else " and size time ids (SDXL")
                                 + "; learned per image as one more row)" if backbone.extra_tokens else "")),
             ("native resolution", f"{backbone.native_resolution} px"),
             ("space", "pixels (no VAE)" if backbone.vae is None else
              f"latent: VAE factor {backbone.vae_factor}, {backbone.vae.config.latent_channels} channels, scaling factor "
              f"{float(backbone.vae.config.scaling_factor):.5g}")]
    backbone.check_supported()
    if resolution is None and data:
        size = min(open_images(data).image(0).size)
        resolution = backbone.choose_resolution(size)
        lines.append(("data", f"{data}: {size} px images"))
    resolution = resolution or backbone.native_resolution
    notes: list[str] = []
    backbone.check_resolution(resolution, notes.append)
    shape = backbone.latent_shape(resolution)
    lines += [("inversion resolution", f"{resolution} px -> latent {'x'.join(map(str, shape))}" + (f" ({notes[0]})" if notes else ""))]
    target = resolve_device(device)
    dtype = resolve_dtype("auto", target)
    lines.append(("precision (auto here)", f"{str(dtype).replace('torch.', '')} on {target}"))
    for name, module in (("transformer" if sd3 else "UNet", backbone.unet), ("VAE", backbone.vae)):
        if module is not None:
            n = sum(p.numel() for p in module.parameters())
            lines.append((f"{name} parameters", f"{n / 1e6:.1f}M ({n * dtype.itemsize / 2**20:.0f} MiB of weights in "
                                                f"{str(dtype).replace('torch.', '')})"))
    x = torch.zeros(1, *shape)
    cond = torch.zeros(1, 5 + backbone.extra_tokens, backbone.cond_dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        t = backbone.process.model_time(torch.tensor([backbone.num_train_timesteps // 2]))
        backbone.predict(x, t, cond).sum().backward()
    lines.append(("FLOPs per inversion image-step", f"{counter.get_total_flops() / 1e9:.1f} GFLOP (UNet forward + backward "
                                                      f"to the conditioning; the paper's loop adds a VAE encode per step)"))
    return lines


def _command(args) -> int:
    for name, value in inspect_model(args.folder, args.data or "", args.resolution, original_config=args.original_config or "",
                                     prediction_type=args.prediction_type or ""):
        print(f"{name:>32}: {value}")
    return 0


STAGE = Stage(name="inspect", cli="folder", command=_command,
              folder="a model (as invert's --model)",
              flags=(InvertConfig, ("data", "resolution", "original_config", "prediction_type")))
