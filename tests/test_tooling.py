"""The maintainers' tools run here, so they cannot rot: the lint rules and the type checks of pyproject.toml hold."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    done = subprocess.run([ruff, "check", "--no-cache", "src", "tests", "benchmarks", "docs"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_mypy_finds_nothing_in_the_library():
    """mypy at its default strictness (pyproject.toml's [tool.mypy]) on src/diffinv: the annotations are checked, not decor."""
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]' brings it)")
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
