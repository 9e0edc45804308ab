"""SDXL and its descendants (Pony, Illustrious, NoobAI...): two text encoders (CLIP ViT-L and
OpenCLIP ViT-bigG), their penultimate hidden states concatenated and the second's pooled
projection, plus the size and crop of each picture (``add_time_ids``) as extra conditioning.
1024 px; the stock VAE overflows in fp16."""
from __future__ import annotations

from typing import Any

import torch

from dreambooth.models.families.base import Conditioning, Family, prompt_chunks


class SDXL(Family):
    name = "sdxl"
    title = "SDXL"
    kinds = ("sdxl",)
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    vae_needs_fp32 = True
    rectified_flow = True  # Forge Neo: "rectified" in the file's path (models.detect)

    def default_resolution(self, prediction_type: str = "epsilon") -> int:
        return 1024

    def encode(self, components, prompts: list[str], clip_skip: int, device,
               frozen: Conditioning | None = None) -> Conditioning:
        """As diffusers' StableDiffusionXLPipeline.encode_prompt: each encoder's hidden state
        ``clip_skip`` layers before the last (1: the penultimate, which SDXL was trained on; no
        final layer norm), concatenated, and the second encoder's pooled projection. A prompt
        longer than 75 tokens is read in chunks of 75 as the WebUI does: the chunks' hidden
        states one after the other, the pooled projection of the first chunk."""
        hidden, pooled = [], None
        for tokenizer, encoder in ((components.tokenizer, components.text_encoder),
                                   (components.tokenizer_2, components.text_encoder_2)):
            ids = prompt_chunks(tokenizer, prompts).to(device)
            chunks = []
            for chunk in range(ids.shape[1]):
                out = encoder(ids[:, chunk], output_hidden_states=True)
                chunks.append(out.hidden_states[-(max(clip_skip, 1) + 1)])
                if chunk == 0:
                    pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
            hidden.append(torch.cat(chunks, dim=1))
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def picture_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                             target_size: tuple[int, int]) -> torch.Tensor:
        """``add_time_ids``: the picture's size before resizing, the top-left corner of the crop
        in the resized picture, and the bucket, each (height, width) in pixels."""
        return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)

    def unet_inputs(self, conditioning: Conditioning,
                    picture_conditioning: torch.Tensor | None) -> dict[str, Any]:
        hidden = conditioning.hidden
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": conditioning.pooled.to(hidden.dtype),
                                      "time_ids": picture_conditioning.to(hidden.device,
                                                                          hidden.dtype)}}

    def pipeline(self, components, scheduler) -> Any:
        from diffusers import StableDiffusionXLPipeline

        # The refiner is never needed; the invisible watermark would need a package we do not add.
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2, tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2, unet=components.unet, scheduler=scheduler,
            add_watermarker=False)
