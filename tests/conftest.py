"""Shared fixtures: tiny models saved in diffusers format, small image trees, the shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffinv.diffusion.tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """The read-only datasets beside the project (DIFFINV_DATA overrides), or None."""
    root = Path(os.environ.get("DIFFINV_DATA", REPO.parent / "shared" / "data"))
    return root if root.is_dir() else None


@pytest.fixture
def data_root() -> Path:
    root = shared_data()
    if root is None:
        pytest.skip("shared datasets not found (set DIFFINV_DATA to the folder of ../shared/data)")
    return root


@pytest.fixture(scope="session")
def tiny_latent(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "latent", "latent")


@pytest.fixture(scope="session")
def tiny_pixel(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "pixel", "pixel")


@pytest.fixture(scope="session")
def tiny_v(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "vpred", "latent", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "text", "latent", with_text_encoder=True)


def write_image_tree(root: Path, per_class: int = 3, classes=("cat", "dog"), size: int = 16, seed: int = 0) -> Path:
    """ROOT/<class>/<i>.png of random RGB images."""
    rs = np.random.RandomState(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rs.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return write_image_tree(tmp_path / "images")


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores on CI: keep torch from oversubscribing when pytest runs.
    torch.set_num_threads(2)


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``diffinv ARGV`` in this process: (exit code, everything printed); a traceback fails the test."""
    from diffinv.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out + captured.err
