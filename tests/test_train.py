"""Stage 3: architectures, augmentation, the training loop, resume, studies, quality metrics and reports."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffinv.classify.augment import Augmenter
from diffinv.classify.batches import Stream, eval_steps
from diffinv.classify.metrics import confusion_matrix, evaluate, metrics_of
from diffinv.classify.models import ARCHITECTURES, build_model, penultimate
from diffinv.cli import main
from diffinv.config import AUGS, ConfigError, GenerateConfig, InvertConfig, TrainConfig, load_config
from diffinv.quality.measures import frechet_distance, kernel_distance, nearest_distances, synthetic_quality
from diffinv.report.efficiency import efficiency_factor, equivalent_real
from diffinv.runs import RunError, read_json
from diffinv.schedule import lr_factor
from diffinv.stages.train import load_classifier, train_classifier

# A few digits at 32 px on a small network: a run takes a few seconds on two cores.
FAST = dict(data="digits", per_class=3, arch="shufflenetv2", resolution=32, batch_size=10, eval_batch_size=400)


def _patterns(n: int, classes: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a bright quadrant: learnable in a few steps by any architecture."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, 3, size, size, generator=g) * 0.3
    h = size // 2
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c % 4, 2)
        x[i, :, r * h:(r + 1) * h, col * h:(col + 1) * h] += 0.6
    return x, y


# ----------------------------------------------------------------------------- architectures


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_every_architecture_trains_and_its_loss_falls(arch):
    torch.manual_seed(0)
    net = build_model(arch, 4, 32)
    x, y = _patterns(8, 4)
    # Adam: SGD on a batch of 8 with train-mode BatchNorm made ResNet-50's loss oscillate on some CPUs.
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert net(x).shape == (8, 4)
    assert max(losses[-3:]) < 0.8 * losses[0]
    net.eval()
    feats, logits = penultimate(net, x)
    assert feats.ndim == 2 and feats.shape[0] == 8
    torch.testing.assert_close(logits, net(x))


def test_small_image_stem_keeps_resolution_and_imagenet_stem_is_used_for_large_images():
    small, large = build_model("resnet18", 3, 32), build_model("resnet18", 3, 96)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.stride == (2, 2)
    assert build_model("vgg16", 3, 16)(torch.rand(2, 3, 16, 16)).shape == (2, 3)  # fewer pools below 32 px


def test_timm_models_for_larger_images():
    pytest.importorskip("timm", reason="timm is an optional extra (installed by the test extra)")
    net = build_model("timm:resnet10t", 3, 64)
    x = torch.rand(2, 3, 64, 64)
    feats, logits = penultimate(net.eval(), x)
    assert logits.shape == (2, 3) and feats.shape[0] == 2
    with pytest.raises(Exception, match="cannot build"):
        build_model("timm:no_such_model", 3, 64)


def test_unknown_architecture_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--arch", "alexnet", "--out", str(tmp_path / "r")]) == 2
    assert "arch must be one of resnet18" in capsys.readouterr().err


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("aug", AUGS)
def test_augmentations_keep_shapes_range_and_labels(aug):
    torch.manual_seed(0)
    x, y = _patterns(32, 10)
    out, soft = Augmenter(aug, 32, 10)(x.clamp(0, 1), y)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(soft, torch.nn.functional.one_hot(y, 10).float())
    if aug == "none":
        torch.testing.assert_close(out, x.clamp(0, 1))
    else:
        assert not torch.allclose(out, x.clamp(0, 1))


def test_mixup_mixes_each_image_with_its_partner_in_the_label_proportion():
    torch.manual_seed(1)
    x, _ = _patterns(6, 4)
    y = torch.arange(6)
    out, soft = Augmenter("none", 32, 6, mixup=1.0)(x, y)
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    lam = soft[0, 0]
    assert 0 < lam < 1
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.roll(1, 0))


def test_cutmix_label_weight_is_the_fraction_of_pixels_kept():
    torch.manual_seed(3)
    x = torch.rand(6, 3, 32, 32)
    y = torch.arange(6)
    out, soft = Augmenter("none", 32, 6, cutmix=1.0)(x, y)
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    kept = (out == x).all(1).float().mean((1, 2))  # a pixel kept from the image itself
    torch.testing.assert_close(kept, soft.diagonal(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- schedule and metrics


def test_warmup_then_cosine():
    total, warm = 100, 10
    lrs = [0.1 * lr_factor(s, total, "cosine", warm) for s in range(total)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.001


def test_batch_order_is_a_pure_function_of_the_step_and_covers_each_pass_once():
    a, b = Stream(10, 3, seed=0, name="pool"), Stream(10, 3, seed=0, name="pool")
    assert torch.equal(a.indices(7), b.indices(7))  # b never saw steps 0-6
    one_pass = torch.cat([a.indices(s) for s in range(3)])
    assert len(set(one_pass.tolist())) == 9  # 3 batches of 3, the 10th item dropped
    assert not torch.equal(torch.cat([a.indices(s) for s in range(3, 6)]), one_pass)
    assert eval_steps(50, 0) == {5, 10, 15, 20, 25, 30, 35, 40, 45, 50}
    assert eval_steps(50, 20) == {20, 40, 50}


def test_confusion_and_per_class_accuracy_match_sklearn():
    from sklearn.metrics import confusion_matrix as sk_confusion

    rs = np.random.RandomState(0)
    labels, preds = rs.randint(0, 4, 50), rs.randint(0, 4, 50)
    ours = confusion_matrix(torch.from_numpy(preds), torch.from_numpy(labels), 5)
    np.testing.assert_array_equal(ours.numpy()[:4, :4], sk_confusion(labels, preds, labels=[0, 1, 2, 3]))
    s = metrics_of(ours, 0.0)
    assert s["top1"] == pytest.approx((labels == preds).mean())
    assert s["per_class"][4] is None  # class 4 absent: no accuracy rather than a fake 0


# ----------------------------------------------------------------------------- the run


def test_train_writes_a_complete_run_whose_model_reproduces_its_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--per-class", "3", "--arch", "shufflenetv2", "--resolution", "32",
                 "--steps", "6", "--batch-size", "10", "--eval-every", "3", "--quiet", "--out", str(out)]) == 0
    assert "test top-1" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "train.json", "metrics.jsonl", "model.safetensors", "final.json"}
    assert not (out / "checkpoint.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    final = read_json(out / "final.json")
    assert final["n_real"] == 30 and final["n_test"] == 360 and len(rows[-1]["confusion"]) == 10
    model, meta = load_classifier(out)
    from diffinv.data.real import load_uint8, open_images

    test = open_images("digits", split="test")
    again = evaluate(model, load_uint8(test, 32), torch.from_numpy(test.labels), meta["mean"], meta["std"], 10)
    assert again["top1"] == pytest.approx(final["top1"])
    assert main(["train", "--data", "digits", "--out", str(out)]) == 2  # finished run: not overwritten
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_same_seed_same_run_and_another_seed_differs(tmp_path):
    runs = [train_classifier(TrainConfig(**FAST, steps=3, seed=s), tmp_path / f"r{i}", progress=False)
            for i, s in enumerate([0, 0, 1])]
    w = [load_file(str(r / "model.safetensors")) for r in runs]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert not all(torch.equal(w[0][k], w[2][k]) for k in w[0])


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    config = TrainConfig(**FAST, steps=6, checkpoint_every=2, aug="randaugment", mixup=0.4, cutmix=1.0)
    ref = train_classifier(config, tmp_path / "ref", progress=False)

    def stop(done):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(config, tmp_path / "run", progress=False, on_step=stop)
    assert read_json(tmp_path / "run" / "train.json")["status"] == "running"
    with pytest.raises(RunError, match="--resume"):
        train_classifier(config, tmp_path / "run", progress=False)
    with pytest.raises(RunError, match="different settings"):
        train_classifier(TrainConfig(**{**FAST, "lr": 0.2}, steps=6, checkpoint_every=2), tmp_path / "run", resume=True,
                         progress=False)
    train_classifier(config, tmp_path / "run", resume=True, progress=False)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(ref / "final.json")["top1"] == read_json(tmp_path / "run" / "final.json")["top1"]


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_model(tmp_path):
    args = ["--data", "digits", "--per-class", "3", "--arch", "shufflenetv2", "--resolution", "32", "--batch-size", "10",
            "--steps", "12", "--checkpoint-every", "2", "--eval-every", "12", "--quiet"]
    cli = [sys.executable, "-m", "diffinv.cli", "train"]
    subprocess.run(cli + args + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)
    proc = subprocess.Popen(cli + args + ["--out", str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "final.json").exists()
    done = subprocess.run(cli + args + ["--out", str(tmp_path / "run"), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_train_options_from_yaml_and_bad_combinations(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("arch: vgg16\nsynthetic: [a, b]\nreal-batch: 8\nsyn-batch: 24\n")
    config = load_config(TrainConfig, path, {"lr": 0.05})
    assert config.synthetic == ("a", "b") and config.real_batch == 8 and config.lr == 0.05
    with pytest.raises(ConfigError, match="--syn-batch"):
        TrainConfig(real_batch=8)
    with pytest.raises(ConfigError, match="needs --synthetic"):
        TrainConfig(use="both")


# ----------------------------------------------------------------------------- synthetic data, studies, reports


@pytest.fixture(scope="module")
def digits_di(tmp_path_factory):
    """Real Diffusion Inversion output on 2 digits per class: a tiny random model, so the images are noise-like."""
    from diffinv.diffusion.tiny import save_tiny_model
    from diffinv.stages.generate import generate_dataset
    from diffinv.stages.invert import invert_dataset

    root = tmp_path_factory.mktemp("di")
    model = save_tiny_model(root / "model", "latent")
    store = invert_dataset(InvertConfig(model=str(model), data="digits", per_class=2, resolution=16, steps=2),
                           root / "store", progress=False)
    return generate_dataset(GenerateConfig(store=str(store), per_image=2, steps=2, save_size=8), root / "di", progress=False)


@pytest.mark.slow
def test_real_plus_synthetic_with_a_fixed_split_of_every_batch(digits_di, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--per-class", "2", "--synthetic", str(digits_di), "--real-batch", "4",
                 "--syn-batch", "8", "--arch", "mobilenetv2", "--resolution", "32", "--steps", "2", "--quiet",
                 "--out", str(out)]) == 0
    final = read_json(out / "final.json")
    assert final["n_real"] == 20 and final["n_synthetic"] == 40 and final["notes"] == []
    # Synthetic images inverted from other real images than the run's subset are flagged.
    assert main(["train", "--data", "digits", "--per-class", "2", "--subset-seed", "5", "--synthetic", str(digits_di),
                 "--arch", "mobilenetv2", "--resolution", "32", "--steps", "1", "--quiet", "--out", str(tmp_path / "r2")]) == 0
    assert "not in the real subset" in capsys.readouterr().out


def test_report_of_a_single_run_and_of_a_folder_that_is_neither(tmp_path, capsys):
    run = train_classifier(TrainConfig(**FAST, steps=2), tmp_path / "run", progress=False)
    assert main(["report", str(run)]) == 0
    assert "Learning curves" in (run / "report" / "report.md").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a study" in capsys.readouterr().err


# ----------------------------------------------------------------------------- quality maths


def test_feature_distances_are_zero_for_the_same_set_and_grow_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, b) < frechet_distance(a, b + 1.0)
    assert abs(kernel_distance(a, b)) < kernel_distance(a, b + 1.0)


def test_nearest_distance_finds_copies():
    real = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    syn = torch.cat([real[2:3], 255 - real[:1]])
    d = nearest_distances(syn, real)
    assert d[0] == 0 and d[1] > 0.1
    assert (nearest_distances(real, real, exclude_self=True) > 0).all()


def test_quality_of_copies_is_perfect_diversity_and_all_near_copies():
    torch.manual_seed(0)
    net = build_model("shufflenetv2", 2, 32).eval()
    x, y = _patterns(8, 2)
    real = (x.clamp(0, 1) * 255).to(torch.uint8)
    meta = {"classes": ["a", "b"], "mean": torch.zeros(3), "std": torch.ones(3)}
    q = synthetic_quality(net, meta, real, y, real, y, real)
    assert q["near_copies"] == 8 and q["diversity_ratio"] == pytest.approx(1.0)
    assert q["nn_distance_syn_to_real"] == 0


def test_sample_efficiency_interpolates_in_log_size_and_bounds_outside_the_curve():
    curve = [(5, 0.30), (10, 0.40), (20, 0.50)]
    assert equivalent_real(curve, 0.40) == (pytest.approx(10), "=")
    value, rel = equivalent_real(curve, 0.45)
    assert rel == "=" and value == pytest.approx(np.sqrt(200))  # geometric midpoint of 10 and 20
    assert equivalent_real(curve, 0.9) == (20, ">")
    assert efficiency_factor(curve, 5, 0.40) == (pytest.approx(2.0), "=")


def test_a_study_process_reads_the_evaluation_split_once(tmp_path, monkeypatch):
    from dataclasses import replace

    import diffinv.stages.train_data as parts

    monkeypatch.setattr(parts, "_SPLITS", {})
    decoded = []
    real_load = parts.load_uint8
    monkeypatch.setattr(parts, "load_uint8", lambda images, *a, **k: decoded.append(len(images)) or real_load(images, *a, **k))
    config = TrainConfig(**FAST, steps=1)
    first = parts.load_train_data(config, log=lambda m: None)
    second = parts.load_train_data(replace(config, seed=1, subset_seed=1), log=lambda m: None)
    n_test = len(first.test)
    assert decoded.count(n_test) == 1  # the test split decoded once, the real subsets each time
    assert torch.equal(first.test, second.test) and first.test.data_ptr() != second.test.data_ptr()
    # Another resolution or a rewritten source is read again.
    parts.load_train_data(replace(config, resolution=16), log=lambda m: None)
    assert decoded.count(n_test) == 2
    np.savez(tmp_path / "d.npz", train_images=np.zeros((20, 8, 8), np.uint8), train_labels=np.arange(20) % 2,
             test_images=np.zeros((6, 8, 8), np.uint8), test_labels=np.arange(6) % 2)
    npz = TrainConfig(data=str(tmp_path / "d.npz"), per_class=2, arch="shufflenetv2", resolution=32, steps=1)
    assert len(parts.load_train_data(npz, log=lambda m: None).test) == 6
    np.savez(tmp_path / "d.npz", train_images=np.zeros((20, 8, 8), np.uint8), train_labels=np.arange(20) % 2,
             test_images=np.zeros((9, 8, 8), np.uint8), test_labels=np.arange(9) % 2)
    assert len(parts.load_train_data(npz, log=lambda m: None).test) == 9
