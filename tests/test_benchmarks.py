"""The experiment scripts whose figures the docs cite: paired differences."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_differences_average_repeats_then_pair_by_replicate(tmp_path, monkeypatch, capsys):
    paired = load_script("paired")
    rows = []
    # Two repeats per replicate; method b is a's value minus (seed + 1) / 100 on test and a fixed 0.02 on validation.
    for seed in range(4):
        for repeat in range(2):
            a = 0.80 + 0.01 * seed + 0.002 * repeat
            for method, test, val in (("a", a, a), ("b", a - (seed + 1) / 100, a - 0.02)):
                rows.append({"method": method, "per_class": 5, "seed": seed, "repeat": repeat, "top1": test,
                             "balanced_accuracy": test, "macro_f1": test, "auc": None, "degenerate": False,
                             "per_class_acc": [test], "validation": {"top1": val, "balanced_accuracy": val,
                                                                     "macro_f1": val, "auc": None}})
    (tmp_path / "results.json").write_text(json.dumps(rows))
    monkeypatch.setattr(sys, "argv", ["paired.py", str(tmp_path), "a:b:5", "--json"])
    paired.main()
    out = json.loads(capsys.readouterr().out.split("\n", 1)[1])[0]
    assert out["replicates"] == 4
    assert out["test"]["mean"] == pytest.approx(np.mean([0.01, 0.02, 0.03, 0.04]))
    assert out["test"]["low"] > 0  # steadily positive differences exclude zero
    assert out["validation"]["mean"] == pytest.approx(0.02) and out["validation"]["std"] == pytest.approx(0, abs=1e-12)
    monkeypatch.setattr(sys, "argv", ["paired.py", str(tmp_path), "a:c:5"])
    with pytest.raises(SystemExit, match="no runs of c at 5 per class"):
        paired.main()




@pytest.mark.slow
def test_the_generalist_base_pretrains_from_a_packed_set_within_its_weight_budget(tmp_path, capsys):
    from conftest import run_cli

    from diffinv.diffusion.model_io import load_backbone

    pack = load_script("pack_generalist")
    images, labels, report = pack.pack(tmp_path, 40, 16, 0, ["digits", "mnist"])  # no MNIST under tmp_path: skipped
    assert images.shape == (40, 16, 16, 3) and images.dtype == np.uint8 and set(labels[:, 0].tolist()) == {0}
    assert report["digits"] == {"images": 40, "of": report["digits"]["of"]} and "skipped" in report["mnist"]
    np.savez_compressed(tmp_path / "g.npz", train_images=images, train_labels=labels)
    code, text = run_cli(capsys, "pretrain-base", "--config", ROOT / "configs/stages/pretrain-generalist-32.yaml",
                         "--data", tmp_path / "g.npz", "--resolution", "16", "--steps", "2", "--batch-size", "8",
                         "--max-seconds", "0", "--quiet", "--out", tmp_path / "base")  # 16 px: a 32 px preview takes minutes on a CPU
    assert code == 0, text
    backbone = load_backbone(tmp_path / "base")
    assert tuple(backbone.unet.config.block_out_channels) == (32, 64, 96) and backbone.cond_dim == 64
    weights = sum(p.stat().st_size for p in (tmp_path / "base").rglob("*.safetensors"))
    assert weights < 20 * 2**20  # what may travel back from a GPU machine and be committed


@pytest.mark.slow
def test_the_one_gpu_script_runs_every_step_at_toy_sizes_on_the_cpu(tmp_path):
    """`gpu_all.sh --cpu-check`: so that it cannot fail on a lent GPU for a reason a CPU would have caught."""
    import subprocess

    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), "--cpu-check"], env=env, capture_output=True,
                          text=True, timeout=300)
    steps = [json.loads(line) for line in (tmp_path / "out" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["user_path", "gpu_suite", "pretrain_vae", "pretrain_base"], done.stdout
    assert all(s["exit"] == 0 for s in steps), (steps, done.stdout[-2000:])
    user = json.loads((tmp_path / "out" / "user_path.json").read_text())
    assert [c["command"] for c in user["commands"]] == ["tiny-model", "invert", "generate di", "generate img2img", "train"]
    assert user["commands"][1]["batch_size_chosen"] == 64  # --batch-size 0 on a CPU
    assert json.loads((tmp_path / "out" / "pretrain.json").read_text())["space"] == "latent"
    assert (tmp_path / "out" / "generalist-32-latent.tar.gz").stat().st_size < 60 * 2**20

