"""The GPU speed settings change how fast a store or set is made, never what is in it: ``--batch-size 0`` (the largest
batch the GPU's free memory holds) and ``--channels-last``. The CUDA measurement itself runs in
``benchmarks/gpu_suite.py`` on a GPU; here it is a given memory model."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import run_cli as _run
from conftest import write_image_tree

from diffinv.data.synthetic import read_manifest
from diffinv.device import batch_that_fits
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.store import EmbeddingStore
from diffinv.runs import read_yaml
from diffinv.stages import invert as invert_stage

QUIET = ["--quiet"]


def test_the_largest_batch_that_fits_a_linear_memory_model():
    asked = []

    def peak(rows):  # 1,000 bytes fixed, 50 a row
        asked.append(rows)
        return 1000 + 50 * rows

    # 80% of 10,000 bytes holds (8,000 - 1,000) / 50 = 140 rows; 136 is the multiple of 8 below.
    assert batch_that_fits(peak, 10_000, cap=4096) == 136 and asked == [8, 16]
    assert batch_that_fits(peak, 10_000, cap=100) == 100  # never more than there are items
    assert batch_that_fits(peak, 1_200, cap=4096) == 1  # nothing fits: one row (out-of-memory halving is the last word)
    assert batch_that_fits(lambda rows: 1000 + 50 * rows, 1_625, cap=4096) == 6  # below 8 rows: not rounded
    assert batch_that_fits(lambda rows: 10 * rows, 8_000, cap=10**6, headroom=0.5) == 400
    gib, mib = 2**30, 2**20  # an SD-sized step: 2 GiB fixed, 150 MiB a row, on 78 GiB free: (62.4 - 2) GiB / 150 MiB = 412
    assert batch_that_fits(lambda rows: 2 * gib + 150 * mib * rows, 78 * gib, cap=4096) == 408


def test_auto_batch_is_64_on_a_cpu_and_the_measured_size_on_a_gpu(tiny_pixel, monkeypatch):
    backbone = load_backbone(tiny_pixel)
    assert invert_stage.auto_batch(backbone, 5, 16, 1000) == 64
    cond = invert_stage.probe_step(backbone, 5, 16, 3)()  # what is measured on a GPU: a step reaching the conditioning
    assert cond.shape == (3, 5, backbone.cond_dim) and cond.grad is not None and cond.grad.abs().sum() > 0
    # On CUDA: the step measured at 8 and 16 rows, the free memory read, their fit returned, capped at the item count.
    fake_cuda = type("D", (), {"type": "cuda"})()
    monkeypatch.setattr(type(backbone), "device", property(lambda self: fake_cuda))
    monkeypatch.setattr(invert_stage, "peak_cuda_bytes", lambda step, device: 2**20)  # every probe: 1 MiB, flat
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**30, 2**31))
    notes = []
    assert invert_stage.auto_batch(backbone, 5, 16, 1000, log=notes.append) == 1000  # flat: all of them
    assert "1000 images a batch" in notes[0] and "1.0 GiB free" in notes[0]
    assert invert_stage.auto_batch(backbone, 5, 16, 1000, sharded=True) == 64  # shards must cut the same batches
    probes = iter([2**24 + 8 * 2**22, 2**24 + 16 * 2**22])  # 16 MiB fixed, 4 MiB a row: (819 - 16) / 4 = 200 rows
    monkeypatch.setattr(invert_stage, "peak_cuda_bytes", lambda step, device: next(probes))
    assert invert_stage.auto_batch(backbone, 5, 16, 1000, log=notes.append) == 200

    def no_room(step, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(invert_stage, "peak_cuda_bytes", no_room)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert invert_stage.auto_batch(backbone, 5, 16, 1000, log=notes.append) == 8  # halving on OOM takes it from there
    assert "do not fit" in notes[-1]


@pytest.mark.slow
def test_invert_records_the_batch_it_chose_and_a_resume_keeps_it(tiny_pixel, tmp_path, capsys):
    data = write_image_tree(tmp_path / "d", per_class=3, size=16)
    common = ["--model", tiny_pixel, "--data", data, "--resolution", "16", "--steps", "2", *QUIET]
    code, text = _run(capsys, "invert", *common, "--out", tmp_path / "auto")  # the default: --batch-size 0
    assert code == 0, text
    assert read_yaml(tmp_path / "auto" / "config.yaml")["batch_size"] == 64  # a CPU: 64
    # Killed in its second batch of 4, then resumed with --batch-size 0: the 4 it was planned with, not a new size.
    from diffinv.config import InvertConfig

    config = InvertConfig(model=str(tiny_pixel), data=str(data), resolution=16, steps=2, batch_size=4)

    def stop(batch, step):
        if batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_stage.invert_dataset(config, tmp_path / "four", progress=False, on_step=stop)
    seen = []
    invert_stage.invert_dataset(replace(config, batch_size=0), tmp_path / "four", resume=True, progress=False,
                                on_step=lambda batch, step: seen.append(batch))
    assert set(seen) == {1} and read_yaml(tmp_path / "four" / "config.yaml")["batch_size"] == 4  # batch 0 not redone
    torch.testing.assert_close(EmbeddingStore.open(tmp_path / "four").embeddings,
                               EmbeddingStore.open(tmp_path / "auto").embeddings, rtol=1e-5, atol=1e-5)
    code, text = _run(capsys, "invert", *common, "--batch-size", "-1", "--out", tmp_path / "bad")
    assert code == 2 and "batch-size must be >= 1, or 0" in text


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_pixel", "tiny_latent"])
def test_channels_last_gives_the_same_embeddings_and_samples(model, request, tmp_path, capsys):
    model = request.getfixturevalue(model)
    backbone = load_backbone(model)
    x = torch.randn(2, *backbone.latent_shape(16))
    t, cond = torch.tensor([10, 500]), torch.randn(2, 5, backbone.cond_dim)
    plain = backbone.predict(x, t, cond)
    backbone.channels_last()
    conv = next(p for p in backbone.unet.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(backbone.predict(x, t, cond), plain, rtol=1e-5, atol=1e-5)
    backbone.channels_last(False)
    assert conv.is_contiguous()

    data = write_image_tree(tmp_path / "d", per_class=2, size=16)
    common = ["--model", model, "--data", data, "--resolution", "16", "--steps", "3", *QUIET]
    for name, extra in (("plain", []), ("nhwc", ["--channels-last"])):
        code, text = _run(capsys, "invert", *common, *extra, "--out", tmp_path / f"store-{name}")
        assert code == 0, text
        code, text = _run(capsys, "generate", "--store", tmp_path / "store-plain", "--per-image", "2", "--steps", "3",
                          *extra, *QUIET, "--out", tmp_path / f"set-{name}")
        assert code == 0, text
    # NHWC kernels round differently (1e-7); Adam's first steps can grow that to ~5e-4 where the
    # gradients nearly cancel, while a wrong layout would move embeddings by O(1)
    torch.testing.assert_close(EmbeddingStore.open(tmp_path / "store-nhwc").embeddings,
                               EmbeddingStore.open(tmp_path / "store-plain").embeddings, rtol=1e-3, atol=2e-3)
    from PIL import Image

    def pngs(folder):
        return {r["id"]: np.asarray(Image.open(folder / r["file"])).astype(int) for r in read_manifest(folder)}

    a, b = pngs(tmp_path / "set-plain"), pngs(tmp_path / "set-nhwc")
    assert a.keys() == b.keys() and len(a) == 8
    assert max(int(np.abs(a[i] - b[i]).max()) for i in a) <= 1
