"""Bad input and damaged outputs, as an adversarial new user meets them: a clear one-line error or a correct result.

One test per scenario of the fault survey (issue 15), named after it; the kill -9 / SIGINT /
disk-full resume tests live in test_scale.py and test_inversion.py.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli as _run
from conftest import write_image_tree
from safetensors.torch import load_file, save_file

from diffinv.runs import LOCK, read_json, write_safetensors

INVERT = ["--resolution", "16", "--steps", "2", "--batch-size", "4", "--quiet"]
GENERATE = ["--per-image", "2", "--steps", "2", "--quiet"]


@pytest.fixture
def store(tiny_latent, image_tree, tmp_path, capsys):
    out = tmp_path / "store"
    assert _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(image_tree), "--out", str(out), *INVERT)[0] == 0
    return out


# ----------------------------------------------------------------------------- silent wrong results


def test_csv_row_with_an_empty_label_is_refused(tiny_latent, image_tree, tmp_path, capsys):
    csv = tmp_path / "data.csv"
    csv.write_text("path,label\nimages/cat/000.png,cat\nimages/dog/000.png,\n")
    code, text = _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(csv), "--out", str(tmp_path / "s"), *INVERT)
    assert code == 2 and "line 3: no label" in text
    csv.write_text("path,label\nimages/cat/000.png\n")  # a row without the label field at all
    code, text = _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(csv), "--out", str(tmp_path / "s"), *INVERT)
    assert code == 2 and "no label" in text


def test_float_npz_with_a_nan_pixel_is_refused(tiny_latent, tmp_path, capsys):
    images = np.random.RandomState(0).rand(6, 8, 8).astype(np.float32)
    images[4, 2, 3] = np.nan
    np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.array([0, 0, 0, 1, 1, 1]))
    code, text = _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(tmp_path / "d.npz"), "--out",
                      str(tmp_path / "s"), *INVERT)
    assert code == 2 and "NaN or infinite, in image(s) [4]" in text


def test_float_npz_in_minus_one_to_one_is_read_right_and_other_ranges_refused(tmp_path):
    from diffinv.data.real import DataError, load_uint8, open_images

    grey = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8).repeat(2, 0)
    np.savez(tmp_path / "a.npz", train_images=grey, train_labels=np.array([0, 1]))
    pixels = load_uint8(open_images(tmp_path / "a.npz"), 8)
    assert pixels.min() == 0 and pixels.max() == 255  # not black: (x + 1) / 2 * 255
    np.savez(tmp_path / "b.npz", train_images=grey * 1000, train_labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"range over \[-1000, 1000\]"):
        open_images(tmp_path / "b.npz")


def test_store_with_a_deleted_part_manifest_is_refused_and_resume_repairs_it(store, tiny_latent, image_tree, tmp_path, capsys):
    first = sorted((store / "parts").glob("*.json"))[0]
    first.unlink()
    code, text = _run(capsys, "generate", "--store", str(store), "--out", str(tmp_path / "syn"), *GENERATE)
    assert code == 2 and "damaged" in text and "--resume" in text
    code, text = _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(image_tree), "--out", str(store), "--resume",
                      *INVERT)
    assert code == 0 and "redoing what is missing" in text and first.is_file()
    assert _run(capsys, "generate", "--store", str(store), "--out", str(tmp_path / "syn"), *GENERATE)[0] == 0


def test_deleted_part_tensors_are_refused_and_resume_repairs_them(store, tiny_latent, image_tree, capsys):
    part = sorted((store / "parts").glob("*.safetensors"))[0]
    part.unlink()
    code, text = _run(capsys, "verify", str(store))
    assert code == 2 and part.name in text
    assert _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(image_tree), "--out", str(store), "--resume",
                *INVERT)[0] == 0
    assert part.is_file() and _run(capsys, "verify", str(store)) == (0, f"{store}: store ok\n")


def test_a_nan_embedding_is_refused_not_turned_into_black_images(store, tmp_path, capsys):
    part = sorted((store / "parts").glob("*.safetensors"))[0]
    tensors = load_file(str(part))
    tensors["embeddings"][0, 0, 0] = float("nan")
    save_file(tensors, str(part))  # the same size, another checksum
    code, text = _run(capsys, "generate", "--store", str(store), "--out", str(tmp_path / "syn"), *GENERATE)
    assert code == 2 and "does not match its checksum" in text
    code, text = _run(capsys, "verify", str(store))
    assert code == 2 and "checksum" in text
    # A NaN the inversion itself wrote (recorded with its checksum) is refused too.
    import json

    from diffinv.runs import file_sha256

    meta = part.with_suffix(".json")
    rows = [{**r, "part_sha256": file_sha256(part)} for r in read_json(meta)]
    meta.write_text(json.dumps(rows))
    (store / "manifest.jsonl").unlink()  # as the part's rows now say: no manifest to compare with
    code, text = _run(capsys, "generate", "--store", str(store), "--out", str(tmp_path / "syn2"), *GENERATE)
    assert code == 2 and "not finite" in text


def test_generating_into_the_real_data_folder_is_refused(store, image_tree, capsys):
    code, text = _run(capsys, "generate", "--store", str(store), "--out", str(image_tree / "syn"), *GENERATE)
    assert code == 2 and "inside the real data" in text and not (image_tree / "syn").exists()


def test_a_synthetic_set_inside_the_real_data_is_refused_by_train(store, image_tree, tmp_path, capsys):
    assert _run(capsys, "generate", "--store", str(store), "--out", str(tmp_path / "syn"), *GENERATE)[0] == 0
    data = tmp_path / "d"
    write_image_tree(data / "train", per_class=3)
    write_image_tree(data / "test", per_class=2)
    shutil.copytree(tmp_path / "syn", data / "train-syn")
    shutil.move(str(data / "train-syn"), str(data / "train" / "syn"))
    code, text = _run(capsys, "train", "--data", str(data), "--synthetic", str(data / "train" / "syn"), "--steps", "1",
                      "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2 and "inside the real data" in text


def test_a_set_with_deleted_images_is_remade_on_rerun(store, tmp_path, capsys):
    out = tmp_path / "syn"
    assert _run(capsys, "generate", "--store", str(store), "--out", str(out), *GENERATE)[0] == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*.png"))}
    gone = list(before)[:3]
    for p in gone:
        p.unlink()
    from diffinv.data.real import DataError
    from diffinv.data.synthetic import open_synthetic

    with pytest.raises(DataError, match="damaged"):
        open_synthetic(out)
    code, text = _run(capsys, "generate", "--store", str(store), "--out", str(out), *GENERATE)
    assert code == 0 and "making what is missing" in text
    assert all(p.read_bytes() == before[p] for p in gone)  # keyed randomness: the very same images
    assert _run(capsys, "verify", str(out)) == (0, f"{out}: synthetic set ok\n")


def test_evaluating_on_a_folder_without_splits_is_refused(tmp_path, capsys):
    data = write_image_tree(tmp_path / "flat", per_class=3)
    code, text = _run(capsys, "train", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2 and "no split folders" in text and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- tracebacks and misleading messages


def test_a_zero_byte_npz_is_one_clear_line(tiny_latent, tmp_path, capsys):
    (tmp_path / "empty.npz").write_bytes(b"")
    code, text = _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(tmp_path / "empty.npz"), "--out",
                      str(tmp_path / "s"), *INVERT)
    assert code == 2 and "cannot read" in text


def _model_copy(source, tmp_path):
    """A fresh copy of a model folder to damage, and its UNet weights file."""
    model = tmp_path / "m"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(source, model)
    return model, model / "unet" / "diffusion_pytorch_model.safetensors"


def test_a_model_folder_without_its_unet_config_is_one_clear_line(tiny_latent, image_tree, tmp_path, capsys):
    model, _ = _model_copy(tiny_latent, tmp_path)
    (model / "unet" / "config.json").unlink()
    code, text = _run(capsys, "invert", "--model", str(model), "--data", str(image_tree), "--out", str(tmp_path / "s"), *INVERT)
    assert code == 2 and "has no config.json" in text


def test_truncated_and_corrupt_weights_are_named(tiny_latent, image_tree, tmp_path, capsys):
    model, weights = _model_copy(tiny_latent, tmp_path)
    weights.write_bytes(weights.read_bytes()[:1000])
    code, text = _run(capsys, "invert", "--model", str(model), "--data", str(image_tree), "--out", str(tmp_path / "s"), *INVERT)
    assert code == 2 and "cannot be loaded" in text
    model, weights = _model_copy(tiny_latent, tmp_path)
    tensors = load_file(str(weights))
    tensors = {k: torch.full_like(v, float("nan")) if i == 0 else v for i, (k, v) in enumerate(tensors.items())}
    save_file(tensors, str(weights))  # what a file of 0xFF bytes decodes to
    code, text = _run(capsys, "invert", "--model", str(model), "--data", str(image_tree), "--out", str(tmp_path / "s"), *INVERT)
    assert code == 2 and "not finite: the file is corrupt" in text


def test_pickle_only_model_folders_are_refused(tiny_latent, image_tree, tmp_path, capsys):
    model, weights = _model_copy(tiny_latent, tmp_path)
    torch.save(load_file(str(weights)), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    code, text = _run(capsys, "invert", "--model", str(model), "--data", str(image_tree), "--out", str(tmp_path / "s"), *INVERT)
    assert code == 2 and "pickles" in text and "not loaded" in text


def test_train_steps_zero_is_refused(tmp_path, capsys):
    code, text = _run(capsys, "train", "--data", "digits", "--steps", "0", "--out", str(tmp_path / "r"), "--quiet")
    assert code == 2 and "steps must be >= 1" in text


def test_a_resolution_far_above_the_model_is_refused(tiny_latent, image_tree, tmp_path, capsys):
    code, text = _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(image_tree), "--out", str(tmp_path / "s"),
                      "--resolution", "256", "--steps", "1", "--quiet")
    assert code == 2 and "8x the 32 px" in text and "--resolution 32" in text


def test_output_inside_the_input_is_refused_before_any_work(tiny_latent, image_tree, capsys):
    code, text = _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(image_tree), "--out",
                      str(image_tree / "store"), *INVERT)
    assert code == 2 and "inside" in text and not (image_tree / "store").exists()


def test_a_second_writer_is_refused_naming_the_first_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process holds it
    args = ["train", "--data", "digits", "--per-class", "2", "--steps", "2", "--batch-size", "8", "--arch", "mobilenetv2",
            "--resolution", "32", "--out", str(out), "--quiet"]
    code, text = _run(capsys, *args)
    assert code == 2 and f"another process ({socket.gethostname()} {os.getppid()})" in text
    (out / LOCK).write_text(f"{socket.gethostname()} 999999999")  # its process is gone
    assert _run(capsys, *args)[0] == 0 and not (out / LOCK).exists()


def test_yaml_numbers_written_without_a_dot_are_numbers(tmp_path):
    from diffinv.config import ConfigError, InvertConfig, load_config

    (tmp_path / "c.yaml").write_text("lr: 1e-3\n")  # PyYAML reads this as a string
    assert load_config(InvertConfig, tmp_path / "c.yaml").lr == 1e-3
    (tmp_path / "c.yaml").write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr must be a number"):
        load_config(InvertConfig, tmp_path / "c.yaml")


def test_report_on_a_killed_study_says_how_far_it_got(tmp_path, capsys):
    from diffinv.shards import Shard
    from diffinv.study.engine import record
    from diffinv.study.plan import build_plan
    from diffinv.study.spec import load_study

    (tmp_path / "s.yaml").write_text("data: digits\nper_class: [2]\nseeds: [0, 1]\nmethods: {}\n")
    study, out = load_study(tmp_path / "s.yaml"), tmp_path / "s"
    plan = build_plan(study, out)
    record(study, plan, out, Shard())
    first = out / plan.runs()[0].folder
    first.mkdir(parents=True)
    (first / "train.json").write_text('{"status": "complete"}')
    code, text = _run(capsys, "report", str(out))
    assert code == 2 and "1 of 2 classifier runs finished" in text and "diffinv experiment" in text


def test_a_truncated_metrics_file_is_named_by_report(tmp_path, capsys):
    run = tmp_path / "r"
    assert _run(capsys, "train", "--data", "digits", "--per-class", "2", "--steps", "2", "--batch-size", "8", "--arch",
                "mobilenetv2", "--resolution", "32", "--out", str(run), "--quiet")[0] == 0
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[:-10])  # a kill while the last line was written
    code, out = _run(capsys, "report", str(run))
    assert code == 2 and f"metrics.jsonl line {text.count(chr(10))} is cut short" in out


def test_a_failed_command_leaves_no_empty_output(tmp_path, capsys):
    out = tmp_path / "never"
    code, _ = _run(capsys, "invert", "--model", "/no/such/model", "--data", "digits", "--out", str(out), *INVERT)
    assert code == 2 and not out.exists()


@pytest.mark.slow
def test_train_resume_after_a_kill_gives_the_same_metrics_file(tmp_path):
    from diffinv.config import TrainConfig
    from diffinv.stages.train import train_classifier

    config = TrainConfig(data="digits", per_class=2, steps=6, batch_size=8, arch="mobilenetv2", resolution=32, eval_every=2,
                         device="cpu")
    train_classifier(config, tmp_path / "whole", progress=False, log=lambda m: None)

    def die(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(config, tmp_path / "killed", progress=False, log=lambda m: None, on_step=die)
    train_classifier(config, tmp_path / "killed", resume=True, progress=False, log=lambda m: None)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()
    assert read_json(tmp_path / "whole" / "final.json") == read_json(tmp_path / "killed" / "final.json")


def test_write_safetensors_reports_a_full_disk_as_such(tmp_path, monkeypatch):
    import safetensors.torch

    import diffinv.runs as runs

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(runs.RunError, match="disk is full"):
        write_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    assert not list(tmp_path.iterdir())


def test_a_disk_full_refusal_leaves_no_store_behind(tiny_latent, image_tree, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    import diffinv.runs as runs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "s"
    code, text = _run(capsys, "invert", "--model", str(tiny_latent), "--data", str(image_tree), "--out", str(out), *INVERT)
    assert code == 2 and "1,000 bytes are free" in text and not out.exists()  # not a store marked in-progress


def test_a_study_yaml_that_is_not_yaml_is_a_clear_error(tmp_path, capsys):
    from diffinv.cli import main

    study = tmp_path / "study.yaml"
    study.write_text("data: digits\nmethods:\n  di: {guidance: [1, 2}\n")
    assert main(["experiment", str(study), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err and not (tmp_path / "s").exists()
