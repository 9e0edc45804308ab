"""A Flux.1-shaped model built in code, for tests and the demo (as :mod:`dreambooth.models.tiny`
is for Stable Diffusion).

Every part has Flux.1's architecture at toy widths: diffusers' ``FluxTransformer2DModel`` (double-
and single-stream blocks, 2x2-packed 16-channel latents, RoPE over three axes, the guidance
embedding for dev and none for schnell), a 16-channel VAE without quant convolutions that works
at 1/8 of the picture and carries Flux's scale and shift, a CLIP-L-shaped text encoder with the
real CLIP tokenizer rebuilt offline, a T5 v1.1-shaped encoder (gated GELU, relative attention)
with the small T5-style tokenizer of :mod:`dreambooth.models.t5_tokenizer`, and the flow-matching
scheduler of the real repositories. Same seed, same weights; the global torch RNG is left as it
was. Nothing is downloaded.

The configs are the ones :mod:`dreambooth.models.flux_files` derives back from the tensor shapes
of a written file (its tests check that), so the tiny model round-trips through Forge's files.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dreambooth.models.components import Components

FLUX_VARIANTS = ("dev", "schnell")

# The scheduler configs of black-forest-labs/FLUX.1-dev and FLUX.1-schnell (scheduler/
# scheduler_config.json): dev shifts the sigmas by the picture's token count, schnell does not.
FLUX_SCHEDULE = dict(num_train_timesteps=1000, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SHIFT = {"dev": dict(shift=3.0, use_dynamic_shifting=True),
              "schnell": dict(shift=1.0, use_dynamic_shifting=False)}

# What no weight stores, shared by the tiny configs and those flux_files derives from shapes:
# Flux.1's VAE latent scale and shift (ae.safetensors' scale_factor / shift_factor) ...
FLUX_VAE_FIXED = dict(in_channels=3, out_channels=3, scaling_factor=0.3611, shift_factor=0.1159,
                      use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
# ... CLIP-L's token ids and activation (openai/clip-vit-large-patch14; as tiny.text_config) ...
CLIP_FIXED = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                  hidden_act="quick_gelu")
# ... and T5 v1.1 / T5-XXL's: gated GELU (Flux's text_encoder_2/config.json names its activation
# gelu_pytorch_tanh, the same tanh approximation as "gated-gelu"'s gelu_new, fused), relative
# attention over 128 positions, eps 1e-6, pad 0 / eos 1; no dropout (T5 is never trained here).
T5_FIXED = dict(feed_forward_proj="gated-gelu", dense_act_fn="gelu_pytorch_tanh",
                relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.0,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False)


def _check_variant(variant: str) -> None:
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"variant must be one of {FLUX_VARIANTS}, not {variant!r}")


def full_size_configs(variant: str = "dev", *, depth: int = 1, single_depth: int = 2) -> dict:
    """Flux.1's real widths (FLUX.1-dev's configs: a 3072-wide transformer of 24 heads over
    T5-XXL's 4096-wide states and CLIP-L's 768-wide pooled output, its 16-channel VAE, CLIP-L)
    at ``depth`` double and ``single_depth`` single blocks (19 and 38 in Flux.1), and one T5-XXL
    layer (T5 is cached, never trained: its depth does not change a training step) over the
    tiny T5 vocabulary: the bench's model for memory and speed per block on a small machine."""
    from dreambooth.models.t5_tokenizer import VOCAB_SIZE

    _check_variant(variant)
    transformer = dict(patch_size=1, in_channels=64, num_layers=depth,
                       num_single_layers=single_depth, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=(variant == "dev"), axes_dims_rope=(16, 56, 56))
    vae = dict(FLUX_VAE_FIXED, latent_channels=16, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
               down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, mid_block_add_attention=True)
    clip = dict(CLIP_FIXED, vocab_size=49408, max_position_embeddings=77, hidden_size=768,
                intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                projection_dim=768)
    t5 = dict(T5_FIXED, vocab_size=VOCAB_SIZE, d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
              num_heads=64, relative_attention_num_buckets=32)
    return dict(transformer=transformer, vae=vae, text_encoder=clip, text_encoder_2=t5)


def flux_configs(variant: str = "dev", *, depth: int = 1, single_depth: int = 1) -> dict:
    """The tiny model's configs: ``transformer`` (FluxTransformer2DModel kwargs), ``vae``
    (AutoencoderKL), ``text_encoder`` (CLIPTextConfig), ``text_encoder_2`` (T5Config)."""
    from dreambooth.models.t5_tokenizer import VOCAB_SIZE

    _check_variant(variant)
    transformer = dict(patch_size=1, in_channels=64, num_layers=depth,
                       num_single_layers=single_depth, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                       guidance_embeds=(variant == "dev"), axes_dims_rope=(4, 6, 6))
    levels = 4  # latents at 1/8 of the picture, as Flux's VAE
    vae = dict(FLUX_VAE_FIXED, latent_channels=16, layers_per_block=1,
               block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
               down_block_types=("DownEncoderBlock2D",) * levels,
               up_block_types=("UpDecoderBlock2D",) * levels, mid_block_add_attention=True)
    clip = dict(CLIP_FIXED, vocab_size=49408, max_position_embeddings=77, hidden_size=32,
                intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                projection_dim=32)
    t5 = dict(T5_FIXED, vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2,
              num_heads=4, relative_attention_num_buckets=32)
    return dict(transformer=transformer, vae=vae, text_encoder=clip, text_encoder_2=t5)


def flux_scheduler(variant: str = "dev"):
    """diffusers' FlowMatchEulerDiscreteScheduler as the real dev / schnell repositories set it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    _check_variant(variant)
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE, **FLUX_SHIFT[variant])


def build_flux(variant: str = "dev", seed: int = 0, cache_dir: Path | None = None, *,
               depth: int = 1, single_depth: int = 1, full_size: bool = False) -> Components:
    """The tiny Flux model with random weights, the same for the same seed (and depths); with
    ``full_size`` Flux.1's real widths (:func:`full_size_configs`). The denoiser sits in the
    ``unet`` slot; CLIP-L is ``text_encoder``, T5 ``text_encoder_2``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from dreambooth.models.t5_tokenizer import load_tiny_t5_tokenizer
    from dreambooth.models.tokenizer import load_clip_tokenizer

    configs = (full_size_configs if full_size else flux_configs)(variant, depth=depth,
                                                                  single_depth=single_depth)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**configs["transformer"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**configs["vae"])
        torch.manual_seed(seed + 2)
        clip = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        torch.manual_seed(seed + 3)
        t5 = T5EncoderModel(T5Config(**configs["text_encoder_2"]))
    finally:
        torch.random.set_rng_state(generator_state)
    return Components(unet=transformer.eval(), vae=vae.eval(), text_encoder=clip.eval(),
                      tokenizer=load_clip_tokenizer(cache_dir=cache_dir),
                      noise_scheduler=flux_scheduler(variant), text_encoder_2=t5.eval(),
                      tokenizer_2=load_tiny_t5_tokenizer())


def flux_pipeline(components: Components, scheduler=None):
    """diffusers' FluxPipeline over the components (the family's sampler builds its own; this
    one is for checks and the demo)."""
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=scheduler or components.noise_scheduler, vae=components.vae,
                        text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                        text_encoder_2=components.text_encoder_2,
                        tokenizer_2=components.tokenizer_2, transformer=components.unet)
