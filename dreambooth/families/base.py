"""What a model family is to the training loop: the small interface every family implements.

The loop (``dreambooth.trainer``) never asks which family it trains. It asks the family for the
text encoders to train or cache, for the conditioning of a batch of prompts (``encode``), for the
extra conditioning a picture brings (``picture_conditioning``: SDXL's size and crop), for the
UNet's keyword arguments (``unet_inputs``) and for a pipeline to make class pictures and samples.
Defaults that differ between families (resolution, what memory a run needs) live here too. A new
family (SD3, Flux...) is a new module with a new subclass; the loop does not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts: the text encoders' hidden states
    (``encoder_hidden_states``) and, for families that have one, a pooled text embedding."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self) -> list["Conditioning"]:
        """One Conditioning per prompt (what the text-embedding cache keeps), on the CPU."""
        pooled = self.pooled if self.pooled is not None else [None] * len(self.hidden)
        return [Conditioning(h.cpu(), None if p is None else p.cpu())
                for h, p in zip(self.hidden, pooled)]

    @staticmethod
    def stack(rows: Sequence["Conditioning"], device) -> "Conditioning":
        """The batch of cached rows, on ``device``."""
        hidden = torch.stack([r.hidden for r in rows]).to(device)
        pooled = (torch.stack([r.pooled for r in rows]).to(device)
                  if rows[0].pooled is not None else None)
        return Conditioning(hidden, pooled)


class Family:
    """SD1.x's behaviour; other families override what differs."""

    name = "sd1"
    title = "SD 1.x"
    kinds: tuple[str, ...] = ("sd1",)  # checkpoint kinds (dreambooth.detect) of this family
    # Components' attribute names of the text encoders and their tokenizers, in prompt order.
    text_encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    # The stock VAE overflows in fp16 (SDXL's does): encode latents in fp32 unless the VAE chosen
    # is fp16-safe.
    vae_needs_fp32 = False
    # Rough GPU memory of a full UNet run at the default resolution, batch 1, fp16, 8-bit AdamW,
    # gradient checkpointing (GB), and what training the text encoder(s) adds.
    memory_gb = 7.5
    text_encoder_memory_gb = 1.5

    def default_resolution(self, prediction_type: str = "epsilon") -> int:
        return 512

    def encoder_modules(self, components) -> list[tuple[str, torch.nn.Module]]:
        """(name, module) of each text encoder of ``components``."""
        return [(name, getattr(components, name)) for name in self.text_encoders]

    def encode(self, components, prompts: list[str], clip_skip: int, device) -> Conditioning:
        """The conditioning of ``prompts`` as the WebUI makes it (see encode_clip)."""
        return Conditioning(encode_clip(components.text_encoder, components.tokenizer, prompts,
                                        clip_skip, device))

    def picture_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                             target_size: tuple[int, int]) -> torch.Tensor | None:
        """What a picture adds to the conditioning besides its prompt; None for SD1.x/2.x.
        Sizes and the crop are (height, width) / (top, left) in pixels."""
        return None

    def unet_inputs(self, conditioning: Conditioning,
                    picture_conditioning: torch.Tensor | None) -> dict[str, Any]:
        """Keyword arguments of the UNet's forward besides the noisy latents and timesteps."""
        return {"encoder_hidden_states": conditioning.hidden}

    def pipeline(self, components, scheduler) -> Any:
        """A diffusers text-to-image pipeline over ``components`` (class pictures, samples)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder,
            tokenizer=components.tokenizer, unet=components.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def memory_estimate_gb(self, *, train_text_encoder: bool, eight_bit: bool,
                           gradient_checkpointing: bool, half: bool, resolution: int,
                           batch: int, prediction_type: str = "epsilon") -> float:
        """A rough GPU figure for a full run (benchmarks measure the real one)."""
        gb = self.memory_gb
        gb += 0 if eight_bit else self.memory_gb / 3
        gb += self.text_encoder_memory_gb if train_text_encoder else 0
        gb += 0 if gradient_checkpointing else self.memory_gb / 2
        gb += 0 if half else self.memory_gb / 2.5
        scale = max(resolution / self.default_resolution(prediction_type), 0.5) ** 2
        return gb * scale * (1 + 0.35 * (batch - 1))


def encode_clip(text_encoder, tokenizer, prompts: list[str], clip_skip: int,
                device) -> torch.Tensor:
    """CLIP embeddings as the WebUI makes them for SD1.x/2.x: with clip_skip > 1, the hidden
    state that many layers from the end, passed through the final layer norm."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    if clip_skip <= 1:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return text_encoder.text_model.final_layer_norm(hidden)
