"""The training objective, as pure functions of tensors: noise, timestep weights, the
DreamBooth loss; and :class:`DiffusionObjective`, the UNet families' way of turning clean latents
into a training example (a family hands the loop its objective, see
:meth:`dreambooth.models.families.base.Family.objective`). The loop calls these and nothing else for its
maths; tests/test_maths.py pins them (and the loop) to the published formulas."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dreambooth.common.config import FLUX_TIMESTEP_SAMPLING


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of each timestep: alpha_bar / (1 - alpha_bar)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v targets (the v loss already carries a factor SNR + 1)."""
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    # A zero-terminal-SNR schedule's last timestep has SNR 0: the weight's limit there is 1
    # (SNR below gamma weighs SNR / SNR), not 0 / 0.
    return torch.where(snr_values > 0, clipped / snr_values.clamp_min(1e-30),
                       torch.ones_like(snr_values))


def timestep_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str, *,
                     n_instance: int, on_prior: bool = True) -> torch.Tensor | None:
    """Per-row loss weights for a batch whose first ``n_instance`` rows are instance pictures:
    min-SNR-gamma weights (None when gamma is 0). With ``on_prior`` False the class rows keep
    weight 1, as diffusers' DreamBooth example computes its unweighted prior loss."""
    if not gamma:
        return None
    weights = min_snr_weights(snr_values, gamma, prediction_type)
    if not on_prior:
        weights = torch.cat([weights[:n_instance], torch.ones_like(weights[n_instance:])])
    return weights


def mask_weights(masks: torch.Tensor, background: float) -> torch.Tensor:
    """Loss weights per latent pixel from masks in [0, 1] (1 = subject): the background keeps
    ``background`` (a floor, so the model still sees what surrounds the subject)."""
    return background + (1.0 - background) * masks


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, *, n_instance: int,
                    prior_loss_weight: float, weights: torch.Tensor | None = None,
                    pixel_weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss = instance MSE + prior_loss_weight x class MSE; the first n_instance rows are instance
    pictures, the rest class pictures. ``weights`` scale each row (min-SNR); ``pixel_weights``
    (rows, 1, h, w) weight each latent pixel (masked training): a row's loss is then the weighted
    mean sum(w * err) / sum(w), so its scale does not depend on how much of the picture the
    subject covers. Returns (loss, instance loss, prior loss or None)."""
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    dims = list(range(1, error.ndim))
    if pixel_weights is None:
        per_sample = error.mean(dim=dims)
    else:
        pixel_weights = pixel_weights.float().expand_as(error)
        per_sample = ((error * pixel_weights).mean(dim=dims)
                      / pixel_weights.mean(dim=dims).clamp_min(1e-8))
    if weights is not None:
        per_sample = per_sample * weights
    instance = per_sample[:n_instance].mean()
    if n_instance == per_sample.shape[0]:
        return instance, instance, None
    prior = per_sample[n_instance:].mean()
    return instance + prior_loss_weight * prior, instance, prior


def posterior_latents(mean: torch.Tensor, std: torch.Tensor | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """The VAE latents a step trains on: the posterior mean, or (``std`` and a generator given)
    a sample mean + std x N(0, 1), as ``latent_dist.sample()`` draws it."""
    if std is None or generator is None:
        return mean
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def offset_noise(shape: tuple[int, ...], strength: float, generator: torch.Generator,
                 dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise plus a per-(sample, channel) constant: lets the model learn overall
    brightness (Guttenberg's offset noise)."""
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    if strength:
        noise = noise + strength * torch.randn(shape[:2] + (1,) * (len(shape) - 2),
                                               generator=generator, dtype=dtype)
    return noise


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for one step: randomness depends only on (seed, step), never on history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2 ** 63))


class DiffusionObjective:
    """The DDPM objective of the UNet families (SD1, SD2, SDXL): timesteps drawn uniformly over
    the schedule, the schedule's noise added, epsilon or v as the target, min-SNR-gamma row
    weights. A family trained otherwise (flow matching) hands the loop another object with the
    same methods."""

    def __init__(self, scheduler: Any, prediction_type: str, *, offset: float = 0.0,
                 min_snr_gamma: float = 0.0, min_snr_on_prior: bool = True):
        self.scheduler, self.prediction_type = scheduler, prediction_type
        self.offset, self.gamma, self.on_prior = offset, min_snr_gamma, min_snr_on_prior

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, device
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, timesteps) of a batch, from ``generator`` alone: the noise first."""
        noise = offset_noise(shape, self.offset, generator).to(device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (shape[0],),
                                  generator=generator).to(device)
        return noise, timesteps

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor,
                         timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's input and what it should predict (the noise, or v)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            return noisy, self.scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is given: the timesteps themselves."""
        return timesteps

    def fixed_levels(self, shares: list[float]) -> torch.Tensor:
        """Timesteps at these shares of the schedule (validation's fixed levels)."""
        steps = self.scheduler.config.num_train_timesteps
        return torch.tensor([int(share * steps) for share in shares], dtype=torch.long)

    def row_weights(self, timesteps: torch.Tensor, n_instance: int) -> torch.Tensor | None:
        """Per-row loss weights (min-SNR-gamma; None when off)."""
        return timestep_weights(snr(self.scheduler.alphas_cumprod, timesteps), self.gamma,
                                self.prediction_type, n_instance=n_instance,
                                on_prior=self.on_prior)


# Flux.1 dev's resolution-dependent shift (its scheduler config): mu grows linearly with the
# picture's token count, from 0.5 at 256 tokens (512 px) to 1.15 at 4096 tokens (1024 px).
FLUX_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))


def shift_mu(tokens: int, points: tuple[tuple[int, float], tuple[int, float]] = FLUX_SHIFT_POINTS
             ) -> float:
    """Flux's ``mu`` for a picture of ``tokens`` 2x2 latent patches (a line through ``points``)."""
    (x1, y1), (x2, y2) = points
    return y1 + (tokens - x1) * (y2 - y1) / (x2 - x1)


def shifted_sigmas(sigmas: torch.Tensor, *, mu: float | None = None,
                   shift: float = 1.0) -> torch.Tensor:
    """Noise levels moved towards noise: with ``mu``, Flux dev's exponential time shift
    e^mu / (e^mu + 1/s - 1); else the fixed shift s' = shift·s / (1 + (shift - 1)·s)."""
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + 1 / sigmas - 1)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatchObjective:
    """Rectified flow as Flux.1 was trained (Esser et al. 2024; BFL's reference): the noisy input
    is the straight line x_s = (1 - s)·x + s·noise between the picture's latents and noise, the
    target the velocity noise - x, the noise level s in (0, 1) drawn per row:

    - ``sigmoid``: s = sigmoid(N(0, 1)), the logit-normal of SD3's paper, most draws mid-way;
    - ``shift``: that draw shifted by the model's own schedule (Flux dev: by the picture's size,
      as it samples; schnell: no shift), what kohya's ``flux_shift`` and BFL's training do;
    - ``uniform``: s uniform in (0, 1).

    The denoiser is given s·``timestep_scale``: s itself for Flux (diffusers' Flux transformer
    scales it by 1000), 1000·s for a rectified-flow SDXL UNet (as Forge Neo's flow predictor
    gives it). No row weights: min-SNR belongs to the DDPM objective."""

    def __init__(self, scheduler: Any, sampling: str = "shift", *, offset: float = 0.0,
                 timestep_scale: float = 1.0):
        if sampling not in FLUX_TIMESTEP_SAMPLING:
            raise ValueError(f"sampling must be one of {FLUX_TIMESTEP_SAMPLING}, not {sampling!r}")
        self.scheduler, self.sampling, self.offset = scheduler, sampling, offset
        self.timestep_scale = timestep_scale

    def model_timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """What the denoiser is given for these noise levels."""
        return sigmas * self.timestep_scale if self.timestep_scale != 1.0 else sigmas

    def sigmas(self, draws: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Noise levels from N(0, 1) (sigmoid, shift) or U(0, 1) (uniform) ``draws``."""
        if self.sampling == "uniform":
            return draws
        sigmas = torch.sigmoid(draws)
        if self.sampling == "sigmoid":
            return sigmas
        config = self.scheduler.config
        if config.get("use_dynamic_shifting"):
            tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
            points = ((config.get("base_image_seq_len", 256), config.get("base_shift", 0.5)),
                      (config.get("max_image_seq_len", 4096), config.get("max_shift", 1.15)))
            return shifted_sigmas(sigmas, mu=shift_mu(tokens, points))
        return shifted_sigmas(sigmas, shift=float(config.get("shift", 1.0)))

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, device
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, noise levels) of a batch, from ``generator`` alone: the noise first."""
        noise = offset_noise(shape, self.offset, generator).to(device)
        draws = (torch.rand(shape[0], generator=generator) if self.sampling == "uniform"
                 else torch.randn(shape[0], generator=generator))
        return noise, self.sigmas(draws, tuple(shape[-2:])).float().to(device)

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor,
                         sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The point on the line from the latents to the noise, and the velocity along it."""
        s = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        return (1 - s) * latents + s * noise, noise - latents

    def fixed_levels(self, shares: list[float]) -> torch.Tensor:
        """Noise levels at these shares (a flow's level is the noise share itself)."""
        return torch.tensor(shares)

    def row_weights(self, timesteps: torch.Tensor, n_instance: int) -> torch.Tensor | None:
        return None
