"""The type every layer passes around: a Stable Diffusion model as diffusers/transformers objects."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Components:
    """What training needs of a Stable Diffusion model, as diffusers/transformers objects."""

    unet: "torch.nn.Module"  # the denoiser: the UNet, or Flux's transformer
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    noise_scheduler: object
    # SDXL's second text encoder (OpenCLIP bigG, with projection) and its tokenizer, Flux's T5-XXL
    # and its tokenizer; None otherwise.
    text_encoder_2: "torch.nn.Module | None" = None
    tokenizer_2: object = None

    def modules(self) -> list["torch.nn.Module"]:
        """The UNet, the VAE and every text encoder."""
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2)
                if m is not None]

    def pipeline(self, scheduler=None):
        """The family's diffusers pipeline over these components (samples and class pictures),
        sampling with DDIM over the noise schedule unless ``scheduler`` is given."""
        from dreambooth.models.families import of_components
        from dreambooth.models.schedules import sampling_scheduler

        return of_components(self).pipeline(self, scheduler or sampling_scheduler(
            self.noise_scheduler))
