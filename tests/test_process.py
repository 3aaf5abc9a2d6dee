"""The noise processes (DDPM epsilon / v, rectified flow): noising, targets and their reading back agree."""

from __future__ import annotations

import pytest
import torch

from diffinv.diffusion.process import DDPM, RectifiedFlow, flow_scheduler_config, make_process
from diffinv.diffusion.tiny import SD15_SCHEDULER


def _processes():
    ddpm = make_process(SD15_SCHEDULER)
    return [ddpm, DDPM(ddpm.config, ddpm.alphas_cumprod, "v_prediction"), make_process(flow_scheduler_config(shift=3.0))]


@pytest.mark.parametrize("process", _processes(), ids=["epsilon", "v", "flow"])
def test_a_perfect_prediction_reads_back_as_the_noise_and_the_clean_latent(process):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    x_t = process.add_noise(x0, noise, t)
    signal, spread = process.levels(t)
    torch.testing.assert_close(x_t, signal.view(-1, 1, 1, 1) * x0 + spread.view(-1, 1, 1, 1) * noise)
    eps, clean = process.split(process.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clean, x0, rtol=1e-3, atol=1e-3)
    assert bool((signal[1:] < signal[:-1]).all()) and bool((spread[1:] > spread[:-1]).all())  # noisier along t


def test_the_flow_schedule_is_diffusers_and_its_time_input_is_sigma_times_steps():
    flow = make_process(flow_scheduler_config(shift=3.0))
    assert isinstance(flow, RectifiedFlow) and flow.prediction == "flow_prediction"
    scheduler = flow.scheduler("euler")  # as made: its training schedule, before any set_timesteps
    t = torch.arange(1000).flip(0)  # diffusers' training timesteps run from the noisiest down
    torch.testing.assert_close(flow.sigma(t), scheduler.sigmas.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flow.model_time(t), scheduler.timesteps.float(), rtol=1e-5, atol=1e-3)
    assert float(flow.sigma(torch.tensor([999]))) == pytest.approx(1.0)
    torch.testing.assert_close(flow.target(torch.ones(1, 2), torch.zeros(1, 2), t[:1]), -torch.ones(1, 2))


def test_each_process_refuses_what_it_cannot_do():
    flow = make_process(flow_scheduler_config())
    with pytest.raises(ValueError, match="no rectified-flow form"):
        flow.scheduler("pndm")
    with pytest.raises(ValueError, match="clip"):
        flow.scheduler("ddim", clip_x0=True)
    with pytest.raises(ValueError, match="dynamic shifting"):
        make_process({**flow_scheduler_config(), "use_dynamic_shifting": True}).scheduler("euler")
    assert flow.stochastic("ddim") is False and make_process(SD15_SCHEDULER).stochastic("ddim") is True
    with pytest.raises(ValueError, match="not supported"):
        DDPM({}, torch.ones(3), "sample").target(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]))


def test_flow_inversion_runs_euler_backwards_exactly_for_a_straight_velocity():
    # A velocity that does not depend on x: Euler is exact, so inverting and sampling return the start.
    flow = make_process(flow_scheduler_config(shift=3.0))
    drift = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    noise = flow.invert(lambda x, t: drift, x0, steps=7)
    torch.testing.assert_close(noise, x0 + drift, rtol=1e-5, atol=1e-5)  # the sigmas run from 0 to 1 in all
    scheduler = flow.scheduler("euler")
    scheduler.set_timesteps(7)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(drift, t, x, return_dict=False)[0]
    torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)
