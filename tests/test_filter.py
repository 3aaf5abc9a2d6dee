"""`diffinv filter`: a new set of the images a real-only judge trusts; the source set never changes."""

import hashlib

import torch
from conftest import run_cli as _run
from conftest import write_image_tree

from diffinv.data.synthetic import read_manifest
from diffinv.quality.filtering import keep_mask
from diffinv.runs import read_json

QUIET = ["--quiet"]


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_keep_mask_by_threshold_and_by_share_of_each_class():
    scores, labels = torch.tensor([0.9, 0.2, 0.6, 0.8, 0.8]), torch.tensor([0, 0, 1, 1, 1])
    assert keep_mask(scores, labels, min_confidence=0.6).tolist() == [True, False, True, True, True]
    # Top half of each class: one of two, two of three (0.8 and 0.8; the tie kept by position).
    assert keep_mask(scores, labels, keep_top=0.5).tolist() == [True, False, False, True, True]
    assert keep_mask(scores, labels, keep_top=0.01).tolist() == [True, False, False, True, False]  # at least one a class


def test_filter_keeps_what_the_judge_trusts_and_leaves_the_source_as_it_was(tiny_latent, tmp_path, capsys):
    data = tmp_path / "d"
    write_image_tree(data / "train", per_class=4, size=16)
    write_image_tree(data / "test", per_class=2, size=16, seed=3)
    assert _run(capsys, "invert", "--model", tiny_latent, "--data", data, "--out", tmp_path / "s", "--resolution", "16",
                "--steps", "2", *QUIET)[0] == 0
    assert _run(capsys, "generate", "--store", tmp_path / "s", "--out", tmp_path / "g", "--per-image", "3", "--steps", "2", *QUIET)[0] == 0
    train = ["--arch", "small-cnn", "--steps", "3", "--batch-size", "4", "--resolution", "16", *QUIET]
    assert _run(capsys, "train", "--data", data, *train, "--out", tmp_path / "judge")[0] == 0
    before = _digest(tmp_path / "g")

    # Every image with its score (keep all), then a threshold: exactly the images scored at or above it.
    code, _ = _run(capsys, "filter", "--set", tmp_path / "g", "--judge", tmp_path / "judge", "--keep-top", "1", "--out", tmp_path / "all")
    assert code == 0
    scored = {r["id"]: r["judge_score"] for r in read_manifest(tmp_path / "all")}
    assert len(scored) == 24 and all(0 <= s <= 1 for s in scored.values())
    cut = sorted(scored.values())[len(scored) // 2]
    code, text = _run(capsys, "filter", "--set", tmp_path / "g", "--judge", tmp_path / "judge", "--min-confidence", cut,
                      "--out", tmp_path / "f")
    kept = {r["id"] for r in read_manifest(tmp_path / "f")}
    assert code == 0 and kept == {i for i, s in scored.items() if s >= cut} and f"kept {len(kept)} of 24" in text
    assert _digest(tmp_path / "g") == before
    info = read_json(tmp_path / "f" / "generate.json")["filter"]
    assert info["kept"] == len(kept) and info["min_confidence"] == cut
    assert _run(capsys, "verify", tmp_path / "f")[0] == 0
    assert _run(capsys, "train", "--data", data, "--synthetic", tmp_path / "f", *train, "--out", tmp_path / "r")[0] == 0

    # The judge must have seen real labels only; a threshold nothing reaches says so.
    assert _run(capsys, "train", "--data", data, "--synthetic", tmp_path / "g", *train, "--out", tmp_path / "mixed")[0] == 0
    code, text = _run(capsys, "filter", "--set", tmp_path / "g", "--judge", tmp_path / "mixed", "--min-confidence", "0.5",
                      "--out", tmp_path / "x")
    assert code == 2 and "real images alone" in text
    code, text = _run(capsys, "filter", "--set", tmp_path / "g", "--judge", tmp_path / "judge", "--min-confidence", "1",
                      "--out", tmp_path / "y")
    assert code == 2 and ("lower it" in text or "kept" in text)
    code, text = _run(capsys, "filter", "--set", tmp_path / "g", "--judge", tmp_path / "judge", "--out", tmp_path / "z")
    assert code == 2 and "give one rule" in text


class Brightness(torch.nn.Module):
    """A stand-in judge: class 1 when the normalised image is bright on average, else class 0."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def test_a_hand_made_judge_keeps_exactly_the_images_it_labels_as_their_class(tmp_path, monkeypatch):
    import diffinv.stages.filter as stage
    from diffinv.config import FilterConfig
    from diffinv.data.synthetic import SyntheticWriter, open_synthetic

    meta = {"classes": ["dark", "bright"], "resolution": 8, "mean": torch.full((3,), 0.5), "std": torch.full((3,), 0.25)}
    monkeypatch.setattr(stage, "load_classifier", lambda run, device: (Brightness().eval(), meta))
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "model.safetensors").write_bytes(b"stand-in")
    (tmp_path / "judge" / "config.yaml").write_text("arch: small-cnn\n")
    src, rows = tmp_path / "set", []
    writer = SyntheticWriter(src)
    writer.start({"classes": meta["classes"], "method": "di"})
    # (label, brightness): two of the five are labelled against their look.
    for i, (label, level) in enumerate([("dark", 20), ("dark", 230), ("bright", 240), ("bright", 10), ("bright", 200)]):
        row = {"id": f"s{i}", "class": label, "file": f"{label}/s{i}.png"}
        writer.write_image(row, torch.full((8, 8, 3), level, dtype=torch.uint8))
        rows.append(row)
    writer.finish(rows)
    # Two classes: an own-class probability above one half is the judge's own label.
    stage.filter_set(FilterConfig(set=str(src), judge=str(tmp_path / "judge"), min_confidence=0.5001, device="cpu"), tmp_path / "kept")
    out = open_synthetic(tmp_path / "kept", meta["classes"])
    assert out.ids == ["s0", "s2", "s4"] and out.labels.tolist() == [0, 1, 1]
    assert (tmp_path / "kept" / "bright" / "s2.png").read_bytes() == (src / "bright" / "s2.png").read_bytes()
    info = read_json(tmp_path / "kept" / "generate.json")
    assert info["n_samples"] == 3 and info["filter"]["of"] == 5 and info["status"] == "complete"
