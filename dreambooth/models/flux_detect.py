"""Is it Flux.1, and which: dev or schnell, its key layout and the parts it carries, from a
checkpoint's key -> shape map (a safetensors header) alone.

Kept apart from :mod:`dreambooth.models.flux_files` (reading and writing the weights) so that
:mod:`dreambooth.models.detect` can ask it without an import circle: this module imports nothing
of the package. The layouts and where each key name was checked are described in flux_files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

TRANSFORMER_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIXES = ("vae.", "first_stage_model.")

KEY_FLUX = "double_blocks.0.img_attn.norm.key_norm.scale"  # ComfyUI's and diffusers' marker
KEY_GUIDANCE = "guidance_in.in_layer.weight"
KEY_DIFFUSERS = "transformer_blocks.0.attn.norm_added_k.weight"
KEY_DIFFUSERS_GUIDANCE = "time_text_embed.guidance_embedder.linear_1.weight"
CLIP_MARK = "embeddings.token_embedding.weight"  # under text_model. (transformers 4.x)
T5_MARK = "encoder.block.0.layer.0.SelfAttention.q.weight"
VAE_MARK = "encoder.conv_in.weight"

FLUX_TITLES = {"flux-dev": "Flux.1 dev", "flux-schnell": "Flux.1 schnell"}


@dataclass(frozen=True)
class FluxFile:
    """What a Flux.1 file holds, read from its keys: the variant, the transformer's layout and
    prefix, and where the parts it carries start (None: not in the file)."""

    variant: str  # "flux-dev" or "flux-schnell"
    layout: str  # "bfl" or "diffusers"
    prefix: str  # "" or TRANSFORMER_PREFIX
    clip_root: str | None = None
    t5_root: str | None = None
    vae_root: str | None = None

    @property
    def title(self) -> str:
        return FLUX_TITLES[self.variant]

    @property
    def missing(self) -> tuple[str, ...]:
        """The parts a whole model needs that the file lacks: "clip_l", "t5xxl", "vae"."""
        return tuple(name for name, root in (("clip_l", self.clip_root), ("t5xxl", self.t5_root),
                                             ("vae", self.vae_root)) if root is None)


def find_root(shapes: Mapping[str, tuple], mark: str) -> str | None:
    """The prefix before ``mark`` in the first key ending with it (shortest first)."""
    found = sorted((k for k in shapes if k == mark or k.endswith("." + mark)), key=len)
    return found[0][: len(found[0]) - len(mark)] if found else None


def flux_file_of(shapes: Mapping[str, tuple]) -> FluxFile | None:
    """The Flux.1 layout of a file's key -> shape map, or None when it is not Flux.1."""
    for prefix in (TRANSFORMER_PREFIX, ""):
        p = prefix
        if p + KEY_FLUX in shapes and p + "vector_in.in_layer.weight" in shapes \
                and p + "img_in.weight" in shapes and p + "final_layer.linear.weight" in shapes:
            if shapes[p + "img_in.weight"][1] != shapes[p + "final_layer.linear.weight"][0]:
                return None  # Fill / Depth: extra input channels, another model
            variant = "flux-dev" if p + KEY_GUIDANCE in shapes else "flux-schnell"
            return _with_parts(FluxFile(variant, "bfl", prefix), shapes)
    if KEY_DIFFUSERS in shapes and "x_embedder.weight" in shapes and "proj_out.weight" in shapes \
            and "time_text_embed.text_embedder.linear_1.weight" in shapes:
        if shapes["x_embedder.weight"][1] != shapes["proj_out.weight"][0]:
            return None
        variant = "flux-dev" if KEY_DIFFUSERS_GUIDANCE in shapes else "flux-schnell"
        return FluxFile(variant, "diffusers", "")
    return None


def _with_parts(found: FluxFile, shapes: Mapping[str, tuple]) -> FluxFile:
    if found.prefix != TRANSFORMER_PREFIX:
        return found  # a bare BFL file holds the transformer only
    clip_root = CLIP_PREFIX + "text_model."
    clip = clip_root if clip_root + CLIP_MARK in shapes else None
    t5 = T5_PREFIX if T5_PREFIX + T5_MARK in shapes else None
    vae = next((p for p in VAE_PREFIXES if p + VAE_MARK in shapes), None)
    return FluxFile(found.variant, found.layout, found.prefix, clip, t5, vae)


def flux_variant_of(shapes: Mapping[str, tuple]) -> str | None:
    """"flux-dev", "flux-schnell", or None when the keys are not a Flux.1 transformer's."""
    found = flux_file_of(shapes)
    return found.variant if found else None
