"""Per-class LoRA: `diffinv finetune` fits an adapter per class; --method lora and di+lora sample through them."""

import hashlib

import pytest
import torch
from conftest import run_cli as _run
from conftest import write_image_tree
from safetensors.torch import load_file

from diffinv.data.synthetic import read_manifest
from diffinv.runs import read_json

pytest.importorskip("peft")
QUIET = ["--quiet"]
FIT = ["--steps", "25", "--lr", "0.01", "--batch-size", "4", "--rank", "4", *QUIET]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def stores(tiny_pixel, tmp_path, capsys):
    data = tmp_path / "d"
    write_image_tree(data, per_class=3, size=16)
    common = ["--model", tiny_pixel, "--data", data, "--resolution", "16", "--steps", "3", *QUIET]
    assert _run(capsys, "invert", *common, "--out", tmp_path / "images")[0] == 0
    assert _run(capsys, "invert", *common, "--target", "class", "--out", tmp_path / "classes")[0] == 0
    return tmp_path / "images", tmp_path / "classes"


@pytest.mark.slow
def test_finetune_lowers_each_class_loss_resumes_bit_identically_and_refuses_an_image_store(stores, tmp_path, capsys):
    images, classes = stores
    code, text = _run(capsys, "finetune", "--store", classes, *FIT, "--out", tmp_path / "ad")
    assert code == 0, text
    info = read_json(tmp_path / "ad" / "finetune.json")
    assert info["classes"] == ["cat", "dog"] and info["rank"] == 4
    for name, r in info["per_class"].items():
        assert r["images"] == 3 and r["loss_after"] < r["loss_before"], (name, r)  # fitting lowers the class's own loss
    dog = tmp_path / "ad" / "adapters" / "dog.safetensors"
    first = load_file(str(dog))
    # Killed after the cat adapter: a re-run fits the dog's again, to the same weights (every draw is seeded).
    dog.unlink()
    (tmp_path / "ad" / "finetune.json").write_text('{"status": "running"}')
    code, text = _run(capsys, "finetune", "--store", classes, *FIT, "--out", tmp_path / "ad")
    assert code == 2 and "--resume" in text  # an unfinished folder is never silently reused
    code, text = _run(capsys, "finetune", "--store", classes, *FIT, "--resume", "--out", tmp_path / "ad")
    assert code == 0, text
    again = load_file(str(dog))  # the tensors (safetensors may order its header differently)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    code, text = _run(capsys, "finetune", "--store", images, *FIT, "--out", tmp_path / "bad")
    assert code == 2 and "--target class" in text


def test_an_adapter_saved_and_loaded_back_gives_equal_outputs(tiny_pixel):
    from diffinv.diffusion.backbone import LatentMoments
    from diffinv.diffusion.lora import fit_lora
    from diffinv.diffusion.model_io import load_backbone

    trained, fresh = load_backbone(tiny_pixel), load_backbone(tiny_pixel)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    cond = torch.randn(5, trained.cond_dim, generator=g)
    probe = (torch.randn(2, 3, 16, 16, generator=g), torch.tensor([100, 700]), cond.expand(2, -1, -1))
    base = trained.predict(*probe).detach()
    params = trained.add_lora("c", 4, 4.0)
    losses = fit_lora(trained, params, LatentMoments(x, torch.zeros_like(x)), cond, steps=10, lr=0.01, batch_size=3, seed=1)
    assert len(losses) == 10
    adapted = trained.predict(*probe).detach()
    assert not torch.allclose(adapted, base)
    fresh.load_lora("c", trained.lora_state("c"), 4, 4.0)
    assert torch.equal(fresh.predict(*probe).detach(), adapted)
    fresh.use_lora(None)
    assert torch.equal(fresh.predict(*probe).detach(), base)  # without the adapter: the frozen base


@pytest.mark.slow
def test_lora_and_di_lora_sample_through_each_class_adapter(stores, tmp_path, capsys):
    images, classes = stores
    assert _run(capsys, "finetune", "--store", classes, *FIT, "--out", tmp_path / "ad")[0] == 0
    gen = ["--per-image", "2", "--steps", "3", *QUIET]
    made = {}
    for method, store, extra in (("lora", classes, ["--adapters", tmp_path / "ad"]), ("class-inversion", classes, []),
                                 ("di+lora", images, ["--adapters", tmp_path / "ad"]), ("di", images, [])):
        code, text = _run(capsys, "generate", "--store", store, "--method", method, *extra, *gen, "--out", tmp_path / method)
        assert code == 0, text
        made[method] = {r["id"]: _sha(tmp_path / method / r["file"]) for r in read_manifest(tmp_path / method)}
    assert made["lora"].keys() == made["class-inversion"].keys() and made["di+lora"].keys() == made["di"].keys()
    # The same rows and keyed noise: only the adapter differs, and it changes every image.
    assert all(made["lora"][i] != made["class-inversion"][i] for i in made["lora"])
    assert all(made["di+lora"][i] != made["di"][i] for i in made["di"])
    rows = read_manifest(tmp_path / "di+lora")
    assert {r["adapter"] for r in rows} == {"adapters/cat.safetensors", "adapters/dog.safetensors"}
    assert all(r["adapter"] == f"adapters/{r['class']}.safetensors" for r in rows)
    info = read_json(tmp_path / "di+lora" / "generate.json")
    lora, cost = info["lora"], read_json(tmp_path / "di+lora" / "cost.json")
    assert lora["fit_seconds_per_image"] == pytest.approx(lora["fit_seconds"] / len(rows), abs=1e-5)
    # Each set's cost per image: sampling, its share of the fits, and of inverting each store it draws on (once).
    inverted = {name: read_json(store / "cost.json")["seconds"] for name, store in (("images", images), ("classes", classes))}
    assert all(s > 0 for s in inverted.values())
    assert cost["images"] == len(rows) and cost["inversion_seconds"] == pytest.approx(sum(inverted.values()), abs=1e-3)
    assert cost["seconds_per_image"] == pytest.approx(
        cost["seconds"] / len(rows) + lora["fit_seconds_per_image"] + cost["inversion_seconds"] / len(rows), abs=1e-5)
    own = read_json(tmp_path / "lora" / "cost.json")  # sampled from the class store its adapters were fitted under
    assert own["inversion_seconds"] == pytest.approx(inverted["classes"], abs=1e-3)
    plain = read_json(tmp_path / "di" / "cost.json")
    assert plain["inversion_seconds"] == pytest.approx(inverted["images"], abs=1e-3) and plain["fit_seconds_per_image"] == 0
    assert plain["seconds_per_image"] == pytest.approx((plain["seconds"] + plain["inversion_seconds"]) / plain["images"], abs=1e-5)
    assert _run(capsys, "verify", tmp_path / "di+lora")[0] == 0
    # A batch of one class at a time gives the same images as mixed batches (the adapter is switched per class).
    code, _ = _run(capsys, "generate", "--store", images, "--method", "di+lora", "--adapters", tmp_path / "ad", *gen,
                   "--batch-size", "1", "--out", tmp_path / "one")
    assert code == 0
    assert {r["id"]: _sha(tmp_path / "one" / r["file"]) for r in read_manifest(tmp_path / "one")} == made["di+lora"]

    code, text = _run(capsys, "generate", "--store", classes, "--method", "lora", *gen, "--out", tmp_path / "x")
    assert code == 2 and "--adapters DIR" in text
    code, text = _run(capsys, "generate", "--store", images, "--method", "di", "--adapters", tmp_path / "ad", *gen,
                      "--out", tmp_path / "y")
    assert code == 2 and "drop --adapters" in text


@pytest.mark.slow
def test_prompt_adapters_with_a_text_encoder_lora_fit_save_load_and_sample(tiny_text, tmp_path, capsys):
    """DataDream's way on an SD-structured model: each class's adapters of the UNet and the text encoder, fitted under
    the class prompt, change the prompt's embedding and load back with equal outputs; lora samples the class prompt
    through them, di+lora (no text encoder needed) the UNet's alone."""
    from diffinv.diffusion.model_io import load_backbone

    data = write_image_tree(tmp_path / "d", per_class=3, size=16)
    common = ["--model", tiny_text, "--data", data, "--resolution", "16", "--steps", "3", *QUIET]
    assert _run(capsys, "invert", *common, "--out", tmp_path / "images")[0] == 0
    code, text = _run(capsys, "finetune", "--store", tmp_path / "images", "--text-encoder", *FIT, "--out", tmp_path / "no")
    assert code == 2 and "give --prompt" in text
    code, text = _run(capsys, "finetune", "--store", tmp_path / "images", *FIT, "--out", tmp_path / "no")
    assert code == 2 and "--prompt" in text  # a per-image store conditions nothing without a prompt
    prompt = ["--prompt", "a photo of a {}", "--text-encoder"]
    code, text = _run(capsys, "finetune", "--store", tmp_path / "images", *prompt, *FIT, "--out", tmp_path / "ad")
    assert code == 0, text
    info = read_json(tmp_path / "ad" / "finetune.json")
    assert info["prompt"] == "a photo of a {}" and info["text_encoder"] is True
    assert all(r["loss_after"] < r["loss_before"] for r in info["per_class"].values())
    state = load_file(str(tmp_path / "ad" / "adapters" / "cat.safetensors"))
    text_keys = [k for k in state if k.startswith("text_encoder.")]
    assert text_keys and any(not k.startswith("text_encoder.") for k in state)
    assert any(state[k].abs().max() > 0 for k in text_keys if ".lora_B." in k)  # the text encoder's adapter was trained

    base, fresh = load_backbone(tiny_text, with_text_encoder=True), load_backbone(tiny_text, with_text_encoder=True)
    before = base.encode_prompts(["a photo of a cat"])
    fresh.load_lora("class0", state, 4, 4.0)
    adapted = fresh.encode_prompts(["a photo of a cat"])
    assert not torch.allclose(adapted, before)
    fresh.use_lora(None)
    assert torch.equal(fresh.encode_prompts(["a photo of a cat"]), before)

    gen = ["--per-image", "2", "--steps", "3", *QUIET]
    made = {}
    for method, extra in (("lora", ["--adapters", tmp_path / "ad"]), ("prompt", []), ("di+lora", ["--adapters", tmp_path / "ad"])):
        code, text = _run(capsys, "generate", "--store", tmp_path / "images", "--method", method, *extra, *gen,
                          "--out", tmp_path / method)
        assert code == 0, text
        made[method] = {r["id"]: (r, _sha(tmp_path / method / r["file"])) for r in read_manifest(tmp_path / method)}
    assert made["lora"].keys() == made["prompt"].keys()  # the same rows and keyed noise as the prompt method's
    assert all(r["prompt"] == f"a photo of a {r['class']}" and r["adapter"] == f"adapters/{r['class']}.safetensors"
               for r, _ in made["lora"].values())
    assert all(made["lora"][i][1] != made["prompt"][i][1] for i in made["lora"])  # the adapters change every image
    assert _run(capsys, "verify", tmp_path / "lora")[0] == 0
