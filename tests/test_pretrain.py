"""The project's own base model (`pretrain-base`) and the one-command demo (`demo`)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffinv.stages.pretrain as pretrain
from diffinv.cli import main
from diffinv.config import ConfigError, PretrainConfig, StudyConfig, load_config
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.store import EmbeddingStore
from diffinv.runs import read_json, read_yaml

TINY = dict(resolution=8, channels=(16, 32), layers_per_block=1, cross_attention_dim=16, tokens=2, batch_size=16,
            lr=3e-3, warmup=5, ema=0.9, log_every=5, checkpoint_every=10, device="cpu")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "digits-base"
    pretrain.pretrain_base(PretrainConfig(**TINY, steps=60), out, progress=False, log=lambda m: None)
    return out


@pytest.mark.slow
def test_pretraining_lowers_the_loss_and_loads_like_sd(tiny_base):
    losses = [json.loads(line)["loss"] for line in (tiny_base / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    info = read_json(tiny_base / "pretrain.json")
    assert info["status"] == "complete" and info["images"] == 1437  # digits' training split only (80 %)
    for name in ("loss.png", "samples.png", "config.yaml", "encoder.safetensors"):
        assert (tiny_base / name).stat().st_size > 0
    assert not (tiny_base / "checkpoint.safetensors").exists()
    # Through the same loader as Stable Diffusion: a pixel-space diffusers folder, conditioning [B, K, D].
    backbone = load_backbone(tiny_base)
    # Digits are grey, so the base is a one-channel model (samples come out equal-RGB, never tinted).
    assert info["image_channels"] == 1
    assert backbone.vae is None and backbone.cond_dim == 16 and backbone.latent_shape(8) == (1, 8, 8)
    out = backbone.predict(torch.zeros(2, 1, 8, 8), torch.tensor([10, 500]), torch.zeros(2, 2, 16))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    decoded = backbone.decode(out)
    assert decoded.shape == (2, 3, 8, 8) and torch.equal(decoded[:, 0], decoded[:, 2])


@pytest.mark.slow
def test_the_saved_weights_are_the_average(tiny_base, tmp_path):
    # ema = 0 saves the trained weights themselves: they differ from the averaged ones.
    plain = tmp_path / "plain"
    pretrain.pretrain_base(PretrainConfig(**{**TINY, "ema": 0.0}, steps=60), plain, progress=False, log=lambda m: None)
    a = load_file(str(tiny_base / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(plain / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_a_kill_gives_identical_weights(tmp_path, monkeypatch):
    config = PretrainConfig(**TINY, steps=20)
    whole = tmp_path / "whole"
    pretrain.pretrain_base(config, whole, progress=False, log=lambda m: None)

    calls = {"n": 0}
    real_update = pretrain.ema_update

    def dying_update(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 14:  # after the checkpoint at step 10
            raise KeyboardInterrupt
        real_update(*args, **kw)

    killed = tmp_path / "killed"
    monkeypatch.setattr(pretrain, "ema_update", dying_update)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain_base(config, killed, progress=False, log=lambda m: None)
    monkeypatch.setattr(pretrain, "ema_update", real_update)
    assert read_json(killed / "pretrain.json")["status"] == "running" and (killed / "checkpoint.safetensors").is_file()
    with pytest.raises(Exception, match="--resume"):
        pretrain.pretrain_base(config, killed, progress=False, log=lambda m: None)
    pretrain.pretrain_base(config, killed, resume=True, progress=False, log=lambda m: None)
    a = load_file(str(whole / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(killed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "losses.jsonl").read_text().count("\n") == (killed / "losses.jsonl").read_text().count("\n")
    # Other settings cannot continue it.
    with pytest.raises(Exception, match="different settings"):
        pretrain.pretrain_base(PretrainConfig(**{**TINY, "lr": 1e-2}, steps=20), killed, resume=True, progress=False)


def test_the_noise_schedule_is_chosen_saved_and_loaded(tiny_base, tmp_path, capsys):
    # SD's schedule (the default) keeps sqrt(alpha_bar_T) = 0.068 of the image at t = T; DDPM's
    # linear one 0.006. The base is saved with its schedule and every stage samples with it.
    assert float(load_backbone(tiny_base).process.alphas_cumprod[-1]) > 4e-3
    flags = ["--resolution", "8", "--channels", "16,32", "--layers-per-block", "1", "--cross-attention-dim", "16",
             "--tokens", "2", "--batch-size", "4", "--steps", "2", "--device", "cpu", "--quiet"]
    out = tmp_path / "linear"
    assert main(["pretrain-base", *flags, "--beta-schedule", "linear", "--out", str(out)]) == 0
    linear = load_backbone(out)
    assert float(linear.process.alphas_cumprod[-1]) < 1e-4
    assert linear.make_scheduler("ddim").config.beta_schedule == "linear"
    assert read_yaml(out / "config.yaml")["beta_schedule"] == "linear"
    # A base is one schedule: continuing it with another is refused, naming the field.
    capsys.readouterr()
    assert main(["pretrain-base", *flags, "--beta-schedule", "scaled_linear", "--out", str(out), "--resume"]) == 2
    assert "beta_schedule" in capsys.readouterr().err


def test_nan_loss_stops_with_advice(tmp_path):
    with pytest.raises(pretrain.PretrainError, match="lower --lr"):
        pretrain.pretrain_base(PretrainConfig(**{**TINY, "lr": 1e30, "warmup": 0}, steps=10), tmp_path / "b",
                               progress=False, log=lambda m: None)


def test_config_rules():
    with pytest.raises(ConfigError, match="never reads a test split"):
        PretrainConfig(split="test")
    with pytest.raises(ConfigError, match="multiple of 4"):
        PretrainConfig(resolution=10, channels=(16, 32, 64))
    # Lists from flags: "16,32" or "0 1 2".
    assert load_config(PretrainConfig, None, {"channels": "16,32"}).channels == (16, 32)
    assert load_config(StudyConfig, None, {"seeds": "0 1 2"}).seeds == (0, 1, 2)
    with pytest.raises(ConfigError, match="integers"):
        load_config(StudyConfig, None, {"seeds": "a,b"})


def test_cli_pretrain_bad_data_is_one_clear_line(tmp_path, capsys):
    assert main(["pretrain-base", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def _sets(out: Path, method: str, k: int, r: int) -> Path:
    row = next(x for x in read_json(out / "results.json") if (x["method"], x["per_class"], x["seed"]) == (method, k, r))
    return out / row["sets"][0]


def _store(out: Path, k: int, r: int) -> Path:
    return next(out / u["folder"] for u in read_json(out / "plan.json")["units"]
                if u["kind"] == "store" and u["folder"].startswith(f"stores/k{k}-r{r}-"))


@pytest.mark.slow
def test_demo_runs_end_to_end_in_fast_mode(tiny_base, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_base), "--per-class", "2", "--out", str(out), "--fast", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert table.strip() in printed
    body = [line for line in table.splitlines() if line.startswith("|")][2:]
    assert [line.split("|")[1].strip() for line in body] == ["real only", "real + di", "real + img2img", "di minus img2img"]
    assert "20 + 40" in table  # 2 per class x 10 classes real; 2 variants each per generator
    summary = read_json(out / "summary.json")
    assert {r["n_seeds"] for r in summary} == {2}
    # Runs with variants keep real images in every batch (the paper's split); real only pools.
    results = read_json(out / "results.json")
    splits = {r["method"]: read_yaml(out / r["run"] / "config.yaml")["real_batch"] for r in results}
    assert splits == {"real": 0, "di": 8, "img2img": 8}
    assert (out / "report" / "report.html").stat().st_size > 10_000
    # Each replicate has its own subset, store and sets; both generators made the same number of images at the
    # data's own size from that replicate's store.
    for r in (0, 1):
        for method in ("di", "img2img"):
            rows = [json.loads(line) for line in (_sets(out, method, 2, r) / "manifest.jsonl").read_text().splitlines()]
            assert len(rows) == 40 and {row["save_size"] for row in rows} == {8}
    # The base has 2 tokens: the demo inverts 2 (its encoder's start), and the store's header says so.
    store = EmbeddingStore.open(_store(out, 2, 0))
    assert list(store.embeddings.shape[1:]) == read_json(_store(out, 2, 0) / "store.json")["cond_shape"] == [2, 16]
    subsets = [{row["id"] for row in read_json(p)} for r in (0, 1) for p in (_store(out, 2, r) / "parts").glob("*.json")]
    assert len(subsets) == 2 and subsets[0] != subsets[1]
    # A second run finds everything done and prints the same table.
    assert main(argv) == 0
    assert table.strip() in capsys.readouterr().out


@pytest.mark.slow
def test_demo_in_two_processes_makes_the_files_one_process_makes_at_the_same_threads(tiny_base, tmp_path, monkeypatch):
    # --processes 2 spawns two processes (this one's torch threads // 2, at least 1, each) for the jobs and then the test
    # of the kept runs; at that thread count one process must give the same numbers. The 2-process demo is first run
    # with one size and replicate (one job: no second process), then continued with two of each (a changed study).
    import diffinv.study.engine as engine

    spawned = []
    original = engine.run_all
    monkeypatch.setattr(engine, "run_all", lambda pool, fn, jobs: (spawned.append((fn.__name__, len(jobs))),
                                                                   original(pool, fn, jobs))[1])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # so each worker has 1 too
    try:
        for workers, seeds, sizes in ((1, "0,1", "1,2"), (2, "0", "2"), (2, "0,1", "1,2")):
            argv = ["demo", "--model", str(tiny_base), "--per-class", sizes, "--out", str(tmp_path / f"w{workers}"), "--fast",
                    "--device", "cpu", "--quiet", "--processes", str(workers), "--seeds", seeds, "--no-report"]
            assert main(argv) == 0
    finally:
        torch.set_num_threads(previous)
    # Only the continued 2-process run went to other processes: its three new jobs, then the test of their nine kept runs.
    assert spawned == [("run_job", 3), ("_test", 4)]
    one, two = (read_json(tmp_path / f"w{w}" / "results.json") for w in (1, 2))
    assert len(one) == 12 and [(r["method"], r["seed"], r["balanced_accuracy"]) for r in one] == \
        [(r["method"], r["seed"], r["balanced_accuracy"]) for r in two]
    assert (tmp_path / "w1" / "results.md").read_text() == (tmp_path / "w2" / "results.md").read_text()
    for r in (0, 1):
        a, b = ({k: v for p in sorted((_store(tmp_path / f"w{w}", 2, r) / "parts").glob("*.safetensors"))
                 for k, v in load_file(p).items()} for w in (1, 2))
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


AE_BASE = Path(__file__).resolve().parents[1] / "bases" / "digits-8-ae"  # the digits base embedded until 2026-11-26


def _redraw_errors(base: Path) -> tuple[float, float]:
    """Pixel MSE of held-out test digits redrawn (DDIM 10, no guidance) from their own encoder tokens, and from another's."""
    from diffinv.data.real import load_pixels, open_images, select
    from diffinv.diffusion.encoder import load_encoder
    from diffinv.diffusion.sampling import sample_latents

    backbone = load_backbone(base)
    test = load_pixels(select(open_images("digits", split="test"), 1, seed=0), 8)
    with torch.no_grad():
        cond = load_encoder(base).eval()(test)
        noise = torch.randn((len(test), backbone.unet.config.in_channels, 8, 8), generator=torch.Generator().manual_seed(0))
        own = sample_latents(backbone, cond, None, noise, sampler="ddim", steps=10, guidance=1.0)
        other = sample_latents(backbone, cond.roll(1, 0), None, noise, sampler="ddim", steps=10, guidance=1.0)
    grey = test.mean(1)  # the embedded base draws one channel
    return (own.mean(1) - grey).pow(2).mean().item(), (other.mean(1) - grey).pow(2).mean().item()


def test_the_embedded_digits_base_loads_like_sd_and_its_tokens_carry_the_digit_not_the_image():
    from diffinv.study.demo import embedded_base

    base = embedded_base()
    size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
    assert size <= 10 * 2 ** 20  # shipped inside the package
    info, config = read_json(base / "pretrain.json"), read_yaml(base / "config.yaml")
    assert info["status"] == "complete" and info["image_channels"] == 1  # grey digits give grey variants
    # digits' training split and MNIST's (1,437 + 60,000 images), never a test split
    assert config["split"] == "train" and config["views"] == "invariant" and info["images"] == 61437
    # Its tokens carry the digit (redraws from a digit's own tokens are closer than from another's) but
    # not the image (measured 0.29 against 0.53): sampling fills the rest in, so DI's variants vary. The
    # autoencoder base's tokens pin the image (0.018 against 0.59): its variants are near-copies.
    own, other = _redraw_errors(base)
    assert own < 0.75 * other and own > 0.1
    own_ae, other_ae = _redraw_errors(AE_BASE)
    assert own_ae < 0.1 * other_ae and own_ae < 0.2 * own


def test_encoder_tokens_start_inversion_closer_than_noise(tmp_path, tiny_latent):
    from diffinv.config import InvertConfig
    from diffinv.diffusion.store import EmbeddingStore
    from diffinv.runs import RunError
    from diffinv.stages.invert import invert_dataset

    def store(init, model=AE_BASE, resolution=8):
        config = InvertConfig(model=str(model), data="digits", per_class=2, resolution=resolution, steps=1, init=init, device="cpu")
        return EmbeddingStore.open(invert_dataset(config, tmp_path / f"{init}-{resolution}", progress=False, log=lambda m: None))

    start = {init: sum(r["loss_init"] for r in store(init).rows) / 20 for init in ("random", "encoder")}
    assert start["encoder"] < 0.5 * start["random"]  # measured on the autoencoder base: 0.0080 vs 0.0704
    with pytest.raises(RunError, match="--init random"):
        store("encoder", tiny_latent, 16)
    with pytest.raises(ConfigError, match="per-image"):
        InvertConfig(init="encoder", target="class")


def test_inverting_from_the_encoder_takes_its_token_count_or_says_which(tiny_base, tmp_path, capsys):
    """A base pretrained with K = 2: --init encoder with --tokens 5 once stored 2-token embeddings under a
    5-token header; now it is a clear error naming --tokens 2, and --tokens 2 stores what its header says."""
    common = ["invert", "--model", str(tiny_base), "--data", "digits", "--per-class", "1", "--steps", "1", "--device", "cpu",
              "--quiet"]
    argv = [*common, "--init", "encoder"]
    assert main([*argv, "--tokens", "5", "--out", str(tmp_path / "five")]) == 2
    err = capsys.readouterr().err
    assert "makes 2 tokens" in err and "--tokens 2" in err and "Traceback" not in err
    assert main([*argv, "--tokens", "2", "--out", str(tmp_path / "two")]) == 0
    store = EmbeddingStore.open(tmp_path / "two")
    assert list(store.embeddings.shape[1:]) == read_json(tmp_path / "two" / "store.json")["cond_shape"] == [2, 16]
    # From noise the token count is the user's choice; the log says the base was pretrained with another.
    assert main([*common, "--init", "random", "--tokens", "5", "--out", str(tmp_path / "random")]) == 0
    printed = capsys.readouterr()
    assert "pretrained with 2 conditioning tokens" in printed.err + printed.out
    assert list(EmbeddingStore.open(tmp_path / "random").embeddings.shape[1:]) == [5, 16]
    # ... and a computed start other than the encoder's is still taken (here the class-level store's).
    assert main([*common, "--target", "class", "--tokens", "5", "--out", str(tmp_path / "classes")]) == 0
    assert main([*common, "--init", "class", "--init-store", str(tmp_path / "classes"), "--tokens", "5", "--lr", "1e-12",
                 "--warmup", "0", "--out", str(tmp_path / "from-class")]) == 0
    classes, images = EmbeddingStore.open(tmp_path / "classes"), EmbeddingStore.open(tmp_path / "from-class")
    by_label = {row["label"]: classes.embeddings[i] for i, row in enumerate(classes.rows)}
    for i, row in enumerate(images.rows):
        torch.testing.assert_close(images.embeddings[i], by_label[row["label"]], atol=1e-4, rtol=0)


def test_zero_steps_from_the_encoder_keep_its_tokens(tmp_path):
    """`--init encoder --steps 0` is the no-inversion ablation: c_i = encoder(x_i), exactly."""
    from diffinv.config import InvertConfig
    from diffinv.data.real import load_pixels, open_images
    from diffinv.diffusion.encoder import load_encoder
    from diffinv.diffusion.store import EmbeddingStore
    from diffinv.stages.invert import invert_dataset
    from diffinv.study.demo import embedded_base

    config = InvertConfig(model=str(embedded_base()), data="digits", per_class=1, resolution=8, steps=0, init="encoder",
                          device="cpu")
    store = EmbeddingStore.open(invert_dataset(config, tmp_path / "enc", progress=False, log=lambda m: None))
    source = open_images("digits")
    position = {image_id: i for i, image_id in enumerate(source.ids)}
    images = source.subset([position[r["id"]] for r in store.rows])
    with torch.no_grad():
        tokens = load_encoder(embedded_base()).eval()(load_pixels(images, 8))
    torch.testing.assert_close(store.embeddings, tokens)
    assert all(r["steps"] == 0 and r["loss"] == r["loss_init"] for r in store.rows)
    with pytest.raises(ConfigError, match="0 only with --init encoder"):
        InvertConfig(steps=0)


def test_demo_on_a_model_without_a_base_encoder_says_to_start_from_noise(tiny_latent, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_latent), "--per-class", "1", "--out", str(out), "--fast", "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--invert-init random" in err and "Traceback" not in err
    assert not out.exists()  # refused before any work


@pytest.mark.slow
def test_demo_with_several_sizes_is_a_sample_efficiency_study(tiny_base, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_base), "--per-class", "1,2", "--real-sizes", "4", "--out", str(out), "--fast",
            "--device", "cpu", "--quiet", "--generate-clip-x0", "--generate-unit-noise"]
    assert main(argv) == 0
    # The sampling remedies reach both generators and are recorded with every sample.
    for method in ("di", "img2img"):
        rows = [json.loads(line) for line in (_sets(out, method, 1, 0) / "manifest.jsonl").read_text().splitlines()]
        assert {(r["clip_x0"], r["unit_noise"]) for r in rows} == {(True, True)}
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")][2:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table]
    assert [(r[0], r[1]) for r in rows] == [("real only", "1"), ("real + di", "1"), ("real + img2img", "1"),
                                           ("real only", "2"), ("real + di", "2"), ("real + img2img", "2"),
                                           ("real only", "4"), ("di minus img2img", "1"), ("di minus img2img", "2")]
    # Each size and replicate has its own inversion of its own subset (nested across sizes within a replicate).
    stores = {(k, r): read_json(_store(out, k, r) / "store.json")["n_items"] for k in (1, 2) for r in (0, 1)}
    assert stores == {(1, 0): 10, (1, 1): 10, (2, 0): 20, (2, 1): 20} and not list(out.glob("stores/k4-*"))
    # The gain column: the mean of the per-replicate differences with real only, in the headline metric (balanced
    # accuracy: digits' test split is imbalanced), with its 95% t-interval; never evidence with 2 replicates.
    from scipy import stats

    results = read_json(out / "results.json")
    acc = {(r["method"], r["per_class"], r["seed"]): 100 * r["balanced_accuracy"] for r in results}
    diffs = [acc[("di", 2, s)] - acc[("real", 2, s)] for s in (0, 1)]
    half = stats.t.ppf(0.975, 1) * np.std(diffs, ddof=1) / np.sqrt(2)  # scipy's t.interval, which gives nan at zero spread
    low, high = np.mean(diffs) - half, np.mean(diffs) + half
    degenerate = any(r["degenerate"] for r in results if r["per_class"] == 2 and r["method"] in ("di", "real"))
    assert "balanced accuracy" in (out / "results.md").read_text().splitlines()[0]
    # 4 SGD steps (--fast) often leave a classifier predicting one class: such a run is marked, never a gain.
    assert rows[4][4] == f"{np.mean(diffs):+.2f} [{low:+.2f}, {high:+.2f}] " + ("(degenerate run)" if degenerate else "(within noise)")
    # "Worth N real images" is read off the real-only curve only for a gain beyond noise: none here.
    assert not any(r[5] for r in rows)
    # Head to head, paired by replicate too.
    di_img = [acc[("di", 2, s)] - acc[("img2img", 2, s)] for s in (0, 1)]
    assert rows[8][4].startswith(f"{np.mean(di_img):+.2f} [")
    report = (out / "report" / "report.md").read_text()
    assert "Sample efficiency" in report and "no gain beyond noise" in report


# ----------------------------------------------------------------------------- lossy, semantic conditioning


def test_invariant_views_feed_the_encoder_another_view_than_the_unet(tmp_path, monkeypatch):
    seen = []
    real_loss = pretrain.autoencoder_loss

    def spy(backbone, encoder, x0, keys, step, cond_dropout, encoder_input=None, token_noise=0.0):
        seen.append((x0.clone(), None if encoder_input is None else encoder_input.clone()))
        return real_loss(backbone, encoder, x0, keys, step, cond_dropout, encoder_input, token_noise)

    monkeypatch.setattr(pretrain, "autoencoder_loss", spy)
    for views in ("same", "invariant"):
        seen.clear()
        pretrain.pretrain_base(PretrainConfig(**TINY, steps=3, views=views, view_min_area=0.4), tmp_path / views,
                               progress=False, log=lambda m: None)
        x0, enc = seen[-1]
        if views == "same":
            assert enc is None  # the encoder reads x0 itself: a diffusion autoencoder
        else:
            # Same images (same batch), different pixels: a crop / rotation / colour view of each.
            assert enc.shape == x0.shape and not torch.allclose(enc, x0, atol=1e-3)
            assert (enc - x0).abs().flatten(1).mean(1).min() > 1e-3
            # The UNet's target stays the data itself: the step's training images, untouched (digits are never flipped).
            config = PretrainConfig(**TINY, steps=3, views=views)
            pixels = pretrain.training_pixels(config, False)[0][:, :1]
            assert torch.equal(x0, pixels[pretrain.batch_indices(config, 2, len(pixels))])


def test_views_are_keyed_and_the_denoiser_view_only_flips():
    from diffinv import rng
    from diffinv.diffusion.views import denoiser_view, random_views, strong

    x = torch.rand(4, 3, 16, 16) * 2 - 1
    keys = torch.arange(4)
    a = random_views(x, keys, 5, rng.STREAM_VIEW, strong(0.35), hflip=True)
    assert torch.equal(a, random_views(x, keys, 5, rng.STREAM_VIEW, strong(0.35), hflip=True))  # a pure function of its keys
    assert not torch.equal(a, random_views(x, keys, 6, rng.STREAM_VIEW, strong(0.35), hflip=True))
    assert torch.equal(random_views(x[2:3], keys[2:3], 5, rng.STREAM_VIEW, strong(0.35), hflip=True), a[2:3])  # batch-free
    flipped = denoiser_view(x, keys, 5, rng.STREAM_LATENT, hflip=True)
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x))
    assert torch.equal(denoiser_view(x, keys, 5, rng.STREAM_LATENT, hflip=False), x)


def test_ema_is_bias_corrected():
    # A plain average started from the initial weights keeps decay^n of them; the corrected one
    # averages only the trained iterates: after updates to a constant w it is exactly w.
    from torch import nn

    from diffinv.diffusion.pretrain import ema_update, ema_weight

    model, average = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        average.weight.fill_(100.0)  # "the initial weights"
        model.weight.fill_(1.0)
    for n in range(1, 4):
        ema_update(average, model, 0.999, n)
    torch.testing.assert_close(average.weight, torch.ones(2, 2))
    assert ema_weight(0.999, 1) == 1.0 and abs(ema_weight(0.999, 10**6) - 0.001) < 1e-12 and ema_weight(0.0, 5) == 1.0


def test_max_seconds_stops_early_and_records_the_steps_reached(tmp_path, monkeypatch):
    clock = {"t": 1000.0}

    def fake_time():
        clock["t"] += 1.0  # every call one second later
        return clock["t"]

    monkeypatch.setattr(pretrain.time, "time", fake_time)
    out = tmp_path / "b"
    pretrain.pretrain_base(PretrainConfig(**TINY, steps=500, max_seconds=6), out, progress=False, log=lambda m: None)
    info = read_json(out / "pretrain.json")
    assert info["status"] == "complete" and info["steps_asked"] == 500 and 1 <= info["steps"] < 10
    assert read_yaml(out / "config.yaml")["steps"] == info["steps"]  # the saved config reproduces the run


def test_a_flow_base_trains_with_the_rectified_flow_objective_and_is_read_back_as_one(tmp_path, capsys):
    from diffinv.diffusion.process import RectifiedFlow

    out = tmp_path / "flow"
    flags = ["--resolution", "8", "--channels", "16,32", "--layers-per-block", "1", "--cross-attention-dim", "16",
             "--tokens", "2", "--batch-size", "16", "--lr", "3e-3", "--warmup", "5", "--steps", "40", "--log-every", "5",
             "--device", "cpu", "--quiet"]
    assert main(["pretrain-base", *flags, "--process", "flow", "--out", str(out)]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2])  # the velocity loss falls (it starts near 2: |n - x0|^2)
    backbone = load_backbone(out)
    assert isinstance(backbone.process, RectifiedFlow) and backbone.prediction_type == "flow_prediction"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    capsys.readouterr()
    assert main(["pretrain-base", *flags, "--out", str(out), "--resume"]) == 2  # a flow base is continued as a flow base
    assert "process" in capsys.readouterr().err
    store = tmp_path / "store"
    assert main(["invert", "--model", str(out), "--data", "digits", "--per-class", "1", "--steps", "3", "--init", "encoder",
                 "--tokens", "2", "--out", str(store), "--quiet"]) == 0
    assert main(["generate", "--store", str(store), "--per-image", "1", "--steps", "3", "--out", str(tmp_path / "di"),
                 "--quiet"]) == 0
