"""experiment --plan and --yes: the work a study will do, its estimated time here, asked for before a large study starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import run_cli, write_image_tree

from diffinv.study.estimate import MAX_BATCH, Rates, Work, plan_work, probe, unit_batch


def test_work_is_counted_from_each_units_config():
    store = SimpleNamespace(kind="store", key="s", folder="stores/k5-r0", config=SimpleNamespace(per_class=5, steps=100))
    di = SimpleNamespace(kind="set", key="d", folder="sets/di-k5", config=SimpleNamespace(
        store="/x/stores/k5-r0", method="di", per_image=4, steps=10, guidance=2.0))
    retrieval = SimpleNamespace(kind="set", key="r", folder="sets/retrieval-k5", config=SimpleNamespace(
        store="/x/stores/k5-r0", method="retrieval", per_image=4, steps=10, guidance=2.0))
    run = SimpleNamespace(kind="run", key="t", folder="runs/di", config=SimpleNamespace(
        per_class=5, synthetic=("/x/sets/di-k5",), batch_size=64, steps=None, epochs=2.0, arch="small-cnn", resolution=None))
    work = plan_work([store, di, retrieval, run], n_classes=3, data_size=28)
    assert work["s"].inversion == 5 * 3 * 100
    assert work["d"].sampling == (5 * 3 * 4) * 10 * 2  # images x steps x 2 (guidance doubles the passes)
    assert work["r"].sampling == 0  # retrieval copies, it does not sample
    assert work["t"].classifier == {("small-cnn", 32, 64): 3}  # 2 epochs of 15 real + 60 synthetic, batches of 64: ceil(2.34)
    total = Work()
    for w in work.values():
        total.add(w)
    rates = Rates(inversion=0.01, sampling=0.002, classifier={("small-cnn", 32, 64): 0.1})
    assert rates.seconds(total) == pytest.approx(1500 * 0.01 + 1200 * 0.002 + 3 * 0.1)


def test_the_probe_times_the_batches_the_units_run_at(tiny_latent):
    store = SimpleNamespace(kind="store", key="s", folder="stores/k10", config=SimpleNamespace(per_class=10, steps=30, batch_size=0))
    small = SimpleNamespace(kind="store", key="m", folder="stores/k1", config=SimpleNamespace(per_class=1, steps=30, batch_size=0))
    di = SimpleNamespace(kind="set", key="d", folder="sets/di", config=SimpleNamespace(
        store="/x/stores/k10", method="di", per_image=5, steps=10, guidance=2.0, batch_size=48))
    work = plan_work([store, small, di], n_classes=10, data_size=16)
    assert unit_batch(store, work["s"]) == MAX_BATCH  # 100 images go through in batches of 64, as invert batches them
    assert unit_batch(small, work["m"]) == 10  # all its 10 images at once
    assert unit_batch(di, work["d"]) == 48  # its own batch size; guidance doubles passes, not the images per batch
    from diffinv.diffusion.model_io import load_backbone

    backbone, seen = load_backbone(str(tiny_latent)), []
    predict = backbone.predict
    backbone.predict = lambda x, t, cond: seen.append((len(x), cond.requires_grad)) or predict(x, t, cond)
    rates = probe(backbone, 16, 16, "cpu", (12, 7))
    assert set(seen) == {(12, True), (7, False)}  # inversion steps (gradients reach the tokens) at 12, sampling at 7
    assert rates.inversion > 0 and rates.sampling > 0


@pytest.fixture
def split_data(tmp_path):
    write_image_tree(tmp_path / "data" / "train", per_class=8, size=16)
    write_image_tree(tmp_path / "data" / "test", per_class=2, size=16, seed=1)
    return tmp_path / "data"


def _argv(model, data, out, *extra):
    return ["experiment", "--data", data, "--model", model, "--per-class", "2", "--seeds", "0,1", "--fast", "--out", out,
            "--device", "cpu", "--processes", "1", "--train-arch", "small-cnn", "--val-per-class", "2", "--quiet",
            "--no-report", *extra]


def test_plan_prints_units_and_estimate_and_writes_nothing(tiny_latent, split_data, tmp_path, capsys, monkeypatch):
    import diffinv.diffusion.model_io as model_io

    loads = []
    real_load = model_io.load_backbone
    monkeypatch.setattr(model_io, "load_backbone", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    code, text = run_cli(capsys, *_argv(tiny_latent, split_data, tmp_path / "s", "--plan"))
    assert code == 0, text
    assert len(loads) == 1, loads  # the generator is read once for its resolution and its probe
    assert "plan: 12 units to make, 0 finished to reuse" in text and "2 stores to make" in text
    assert "estimate: about" in text and "ms per sampling image-pass" in text and "small-cnn step" in text
    assert not (tmp_path / "s").exists()


def test_a_large_study_asks_for_yes_before_any_unit(tiny_latent, split_data, tmp_path, capsys, monkeypatch):
    import diffinv.config

    monkeypatch.setattr(diffinv.config, "PLAN_UNITS", 5)
    code, text = run_cli(capsys, *_argv(tiny_latent, split_data, tmp_path / "s"))
    assert code != 0 and "add --yes to start it" in text and "12 units" in text
    assert not (tmp_path / "s" / "stores").exists() and not (tmp_path / "s" / "study.yaml").exists()
    code, text = run_cli(capsys, *_argv(tiny_latent, split_data, tmp_path / "p", "--plan"))
    assert code == 0 and "starting it will need --yes" in text


def test_what_makes_a_study_uninformative_is_said_before_the_work():
    from diffinv.study.estimate import uninformative

    short = {"t": Work(classifier={("resnet18", 32, 64): 30.0})}
    notes = uninformative(short, data_size=96, native=16, n_classes=3)
    assert any("30 SGD steps, too few to learn 3 classes" in n for n in notes)
    assert any("16 px images and the data is 96 px" in n and "6x upsampled" in n for n in notes)
    assert uninformative({"t": Work(classifier={("resnet18", 32, 64): 300.0})}, 32, 32, 10) == []


def test_study_progress_says_the_time_left():
    from diffinv.study.engine import eta_line

    assert eta_line(2, 10, 600.0) == "study: 2 of 10 jobs done in 10 min, about 40 min left"


def test_the_wiener_estimate_is_the_best_per_value_guess_and_an_oracle_beats_it():
    import torch

    from diffinv.diffusion.objective import gain_over_wiener_db, wiener_estimate

    g = torch.Generator().manual_seed(0)
    x0 = 0.3 + 0.5 * torch.randn(64, 2, 8, 8, generator=g)  # per-value Gaussian: no structure to learn
    a = torch.full((64,), 0.4)
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    wiener = wiener_estimate(x_t, a.sqrt(), (1 - a).sqrt(), torch.full((2,), 0.3), torch.full((2,), 0.25))
    theory = 0.25 * 0.6 / (0.4 * 0.25 + 0.6)  # v (1 - a) / (a v + 1 - a)
    assert (wiener - x0).pow(2).mean().item() == pytest.approx(theory, rel=0.05)
    assert abs(gain_over_wiener_db(x0, wiener * 1.2 - 0.06, wiener)) < 1.0  # another per-value guess: no better
    assert gain_over_wiener_db(x0, x0 + 0.01 * torch.randn(x0.shape, generator=g), wiener) > 20  # one that knows x0


def test_a_base_that_learned_nothing_is_named_before_the_work(tiny_pixel, split_data, tmp_path, capsys):
    from diffinv.data.real import open_images
    from diffinv.diffusion.model_io import load_backbone
    from diffinv.study.estimate import NOISE_DB, denoising_gain, noise_note, sample_pixels

    backbone = load_backbone(str(tiny_pixel))
    images = open_images(split_data, "auto", "train")
    pixels = sample_pixels(images, 16)
    assert pixels.shape == (16, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    assert len(sample_pixels(images, 16, n=5)) == 5 and len({float(p.sum()) for p in pixels}) == 16  # spread, each once
    gain = denoising_gain(backbone, pixels)
    assert gain < NOISE_DB and gain == denoising_gain(backbone, pixels)  # random weights; seeded noise
    assert noise_note(backbone, images, 16)[1] is not None

    class Oracle:  # a "model" that predicts the true noise: it knows the images
        device, extra_tokens, cond_dim, num_train_timesteps, prediction_type = "cpu", 0, 4, 1000, "epsilon"
        process = backbone.process

        def encode(self, px):
            return SimpleNamespace(mean=px)

        def predict(self, x_t, t, cond):
            a = self.process.alphas_cumprod[t].view(-1, 1, 1, 1)
            return (x_t - a.sqrt() * pixels) / (1 - a).sqrt()

    assert denoising_gain(Oracle(), pixels) > 20 and noise_note(Oracle(), images, 16) == (denoising_gain(Oracle(), pixels), None)
    code, text = run_cli(capsys, *_argv(tiny_pixel, split_data, tmp_path / "s", "--plan"))
    assert code == 0 and f"only {gain:+.1f} dB better than a filter that sees one value at a time" in text


def test_a_replicates_cost_is_what_its_sets_were_made_from_and_read():
    from diffinv.study.engine import _made_from

    def unit(kind, folder, **config):
        return SimpleNamespace(kind=kind, folder=folder, config=SimpleNamespace(**config))

    plan = SimpleNamespace(units={
        "store": unit("store", "stores/k5-r0"), "class": unit("store", "stores/k5-r0-class"),
        "fit": unit("adapters", "adapters/k5-r0", store="/o/stores/k5-r0-class"),
        "di": unit("set", "sets/di", method="di", store="/o/stores/k5-r0"),
        "lora": unit("set", "sets/lora", method="lora", store="/o/stores/k5-r0-class", adapters="/o/adapters/k5-r0"),
        "di+lora": unit("set", "sets/dl", method="di+lora", store="/o/stores/k5-r0", adapters="/o/adapters/k5-r0"),
        "retrieval": unit("set", "sets/retrieval", method="retrieval", store="/o/stores/k5-r0")})
    assert _made_from(plan, ["di"]) == {"di", "store"}
    assert _made_from(plan, ["lora"]) == {"lora", "fit", "class"}  # the fit and the class inversion it was fitted on
    assert _made_from(plan, ["di+lora"]) == {"di+lora", "store", "fit", "class"}
    assert _made_from(plan, ["retrieval"]) == {"retrieval"}  # it reads the store's list of images, not its inversion
