"""``--preset paper`` against a plain re-implementation of the official code (yongchaoz/diffusion_inversion).

The reference loops below are written as the official scripts are: an ``nn.Linear(n, K*D)``
whose columns are the embeddings, a DataLoader-order walk over the group in batches, the mean
squared error of the batch, diffusers' schedulers called directly, and the EmbPipeline's
sampling (conditional noise, mean-embedding guidance, PNDM). Only the random draws are ours,
fed to both, so the two must agree to rounding.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel

from diffinv import rng
from diffinv.cli import main
from diffinv.config import PRESETS, GenerateConfig, InvertConfig, load_config
from diffinv.data.real import load_pixels, open_images, select
from diffinv.diffusion.generation import generate_batch, plan_samples
from diffinv.diffusion.inversion import InversionSettings, invert_batch
from diffinv.diffusion.methods import get_method
from diffinv.diffusion.methods.base import GenerationSettings, Inputs
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.objective import init_embeddings
from diffinv.diffusion.perturb import paper_partners
from diffinv.diffusion.store import EmbeddingStore
from diffinv.diffusion.tiny import save_tiny_model
from diffinv.runs import read_yaml


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("paper") / "sd15", "sd15-tiny")


def official_inversion(model, pixels, keys, init, *, gradients, group_batch, lr=3e-2, wd=1e-2):
    """The official loop, on one group of n images: returns the embeddings [n, K, D]."""
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
    n, k, d = init.shape
    emb = torch.nn.Linear(n, k * d, bias=False)
    with torch.no_grad():
        emb.weight.copy_(init.reshape(n, k * d).T)  # column i is image i's embedding
    optimizer = torch.optim.AdamW(emb.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=wd, eps=1e-8)
    posterior = vae.encode(pixels).latent_dist
    batches = math.ceil(n / group_batch)
    for step in range(gradients * batches):
        b, g = step % batches, step // batches  # DataLoader(shuffle=False): the group's batches in order, again and again
        ids = torch.arange(b * group_batch, min(n, (b + 1) * group_batch))
        shape = tuple(posterior.mean.shape[1:])
        eps = rng.keyed_normal(keys[ids], g, rng.STREAM_LATENT, shape)
        latents = (posterior.mean[ids] + posterior.std[ids] * eps).detach() * vae.config.scaling_factor
        noise = rng.keyed_normal(keys[ids], g, rng.STREAM_NOISE, shape)
        timesteps = rng.keyed_randint(keys[ids], g, rng.STREAM_TIMESTEP, scheduler.config.num_train_timesteps)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = emb(torch.eye(n)[ids]).view(-1, k, d)
        pred = unet(noisy, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return emb.weight.detach().T.reshape(n, k, d)


def official_sampling(model, embeddings, own, partner, cond_noise, start_noise, *, steps, guidance, interp, sigma):
    """The official EmbPipeline on prompts e_i + s (e_j - e_i): decoded pixels [B, 3, R, R] in [-1, 1]."""
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    scheduler = PNDMScheduler.from_pretrained(model / "scheduler")
    n, k, d = embeddings.shape
    weight = embeddings.reshape(n, k * d).T  # the nn.Linear's weight [K*D, n]
    onehot = torch.eye(n)
    prompt = onehot[own] + interp * (onehot[partner] - onehot[own])
    text = (prompt @ weight.T).view(-1, k, d) + cond_noise * sigma
    uncond = weight.mean(dim=1).view(1, k, d).expand(len(text), -1, -1)
    scheduler.set_timesteps(steps)
    latents = start_noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out = unet(model_input, t, encoder_hidden_states=torch.cat([uncond, text])).sample
            out_uncond, out_text = out.chunk(2)
            latents = scheduler.step(out_uncond + guidance * (out_text - out_uncond), t, latents).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1) - 0.5) * 2  # the pipeline's conversion to an image, back in [-1, 1]


def test_preset_sets_the_official_values_and_flags_still_win():
    config = load_config(InvertConfig, None, {"preset": "paper", "model": "m", "data": "d", "group_batch": 10})
    assert (config.init, config.update, config.group_size, config.precision, config.steps, config.lr) == \
        ("uniform", "group", 100, "fp32", 3000, 3e-2)
    assert config.group_batch == 10  # the flag overrides the preset's 50
    generate = load_config(GenerateConfig, None, {"preset": "paper", "store": "s"})
    assert (generate.sampler, generate.steps, generate.guidance, generate.partners) == ("pndm", 100, 2.0, "paper")
    assert set(PRESETS["paper"]["InvertConfig"]) <= set(InvertConfig.__dataclass_fields__)


def test_paper_inversion_equals_the_official_loop(sd15):
    backbone = load_backbone(sd15)
    images = select(open_images("digits"), 1, seed=0).subset(range(5))
    pixels = load_pixels(images, 64)
    keys = rng.keys_tensor(0, images.ids)
    # A group of 5 in batches of 2 (2, 2, 1): each image gets a gradient every third step, and is moved every step.
    config = load_config(InvertConfig, None, {"preset": "paper", "model": "m", "data": "d", "steps": 4, "group_size": 5,
                                              "group_batch": 2, "eval_timesteps": 1, "log_every": 1})
    ours = invert_batch(backbone, pixels, keys, InversionSettings.of(config)).embeddings
    init = init_embeddings(keys, 5, 768, 5 ** -0.5, "uniform")
    reference = official_inversion(sd15, pixels, keys, init, gradients=4, group_batch=2)
    assert not torch.allclose(reference, init, atol=1e-3)  # the loop moved the embeddings
    # Adam divides by the root of the squared gradients, so where a gradient is near zero a rounding
    # difference (summation order) can move an element by up to lr: bound the mean and the largest.
    diff = (ours - reference).abs()
    assert diff.mean() < 1e-6 and diff.max() < 1e-3 and (diff > 1e-5).float().mean() < 1e-3

    # The default pattern (every image every step, sum of losses) is a different optimisation: the test can tell.
    own = load_config(InvertConfig, None, {"preset": "paper", "model": "m", "data": "d", "steps": 4, "update": "own",
                                           "group_size": 5, "eval_timesteps": 1})
    assert (invert_batch(backbone, pixels, keys, InversionSettings.of(own)).embeddings - reference).abs().mean() > 1e-3


def test_paper_init_is_the_linear_layers_uniform_start():
    keys = rng.keys_tensor(0, [str(i) for i in range(100)])
    init = init_embeddings(keys, 5, 768, 100 ** -0.5, "uniform")
    assert init.abs().max() <= 0.1 and init.abs().max() > 0.099
    assert abs(init.std().item() - 0.1 / math.sqrt(3)) < 1e-3  # U(-b, b) has std b / sqrt(3)
    linear = torch.nn.Linear(100, 5 * 768, bias=False)  # PyTorch's default init of the official embedding table
    assert abs(linear.weight.abs().max().item() - init.abs().max().item()) < 1e-3


def test_paper_samples_equal_the_official_pipeline(sd15, tmp_path):
    store_path = tmp_path / "store"
    assert main(["invert", "--preset", "paper", "--model", str(sd15), "--data", "digits", "--per-class", "1", "--steps", "2",
                 "--group-size", "10", "--group-batch", "5", "--resolution", "64", "--out", str(store_path), "--quiet"]) == 0
    assert read_yaml(store_path / "config.yaml")["update"] == "group"
    store = EmbeddingStore.open(store_path)
    config = load_config(GenerateConfig, None, {"preset": "paper", "store": str(store_path), "steps": 12, "per_image": 2})
    config = GenerationSettings.of(config)
    backbone = load_backbone(sd15)
    rows = plan_samples(config, store, str(sd15))[:6]
    source = get_method("di").load(config, store, backbone, rows, Inputs())
    ours = generate_batch(backbone, rows, source, config)

    keys = torch.tensor([r["_key"] for r in rows], dtype=torch.int64)
    own = torch.tensor([r["_src"] for r in rows])
    partner = torch.tensor([store.ids.index(r["partner"]) for r in rows])
    cond_noise = rng.keyed_normal(keys, 0, rng.STREAM_PERTURB, (5, 768))
    start_noise = rng.keyed_normal(keys, 0, rng.STREAM_NOISE, (4, 8, 8))
    reference = official_sampling(sd15, store.embeddings, own, partner, cond_noise, start_noise, steps=12, guidance=2.0,
                                  interp=0.1, sigma=0.1)
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-4)


def test_paper_partner_rule():
    # Class 0: 8 images (>= per_image + 1: drawn within the class without replacement, itself possible);
    # class 1: 3 images (2 others < 4: both others, then 2 from class 0).
    labels = torch.tensor([0] * 8 + [1] * 3)
    keys = rng.keys_tensor(0, [str(i) for i in range(11)])
    partners, fallback = paper_partners(keys, labels, 4)
    for i in range(8):
        row = partners[i].tolist()
        assert len(set(row)) == 4 and all(labels[j] == 0 for j in row) and not fallback[i].any()
    for i in range(8, 11):
        row = partners[i].tolist()
        assert sorted(row[:2]) == sorted(j for j in range(8, 11) if j != i)  # every other image of its class
        assert all(labels[j] == 0 for j in row[2:]) and len(set(row)) == 4
        assert fallback[i].tolist() == [False, False, True, True]
    # Over many images the image itself is drawn about per_image / class size of the time (4/8 here).
    many = torch.tensor([0] * 8)
    selfs = sum(i in paper_partners(rng.keys_tensor(s, [str(i) for i in range(8)]), many, 4)[0][i].tolist()
                for s in range(50) for i in range(8))
    assert 0.4 < selfs / 400 < 0.6
