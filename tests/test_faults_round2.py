"""Fault survey, round two: each scenario as a new user meets it, named after it; every one failed before its fix.

First the seven that exited 0 with a wrong result, then the ones that ended in a traceback or a misleading message.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
from conftest import run_cli as _run
from conftest import write_image_tree
from PIL import Image

from diffinv.data.real import open_images, select
from diffinv.runs import read_json

INVERT = ["--resolution", "16", "--steps", "2", "--batch-size", "4", "--quiet"]
GENERATE = ["--per-image", "2", "--steps", "2", "--quiet"]
TRAIN = ["--arch", "small-cnn", "--steps", "1", "--batch-size", "4", "--resolution", "16", "--quiet"]


@pytest.fixture
def store(tiny_latent, image_tree, tmp_path, capsys):
    out = tmp_path / "store"
    assert _run(capsys, "invert", "--model", tiny_latent, "--data", image_tree, "--out", out, *INVERT)[0] == 0
    return out


@pytest.fixture
def split_tree(tmp_path):
    root = tmp_path / "data"
    write_image_tree(root / "train", per_class=4)
    write_image_tree(root / "test", per_class=3, seed=1)
    return root


def _csv(tmp_path, rows: list[str], header: str = "path,label", encoding: str = "utf-8") -> str:
    write_image_tree(tmp_path / "images", per_class=4)
    path = tmp_path / "labels.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding=encoding)
    return str(path)


# ----------------------------------------------------------------------------- silent wrong results


def test_csv_without_a_split_column_has_no_test_split_and_a_split_column_is_read(tmp_path, capsys):
    rows = [f"images/{c}/{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(4)]
    path = _csv(tmp_path, rows)
    code, text = _run(capsys, "train", "--data", path, *TRAIN, "--out", tmp_path / "r")
    assert code == 2 and "no 'split' column" in text  # before: the "test" metrics were computed on the training rows
    path = _csv(tmp_path, [r + (",test" if r.endswith(("003.png,cat", "003.png,dog")) else ",train") for r in rows],
                header="path,label,split")
    assert len(open_images(path, split="train")) == 6 and len(open_images(path, split="test")) == 2
    assert _run(capsys, "train", "--data", path, *TRAIN, "--out", tmp_path / "r2")[0] == 0
    assert read_json(tmp_path / "r2" / "final.json")["n_test"] == 2
    code, text = _run(capsys, "train", "--data", path, *TRAIN, "--eval-split", "banana", "--out", tmp_path / "r3")
    assert code == 2 and "no rows of split 'banana'" in text and "['test', 'train']" in text


def test_csv_labels_with_spaces_are_the_same_class(tmp_path):
    path = _csv(tmp_path, ["images/cat/000.png, cat", "images/cat/001.png,cat ", "images/dog/000.png,dog"])
    assert open_images(path).classes == ["cat", "dog"]  # before: " cat" was a third class


def _png16(path, value: int) -> None:
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(path)


def test_16_bit_images_are_read_on_one_scale_for_the_whole_source(tmp_path):
    for c, value in (("a", 250), ("b", 256)):
        (tmp_path / "d" / c).mkdir(parents=True)
        _png16(tmp_path / "d" / c / "x.png", value)
    images = open_images(tmp_path / "d")
    grey = [np.asarray(images.image(i))[0, 0, 0] for i in range(2)]
    assert grey[0] < grey[1]  # before: 250 read as 250, 256 as 1 (each image scaled by its own maximum)
    for c in ("a", "b"):  # 12-bit data in 16-bit files keeps its contrast
        _png16(tmp_path / "d" / c / "x.png", 4095 if c == "a" else 2048)
    images = open_images(tmp_path / "d")
    assert np.asarray(images.image(0))[0, 0, 0] == 255 and 125 <= np.asarray(images.image(1))[0, 0, 0] <= 130


def test_a_set_made_from_the_test_split_never_meets_that_test_split(tiny_latent, split_tree, tmp_path, capsys):
    assert _run(capsys, "invert", "--model", tiny_latent, "--data", split_tree, "--split", "test", "--out", tmp_path / "s",
                *INVERT)[0] == 0
    assert _run(capsys, "generate", "--store", tmp_path / "s", "--out", tmp_path / "g", *GENERATE)[0] == 0
    code, text = _run(capsys, "train", "--data", split_tree, "--synthetic", tmp_path / "g", *TRAIN, "--out", tmp_path / "r")
    assert code == 2 and "made from the 'test' split" in text and "never meet" in text


def test_a_generated_set_inside_a_class_folder_is_not_read_as_real_images(store, tiny_latent, image_tree, tmp_path, capsys):
    copy = tmp_path / "copy"
    write_image_tree(copy, per_class=3)
    assert _run(capsys, "generate", "--store", store, "--out", copy / "cat" / "gen", *GENERATE)[0] == 0
    for argv in (["train", "--data", copy, *TRAIN, "--out", tmp_path / "r"],
                 ["invert", "--model", tiny_latent, "--data", copy, "--out", tmp_path / "s2", *INVERT]):
        code, text = _run(capsys, *argv)
        assert code == 2 and "is a diffinv output (generate.json) inside the real data's class folder" in text


@pytest.mark.slow
def test_a_set_is_never_repaired_from_a_store_made_again_at_its_path(store, tiny_latent, image_tree, tmp_path, capsys):
    assert _run(capsys, "generate", "--store", store, "--out", tmp_path / "g", *GENERATE)[0] == 0
    assert _run(capsys, "invert", "--model", tiny_latent, "--data", image_tree, "--out", store, *INVERT, "--overwrite",
                "--seed", "7")[0] == 0
    next((tmp_path / "g").rglob("*.png")).unlink()  # a damaged set, to be repaired by running generate again
    code, text = _run(capsys, "generate", "--store", store, "--out", tmp_path / "g", *GENERATE)
    assert code == 2 and "another version of the store" in text
    code, text = _run(capsys, "verify", tmp_path / "g")
    assert code == 2 and "another version of the store" in text


def test_a_label_edited_in_a_store_part_is_caught(store, tmp_path, capsys):
    part = next((store / "parts").glob("part-*.json"))
    rows = read_json(part)
    rows[0]["label"] = 1 - rows[0]["label"]
    part.write_text(json.dumps(rows))
    code, text = _run(capsys, "verify", store)
    assert code == 2 and "differ from manifest.jsonl" in text  # before: "store ok"
    code, text = _run(capsys, "generate", "--store", store, "--out", tmp_path / "g", *GENERATE)
    assert code == 2 and "differ from manifest.jsonl" in text


# ----------------------------------------------------------------------------- tracebacks and misleading messages


def test_an_out_that_is_a_file_or_cannot_be_written_is_one_line(store, tiny_latent, image_tree, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (["invert", "--model", tiny_latent, "--data", image_tree, *INVERT],
                 ["generate", "--store", store, *GENERATE], ["train", "--data", "digits", *TRAIN]):
        code, text = _run(capsys, *argv, "--out", blocker)
        assert code == 2 and "exists and is a file" in text
    import diffinv.runs as runs

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(runs.os, "open", read_only)
    code, text = _run(capsys, "train", "--data", "digits", *TRAIN, "--out", tmp_path / "ro")
    assert code == 2 and "cannot write to --out" in text and "Read-only" in text


def test_a_demo_in_a_folder_it_cannot_write_is_one_line(tmp_path, capsys, monkeypatch):
    import pathlib

    monkeypatch.chdir(tmp_path)
    real_mkdir = pathlib.Path.mkdir

    def no_mkdir(self, *a, **k):
        if "runs" in self.parts:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", no_mkdir)
    code, text = _run(capsys, "demo", "--fast", "--quiet")
    assert code == 2 and "cannot make --out runs/demo" in text


def test_garbage_in_store_parts_or_manifests_is_named_not_a_traceback(store, tmp_path, capsys):
    manifest = store / "manifest.jsonl"
    good = manifest.read_text()
    manifest.write_text("not json\n")
    code, text = _run(capsys, "verify", store)
    assert code == 2 and "manifest.jsonl is not valid JSON" in text  # before: "store ok"
    manifest.write_text(good)
    part = next((store / "parts").glob("part-*.json"))
    part.write_text("{garbage")
    for argv in (["verify", store], ["generate", "--store", store, "--out", tmp_path / "g", *GENERATE]):
        code, text = _run(capsys, *argv)
        assert code == 2 and "is not valid JSON" in text and "--resume" in text


def test_a_set_with_a_garbage_manifest_is_named_and_generate_rewrites_it(store, tmp_path, capsys):
    assert _run(capsys, "generate", "--store", store, "--out", tmp_path / "g", *GENERATE)[0] == 0
    good = (tmp_path / "g" / "manifest.jsonl").read_text()
    (tmp_path / "g" / "manifest.jsonl").write_text(good[:-40] + "\n")
    code, text = _run(capsys, "verify", tmp_path / "g")
    assert code == 2 and "not valid JSON" in text
    assert _run(capsys, "generate", "--store", store, "--out", tmp_path / "g", *GENERATE)[0] == 0
    assert (tmp_path / "g" / "manifest.jsonl").read_text() == good


def test_a_truncated_study_summary_is_named_by_report(tmp_path, capsys):
    study = tmp_path / "s"
    study.mkdir()
    (study / "summary.json").write_text('[{"dataset": "d", "meth')
    code, text = _run(capsys, "report", study)
    assert code == 2 and "cut short or not valid JSON" in text


def test_one_class_data_is_refused_and_train_test_duplicates_are_named(split_tree, tmp_path, capsys):
    one = tmp_path / "one"
    write_image_tree(one / "train", per_class=4, classes=("cat",))
    write_image_tree(one / "test", per_class=2, classes=("cat",))
    code, text = _run(capsys, "train", "--data", one, *TRAIN, "--out", tmp_path / "r")
    assert code == 2 and "has one class" in text  # before: top-1 1.0, degenerate false
    for c in ("cat", "dog"):  # a test image that is also a training image
        (split_tree / "test" / c / "dup.png").write_bytes((split_tree / "train" / c / "000.png").read_bytes())
    code, text = _run(capsys, "train", "--data", split_tree, *TRAIN, "--out", tmp_path / "r2")
    assert code == 0 and "2 training image(s) are identical to images of the 'test' split" in text
    # A study says it once, over every replicate's subset (its runs never read the test split while training).
    (tmp_path / "s.yaml").write_text(f"data: {split_tree}\nper_class: [1]\nseeds: [0, 1]\nval_per_class: 1\nmethods: {{}}\n"
                                     "report: false\nprocesses: 1\ntrain: {arch: small-cnn, steps: 1, resolution: 16}\n")
    for c in ("cat", "dog"):
        for f in (split_tree / "train" / c).glob("*.png"):
            (split_tree / "test" / c / f"copy-{f.name}").write_bytes(f.read_bytes())
    code, text = _run(capsys, "experiment", tmp_path / "s.yaml", "--out", tmp_path / "s", "--quiet")
    assert code == 0 and text.count("are identical to images of the 'test' split") == 1


def test_a_full_disk_says_how_to_continue(tmp_path, monkeypatch):
    import diffinv.runs as runs

    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(runs.RunError, match="with --resume where the command has it"):
        runs.atomic_write(tmp_path / "x.json", no_space)


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    path = _csv(tmp_path, ["images/cat/000.png,cat", "images/dog/000.png,dog"], encoding="utf-8-sig")
    assert open_images(path).classes == ["cat", "dog"]  # before: "must be a CSV with a header row"


def test_exif_orientation_is_applied_and_tiny_images_are_named(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(root / c / f"{i}.png")
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    wide.save(root / "a" / "photo.jpg", exif=exif)
    images = open_images(root)
    assert images.image(images.ids.index("a/photo.jpg")).size == (20, 40)  # before: (40, 20), as stored
    Image.new("RGB", (1, 1)).save(root / "b" / "dot.png")
    said = []
    select(open_images(root), None, 0, warn=said.append)
    assert any("quarter of the typical size" in s and "dot.png" in s for s in said)


def test_float_labels_in_an_npz_are_classes_when_whole_and_refused_when_not(tmp_path):
    images = np.random.RandomState(0).randint(0, 255, (6, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert open_images(tmp_path / "d.npz").classes == ["0", "1"]  # before: "0.0", "1.0"
    np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.array([0.0, 0.5, 1.0, 0.0, 0.5, 1.0]))
    with pytest.raises(Exception, match="labels must be class numbers"):
        open_images(tmp_path / "d.npz")


def test_a_set_of_another_dataset_is_named_as_such(store, tmp_path, capsys):
    assert _run(capsys, "generate", "--store", store, "--out", tmp_path / "g", *GENERATE)[0] == 0
    other = tmp_path / "other"  # the same classes, other images (before: "pass the settings the store was inverted with")
    write_image_tree(other / "train", per_class=4, seed=3)
    write_image_tree(other / "test", per_class=2, seed=4)
    code, text = _run(capsys, "train", "--data", other, "--synthetic", tmp_path / "g", *TRAIN, "--out", tmp_path / "r")
    assert code == 0 and "was made from the images of" in text and f"not of {other}" in text


def test_a_flipped_byte_in_a_store_part_is_caught_by_generate(store, tmp_path, capsys):
    part = next((store / "parts").glob("part-*.safetensors"))
    raw = bytearray(part.read_bytes())
    raw[-3] ^= 0x01  # a low mantissa bit of the last embedding value: finite, so only the checksum sees it
    part.write_bytes(bytes(raw))
    code, text = _run(capsys, "generate", "--store", store, "--out", tmp_path / "g", *GENERATE)
    assert code == 2 and "does not match its checksum" in text


@pytest.mark.slow
def test_an_unknown_device_is_one_line(capsys, tmp_path):
    code, text = _run(capsys, "train", "--data", "digits", *TRAIN, "--device", "tpu", "--out", tmp_path / "r")
    assert code == 2 and "--device 'tpu'" in text


def test_generating_in_another_precision_is_the_same_model(store, tmp_path, capsys):
    code, text = _run(capsys, "generate", "--store", store, "--precision", "bf16", "--out", tmp_path / "g", *GENERATE)
    assert "another model" not in text and code == 0


def test_a_method_named_like_a_path_writes_nothing_outside_the_study(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("data: digits\nper_class: [1]\nseeds: [0]\nval_per_class: 2\nreport: false\n"
                                     "methods: {'../../x': {method: di}}\n"
                                     "train: {arch: small-cnn, steps: 1, resolution: 8}\ninvert: {steps: 1, init: random}\n"
                                     "generate: {per_image: 1, steps: 2}\nprocesses: 1\n")
    code, _ = _run(capsys, "experiment", tmp_path / "s.yaml", "--out", tmp_path / "deep" / "study", "--quiet")
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["deep", "s.yaml"]
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["study"]


def test_the_same_synthetic_set_twice_is_refused(store, tmp_path, capsys):
    assert _run(capsys, "generate", "--store", store, "--out", tmp_path / "g", *GENERATE)[0] == 0
    code, text = _run(capsys, "train", "--data", "digits", "--synthetic", tmp_path / "g", "--synthetic", tmp_path / "g",
                      *TRAIN, "--out", tmp_path / "r")
    assert code == 2 and "is given twice" in text


def test_too_few_images_after_the_validation_hold_out_says_so(tmp_path, capsys):
    images = open_images(write_image_tree(tmp_path / "d", per_class=4))
    from diffinv.data.real import DataError, validation_ids

    with pytest.raises(DataError, match="outside the 3 held out for validation.*lower --per-class or --val-per-class"):
        select(images, 2, 0, exclude=validation_ids(images, 3))


def test_an_empty_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("# nothing yet\n")
    code, text = _run(capsys, "train", "--config", tmp_path / "c.yaml", "--data", "digits", "--out", tmp_path / "r")
    assert code == 2 and "is empty" in text


# ----------------------------------------------------------------------------- the second sweep: new scenarios


def test_class_names_with_spaces_and_accents_go_end_to_end(tiny_latent, tmp_path, capsys):
    data = tmp_path / "d"
    write_image_tree(data / "train", per_class=3, classes=("chat noir", "élan"))
    write_image_tree(data / "test", per_class=2, classes=("chat noir", "élan"), seed=5)
    assert _run(capsys, "invert", "--model", tiny_latent, "--data", data, "--out", tmp_path / "s", *INVERT)[0] == 0
    assert _run(capsys, "generate", "--store", tmp_path / "s", "--out", tmp_path / "ausgabe ü" / "g", *GENERATE)[0] == 0
    code, text = _run(capsys, "train", "--data", data, "--synthetic", tmp_path / "ausgabe ü" / "g", *TRAIN, "--out", tmp_path / "r")
    assert code == 0 and read_json(tmp_path / "r" / "final.json")["classes"] == ["chat noir", "élan"]


def test_macos_metadata_files_in_a_data_folder_are_ignored(tiny_latent, image_tree, tmp_path, capsys):
    (image_tree / "cat" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (image_tree / ".DS_Store").write_bytes(b"junk")
    assert len(open_images(image_tree)) == 6
    assert _run(capsys, "invert", "--model", tiny_latent, "--data", image_tree, "--out", tmp_path / "s", *INVERT)[0] == 0


def test_upper_case_suffixes_and_a_symlink_loop_in_the_data(tmp_path):
    data = write_image_tree(tmp_path / "d", per_class=2)
    for path in list(data.rglob("*.png")):
        path.rename(path.with_suffix(".PNG"))
    os.symlink(data, data / "cat" / "loop")
    images = open_images(data)
    assert len(images) == 4 and images.classes == ["cat", "dog"]


def test_an_absurd_sample_count_is_refused_before_it_fills_memory(store, tmp_path, capsys):
    code, text = _run(capsys, "generate", "--store", store, "--out", tmp_path / "g", "--per-image", "100000000", "--quiet")
    assert code == 2 and "600,000,000 generated images" in text and "free" in text  # before: killed for memory


def test_resuming_a_run_with_other_settings_names_the_setting(tmp_path, capsys):
    argv = ["train", "--data", "digits", "--arch", "small-cnn", "--resolution", "8", "--quiet", "--out", tmp_path / "r"]
    assert _run(capsys, *argv, "--steps", "2")[0] == 0
    code, text = _run(capsys, *argv, "--steps", "3", "--resume")
    assert code == 2 and "steps: run has 2, asked 3" in text


def test_a_model_that_is_a_text_file_and_a_data_folder_with_an_empty_class(image_tree, tmp_path, capsys):
    (tmp_path / "model.txt").write_text("not a model")
    code, text = _run(capsys, "invert", "--model", tmp_path / "model.txt", "--data", image_tree, "--out", tmp_path / "s", *INVERT)
    assert code == 2 and "must be .safetensors" in text
    (image_tree / "bird").mkdir()
    with pytest.raises(Exception, match=r"class\(es\) \['bird'\] have no images"):
        open_images(image_tree)


def test_csv_paths_with_commas_are_read(tmp_path):
    write_image_tree(tmp_path / "im,ages", per_class=2)
    rows = [f'"im,ages/{c}/{i:03d}.png",{c}' for c in ("cat", "dog") for i in range(2)]
    (tmp_path / "l.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    assert len(open_images(tmp_path / "l.csv")) == 4


def test_data_changed_under_a_study_folder_is_refused(tmp_path, capsys):
    data = tmp_path / "d"
    write_image_tree(data / "train", per_class=6)
    write_image_tree(data / "test", per_class=2, seed=9)
    (tmp_path / "s.yaml").write_text(f"data: {data}\nper_class: [2]\nseeds: [0]\nval_per_class: 2\nmethods: {{}}\nreport: false\n"
                                     "train: {arch: small-cnn, steps: 1, resolution: 16}\nprocesses: 1\n")
    argv = ["experiment", tmp_path / "s.yaml", "--out", tmp_path / "out", "--quiet"]
    assert _run(capsys, *argv)[0] == 0
    for f in data.rglob("*.png"):  # a copy or a remount: the same bytes with new times is the same data
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert _run(capsys, *argv)[0] == 0  # before: refused as "changed", and the finished work was unreachable
    write_image_tree(data / "train", per_class=7, seed=2)  # rewritten files and one more per class
    code, text = _run(capsys, *argv)
    assert code == 2 and "changed since" in text  # before: the old runs were reused silently


def test_an_interrupt_says_how_to_continue_each_command(tmp_path, capsys, monkeypatch):
    import diffinv.launch as launch

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "run_shard", interrupted)
    code, text = _run(capsys, "experiment", "--data", "digits", "--out", tmp_path / "s")
    assert code == 130 and "run the same command again" in text and "--resume" not in text
    code, text = _run(capsys, "train", "--data", "digits", "--out", tmp_path / "r")
    assert code == 130 and "run the same command again with --resume" in text


def test_a_study_already_being_written_is_refused(tmp_path, capsys):
    import socket

    out = tmp_path / "s"
    out.mkdir()
    (out / ".diffinv.lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a live writer: this very process
    code, text = _run(capsys, "experiment", "--data", "digits", "--out", out, "--quiet")
    assert code == 2 and "being written by another process" in text


def test_a_study_folder_inside_the_data_is_refused(image_tree, capsys):
    code, text = _run(capsys, "experiment", "--data", image_tree, "--out", image_tree / "cat" / "study", "--quiet")
    assert code == 2 and "is inside data" in text


def test_a_study_file_with_python_tags_is_not_executed(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("data: !!python/object/apply:os.system ['touch pwned']\n")
    code, text = _run(capsys, "experiment", tmp_path / "s.yaml", "--out", tmp_path / "s")
    assert code == 2 and "not valid YAML" in text and not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_more_images_per_class_than_the_data_has_says_so_before_training(tmp_path, capsys):
    code, text = _run(capsys, "experiment", "--data", "digits", "--per-class", "500", "--seeds", "0", "--out", tmp_path / "s",
                      "--quiet", "--processes", "1", "--invert-steps", "1")
    assert code == 2 and "fewer than --per-class 500" in text and not list((tmp_path / "s").glob("runs/*/train.json"))


def test_a_start_killed_before_its_marker_is_started_again_but_foreign_files_are_refused(tmp_path):
    from diffinv.runs import RunError, prepare_output

    out = tmp_path / "store"
    (out / "parts").mkdir(parents=True)  # what a stage makes before its marker: its config and empty folders
    (out / "config.yaml").write_text("steps: 2\n")
    assert prepare_output(out, "store.json", resume=True, overwrite=False) == "fresh"
    (out / "parts" / "mine.txt").write_text("work")  # a folder with something in it is not ours to take over
    with pytest.raises(RunError, match="not a diffinv output"):
        prepare_output(out, "store.json", resume=True, overwrite=False)
