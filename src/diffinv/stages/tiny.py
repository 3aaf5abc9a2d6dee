"""``diffinv tiny-model``: write a small random SD-architecture model (diffusers format) to try the pipeline offline."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from diffinv.config import ConfigError, TinyModelConfig
from diffinv.diffusion.tiny import save_tiny_model
from diffinv.runs import LOCK
from diffinv.stages import Stage


def _run(config: TinyModelConfig, out: Path, *, overwrite: bool, **_: Any) -> Path:
    if out.exists() and any(p.name != LOCK for p in out.iterdir()):  # the lock is this process's own
        if not (overwrite and (out / "model_index.json").is_file()):
            raise ConfigError(f"{out} exists and is not empty; choose a new folder (--overwrite replaces a tiny-model folder)")
        for child in out.iterdir():
            if child.name != LOCK:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    return save_tiny_model(out, config.kind, config.seed, config.prediction_type, config.text_encoder)


STAGE = Stage(name="tiny-model", config=TinyModelConfig, marker="model_index.json", run=_run,
              summary=lambda config, out: f"saved a random {config.kind} model to {out}",
              outputs=("folder to write", "(not used: a model is written whole)", "replace a model previously written by tiny-model"))
