"""Noise schedules: the training one (prediction type, zero terminal SNR) and the sampler made
from it for class pictures and samples."""
from __future__ import annotations

import functools

# CFG rescale for models trained with zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise
# Schedules and Sample Steps are Flawed": 0.7), applied when sampling from such a schedule.
GUIDANCE_RESCALE = 0.7


def noise_schedule(scheduler, prediction_type: str, zero_terminal_snr: bool, *,
                   flow_shift: float = 1.0):
    """``scheduler`` (a diffusers DDPMScheduler) with this run's prediction type and, when asked,
    its betas rescaled so the last timestep is pure noise (diffusers' rescale_betas_zero_snr);
    for ``flow`` (rectified-flow SDXL) a flow schedule with ``flow_shift`` in its place."""
    if is_flow(scheduler):  # a flow's schedule has no prediction type or betas to change
        return scheduler
    if prediction_type == "flow":
        return unet_flow_scheduler_class()(
            num_train_timesteps=scheduler.config.num_train_timesteps, shift=flow_shift)
    wanted = {"prediction_type": prediction_type}
    if zero_terminal_snr:
        wanted["rescale_betas_zero_snr"] = True
    if all(scheduler.config.get(k) == v for k, v in wanted.items()):
        return scheduler
    return type(scheduler).from_config(scheduler.config, **wanted)


@functools.cache
def unet_flow_scheduler_class():
    """diffusers' FlowMatchEulerDiscreteScheduler as a UNet pipeline calls a scheduler: its
    timesteps are already what the UNet is given (1000·sigma, as Forge Neo's flow predictor
    feeds an SDXL UNet); it starts from pure noise (sigma 1) and does not scale the input.
    StableDiffusionXLPipeline asks for those two, which the flow scheduler (made for the
    transformer pipelines) lacks."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class FlowMatchUNetScheduler(FlowMatchEulerDiscreteScheduler):
        init_noise_sigma = 1.0

        def scale_model_input(self, sample, timestep=None):
            return sample

    return FlowMatchUNetScheduler


def is_flow(scheduler) -> bool:
    """A flow-matching schedule (Flux's FlowMatchEulerDiscreteScheduler), not a DDPM one."""
    return type(scheduler).__name__.startswith("FlowMatch")


def prediction_of(scheduler) -> str:
    """What a model trained on ``scheduler`` predicts: "flow" for a flow schedule."""
    return "flow" if is_flow(scheduler) else scheduler.config.get("prediction_type", "epsilon")


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
