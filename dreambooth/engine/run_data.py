"""What the loop feeds on: latents (cached or encoded per step), text conditioning (cached or
encoded per step), and the order of the batches, all derived from ``(config.seed, step)`` so a
resumed run sees the batches an uninterrupted one would."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from dreambooth import data
from dreambooth.common.config import ConfigError, FieldError, TrainingConfig
from dreambooth.common.run_types import Cancelled
from dreambooth.models import families
from dreambooth.models.families.base import CHUNK_TOKENS, chunk_count
from dreambooth.models.objective import mask_weights, posterior_latents


@dataclass
class Encoded:
    """What training needs of one picture: its latents (the VAE posterior's mean, and its std
    when latents are sampled), its mask on the latent grid (masked training), and what the
    family conditions on besides the prompt (SDXL: size and crop)."""

    mean: torch.Tensor
    std: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    conditioning: torch.Tensor | None = None


class LatentSource:
    """Latents for (picture, flip, bucket): from the cache when caching is exact, else encoded now."""

    def __init__(self, vae, config: TrainingConfig, device, dtype, family: families.Family):
        self.vae, self.config, self.device, self.dtype = vae, config, device, dtype
        self.family = family
        self.cache: dict[tuple, Encoded] | None = (
            {} if config.cache_latents and not data.has_random_augmentation(config) else None)
        self.scale = vae.config.scaling_factor
        # Flux's VAE also centres its latents (latents - shift) * scale; SD's have no shift
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.sampled = config.latents_from == "sample"

    @torch.no_grad()
    def encode(self, picture: data.Picture, flip: bool, bucket: tuple[int, int],
               rng: random.Random | None) -> Encoded:
        view = data.picture_view(picture, self.config, flip=flip, rng=rng, bucket=bucket,
                                 mask=picture.mask)
        dist = self.vae.encode(view.pixels[None].to(self.device, self.dtype)).latent_dist
        mean = ((dist.mean - self.shift) * self.scale).float().cpu()[0]
        std = (dist.std * self.scale).float().cpu()[0] if self.sampled else None
        mask = view.mask
        if mask is not None:  # the share of each latent pixel's 8 x 8 patch that is subject
            mask = F.interpolate(mask[None], size=tuple(mean.shape[-2:]), mode="area")[0]
        width, height = picture.size
        conditioning = self.family.picture_conditioning(
            (height, width), view.crop_top_left, tuple(view.pixels.shape[-2:]))
        return Encoded(mean, std, mask, conditioning)

    def fill_cache(self, items: list[tuple[data.Picture, bool, tuple[int, int]]],
                   should_stop: Callable[[], bool], progress: Callable[[int, int], None]) -> None:
        todo = [item for item in items if self.key(*item) not in self.cache]
        for done, (picture, flip, bucket) in enumerate(todo, 1):
            if should_stop():
                raise Cancelled
            self.cache[self.key(picture, flip, bucket)] = self.encode(picture, flip, bucket, None)
            progress(done, len(todo))

    @staticmethod
    def key(picture: data.Picture, flip: bool, bucket: tuple[int, int]) -> tuple:
        return (str(picture.path), flip, bucket)

    def get(self, picture: data.Picture, flip: bool, bucket: tuple[int, int],
            rng: random.Random) -> Encoded:
        if self.cache is not None:
            return self.cache[self.key(picture, flip, bucket)]
        return self.encode(picture, flip, bucket, rng)


def batch_inputs(encoded: list[Encoded], generator: torch.Generator, background: float,
                 device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The latents of a batch (a posterior sample when stds are kept, drawn from ``generator``),
    its per-pixel loss weights (None when no row has a mask; rows without one weigh 1) and its
    pictures' extra conditioning (None for families without)."""
    means = torch.stack([e.mean for e in encoded])
    stds = torch.stack([e.std for e in encoded]) if encoded[0].std is not None else None
    latents = posterior_latents(means, stds, generator)
    pixel_weights = None
    if any(e.mask is not None for e in encoded):
        masks = torch.stack([e.mask if e.mask is not None else torch.ones_like(means[i, :1])
                             for i, e in enumerate(encoded)])
        pixel_weights = mask_weights(masks, background).to(device)
    conditioning = (torch.stack([e.conditioning for e in encoded]).to(device)
                    if encoded[0].conditioning is not None else None)
    return latents.to(device), pixel_weights, conditioning


def step_record(figures: list[float], lr: float, seconds: float, *, prior: bool,
                text_encoder_lrs: dict[str, float]) -> dict[str, float]:
    """One step's line of the training log. ``figures``: loss, instance loss, prior loss and,
    when clipping computed it, the gradient norm; ``lr``: the UNet's lr the step used;
    ``text_encoder_lrs``: the lr of each text encoder that trained in the step, by name."""
    record = {"loss": figures[0], "lr": lr, "step_seconds": round(seconds, 4)}
    if prior:
        record.update(loss_instance=figures[1], loss_prior=figures[2])
    for name, value in text_encoder_lrs.items():
        record[f"lr_{name}"] = value
    if len(figures) > 3:
        record["grad_norm"] = figures[3]
    return record


def epoch_batches(instances: list[data.Picture], config: TrainingConfig, epoch: int,
                  rank: int = 0, world: int = 1) -> list[list[int]]:
    batches = data.bucket_batches(instances, config.train_batch_size,
                                  random.Random(f"{config.seed}-epoch-{epoch}"))
    return batches[rank::world] if world > 1 else batches


def micro_batches(instances: list[data.Picture], config: TrainingConfig, start_micro: int,
                  rank: int = 0, world: int = 1) -> Iterator[tuple[int, list[int]]]:
    """(micro step number, picture indices) from start_micro on, epoch after epoch."""
    micro, epoch = 0, 0
    while True:
        batches = epoch_batches(instances, config, epoch, rank, world)
        if not batches:
            raise ConfigError([FieldError("train_batch_size",
                                          "no batch can be formed from the pictures")])
        for batch in batches:
            if micro >= start_micro:
                yield micro, batch
            micro += 1
        epoch += 1


def class_partner(classes: list[data.Picture], concept_index: int, micro: int,
                  slot: int) -> data.Picture:
    """A class picture of the same concept, taken round-robin so every one is used."""
    pool = [p for p in classes if p.concept_index == concept_index]
    return pool[(micro * 7 + slot) % len(pool)]


class TextConditioning:
    """The conditioning of a batch of prompts: through the trained text encoders (with
    gradients) while they train, else from a cache made once (fixed prompts: the frozen encoders
    then leave the GPU), else encoded now without gradients (tag shuffle or dropout)."""

    def __init__(self, family: families.Family, components, config: TrainingConfig, device):
        self.family, self.components, self.config, self.device = family, components, config, device
        self.cache: dict[str, families.Conditioning] | None = None
        self.empty_chunk: families.Conditioning | None = None
        # while an encoder trains: the never-trained encoders' rows (Flux's T5), by prompt
        self.frozen_cache: dict[str, families.Conditioning] | None = None
        # the components the loop encodes with: the (wrapped) trained encoders once prepared
        self.encoding = components

    @torch.no_grad()
    def fill_cache(self, prompts: list[str]) -> int:
        """Encode each prompt once (at its own number of 75-token chunks); returns how many."""
        self.cache = {}
        unique = list(dict.fromkeys(prompts))
        tokens = CHUNK_TOKENS + 2
        chunks = {p: chunk_count(self.components.tokenizer, p) if self.family.chunked_prompts
                  else None for p in unique}  # Flux: T5's fixed length, no chunks
        for i in range(0, len(unique), 16):
            batch = unique[i:i + 16]
            rows = self.family.encode(self.components, batch, self.config.clip_skip,
                                      self.device).rows()
            for prompt, row in zip(batch, rows):
                if chunks[prompt]:
                    row.hidden = row.hidden[:chunks[prompt] * tokens]
                self.cache[prompt] = row
        # an empty chunk fills up the shorter prompts of a batch with a long one
        if max(c or 1 for c in chunks.values()) > 1:
            self.empty_chunk = self.family.encode(self.components, [""], self.config.clip_skip,
                                                  self.device).rows()[0]
        return len(self.cache)

    @torch.no_grad()
    def fill_frozen_cache(self, prompts: list[str]) -> int:
        """While an encoder trains: the never-trained encoders' part of each prompt, once
        (0 when the family has none)."""
        unique, cache = list(dict.fromkeys(prompts)), {}
        for i in range(0, len(unique), 16):
            batch = unique[i:i + 16]
            part = self.family.frozen_part(self.components, batch, self.device)
            if part is None:  # every encoder of this family may train: nothing to cache
                return 0
            cache.update(zip(batch, part.rows()))
        self.frozen_cache = cache
        return len(cache)

    def __call__(self, prompts: list[str], training_encoders: bool) -> families.Conditioning:
        if self.cache is not None and not training_encoders:
            return families.Conditioning.stack([self.cache[p] for p in prompts], self.device,
                                               empty=self.empty_chunk)
        # the never-trained encoders' rows when cached (they left the GPU), also once the
        # trained encoder has stopped
        cached = {} if self.frozen_cache is None else {"frozen": families.Conditioning.stack(
            [self.frozen_cache[p] for p in prompts], self.device)}
        with torch.set_grad_enabled(training_encoders and torch.is_grad_enabled()):
            return self.family.encode(self.encoding, prompts, self.config.clip_skip, self.device,
                                      **cached)