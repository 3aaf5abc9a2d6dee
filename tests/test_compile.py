"""--compile: the UNet through torch.compile with one batch shape per run (the last batch padded); results unchanged.

Inductor compiles for minutes on a CPU, so these tests compile with the ``aot_eager`` backend: the same graph capture
(dynamo), autograd through it and static-shape padding, without generating kernels. The GPU suite times inductor.
"""

import numpy as np
import pytest
import torch
from conftest import run_cli as _run
from conftest import write_image_tree
from PIL import Image

from diffinv import rng
from diffinv.data.synthetic import read_manifest
from diffinv.device import compile_wanted
from diffinv.diffusion.backbone import Backbone
from diffinv.diffusion.inversion import InversionSettings, invert_items, padded
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.store import EmbeddingStore

QUIET = ["--quiet"]


@pytest.mark.slow
def test_padding_a_batch_changes_no_row_and_is_refused_where_rows_share_an_optimiser(tiny_pixel):
    backbone = load_backbone(tiny_pixel)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    keys = rng.keys_tensor(0, ["a", "b", "c"])
    settings = InversionSettings(steps=6, lr=0.1, log_every=100)
    plain = invert_items(backbone, pixels, keys, settings)
    pad = invert_items(backbone, pixels, keys, settings, pad_to=5)
    assert pad.embeddings.shape == plain.embeddings.shape and pad.steps == plain.steps
    # Equal up to float rounding: the CPU's kernels sum in another order for another batch size (a few 1e-6 here).
    torch.testing.assert_close(pad.embeddings, plain.embeddings, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pad.loss_final, plain.loss_final, rtol=1e-5, atol=1e-5)
    assert padded(settings, 3, 5, None) == 5 and padded(settings, 7, 5, None) == 7
    from dataclasses import replace
    assert padded(replace(settings, update="group"), 3, 5, None) == 3  # one optimiser for the group: a copy would count
    assert padded(replace(settings, early_stop=0.01), 3, 5, None) == 3  # slots move: shapes vary anyway
    assert padded(settings, 3, 5, torch.tensor([0, 0, 1])) == 3  # a class batch's rows are shared by owners


def test_compile_is_on_only_when_asked_or_for_long_cuda_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_wanted("on", cpu, 1) and not compile_wanted("off", cuda, 10**9)
    assert not compile_wanted("auto", cpu, 10**9) and compile_wanted("auto", cuda, 10**6) and not compile_wanted("auto", cuda, 100)
    with pytest.raises(ValueError):
        compile_wanted("yes", cpu, 1)


def _pngs(folder):
    return {r["id"]: np.asarray(Image.open(folder / r["file"])).astype(int) for r in read_manifest(folder)}


@pytest.mark.slow
def test_compiled_invert_and_generate_give_the_eager_results(tiny_pixel, tmp_path, capsys, monkeypatch):
    compiled, shapes = [], []
    original = Backbone.compile

    def quick(self, backend="inductor"):
        compiled.append(self.source)
        original(self, backend="aot_eager")
        unet = self._compiled

        def spy(x, *args, **kwargs):  # the batch shapes the compiled UNet is called with
            shapes.append(len(x))
            return unet(x, *args, **kwargs)

        self._compiled = spy
        return self

    monkeypatch.setattr(Backbone, "compile", quick)
    data = write_image_tree(tmp_path / "d", per_class=3, size=16)  # 6 images in batches of 4: the last one padded
    common = ["--model", tiny_pixel, "--data", data, "--resolution", "16", "--steps", "4", "--batch-size", "4", *QUIET]
    for mode in ("off", "on"):
        code, text = _run(capsys, "invert", *common, "--compile", mode, "--out", tmp_path / f"store-{mode}")
        assert code == 0, text
    assert len(compiled) == 1 and set(shapes) == {4}, set(shapes)  # one shape: 6 images ran as 4 + 4
    shapes.clear()
    eager, fast = EmbeddingStore.open(tmp_path / "store-off"), EmbeddingStore.open(tmp_path / "store-on")
    assert eager.ids == fast.ids
    torch.testing.assert_close(fast.embeddings, eager.embeddings, rtol=1e-4, atol=1e-4)

    gen = ["--store", tmp_path / "store-off", "--per-image", "2", "--steps", "3", "--batch-size", "5", *QUIET]
    for mode in ("off", "on"):
        code, text = _run(capsys, "generate", *gen, "--compile", mode, "--out", tmp_path / f"set-{mode}")
        assert code == 0, text
    assert len(compiled) == 2 and set(shapes) == {10}, set(shapes)  # chunks of 5 samples, guided: 2 x 5
    a, b = _pngs(tmp_path / "set-off"), _pngs(tmp_path / "set-on")
    assert a.keys() == b.keys() and len(a) == 12  # 12 samples in chunks of 5: the last one padded
    assert max(int(np.abs(a[i] - b[i]).max()) for i in a) <= 1  # a rounding step of uint8 at most


def test_attention_not_through_a_fused_kernel_is_named(tiny_latent):
    from diffusers.models.attention_processor import AttnProcessor

    backbone = load_backbone(tiny_latent)
    assert backbone.unfused_attention() == []  # diffusers' default: PyTorch's scaled_dot_product_attention
    backbone.unet.set_attn_processor(AttnProcessor())  # the classic einsum path
    assert backbone.unfused_attention() == ["AttnProcessor"]
