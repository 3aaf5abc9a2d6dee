"""The CLI starts without importing what a command does not use: `diffinv --help`, the folder tools' help and
`verify` of a synthetic set never import torch (about 1 s of every start on a laptop)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, run_cli, write_image_tree

from diffinv.launch import CATALOG, STAGES, load_stage


def _heavy_modules_after(*argv: str) -> tuple[int, list[str]]:
    """Run ``diffinv ARGV`` in a fresh interpreter: (its exit code, which of torch / diffusers / matplotlib it imported)."""
    code = ("import sys; from diffinv.cli import main\n"
            f"try:\n    rc = main({list(argv)!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('HEAVY', rc, *[m for m in ('torch', 'diffusers', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    line = next(x for x in out.splitlines() if x.startswith("HEAVY"))
    words = line.split()
    return int(words[1]), words[2:]


@pytest.mark.parametrize("argv", [("--help",), ("verify", "--help"), ("inspect", "--help"), ("report", "--help"),
                                  ("merge", "--help"), ("experiment", "--help"), ("--log-format", "lines", "verify", "--help")])
def test_help_and_the_folder_tools_start_without_torch(argv):
    code, heavy = _heavy_modules_after(*argv)
    assert code == 0 and heavy == []


def test_verify_of_a_set_reads_no_tensors_and_a_stage_that_needs_torch_imports_it(tiny_pixel, tmp_path, capsys):
    data = write_image_tree(tmp_path / "data", per_class=2)
    store, made = tmp_path / "store", tmp_path / "set"
    assert run_cli(capsys, "invert", "--model", tiny_pixel, "--data", data, "--out", store, "--resolution", "16",
                   "--steps", "1", "--quiet")[0] == 0
    assert run_cli(capsys, "generate", "--store", store, "--per-image", "1", "--steps", "2", "--quiet", "--out", made)[0] == 0
    assert _heavy_modules_after("verify", str(made)) == (0, [])
    code, heavy = _heavy_modules_after("verify", str(store))  # a store's embeddings are tensors: checked finite
    assert code == 0 and "torch" in heavy
    code, heavy = _heavy_modules_after("train", "--help")  # its --arch help lists the registered classifiers
    assert code == 0 and "torch" in heavy


def test_a_mistyped_stage_is_told_the_stages():
    code = subprocess.run([sys.executable, "-m", "diffinv.cli", "invrt"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert code.returncode == 2 and "invalid choice: 'invrt'" in code.stderr and "'invert'" in code.stderr


def test_every_catalog_entry_is_its_stage():
    assert list(STAGES) == list(CATALOG)
    for name in CATALOG:
        assert load_stage(name).name == name


def test_a_catalog_entry_naming_another_stage_is_refused(monkeypatch):
    monkeypatch.setitem(CATALOG, "verify", ("diffinv.stages.report:STAGE", "check"))
    with pytest.raises(RuntimeError, match="is the stage 'report', listed as 'verify'"):
        load_stage("verify")
