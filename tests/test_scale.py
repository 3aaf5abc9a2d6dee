"""Sharded jobs: --shard by hand, launcher environments, Ray with killed workers, merge, failure handling."""

import errno
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import write_image_tree

from diffinv.cli import main
from diffinv.config import GenerateConfig, InvertConfig
from diffinv.diffusion import inversion
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.store import EmbeddingStore, part_name
from diffinv.launch import merge
from diffinv.runs import RunError, read_json, write_text
from diffinv.shards import Shard, parse_shard, shard_from_env
from diffinv.stages.generate import generate_dataset
from diffinv.stages.invert import invert_dataset

INVERT = ["--resolution", "16", "--steps", "6", "--batch-size", "2", "--checkpoint-every", "2", "--log-every", "2", "--quiet"]
# Long enough that shard 0 is still in its first batch when the test sees that batch's checkpoint.
SLOW = ["--resolution", "16", "--steps", "30", "--batch-size", "2", "--checkpoint-every", "3", "--log-every", "3", "--quiet"]


def _invert_config(model, data, **kw):
    return InvertConfig(**{**dict(model=str(model), data=str(data), resolution=16, steps=6, batch_size=2, checkpoint_every=2,
                                  log_every=2), **kw})


def _generate_config(store, **kw):
    return GenerateConfig(**{**dict(store=str(store), per_image=2, steps=3, batch_size=3), **kw})


def _same_store(a: Path, b: Path) -> None:
    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert sa.ids == sb.ids
    assert torch.equal(sa.embeddings, sb.embeddings)
    assert [r["loss"] for r in sa.rows] == [r["loss"] for r in sb.rows]


def _same_images(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "manifest.jsonl").read_text() == (b / "manifest.jsonl").read_text()


@pytest.fixture
def one_thread():
    # Shard processes and Ray tasks run with one thread; the reference must reduce in the same order.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_image_tree(tmp_path / "images", per_class=5)


def test_shard_ids_from_flags_and_launchers():
    assert parse_shard("1/4") == Shard(1, 4) and [u for u in range(10) if Shard(1, 4).owns(u)] == [1, 5, 9]
    for bad in ("4/4", "1-4", "x/2", "0/0"):
        with pytest.raises(RunError, match="I/N"):
            parse_shard(bad)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Shard(3, 8)  # torchrun / accelerate
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2"}) == Shard(3, 4)
    assert shard_from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == Shard(1, 2)
    assert shard_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None and shard_from_env({}) is None


@pytest.mark.slow
def test_two_shard_processes_with_one_killed_equal_one_process(tiny_latent, data, tmp_path, one_thread, capsys, monkeypatch):
    """Two `--shard` processes started by hand; shard 0 is killed -9 mid-batch and re-run."""
    invert_dataset(_invert_config(tiny_latent, data, steps=30, checkpoint_every=3, log_every=3), tmp_path / "ref", progress=False)
    generate_dataset(_generate_config(tmp_path / "ref"), tmp_path / "ref-syn", progress=False)

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "diffinv.cli", "invert", "--model", str(tiny_latent), "--data", str(data), "--out", str(out), *SLOW]
    first = subprocess.Popen(cli + ["--shard", "0/2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = subprocess.Popen(cli + ["--shard", "1/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_batch = out / "checkpoints" / f"{part_name(['cat/000.png', 'cat/001.png'])}.safetensors"  # batch 0: shard 0's
    deadline = time.time() + 120
    while not first_batch.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "shard 0 ended before it could be killed"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert second.wait() == 0, second.stderr.read()
    # Nothing looks finished that is not: no manifest, and merge names the shard to re-run.
    assert read_json(out / "store.json")["status"] == "in-progress" and not (out / "manifest.jsonl").exists()
    with pytest.raises(RunError, match="shard 0/2"):
        merge(out)
    rerun = subprocess.run(cli + ["--shard", "0/2"], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "store" in rerun.stdout and read_json(out / "store.json")["status"] == "complete"  # the last shard merged
    _same_store(tmp_path / "ref", out)

    # Generation in two shards, the second through the launcher's environment (as under torchrun).
    gen = ["generate", "--store", str(out), "--out", str(tmp_path / "syn"), "--per-image", "2", "--steps", "3", "--batch-size", "3",
           "--quiet"]
    assert main(gen + ["--shard", "0/2"]) == 0 and "not finished yet" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(gen) == 0 and "dataset" in capsys.readouterr().out
    _same_images(tmp_path / "ref-syn", tmp_path / "syn")


def test_shards_refuse_mixed_batch_sizes_and_overwrite(tiny_latent, data, tmp_path):
    invert_dataset(_invert_config(tiny_latent, data), tmp_path / "s", progress=False, shard=Shard(0, 2))
    assert read_json(tmp_path / "s" / "store.json")["status"] == "in-progress"
    with pytest.raises(RunError, match="same --batch-size"):
        invert_dataset(_invert_config(tiny_latent, data, batch_size=3), tmp_path / "s", progress=False, shard=Shard(1, 2))
    with pytest.raises(RunError, match="sharding"):
        invert_dataset(_invert_config(tiny_latent, data), tmp_path / "s", overwrite=True, progress=False, shard=Shard(1, 2))
    with pytest.raises(RunError, match="steps: store has 6, asked 7"):
        invert_dataset(_invert_config(tiny_latent, data, steps=7), tmp_path / "s", progress=False, shard=Shard(1, 2))


class KillOnce:
    """A step hook that SIGKILLs the process it runs in the first time any shard reaches ``step``."""

    def __init__(self, flag: Path, step: int):
        self.flag, self.step = str(flag), step

    def __call__(self, batch, step=None):
        if (step is None or step == self.step) and not os.path.exists(self.flag):
            Path(self.flag).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    import ray.cloudpickle  # noqa: F811 (the submodule, bound to the same name)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillOnce travels to the workers by value
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", configure_logging=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_workers_killed_mid_shard_are_retried_and_equal_one_process(local_ray, tiny_latent, data, tmp_path, one_thread):
    from diffinv.launch import run_on_ray

    invert_dataset(_invert_config(tiny_latent, data), tmp_path / "ref", progress=False)
    generate_dataset(_generate_config(tmp_path / "ref"), tmp_path / "ref-syn", progress=False)

    messages = []
    run_on_ray("invert", _invert_config(tiny_latent, data), tmp_path / "run", workers=2, progress=False,
               hook=KillOnce(tmp_path / "killed-invert", step=3), log=messages.append)
    assert (tmp_path / "killed-invert").exists()  # a worker really died mid-shard ...
    assert any("failed (attempt 1 of 3)" in m and "retrying" in m for m in messages), messages  # ... was reported and retried
    _same_store(tmp_path / "ref", tmp_path / "run")

    run_on_ray("generate", _generate_config(tmp_path / "run"), tmp_path / "syn", workers=2, progress=False,
               hook=KillOnce(tmp_path / "killed-generate", step=None), log=messages.append)
    assert (tmp_path / "killed-generate").exists()
    _same_images(tmp_path / "ref-syn", tmp_path / "syn")


def test_ray_shard_that_always_fails_is_reported_not_dropped(local_ray, tiny_latent, data, tmp_path):
    from diffinv.launch import ShardError, run_on_ray

    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ShardError, match=r"2 of 2 shards failed after 2 attempts.*not-a-model"):
        run_on_ray("invert", _invert_config(tmp_path / "not-a-model", data), tmp_path / "run", workers=2, attempts=2,
                   progress=False, log=lambda m: None)


def test_cli_ray_backend_end_to_end(local_ray, tiny_latent, data, tmp_path, capsys):
    assert main(["invert", "--model", str(tiny_latent), "--data", str(data), "--out", str(tmp_path / "s"), *INVERT,
                 "--backend", "ray", "--workers", "2"]) == 0
    assert "store" in capsys.readouterr().out and len(EmbeddingStore.open(tmp_path / "s").ids) == 10
    assert main(["invert", "--model", str(tiny_latent), "--data", str(data), "--out", str(tmp_path / "t"), *INVERT,
                 "--backend", "ray", "--shard", "0/2"]) == 2
    assert "do not mix" in capsys.readouterr().err


def test_missing_ray_is_a_clear_message(monkeypatch, tiny_latent, data, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["invert", "--model", str(tiny_latent), "--data", str(data), "--out", str(tmp_path / "s"), *INVERT,
                 "--backend", "ray"]) == 2
    assert "pip install 'diffusion-inversion[ray]'" in capsys.readouterr().err


def test_non_finite_images_are_retried_at_lower_lr_then_reported(tiny_latent, data, tmp_path, monkeypatch):
    from diffinv import rng

    real = inversion.invert_batch
    stubborn, flaky = rng.key_of(0, "cat/001.png"), rng.key_of(0, "dog/002.png")

    def poisoned(backbone, pixels, keys, config, **kw):
        # One image fails at any lr; another only at the configured lr (as a too-large step would).
        result = real(backbone, pixels, keys, config, **kw)
        for j, key in enumerate(keys.tolist()):
            if key == stubborn or (key == flaky and config.lr >= 3e-2):
                result.embeddings[j] = float("nan")
                result.loss_final[j] = float("nan")
        return result

    monkeypatch.setattr(inversion, "invert_batch", poisoned)
    messages = []
    invert_dataset(_invert_config(tiny_latent, data, nan_retries=2, lr=3e-2), tmp_path / "s", progress=False, log=messages.append)
    store = EmbeddingStore.open(tmp_path / "s")
    assert len(store.ids) == 9 and "cat/001.png" not in store.ids and torch.isfinite(store.embeddings).all()
    lrs = {r["id"]: r["lr"] for r in store.rows}
    assert lrs["dog/002.png"] == pytest.approx(3e-3) and lrs["dog/000.png"] == pytest.approx(3e-2)
    info = read_json(tmp_path / "s" / "store.json")
    assert [f["id"] for f in info["failed"]] == ["cat/001.png"] and info["n_items"] == 10
    assert any("retrying at lr 0.003" in m for m in messages) and any("left out" in m and "cat/001.png" in m for m in messages)
    # A store with a failed image still generates from the others.
    generate_dataset(_generate_config(tmp_path / "s"), tmp_path / "syn", progress=False)
    assert len(list((tmp_path / "syn").rglob("*.png"))) == 18


def test_out_of_memory_halves_the_batch_and_goes_on(tiny_latent, data, tmp_path, monkeypatch):
    invert_dataset(_invert_config(tiny_latent, data, batch_size=4), tmp_path / "ref", progress=False)
    generate_dataset(_generate_config(tmp_path / "ref", batch_size=4), tmp_path / "ref-syn", progress=False)
    real = Backbone.predict

    def small_memory(self, latents, t, cond):
        if latents.shape[0] >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, latents, t, cond)

    monkeypatch.setattr(Backbone, "predict", small_memory)
    messages = []
    invert_dataset(_invert_config(tiny_latent, data, batch_size=4), tmp_path / "s", progress=False, log=messages.append)
    generate_dataset(_generate_config(tmp_path / "s", batch_size=4), tmp_path / "syn", progress=False, log=messages.append)
    assert any("out of memory on a batch of 4" in m for m in messages)
    a, b = EmbeddingStore.open(tmp_path / "ref"), EmbeddingStore.open(tmp_path / "s")
    assert a.ids == b.ids
    # Equal up to float noise: halved batches run other kernels (~1e-7 relative), which Adam's early moments
    # can amplify where successive gradients nearly cancel (see test_two_runs_on_halves_equal_one_run).
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-4, atol=3e-4)
    assert sorted(p.name for p in (tmp_path / "syn").rglob("*.png")) == sorted(p.name for p in (tmp_path / "ref-syn").rglob("*.png"))


def test_full_disk_is_refused_before_work_and_during_writes(tiny_latent, data, tmp_path, monkeypatch):
    import diffinv.runs as runs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(RunError, match="1,000 bytes are free"):
        invert_dataset(_invert_config(tiny_latent, data), tmp_path / "s", progress=False)
    assert not list((tmp_path / "s").glob("parts/*"))
    monkeypatch.undo()

    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunError, match="disk is full.*run the same command again, with --resume"):
        runs.atomic_write(tmp_path / "x.json", no_space)
    assert not list(tmp_path.glob(".x.json.*"))  # the partial temporary is removed
    write_text(tmp_path / "x.json", "kept")
    with pytest.raises(RunError, match="disk is full"):
        runs.atomic_write(tmp_path / "x.json", no_space)
    assert (tmp_path / "x.json").read_text() == "kept"


@pytest.mark.slow
def test_sharded_experiment_and_merge(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text("data: digits\nper_class: [3]\nseeds: [0, 1]\nval_per_class: 3\nmethods: {}\nreport: false\n"
                     "train: {arch: mobilenetv2, steps: 4, batch_size: 8, eval_every: 4}\n")
    out = tmp_path / "s"
    assert main(["experiment", str(study), "--out", str(out), "--quiet", "--shard", "0/2"]) == 0
    assert "not finished yet" in capsys.readouterr().out and not (out / "summary.json").exists()
    assert main(["merge", str(out)]) == 2 and "1 of 2 jobs" in capsys.readouterr().err
    # Every shard must run the same study.
    assert main(["experiment", str(study), "--out", str(out), "--quiet", "--shard", "1/2", "--repeats", "2"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["experiment", str(study), "--out", str(out), "--quiet", "--shard", "1/2"]) == 0
    summary = read_json(out / "summary.json")
    assert summary[0]["n_seeds"] == 2 and len(read_json(out / "results.json")) == 2
    (out / "summary.json").unlink()
    assert main(["merge", str(out)]) == 0 and (out / "summary.json").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["merge", str(tmp_path / "empty")]) == 2 and "not a diffinv" in capsys.readouterr().err
