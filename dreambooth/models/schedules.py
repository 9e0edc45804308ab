"""Noise schedules: the training one (prediction type, zero terminal SNR) and the sampler made
from it for class pictures and samples."""
from __future__ import annotations

# CFG rescale for models trained with zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise
# Schedules and Sample Steps are Flawed": 0.7), applied when sampling from such a schedule.
GUIDANCE_RESCALE = 0.7


def noise_schedule(scheduler, prediction_type: str, zero_terminal_snr: bool):
    """``scheduler`` (a diffusers DDPMScheduler) with this run's prediction type and, when asked,
    its betas rescaled so the last timestep is pure noise (diffusers' rescale_betas_zero_snr)."""
    if is_flow(scheduler):  # a flow's schedule has no prediction type or betas to change
        return scheduler
    wanted = {"prediction_type": prediction_type}
    if zero_terminal_snr:
        wanted["rescale_betas_zero_snr"] = True
    if all(scheduler.config.get(k) == v for k, v in wanted.items()):
        return scheduler
    return type(scheduler).from_config(scheduler.config, **wanted)


def is_flow(scheduler) -> bool:
    """A flow-matching schedule (Flux's FlowMatchEulerDiscreteScheduler), not a DDPM one."""
    return type(scheduler).__name__.startswith("FlowMatch")


def is_zero_terminal_snr(scheduler) -> bool:
    return bool(scheduler.config.get("rescale_betas_zero_snr", False))


def sampling_scheduler(noise_scheduler):
    """A flow's own Euler sampler; else DDIM over the training schedule; with zero terminal SNR its steps are spaced from the last
    timestep ("trailing"), so sampling starts from pure noise as the model was trained."""
    from diffusers import DDIMScheduler

    if is_flow(noise_scheduler):  # Flux samples with its own Euler steps (and shift)
        return type(noise_scheduler).from_config(noise_scheduler.config)
    extra = {"set_alpha_to_one": False}
    if is_zero_terminal_snr(noise_scheduler):
        extra.update(timestep_spacing="trailing", rescale_betas_zero_snr=True)
    return DDIMScheduler.from_config(noise_scheduler.config, **extra)


def guidance_rescale(scheduler) -> float:
    """The CFG rescale to sample with from ``scheduler`` (0: none)."""
    return GUIDANCE_RESCALE if is_zero_terminal_snr(scheduler) else 0.0
