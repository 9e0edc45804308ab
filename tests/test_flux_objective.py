"""Flux's flow-matching objective and the family's layout, pinned to the published formulas and to
diffusers' own Flux scheduler and pipeline (the real parts)."""
from __future__ import annotations

import math

import pytest
import torch

from dreambooth.common.config import ConfigError, TrainingConfig
from dreambooth.models.families import for_kind
from dreambooth.models.families.flux import image_ids, pack, unpack
from dreambooth.models.objective import FlowMatchObjective, shift_mu, shifted_sigmas


def dev_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def schnell_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0,
                                           use_dynamic_shifting=False)


def test_the_noisy_input_is_the_straight_line_and_the_target_its_velocity():
    objective = FlowMatchObjective(dev_scheduler())
    latents, noise = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy, target = objective.noisy_and_target(latents, noise, sigmas)
    assert torch.equal(noisy[0], latents[0]) and torch.equal(noisy[2], noise[2])
    assert torch.allclose(noisy[1], 0.75 * latents[1] + 0.25 * noise[1])
    assert torch.equal(target, noise - latents)
    # one Euler step of the sampler along the target lands on the line's other point
    step = noisy[1] + (0.0 - 0.25) * target[1]
    assert torch.allclose(step, latents[1], atol=1e-6)
    assert objective.row_weights(sigmas, n_instance=3) is None


def test_the_shift_is_the_one_diffusers_flux_scheduler_samples_with():
    scheduler = dev_scheduler()
    t = torch.linspace(0.05, 0.95, 7)
    for tokens in (256, 1024, 4096):
        mu = shift_mu(tokens)
        assert torch.allclose(shifted_sigmas(t, mu=mu), scheduler.time_shift(mu, 1.0, t))
    assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)
    assert torch.allclose(shifted_sigmas(t, shift=3.0), 3 * t / (1 + 2 * t))


def draws(sampling: str, scheduler, hw: tuple[int, int], n: int = 4000) -> torch.Tensor:
    """``n`` noise levels as ``draw`` makes them for latents of ``hw`` (its own normal or
    uniform draws through ``sigmas``; without the 4000 latents' noise it also draws)."""
    objective = FlowMatchObjective(scheduler, sampling)
    generator = torch.Generator().manual_seed(0)
    raw = (torch.rand(n, generator=generator) if sampling == "uniform"
           else torch.randn(n, generator=generator))
    assert torch.equal(objective.draw((2, 16, *hw), torch.Generator().manual_seed(0), "cpu")[1],
                       objective.sigmas(draws_after_noise(sampling, hw), hw).float())
    return objective.sigmas(raw, hw)


def draws_after_noise(sampling: str, hw: tuple[int, int]) -> torch.Tensor:
    """The two raw draws ``draw`` takes for a batch of 2 after its noise (same generator)."""
    generator = torch.Generator().manual_seed(0)
    torch.randn((2, 16, *hw), generator=generator)
    return (torch.rand(2, generator=generator) if sampling == "uniform"
            else torch.randn(2, generator=generator))


def test_each_timestep_sampling_draws_as_it_says():
    small = draws("shift", dev_scheduler(), (64, 64))  # 512 px: 1024 tokens
    large = draws("shift", dev_scheduler(), (128, 128))  # 1024 px: 4096 tokens
    plain = draws("sigmoid", dev_scheduler(), (128, 128))
    uniform = draws("uniform", dev_scheduler(), (128, 128))
    for sigmas in (small, large, plain, uniform):
        assert sigmas.min() >= 0 and sigmas.max() <= 1
    assert plain.mean() == pytest.approx(0.5, abs=0.02)  # logit-normal(0, 1): centred
    assert uniform.std() == pytest.approx(1 / math.sqrt(12), abs=0.01)
    # a larger picture is shifted further towards noise, as Flux dev samples it
    assert plain.mean() < small.mean() < large.mean()
    # schnell's schedule has no shift: "shift" is the plain logit-normal there
    assert torch.equal(draws("shift", schnell_scheduler(), (128, 128)), plain)


def test_the_draw_depends_on_the_generator_alone():
    objective = FlowMatchObjective(dev_scheduler())
    a = objective.draw((2, 16, 8, 8), torch.Generator().manual_seed(5), "cpu")
    b = objective.draw((2, 16, 8, 8), torch.Generator().manual_seed(5), "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_packing_is_diffusers_flux_pipelines_and_unpacks_back():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    tokens = pack(latents)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack(tokens, 6, 10), latents)
    ids = image_ids(6, 10, "cpu", torch.float32)
    assert ids.shape == (15, 3) and ids[7].tolist() == [0.0, 1.0, 2.0]  # row 1, column 2


def flux_config(**changes) -> TrainingConfig:
    return TrainingConfig(base_model="x", model_name="m", **{"training_method": "lora", **changes})


@pytest.mark.parametrize("field,value", [
    ("training_method", "loha"), ("training_method", "lokr"), ("training_method", "full"),
    ("dora", True), ("min_snr_gamma", 5.0),
    ("zero_terminal_snr", True), ("prediction_type", "epsilon"), ("clip_skip", 2),
    ("class_clip_skip", 2), ("resolution", 520),
    ("attention", "xformers")])
def test_what_flux_cannot_honour_is_refused_by_field(field, value):
    problems = for_kind("flux-dev").config_problems(flux_config(**{field: value}))
    assert [p.field for p in problems] == [field]
    assert not for_kind("flux-dev").config_problems(flux_config())
    assert not for_kind("sd1").config_problems(flux_config(**{field: value}))


def test_the_family_takes_the_runs_flux_settings():
    family = for_kind("flux-dev").configured(flux_config(
        flux_guidance=3.5, t5_max_length=256, flux_timestep_sampling="uniform"))
    assert (family.guidance, family.t5_max_length, family.timestep_sampling) == (3.5, 256,
                                                                                  "uniform")
    assert family.objective(dev_scheduler(), "flow", flux_config()).sampling == "uniform"
    assert family.pipeline_kwargs(flux_config()) == {"max_sequence_length": 256}
    with pytest.raises(ConfigError, match="flux_timestep_sampling"):
        flux_config(flux_timestep_sampling="cosine").check()
    with pytest.raises(ConfigError, match="t5_max_length"):
        flux_config(t5_max_length=300).check()
