import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffinv import rng
from diffinv.config import ConfigError, InvertConfig
from diffinv.data.real import load_pixels, open_images, select
from diffinv.diffusion.inversion import InversionError, InversionSettings, invert_batch
from diffinv.diffusion.model_io import load_backbone
from diffinv.diffusion.objective import adamw_rows, evaluation_loss
from diffinv.diffusion.store import EmbeddingStore, StoreError
from diffinv.diffusion.tiny import memorise, save_tiny_model
from diffinv.runs import RunError, read_json
from diffinv.stages.invert import invert_dataset


def _config(model, data, **kw):
    base = dict(model=str(model), data=str(data), resolution=16, steps=6, batch_size=4, checkpoint_every=2, log_every=2)
    return InvertConfig(**{**base, **kw})


def _same_store(a: Path, b: Path, exact: bool = True):
    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert sa.ids == sb.ids
    if exact:
        assert torch.equal(sa.embeddings, sb.embeddings)
    else:
        # float noise from other kernels, grown by Adam where an image's first gradients nearly cancel
        torch.testing.assert_close(sa.embeddings, sb.embeddings, rtol=1e-4, atol=3e-4)
    assert [r["loss"] for r in sa.rows] == pytest.approx([r["loss"] for r in sb.rows], rel=1e-4)


@pytest.fixture(scope="module")
def trained_pixel(tmp_path_factory):
    """A tiny pixel-space diffusion autoencoder that has memorised 10 digits: its conditioning matters."""
    path = save_tiny_model(tmp_path_factory.mktemp("m") / "dae", "pixel", sample_size=8)
    backbone = load_backbone(path)
    images = select(open_images("digits"), 1, seed=0)
    pixels = load_pixels(images, 8)
    memorise(backbone, pixels, steps=300, batch_size=20, lr=3e-3)
    return backbone, images, pixels


@pytest.mark.slow
def test_inverted_embeddings_explain_their_own_image(trained_pixel):
    backbone, images, pixels = trained_pixel
    keys = rng.keys_tensor(0, images.ids)
    emb, loss_init, loss_final, _ = invert_batch(backbone, pixels, keys, InversionSettings(steps=100, lr=0.1, log_every=50))
    clean = backbone.encode(pixels).mean
    own = evaluation_loss(backbone, clean, emb, keys).mean()
    mean = evaluation_loss(backbone, clean, emb.mean(0, keepdim=True).expand_as(emb), keys).mean()
    other = evaluation_loss(backbone, clean, emb.roll(1, 0), keys).mean()
    assert torch.allclose(own, loss_final.mean())
    # The N(0, 1) start already has the encoder's (layer-normalised) token scale, so it starts in distribution.
    assert own < 0.9 * loss_init.mean()
    assert own < 0.93 * mean  # the store's mean embedding explains each image worse ...
    assert own < 0.88 * other  # ... and another image's embedding worse still: c_i is specific to x_i


def test_batch_composition_does_not_change_results(tiny_latent, image_tree, tmp_path):
    invert_dataset(_config(tiny_latent, image_tree, batch_size=6), tmp_path / "one", progress=False)
    invert_dataset(_config(tiny_latent, image_tree, batch_size=4), tmp_path / "split", progress=False)
    _same_store(tmp_path / "one", tmp_path / "split", exact=False)


def test_two_runs_on_halves_equal_one_run(tiny_latent, image_tree, tmp_path):
    invert_dataset(_config(tiny_latent, image_tree), tmp_path / "all", progress=False)
    full = EmbeddingStore.open(tmp_path / "all")
    for c in ("cat", "dog"):
        half = tmp_path / f"data-{c}" / c
        half.parent.mkdir()
        half.symlink_to(image_tree / c)
        invert_dataset(_config(tiny_latent, half.parent), tmp_path / f"store-{c}", progress=False)
    halves = [EmbeddingStore.open(tmp_path / f"store-{c}") for c in ("cat", "dog")]
    # Equal up to float noise: another batch size runs other kernels (~1e-7 relative), and where an
    # image's first gradients nearly cancel in Adam's moments (1.155e-5 then -1.062e-5 on one
    # coordinate here), that noise becomes a 1e-4 difference in the update.
    torch.testing.assert_close(torch.cat([h.embeddings for h in halves]), full.embeddings, rtol=1e-4, atol=3e-4)


def test_interrupt_then_resume_equals_uninterrupted(tiny_latent, image_tree, tmp_path):
    invert_dataset(_config(tiny_latent, image_tree), tmp_path / "ref", progress=False)

    def stop(batch, step):
        if batch == 1 and step == 5:  # mid second batch, after its checkpoint at step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_dataset(_config(tiny_latent, image_tree), tmp_path / "run", progress=False, on_step=stop)
    assert len(list((tmp_path / "run" / "checkpoints").glob("*.safetensors"))) == 1
    with pytest.raises(RunError, match="--resume"):
        invert_dataset(_config(tiny_latent, image_tree), tmp_path / "run", progress=False)
    resumed_steps = []
    invert_dataset(_config(tiny_latent, image_tree), tmp_path / "run", resume=True, progress=False,
                   on_step=lambda batch, step: resumed_steps.append(step))
    assert resumed_steps == [5, 6]  # continued from the step-4 checkpoint, first batch not redone
    _same_store(tmp_path / "ref", tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoints").glob("*.safetensors"))


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tiny_latent, image_tree, tmp_path):
    args = ["--model", str(tiny_latent), "--data", str(image_tree), "--resolution", "16", "--steps", "40",
            "--batch-size", "4", "--checkpoint-every", "3", "--quiet"]
    cli = [sys.executable, "-m", "diffinv.cli", "invert"]
    subprocess.run(cli + args + ["--out", str(tmp_path / "ref")], check=True, capture_output=True)
    proc = subprocess.Popen(cli + args + ["--out", str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "run" / "parts").glob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_json(tmp_path / "run" / "store.json")["status"] == "in-progress"  # killed mid-run
    done = subprocess.run(cli + args + ["--out", str(tmp_path / "run"), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _same_store(tmp_path / "ref", tmp_path / "run")


@pytest.mark.slow
def test_finished_store_is_protected_and_mismatches_refused(tiny_latent, tiny_pixel, image_tree, tmp_path):
    out = tmp_path / "store"
    invert_dataset(_config(tiny_latent, image_tree), out, progress=False)
    with pytest.raises(RunError, match="--overwrite"):
        invert_dataset(_config(tiny_latent, image_tree), out, progress=False)
    # --resume on a finished store is a no-op, not a rerun.
    steps_run, parts_before = [], sorted(p.stat().st_mtime_ns for p in (out / "parts").iterdir())
    invert_dataset(_config(tiny_latent, image_tree), out, resume=True, progress=False,
                   on_step=lambda batch, step: steps_run.append(step))
    assert steps_run == [] and sorted(p.stat().st_mtime_ns for p in (out / "parts").iterdir()) == parts_before

    def stop(batch, step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_dataset(_config(tiny_latent, image_tree), tmp_path / "partial", progress=False, on_step=stop)
    with pytest.raises(RunError, match="steps: store has 6, asked 7"):
        invert_dataset(_config(tiny_latent, image_tree, steps=7), tmp_path / "partial", resume=True, progress=False)
    invert_dataset(_config(tiny_latent, image_tree, steps=7), out, overwrite=True, progress=False)
    assert EmbeddingStore.open(out).rows[0]["steps"] == 7
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(RunError, match="not a diffinv output"):
        invert_dataset(_config(tiny_latent, image_tree), tmp_path / "mine", overwrite=True, progress=False)
    # Killed after writing its config but before its marker: the same command starts it, other settings are refused.
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_bytes((out / "config.yaml").read_bytes())
    with pytest.raises(RunError, match="steps"):
        invert_dataset(_config(tiny_latent, image_tree, steps=5), tmp_path / "early", resume=True, progress=False)
    invert_dataset(_config(tiny_latent, image_tree, steps=7), tmp_path / "early", resume=True, progress=False)
    assert EmbeddingStore.open(tmp_path / "early").rows[0]["steps"] == 7


def test_nan_loss_is_a_clear_error(tiny_latent, image_tree, tmp_path):
    with pytest.raises(InversionError, match="lower --lr"):
        invert_dataset(_config(tiny_latent, image_tree, init_std=float("inf")), tmp_path / "s", progress=False)


def test_pixel_and_v_prediction_models_invert(tiny_pixel, tiny_v, image_tree, tmp_path):
    for name, model in (("pixel", tiny_pixel), ("v", tiny_v)):
        invert_dataset(_config(model, image_tree, latent="mean"), tmp_path / name, progress=False)
        store = EmbeddingStore.open(tmp_path / name)
        assert store.embeddings.shape == (6, 5, 32) and torch.isfinite(store.embeddings).all()
        assert store.mean_embedding().shape == (5, 32)


# The official update pattern (groups of 4 in batches of 3: the 6 images are 2 groups), and the
# cost levers: a warm-up + cosine schedule and stratified timesteps, all functions of the step.
RECIPES = {"group": dict(update="group", group_size=4, group_batch=3, init="uniform"),
           "schedule": dict(lr_schedule="cosine", warmup=2, timesteps="stratified")}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_kill_then_resume_equals_uninterrupted_for_every_recipe(tiny_latent, image_tree, tmp_path, recipe):
    kw = RECIPES[recipe]
    invert_dataset(_config(tiny_latent, image_tree, **kw), tmp_path / "ref", progress=False)

    def stop(batch, step):
        if batch == 1 and step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_dataset(_config(tiny_latent, image_tree, **kw), tmp_path / "run", progress=False, on_step=stop)
    resumed = []
    invert_dataset(_config(tiny_latent, image_tree, **kw), tmp_path / "run", resume=True, progress=False,
                   on_step=lambda batch, step: resumed.append((batch, step)))
    assert resumed == [(1, 5), (1, 6)]
    _same_store(tmp_path / "ref", tmp_path / "run")
    other = {"group": dict(update="own"), "schedule": dict(lr_schedule="constant", warmup=0, timesteps="uniform")}[recipe]
    invert_dataset(_config(tiny_latent, image_tree, **{**kw, **other}), tmp_path / "other", progress=False)
    assert not torch.allclose(EmbeddingStore.open(tmp_path / "other").embeddings, EmbeddingStore.open(tmp_path / "ref").embeddings)


def test_group_pattern_plans_whole_groups_whatever_the_batch_size(tiny_latent, image_tree, tmp_path):
    kw = RECIPES["group"]
    invert_dataset(_config(tiny_latent, image_tree, batch_size=2, **kw), tmp_path / "a", progress=False)
    invert_dataset(_config(tiny_latent, image_tree, batch_size=6, **kw), tmp_path / "b", progress=False)
    _same_store(tmp_path / "a", tmp_path / "b", exact=False)
    assert len(list((tmp_path / "a" / "parts").glob("part-*.json"))) == 2  # two groups (4 + 2), not three batches of 2


def test_stratified_timesteps_cover_the_schedule_evenly():
    from diffinv.diffusion.inversion import InversionSettings, warm_up
    from diffinv.diffusion.objective import training_timesteps
    from diffinv.schedule import lr_factor

    keys = rng.keys_tensor(0, ["a", "b"])
    strat = torch.stack([training_timesteps(keys, s, 1000, "stratified") for s in range(20)])  # [steps, images]
    iid = torch.stack([training_timesteps(keys, s, 1000, "uniform") for s in range(20)])
    # Every tenth of the schedule is hit 2 +- 1 times in 20 steps; i.i.d. draws leave tenths empty.
    assert all(set(torch.bincount(strat[:, b] // 100, minlength=10).tolist()) <= {1, 2, 3} for b in range(2))
    assert any(torch.bincount(iid[:, b] // 100, minlength=10).min() == 0 for b in range(2))
    assert torch.equal(training_timesteps(keys[1:], 7, 1000, "stratified"), strat[7, 1:])  # a function of (key, step)
    assert [round(lr_factor(s, 20, "cosine", 2), 4) for s in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 0.0076]  # 0.5 (1 + cos(pi 17/18))
    assert warm_up(InversionSettings(steps=5, warmup=10)) == 0  # warm-up is at most a tenth of the steps: none in 5


def test_antithetic_draws_pair_steps_with_negated_noise_and_per_image_steps_agree():
    from diffinv.diffusion.backbone import LatentMoments
    from diffinv.diffusion.objective import training_draws

    keys = rng.keys_tensor(0, ["a", "b", "c"])
    moments = LatentMoments(torch.randn(3, 2, 4, 4), torch.full((3, 2, 4, 4), 0.1))
    draws = [training_draws(keys, s, moments, 1000, True, "stratified", "antithetic") for s in range(6)]
    for k in range(3):  # steps 2k and 2k+1: one timestep and latent draw, opposite noise
        (x_even, n_even, t_even), (x_odd, n_odd, t_odd) = draws[2 * k], draws[2 * k + 1]
        assert torch.equal(t_even, t_odd) and torch.equal(x_even, x_odd)
        torch.testing.assert_close(n_odd, -n_even)
        assert n_even.abs().mean() > 0.5  # real noise, not zeros
    assert not torch.allclose(draws[0][1], draws[2][1]) and not torch.allclose(draws[0][1], -draws[2][1])  # the next pair draws anew
    # Each image at its own step (early stopping) gets what it gets in a batch at that step.
    own = training_draws(keys, torch.tensor([3, 4, 5]), moments, 1000, True, "stratified", "antithetic")
    for b, s in enumerate((3, 4, 5)):
        for got, want in zip(own, draws[s]):
            torch.testing.assert_close(got[b], want[b])
    # Independent draws (the paper's) do not pair steps.
    _, n1, _ = training_draws(keys, 1, moments, 1000, True, "stratified", "independent")
    assert not torch.allclose(n1, -draws[0][1])


def test_importance_timesteps_pilot_every_bin_then_follow_the_proposal_with_unbiased_weights():
    from diffinv.diffusion.objective import importance_weights, pilot_steps, timestep_bins, timestep_proposal, training_timesteps

    keys, T = rng.keys_tensor(0, ["a", "b", "c"]), 1000
    # Image a's gradients were 4x larger in the lowest bin than in the top seven; b has no pilot yet.
    stats = torch.tensor([[16.0, 9, 4, 1, 1, 1, 1, 1, 1, 1], [0.0] * 10, [1.0] * 10])
    proposal = timestep_proposal(stats)
    assert proposal[0, 0] / proposal[0, 9] == pytest.approx((0.9 * 4 / 16 + 0.01) / (0.9 / 16 + 0.01))  # sqrt, a tenth uniform
    torch.testing.assert_close(proposal[1], torch.full((10,), 0.1))  # no pilot: uniform
    # The pilot: each image's first 10 draws visit every bin once, in a keyed order.
    pilot = torch.stack([training_timesteps(keys, s, T, "importance", proposal) for s in range(10)])
    assert all(sorted(timestep_bins(pilot[:, b], T).tolist()) == list(range(10)) for b in range(3))
    assert timestep_bins(pilot[:, 0], T).tolist() != timestep_bins(pilot[:, 1], T).tolist()
    # Later draws follow the proposal, stratified: 200 draws put within 2 of 200 x p in every bin.
    later = torch.stack([training_timesteps(keys, s, T, "importance", proposal) for s in range(10, 210)])
    counts = torch.stack([torch.bincount(timestep_bins(later[:, b], T), minlength=10) for b in range(3)])
    assert (counts - 200 * proposal).abs().max() <= 2.01 and counts[0, 0] > 2 * counts[0, 9]
    # Weight x proposal density is the uniform density at every timestep: the weighted loss keeps its expectation.
    t = torch.arange(T)
    for b in range(3):
        density = proposal[b][timestep_bins(t, T)] / (T // 10)
        torch.testing.assert_close(density * importance_weights(t, proposal[b].expand(T, -1), T), torch.full((T,), 1 / T))
    # A function of (key, draw): images at their own draws (early stopping) get what they get in a batch.
    own = training_timesteps(keys, torch.tensor([3, 12, 40]), T, "importance", proposal)
    assert own.tolist() == [pilot[3, 0], later[2, 1], later[30, 2]]
    assert (pilot_steps("importance", "antithetic"), pilot_steps("importance", "independent"), pilot_steps("stratified", "antithetic")) \
        == (20, 10, 0)


@pytest.mark.slow
def test_importance_sampled_inversion_resumes_exactly_inside_and_after_the_pilot(tiny_latent, image_tree, tmp_path):
    kw = {"timesteps": "importance", "steps": 26, "checkpoint_every": 3, "log_every": 1}  # pilot: 20 steps (antithetic pairs)
    invert_dataset(_config(tiny_latent, image_tree, **kw), tmp_path / "ref", progress=False)
    for kill in (8, 23):  # the checkpoint before it is at step 6 (in the pilot) or 21 (the proposals fixed)
        def stop(batch, step, kill=kill):
            if batch == 1 and step == kill:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            invert_dataset(_config(tiny_latent, image_tree, **kw), tmp_path / f"run{kill}", progress=False, on_step=stop)
        resumed = []
        invert_dataset(_config(tiny_latent, image_tree, **kw), tmp_path / f"run{kill}", resume=True, progress=False,
                       on_step=lambda batch, step, log=resumed: log.append((batch, step)))
        assert resumed[0] == (1, kill - 1)
        _same_store(tmp_path / "ref", tmp_path / f"run{kill}")
    invert_dataset(_config(tiny_latent, image_tree, **{**kw, "timesteps": "stratified"}), tmp_path / "other", progress=False)
    assert not torch.allclose(EmbeddingStore.open(tmp_path / "other").embeddings, EmbeddingStore.open(tmp_path / "ref").embeddings)


def test_text_start_is_the_class_prompts_last_k_tokens_through_the_models_encoder(tmp_path, image_tree):
    model = save_tiny_model(tmp_path / "t2i", "latent", with_text_encoder=True)
    backbone = load_backbone(model, with_text_encoder=True)
    starts = backbone.encode_prompt_tokens(["a photo of a cat", "a photo of a dog"], 5)
    assert starts.shape == (2, 5, backbone.cond_dim)
    tokens = backbone.tokenizer(["a photo of a cat"], padding="max_length", max_length=backbone.tokenizer.model_max_length,
                                return_tensors="pt")
    full = backbone.text_encoder(tokens.input_ids)[0]
    end = int(tokens.attention_mask.sum())  # the prompt's tokens, its end token included
    torch.testing.assert_close(starts[0], full[0, end - 5:end].float())
    assert not torch.allclose(starts[0], starts[1])  # the class name changes the start

    # From the CLI: every image starts from its class's prompt tokens (0 steps' worth: the store's initial loss is theirs).
    config = _config(model, image_tree, init="text", steps=1, eval_timesteps=2)
    invert_dataset(config, tmp_path / "store", progress=False)
    rows = EmbeddingStore.open(tmp_path / "store").rows
    cats = [r["loss_init"] for r in rows if r["class"] == "cat"]
    assert len(set(round(x, 6) for x in cats)) == len(cats)  # own images, own losses ...
    keys = rng.keys_tensor(0, [r["id"] for r in rows])
    pixels = load_pixels(select(open_images(str(image_tree)), None, 0), 16)
    clean = load_backbone(model).encode(pixels).mean
    expected = evaluation_loss(load_backbone(model), clean, starts[torch.tensor([r["label"] for r in rows])], keys, 2)
    assert [r["loss_init"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-4)  # ... from the class's tokens


def test_adamw_rows_is_torch_adamw_for_each_row_at_its_own_step():
    torch.manual_seed(0)
    start, grads, lrs = torch.randn(2, 5, 33), torch.randn(6, 2, 5, 33), (torch.rand(2) * 0.1).tolist()
    # Row 0 is updated at iterations 0-5, row 1 joins at iteration 2 (a refilled slot): its own steps 1-4.
    param, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for it in range(6):
        rows = [0, 1] if it >= 2 else [0]
        step = [[it + 1, it - 1][r] for r in rows]
        param[rows], m[rows], v[rows] = adamw_rows(param[rows], grads[it][rows], m[rows], v[rows], step,
                                                   [lrs[r] for r in rows], 1e-2)
    for row, first in ((0, 0), (1, 2)):
        p = torch.nn.Parameter(start[row].clone())
        opt = torch.optim.AdamW([p], lr=0.1, weight_decay=1e-2)
        for it in range(first, 6):
            p.grad = grads[it][row].clone()
            opt.param_groups[0]["lr"] = lrs[row]
            opt.step()
        assert torch.equal(param[row], p.detach())  # bit for bit: the one loop keeps torch's AdamW results


def _refill_schedule(steps: list[int], slots: int) -> list[int]:
    """Rows per training call when images needing ``steps`` each move through ``slots`` in order."""
    waiting, active, sizes = list(range(len(steps))), {}, []
    while waiting or active:
        while waiting and len(active) < slots:
            i = waiting.pop(0)
            active[i] = steps[i]
        sizes.append(len(active))
        active = {i: left - 1 for i, left in active.items() if left > 1}
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("timesteps", ["stratified", "importance"])
def test_early_stopped_images_leave_the_batch_and_equal_running_alone(trained_pixel, timesteps):
    backbone, images, pixels = trained_pixel
    keys = rng.keys_tensor(0, images.ids)
    config = InversionSettings(steps=60, lr=0.1, warmup=0, early_stop=0.02, check_every=5, log_every=5, timesteps=timesteps)
    sizes, predict = [], backbone.predict

    def spy(x, t, cond, **kw):
        if torch.is_grad_enabled():  # a training step (the checks run without gradients)
            sizes.append(len(x))
        return predict(x, t, cond, **kw)

    backbone.predict = spy
    try:
        pooled = invert_batch(backbone, pixels, keys, config, slots=4)
    finally:
        backbone.predict = predict
    assert min(pooled.steps) < config.steps and len(set(pooled.steps)) > 2  # images stopped at different steps
    assert all(s % config.check_every == 0 for s in pooled.steps)
    # A finished image leaves at once and the next takes its slot: the calls' sizes are exactly the refill schedule.
    assert sizes == _refill_schedule(pooled.steps, 4) and sizes[0] == 4
    plain = invert_batch(backbone, pixels, keys, replace(config, early_stop=0.0), slots=4)
    assert pooled.loss_final.mean() > plain.loss_final.mean()  # stopping early does cost loss: the rule is not a no-op
    for i in range(len(keys)):
        alone = invert_batch(backbone, pixels[i : i + 1], keys[i : i + 1], config, slots=1)
        assert alone.steps == [pooled.steps[i]]
        torch.testing.assert_close(alone.embeddings[0], pooled.embeddings[i], rtol=1e-4, atol=1e-5)
        assert float(alone.loss_final[0]) == pytest.approx(float(pooled.loss_final[i]), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("timesteps", ["stratified", "importance"])
def test_early_stop_pool_resumes_exactly_and_records_steps(trained_pixel, tmp_path, timesteps):
    backbone, images, pixels = trained_pixel
    model = save_tiny_model(tmp_path / "model", "pixel", sample_size=8)
    backbone.unet.save_pretrained(Path(model) / "unet")  # the memorising weights, loadable by the stage
    kw = dict(resolution=8, steps=40, lr=0.1, warmup=0, early_stop=0.02, check_every=5, batch_size=3, checkpoint_every=4,
              per_class=1, latent="mean", timesteps=timesteps)
    ref = invert_dataset(_config(model, "digits", **kw), tmp_path / "ref", progress=False)

    def stop(batch, iteration):
        if iteration == 10:  # after the checkpoint at iteration 8, with images finished, running and waiting
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_dataset(_config(model, "digits", **kw), tmp_path / "run", progress=False, on_step=stop)
    resumed = []
    invert_dataset(_config(model, "digits", **kw), tmp_path / "run", resume=True, progress=False,
                   on_step=lambda batch, iteration: resumed.append(iteration))
    assert resumed[0] == 9
    _same_store(ref, tmp_path / "run")
    steps = [r["steps"] for r in EmbeddingStore.open(ref).rows]
    assert min(steps) < 40 and len(set(steps)) > 1


def test_class_start_begins_each_image_at_its_class_conditioning(tiny_latent, tiny_pixel, image_tree, tmp_path):
    invert_dataset(_config(tiny_latent, image_tree, target="class"), tmp_path / "classes", progress=False)
    classes = EmbeddingStore.open(tmp_path / "classes")
    # One step at a vanishing lr: each image's conditioning is still its start.
    start = dict(init="class", init_store=str(tmp_path / "classes"), steps=1, lr=1e-12, warmup=0)
    invert_dataset(_config(tiny_latent, image_tree, **start), tmp_path / "per-image", progress=False)
    images = EmbeddingStore.open(tmp_path / "per-image")
    expected = classes.embeddings[[classes.ids.index("class:" + images.classes[int(label)]) for label in images.labels]]
    torch.testing.assert_close(images.embeddings, expected, atol=1e-6, rtol=0)
    assert len(set(images.labels.tolist())) == 2 and not torch.allclose(expected[0], expected[-1])
    with pytest.raises(StoreError, match="--target class"):  # a per-image store is not a class start
        invert_dataset(_config(tiny_latent, image_tree, **{**start, "init_store": str(tmp_path / "per-image")}), tmp_path / "x",
                       progress=False)
    with pytest.raises(StoreError, match="another model"):
        invert_dataset(_config(tiny_pixel, image_tree, **start, latent="mean"), tmp_path / "y", progress=False)
    with pytest.raises(ConfigError, match="--init-store"):
        _config(tiny_latent, image_tree, init="class")
