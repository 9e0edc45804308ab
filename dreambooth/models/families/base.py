"""What a model family is to the training loop: the small interface every family implements.

The loop (``dreambooth.engine.trainer``) never asks which family it trains. It asks the family for the
text encoders to train or cache, for the conditioning of a batch of prompts (``encode``), for the
extra conditioning a picture brings (``picture_conditioning``: SDXL's size and crop), for the
training objective (``objective``: how timesteps are drawn, how noise is added and what the
target is — epsilon, v, or a flow's velocity), for the denoiser's call in the layout it takes
(``predict``: a transformer's packing lives there) and for a pipeline to make class pictures and
samples. Defaults that differ between families (resolution, what memory a run needs) live here
too. A new family (SD3, Flux...) is a new module with a new subclass; the loop does not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dreambooth.models.objective import DiffusionObjective, FlowMatchObjective

# The WebUI reads a prompt in chunks of 75 tokens (each with its start and end markers, 77 in all)
# and concatenates the chunks' hidden states; a chunk that would split near a comma ends at the
# comma instead when the comma is at most this many tokens back (its comma_padding_backtrack).
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20


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
    def stack(rows: Sequence["Conditioning"], device,
              empty: "Conditioning | None" = None) -> "Conditioning":
        """The batch of cached rows, on ``device``. Rows of fewer 77-token chunks than the
        longest are filled up with ``empty``'s chunk (the encoding of an empty chunk), as a
        batch encoded together would be."""
        longest = max(r.hidden.shape[0] for r in rows)
        hidden = []
        for row in rows:
            missing = (longest - row.hidden.shape[0]) // max(1, empty.hidden.shape[0]) if empty \
                is not None else 0
            hidden.append(torch.cat([row.hidden] + [empty.hidden] * missing) if missing
                          else row.hidden)
        hidden = torch.stack(hidden).to(device)
        pooled = (torch.stack([r.pooled for r in rows]).to(device)
                  if rows[0].pooled is not None else None)
        return Conditioning(hidden, pooled)


class Family:
    """SD1.x's behaviour; other families override what differs."""

    name = "sd1"
    title = "SD 1.x"
    kinds: tuple[str, ...] = ("sd1",)  # checkpoint kinds (dreambooth.models.detect) of this family
    # Components' attribute names of the text encoders and their tokenizers, in prompt order.
    text_encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    # What the log calls each text encoder.
    encoder_titles = {"text_encoder": "the text encoder", "text_encoder_2": "the second encoder"}
    # The stock VAE overflows in fp16 (SDXL's does): encode latents in fp32 unless the VAE chosen
    # is fp16-safe.
    vae_needs_fp32 = False
    # How ``base_weights_8bit`` keeps the frozen base's linear layers: "int8" through
    # bitsandbytes (the UNets, models/adapters/quantize.py) or "fp8" (models/adapters/fp8.py).
    base_8bit = "int8"
    # What the denoiser predicts when the checkpoint does not say (the UNets: epsilon).
    default_prediction = "epsilon"
    # How many of ``text_encoders`` may train, in prompt order (None: all); the rest stay frozen.
    trainable_text_encoders: int | None = None
    # Whether the run's ``attention`` choice sets the denoiser's processors (the UNets' do).
    attention_processors = True
    # Whether prompts are read in 75-token chunks (CLIP, as the WebUI does), not at a fixed length.
    chunked_prompts = True
    # Whether its pipeline takes a negative prompt (classifier-free guidance).
    negative_prompts = True
    # Whether samples and class pictures are made from prompts encoded beforehand (the text
    # encoders then stay off the GPU: Flux's T5 is 9.5 GB), see ``prompt_inputs``.
    encodes_for_pipeline = False
    # Whether a model of this family may be trained and sampled as rectified flow (SDXL: Neo).
    rectified_flow = False

    def configured(self, config) -> "Family":
        """The family with this run's settings (a family with options returns a copy)."""
        return self

    def config_problems(self, config) -> list:
        """FieldErrors for what a run of this family cannot honour (the UNet families: block
        swap, which needs blocks run one after another)."""
        from dreambooth.common.errors import FieldError

        found = []
        if config.blocks_to_swap:
            found.append(FieldError("blocks_to_swap", f"block swap is for transformer families "
                                    f"(Flux); {self.title} fits without it: set 0"))
        if config.prediction_type == "flow" and not self.rectified_flow:
            found.append(FieldError("prediction_type", f"rectified flow is offered for SDXL (as "
                                    f"Forge Neo samples it), not {self.title}"))
        return found

    def swap_blocks(self, denoiser) -> list[list[torch.nn.Module]]:
        """The denoiser's chains of blocks, each in the order its blocks run, for
        ``blocks_to_swap`` (none: the UNet's down, middle and up blocks are not one chain)."""
        return []

    def notes(self, config, components=None) -> list[str]:
        """What a run of this family does not use of ``config`` (with ``components``: of this
        model), said before training."""
        return []

    def pipeline_kwargs(self, config) -> dict[str, Any]:
        """Keywords of this family's pipeline call besides the prompt, size, steps and seed."""
        return {}

    def prompt_inputs(self, conditioning: Conditioning) -> dict[str, Any]:
        """The pipeline's keywords for prompts encoded by :meth:`encode` (with
        ``encodes_for_pipeline``), in place of the prompts themselves."""
        raise NotImplementedError(f"{self.title}'s pipeline encodes its own prompts")

    def adapter_file_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An adapter's tensors as its LoRA file holds them (the UNet families: as trained)."""
        return tensors

    def default_resolution(self, prediction_type: str = "epsilon") -> int:
        return 512

    def encoder_modules(self, components) -> list[tuple[str, torch.nn.Module]]:
        """(name, module) of each text encoder of ``components``."""
        return [(name, getattr(components, name)) for name in self.text_encoders]

    def frozen_part(self, components, prompts: list[str], device) -> Conditioning | None:
        """What the encoders that never train give for ``prompts`` (cached once while the others
        train, so they can leave the GPU); None when every encoder may train (SD, SDXL)."""
        return None

    def encode(self, components, prompts: list[str], clip_skip: int, device,
               frozen: Conditioning | None = None) -> Conditioning:
        """The conditioning of ``prompts`` as the WebUI makes it (see encode_clip); ``frozen``:
        :meth:`frozen_part`'s cached rows, used instead of running those encoders."""
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

    def objective(self, scheduler, prediction_type: str, config
                  ) -> DiffusionObjective | FlowMatchObjective:
        """How this family trains (:class:`dreambooth.models.objective.DiffusionObjective` for the UNet
        families), with the run's offset noise and min-SNR settings; a rectified-flow SDXL by
        flow matching, its UNet given 1000·sigma as Forge Neo's flow predictor gives it."""
        if prediction_type == "flow":
            return FlowMatchObjective(scheduler, config.flux_timestep_sampling,
                                      offset=config.offset_noise, timestep_scale=1000.0)
        return DiffusionObjective(scheduler, prediction_type, offset=config.offset_noise,
                                  min_snr_gamma=config.min_snr_gamma,
                                  min_snr_on_prior=config.min_snr_on_prior)

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, picture_conditioning: torch.Tensor | None
                ) -> torch.Tensor:
        """The denoiser's prediction for a batch, in the latents' own layout (batch, channels,
        h, w), which the loss compares with the target. The UNet takes that layout as it is; a
        denoiser that takes another (a transformer's 2x2 patches as tokens) is given its layout
        here and its prediction put back, so targets and masks stay in one layout."""
        return denoiser(noisy, timesteps, **self.unet_inputs(conditioning,
                                                              picture_conditioning)).sample

    def pipeline(self, components, scheduler) -> Any:
        """A diffusers text-to-image pipeline over ``components`` (class pictures, samples)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder,
            tokenizer=components.tokenizer, unet=components.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def memory_estimate(self, **settings) -> dict[str, float]:
        """A rough GPU figure of a run of this family, GB by category and "total"
        (:func:`dreambooth.models.memory_estimate.estimate`; ``settings`` are its keywords)."""
        from dreambooth.models.memory_estimate import estimate

        return estimate(self.name, **settings)


def _chunks(tokens: list[int], comma: int | None) -> list[list[int]]:
    """A prompt's tokens in chunks of at most 75, cut after a comma when one is near the end."""
    chunks, current = [], []
    for token in tokens:
        current.append(token)
        if len(current) == CHUNK_TOKENS:
            cut = next((i for i in range(len(current) - 1, len(current) - 1 - COMMA_BACKTRACK, -1)
                        if comma is not None and current[i] == comma), None)
            if cut is not None and cut < len(current) - 1:
                chunks.append(current[:cut + 1])
                current = current[cut + 1:]
            else:
                chunks.append(current)
                current = []
    if current or not chunks:
        chunks.append(current)
    return chunks


def prompt_chunks(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (batch, chunks, 77): each prompt in chunks of 75 as the WebUI reads it, each
    chunk with its start and end markers and padded; every prompt of the batch gets as many
    chunks as the longest (the others end in empty chunks). A prompt of up to 75 tokens is one
    chunk, exactly what the tokenizer gives with padding to 77 and truncation."""
    comma = tokenizer.get_vocab().get(",</w>")
    split = [_chunks(tokenizer(p, add_special_tokens=False, verbose=False).input_ids, comma) for p in prompts]
    count = max(len(c) for c in split)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for chunks in split:
        chunks = chunks + [[]] * (count - len(chunks))
        rows.append([[bos] + c + [eos] + [pad] * (CHUNK_TOKENS - len(c)) for c in chunks])
    return torch.tensor(rows, dtype=torch.long)


def chunk_count(tokenizer, prompt: str) -> int:
    """How many chunks of 75 tokens the WebUI reads ``prompt`` in."""
    return prompt_chunks(tokenizer, [prompt]).shape[1]


def encode_clip(text_encoder, tokenizer, prompts: list[str], clip_skip: int,
                device) -> torch.Tensor:
    """CLIP embeddings as the WebUI makes them for SD1.x/2.x: with clip_skip > 1, the hidden
    state that many layers from the end, passed through the final layer norm; a prompt longer
    than 75 tokens in chunks of 75 whose hidden states are concatenated."""
    ids = prompt_chunks(tokenizer, prompts).to(device)
    model = getattr(text_encoder, "module", text_encoder)  # under DDP, the model inside
    hidden = []
    for chunk in range(ids.shape[1]):
        if clip_skip <= 1:
            hidden.append(text_encoder(ids[:, chunk])[0])
            continue
        out = text_encoder(ids[:, chunk], output_hidden_states=True)
        hidden.append(model.text_model.final_layer_norm(out.hidden_states[-clip_skip]))
    return torch.cat(hidden, dim=1)
