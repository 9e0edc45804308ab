"""Flux.1 (dev, schnell): a 12 B transformer (diffusers' ``FluxTransformer2DModel``, held in the
components' denoiser slot) trained by flow matching, conditioned on T5-XXL's hidden states and
CLIP-L's pooled output; 16-channel VAE latents shifted and scaled, given to the transformer as a
sequence of 2x2 patches with their positions (``img_ids``); dev also takes the guidance value it
was distilled with. 1024 px.

What the loop sees stays the SD interface: latents in (batch, channels, h, w), a Conditioning,
``predict`` returning the velocity in that layout (packed here, unpacked here). T5 is never
trained (too large to be worth it, and no trainer does); CLIP-L may be (the first encoder).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dreambooth.common.errors import FieldError
from dreambooth.models.families.base import Conditioning, Family
from dreambooth.models.objective import FlowMatchObjective

FLUX_BLOCKS = 57  # Flux.1's transformer: 19 double-stream and 38 single-stream blocks
CLIP_TOKENS = 77  # CLIP-L reads one 77-token chunk for its pooled output, as FluxPipeline does


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) latents → (b, h/2 · w/2, c · 4) tokens: each 2x2 patch one token, row by row,
    as BFL's reference and diffusers' FluxPipeline lay them out."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``h`` x ``w``."""
    b, _, features = tokens.shape
    c = features // 4
    patches = tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Each token's position for the rotary embedding: (0, row, column) of its 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


@dataclasses.dataclass(frozen=True)
class Flux(Family):
    """Flux.1, with this run's settings (``configured``): the guidance value dev is given, the
    T5 token count, how noise levels are drawn."""

    guidance: float = 1.0
    t5_max_length: int = 512
    timestep_sampling: str = "shift"

    name = "flux"
    title = "Flux.1"
    kinds = ("flux-dev", "flux-schnell")
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP-L, T5-XXL
    tokenizers = ("tokenizer", "tokenizer_2")
    encoder_titles = {"text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL"}
    default_prediction = "flow"  # the velocity of the flow, not epsilon or v
    base_8bit = "fp8"  # as kohya's --fp8_base and Forge's fp8 files; no bitsandbytes needed
    trainable_text_encoders = 1  # CLIP-L only: T5 stays frozen (and cached)
    negative_prompts = False  # guidance-distilled: no negative prompt, no CFG
    encodes_for_pipeline = True  # T5 (9.5 GB) cached: samples need not bring it back
    chunked_prompts = False  # T5 reads t5_max_length tokens; CLIP-L one chunk
    attention_processors = False  # diffusers' Flux processors already use torch's SDPA

    def default_resolution(self, prediction_type: str = "flow") -> int:
        return 1024

    def configured(self, config) -> "Flux":
        return dataclasses.replace(self, guidance=config.flux_guidance,
                                   t5_max_length=config.t5_max_length,
                                   timestep_sampling=config.flux_timestep_sampling)

    def config_problems(self, config) -> list[FieldError]:
        """What a Flux run cannot honour, by field (checked before anything is written)."""
        found = []

        def refuse(name: str, bad: bool, why: str) -> None:
            if bad:
                found.append(FieldError(name, why))

        refuse("training_method", config.training_method not in ("lora", "locon"),
               "Flux trains lora (or locon, the same on a transformer without convolutions): "
               "LoHa and LoKr cannot be fused into the q/k/v layout Forge's Flux loader reads, "
               "and full Flux checkpoints are not written yet")
        refuse("dora", config.dora, "not offered for Flux: Forge's Flux loader fuses q, k and v, "
               "whose DoRA norms cannot be split")
        refuse("min_snr_gamma", bool(config.min_snr_gamma),
               "Min-SNR weighs the DDPM objective; Flux trains by flow matching: set 0")
        refuse("zero_terminal_snr", config.zero_terminal_snr,
               "a DDPM schedule's option; Flux's flow ends at pure noise already: turn it off")
        refuse("prediction_type", bool(config.prediction_type),
               "Flux predicts the flow's velocity: leave it empty")
        refuse("attention", config.attention != "sdpa",
               "Flux's joint attention runs on torch's SDPA (its own diffusers processors)")
        refuse("clip_skip", config.clip_skip > 1,
               "Flux reads CLIP-L's pooled output, which CLIP skip does not change: set 1")
        refuse("class_clip_skip", config.class_clip_skip > 1,
               "Flux reads CLIP-L's pooled output, which CLIP skip does not change: set 1")
        refuse("resolution", bool(config.resolution % 16),
               "Flux packs 2x2 latent patches: a multiple of 16 (e.g. 512, 768, 1024)")
        swap = config.blocks_to_swap
        refuse("blocks_to_swap", swap and not config.gradient_checkpointing,
               "swapped blocks are recomputed in the backward: turn on gradient_checkpointing")
        refuse("blocks_to_swap", swap and config.compile_unet,
               "a compiled transformer cannot have its blocks swapped: turn compile_unet off")
        refuse("blocks_to_swap", swap > FLUX_BLOCKS - 2,
               f"Flux.1 has {FLUX_BLOCKS} blocks (19 double, 38 single) and keeps one of each "
               f"kind on the GPU: at most {FLUX_BLOCKS - 2} can be swapped")
        return found

    def swap_blocks(self, denoiser) -> list[list[torch.nn.Module]]:
        """The double-stream blocks, then the single-stream ones: two chains."""
        return [list(denoiser.transformer_blocks), list(denoiser.single_transformer_blocks)]

    def notes(self, config, components=None) -> list[str]:
        said = []
        schnell = components is not None and not components.unet.config.guidance_embeds
        if schnell and config.flux_guidance != 1.0:
            said.append("Flux.1 schnell has no guidance input: flux_guidance does not apply")
        if config.sample_negative_prompt.strip() or any(
                c.class_negative_prompt.strip() for c in config.concepts):
            said.append("Flux.1 is guidance-distilled: the negative prompts are not used for "
                        "samples or class pictures")
        if config.train_text_encoder:
            said.append("Flux: CLIP-L trains with the text encoder settings; T5-XXL stays "
                        "frozen (text_encoder_2_lr and text_encoder_2_stop do not apply)")
        if config.training_method == "locon":
            said.append("Flux's transformer has no convolutions: locon adapts the same linear "
                        "layers as lora and writes a LoRA file (lora_conv_rank does not apply)")
        return said

    def frozen_part(self, components, prompts: list[str], device) -> Conditioning:
        """T5's last hidden state over ``t5_max_length`` tokens (padded, truncated)."""
        ids = components.tokenizer_2(prompts, padding="max_length", max_length=self.t5_max_length,
                                     truncation=True, return_tensors="pt").input_ids
        return Conditioning(components.text_encoder_2(ids.to(device),
                                                      output_hidden_states=False)[0])

    def encode(self, components, prompts: list[str], clip_skip: int, device,
               frozen: Conditioning | None = None) -> Conditioning:
        """As diffusers' FluxPipeline.encode_prompt: T5's hidden states (``frozen``'s when
        cached) and CLIP-L's pooled output of one 77-token chunk."""
        clip_ids = components.tokenizer(prompts, padding="max_length", max_length=CLIP_TOKENS,
                                        truncation=True, return_tensors="pt").input_ids
        pooled = components.text_encoder(clip_ids.to(device), output_hidden_states=False)
        if frozen is None:
            with torch.no_grad():  # T5 never trains: no graph through its 4.7 B weights
                frozen = self.frozen_part(components, prompts, device)
        return Conditioning(frozen.hidden, pooled.pooler_output)

    def objective(self, scheduler, prediction_type: str, config) -> FlowMatchObjective:
        return FlowMatchObjective(scheduler, self.timestep_sampling, offset=config.offset_noise)

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, picture_conditioning: torch.Tensor | None
                ) -> torch.Tensor:
        """The velocity for a batch: the latents packed, positions given (text tokens at 0),
        the noise level as it is, dev's guidance value; unpacked to the latents' layout."""
        h, w = noisy.shape[-2:]
        hidden = conditioning.hidden
        model = getattr(denoiser, "module", denoiser)  # under DDP, the model's config
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((noisy.shape[0],), self.guidance, device=noisy.device)
        out = denoiser(hidden_states=pack(noisy), encoder_hidden_states=hidden,
                       pooled_projections=conditioning.pooled.to(hidden.dtype),
                       timestep=timesteps.to(noisy.dtype), guidance=guidance,
                       img_ids=image_ids(h, w, noisy.device, noisy.dtype),
                       txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device,
                                           dtype=noisy.dtype),
                       return_dict=False)[0]
        return unpack(out, h, w)

    def pipeline(self, components, scheduler) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=scheduler, vae=components.vae,
                            text_encoder=components.text_encoder,
                            tokenizer=components.tokenizer,
                            text_encoder_2=components.text_encoder_2,
                            tokenizer_2=components.tokenizer_2, transformer=components.unet)

    def prompt_inputs(self, conditioning: Conditioning) -> dict[str, Any]:
        """FluxPipeline's keywords for encoded prompts: T5's states and CLIP-L's pooled output."""
        return {"prompt_embeds": conditioning.hidden,
                "pooled_prompt_embeds": conditioning.pooled.to(conditioning.hidden.dtype)}

    def pipeline_kwargs(self, config) -> dict[str, Any]:
        return {"max_sequence_length": self.t5_max_length}

    def adapter_file_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our adapter's tensors under kohya's Flux names on BFL's fused layout, which Forge,
        Forge Neo, ComfyUI and diffusers' kohya loader apply."""
        from dreambooth.models.flux_layout import lora_to_kohya_flux

        return lora_to_kohya_flux(tensors)
