"""A Stable-Diffusion-shaped model built in code, for tests, the demo and the benchmarks.

``size="tiny"`` trains a step in a fraction of a second on the CPU; ``size="small"`` is the tiny
model with a wider text encoder (about 80 MB of fp32 weights: big enough that a leaked copy shows
in the process's memory, still quick); ``size="sd15"`` has SD1.5's
real architecture (random weights: the same FLOPs and memory as the real model). Both use the real
CLIP tokenizer rebuilt offline, and SD's own noise schedule. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dreambooth.models.components import Components  # noqa: F401  (what it builds)

SIZES = ("tiny", "small", "sd15")

# SD1.x's noise schedule (v1-inference.yaml): scaled-linear betas 0.00085 -> 0.012 over 1000 steps.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def unet_config(size: str = "tiny") -> dict:
    if size == "small":
        return dict(unet_config("tiny"), cross_attention_dim=256)
    if size == "tiny":
        return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                    block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    if size == "sd15":
        return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    cross_attention_dim=768, attention_head_dim=8)
    raise ValueError(f"size must be one of {SIZES}, not {size!r}")


def vae_config(size: str = "tiny") -> dict:
    blocks = 4  # always 4 levels: latents are 1/8 of the picture, as in SD
    if size in ("tiny", "small"):
        return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                    block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64,
                    down_block_types=("DownEncoderBlock2D",) * blocks,
                    up_block_types=("UpDecoderBlock2D",) * blocks, scaling_factor=0.18215)
    if size == "sd15":
        return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                    block_out_channels=(128, 256, 512, 512), sample_size=512,
                    down_block_types=("DownEncoderBlock2D",) * blocks,
                    up_block_types=("UpDecoderBlock2D",) * blocks, scaling_factor=0.18215)
    raise ValueError(f"size must be one of {SIZES}, not {size!r}")


def text_config(size: str = "tiny") -> dict:
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                  eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu")
    if size == "small":
        return dict(common, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                    num_hidden_layers=4, projection_dim=256)
    if size == "tiny":
        return dict(common, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_hidden_layers=2, projection_dim=32)
    if size == "sd15":
        return dict(common, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                    num_hidden_layers=12, projection_dim=768)
    raise ValueError(f"size must be one of {SIZES}, not {size!r}")


def build_components(size: str = "tiny", seed: int = 0, cache_dir: Path | None = None) -> Components:
    """Build the model with random weights, the same weights for the same seed."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.models.tokenizer import load_clip_tokenizer

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(size))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config(size))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(size)))
    finally:
        torch.random.set_rng_state(generator_state)
    return Components(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                      tokenizer=load_clip_tokenizer(cache_dir=cache_dir),
                      noise_scheduler=DDPMScheduler(**SD_SCHEDULE, prediction_type="epsilon"))


def save_diffusers_folder(components: Components, folder: Path) -> Path:
    """Save as a diffusers model folder (model_index.json and one subfolder per component)."""
    folder = Path(folder)
    components.pipeline().save_pretrained(str(folder), safe_serialization=True)
    return folder


VARIANTS = ("sd1", "sd2", "sd2-v", "sdxl")


def variant_configs(kind: str = "sd2") -> dict:
    """Tiny SD2- and SDXL-shaped configs (OpenCLIP text encoders, linear proj_in, SDXL's two
    encoders and add_embedding), for the checkpoint tests. Heads follow the real models' rule
    (64-wide, at least one) so a file's configs can be derived from its shapes."""
    if kind == "sd1":
        return dict(unet=unet_config("tiny"), vae=vae_config("tiny"), text_encoder=text_config("tiny"))
    openclip = dict(text_config("tiny"), hidden_act="gelu")
    if kind in ("sd2", "sd2-v"):
        unet = dict(unet_config("tiny"), use_linear_projection=True, attention_head_dim=(1, 1))
        return dict(unet=unet, vae=vae_config("tiny"), text_encoder=openclip)
    if kind == "sdxl":
        big_g = dict(openclip, hidden_size=64, intermediate_size=128, num_attention_heads=1,
                     projection_dim=64)
        unet = dict(unet_config("tiny"), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                    attention_head_dim=(1, 1), transformer_layers_per_block=(1, 2),
                    cross_attention_dim=32 + 64, addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8)
        return dict(unet=unet, vae=dict(vae_config("tiny"), scaling_factor=0.13025),
                    text_encoder=text_config("tiny"), text_encoder_2=big_g)
    raise ValueError(f"kind must be one of {VARIANTS}, not {kind!r}")


def full_sdxl_configs(deep_layers: int = 10) -> dict:
    """SDXL base's real architecture (the bundled configs: 2.6 B UNet parameters, CLIP ViT-L and
    OpenCLIP bigG), with ``deep_layers`` transformer layers in the lowest level (10 in SDXL; fewer
    makes the largest SDXL-shaped model that fits a small machine)."""
    import json

    root = Path(__file__).parent / "configs" / "sdxl"
    configs = {name: {k: v for k, v in json.loads((root / name / "config.json").read_text()).items()
                      if not k.startswith("_") and k not in ("architectures", "transformers_version",
                                                             "torch_dtype", "model_type")}
               for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    configs["unet"]["transformer_layers_per_block"] = [1, 2, deep_layers]
    return configs


def build_variant(kind: str = "sd2", seed: int = 0, cache_dir: Path | None = None, *,
                  full_size: bool = False, deep_layers: int = 10) -> Components:
    """A tiny model of the given kind with random weights (same seed, same weights); with
    ``full_size`` (SDXL only) the real architecture, see :func:`full_sdxl_configs`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.models.tokenizer import OPENCLIP_PAD, SD1_PAD, load_clip_tokenizer

    if full_size and kind != "sdxl":
        raise ValueError("full_size is for SDXL; SD1.5's real size is build_components('sd15')")
    configs = full_sdxl_configs(deep_layers) if full_size else variant_configs(kind)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**configs["vae"])
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_encoder_2 = None
        if "text_encoder_2" in configs:
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    finally:
        torch.random.set_rng_state(generator_state)
    pad = OPENCLIP_PAD if kind in ("sd2", "sd2-v") else SD1_PAD
    prediction = "v_prediction" if kind == "sd2-v" else "epsilon"
    extra = {}
    if text_encoder_2 is not None:
        extra = dict(text_encoder_2=text_encoder_2.eval(),
                     tokenizer_2=load_clip_tokenizer(OPENCLIP_PAD, cache_dir=cache_dir))
    return Components(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                      tokenizer=load_clip_tokenizer(pad, cache_dir=cache_dir),
                      noise_scheduler=DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction),
                      **extra)


def save_checkpoint(path: Path, size: str = "tiny", seed: int = 0, kind: str = "sd1",
                    dtype: str = "fp32") -> Path:
    """Build a model and write it as a WebUI single-file checkpoint (the "user's base model")."""
    from dreambooth.models.export import save_single_file  # lazy: export imports this module

    components = build_components(size, seed) if kind == "sd1" else build_variant(kind, seed)
    return save_single_file(components, Path(path), kind=kind, dtype=dtype)
