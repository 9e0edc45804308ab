"""The tiny Flux.1-shaped model, and Flux files as Forge users keep them: every layout written,
recognised from the header alone and loaded back offline into the same model."""
from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth.models import flux_files
from dreambooth.models.detect import CheckpointError, read_safetensors_header, read_shapes
from dreambooth.models.flux_layout import bfl_to_diffusers, diffusers_to_bfl
from dreambooth.models.t5_tokenizer import (VOCAB_SIZE, load_flux_t5_tokenizer,
                                            load_tiny_t5_tokenizer, t5_tokenizer_places)
from dreambooth.models.tiny_flux import build_flux, flux_configs, flux_pipeline

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def models():
    return {variant: build_flux(variant, seed=0) for variant in ("dev", "schnell")}


@pytest.fixture
def no_network(monkeypatch):
    """Loading must never reach a hub: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a Flux load tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def shapes_of(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


@torch.no_grad()
def outputs(components) -> dict[str, torch.Tensor]:
    """Every part's forward pass on fixed inputs (its own generator: the global RNG is kept)."""
    g = torch.Generator().manual_seed(1)
    transformer = components.unet
    kwargs = dict(hidden_states=torch.randn(1, 16, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g),
                  timestep=torch.tensor([0.7]), img_ids=torch.rand(16, 3, generator=g) * 4,
                  txt_ids=torch.zeros(8, 3), return_dict=False)
    if transformer.config.guidance_embeds:
        kwargs["guidance"] = torch.tensor([3.5])
    picture = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.tensor([[49406, 320, 1125, 539, 48136, 49407, 49407]])
    t5_ids = components.tokenizer_2(["a photo of sks dog"], return_tensors="pt").input_ids
    latents = components.vae.encode(picture).latent_dist.mean
    clip = components.text_encoder(ids)
    return {"transformer": transformer(**kwargs)[0], "vae_encode": latents,
            "vae_decode": components.vae.decode(latents).sample,
            "clip": clip.last_hidden_state, "clip_pooled": clip.pooler_output,
            "t5": components.text_encoder_2(t5_ids).last_hidden_state}


def rounded_like_file(components, dtype: str):
    """The built model with every weight rounded as a ``dtype`` file stores it (rounding is per
    element, so rounding diffusers' q/k/v equals rounding BFL's fused qkv)."""
    copy = build_flux("dev" if components.unet.config.guidance_embeds else "schnell", seed=0)
    with torch.no_grad():
        for name in PARTS:
            quantize = dtype == "fp8" and name in ("unet", "text_encoder_2")
            for key, param in getattr(copy, name).named_parameters():
                if quantize and param.ndim == 2 and key.endswith("weight"):
                    param.copy_(param.to(torch.float8_e4m3fn).float())
                else:
                    param.copy_(param.to(torch.bfloat16 if dtype in ("bf16", "fp8") else
                                         torch.float32).float())
    return copy


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# The tiny model


def test_tiny_flux_is_deterministic_and_keeps_the_rng(models):
    state = torch.random.get_rng_state()
    again, other = build_flux("dev", seed=0), build_flux("dev", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in PARTS:
        mine, same = getattr(models["dev"], name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(mine[k], same[k]) for k in mine), name
    assert not torch.equal(models["dev"].unet.x_embedder.weight, other.unet.x_embedder.weight)
    assert models["dev"].unet.config.guidance_embeds
    assert not models["schnell"].unet.config.guidance_embeds
    assert models["dev"].noise_scheduler.config.use_dynamic_shifting
    assert models["schnell"].noise_scheduler.config.shift == 1.0
    assert all(not getattr(models["dev"], n).training for n in PARTS)
    deeper = build_flux("schnell", seed=0, depth=2, single_depth=3).unet.config
    assert (deeper.num_layers, deeper.num_single_layers) == (2, 3)


def test_tiny_t5_tokenizer_is_t5_shaped():
    tokenizer = load_tiny_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == VOCAB_SIZE == flux_configs()["text_encoder_2"]["vocab_size"]
    ids = tokenizer(["a photo of sks dog", "Zürich ☃ " * 40], padding="max_length",
                    max_length=32, truncation=True).input_ids
    assert ids[0][:6] == tokenizer("a photo of sks dog").input_ids and ids[0][5] == 1
    assert ids[0][6:] == [0] * 26 and ids[1][-1] == 1 and max(max(i) for i in ids) < VOCAB_SIZE
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a photo of sks dog"


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_pipeline_makes_a_picture(models, variant):
    pipe = flux_pipeline(models[variant])
    picture = pipe("a photo of sks dog", height=64, width=64, num_inference_steps=2,
                   max_sequence_length=32, guidance_scale=3.5, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]
    assert picture.shape == (64, 64, 3) and 0 <= picture.min() and picture.max() <= 1
    assert picture.std() > 0.01  # a picture, not a flat fill


# --------------------------------------------------------------------------------------------
# Recognising the layouts from the header alone


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_configs_derived_from_the_files_equal_the_built_ones(models, variant, tmp_path):
    path = flux_files.save_flux_file(models[variant], tmp_path / "all.safetensors")
    shapes, expected = read_shapes(path), flux_configs(variant)
    found = flux_files.flux_file_of(shapes)
    derived = flux_files.transformer_config_from_shapes(shapes, found.prefix)
    assert derived == expected["transformer"]
    parts = flux_files.save_flux_parts(models[variant], tmp_path)
    clip = read_shapes(parts["clip_l"])
    assert flux_files.clip_config_from_shapes(clip) == expected["text_encoder"]
    t5 = read_shapes(parts["t5xxl"])
    assert flux_files.t5_config_from_shapes(t5) == expected["text_encoder_2"]
    # the keys as Forge's models/text_encoder and models/VAE files have them
    assert all(k.startswith("text_model.") for k in read_shapes(parts["clip_l"]))
    assert all(k.startswith(("encoder.", "shared.")) for k in t5) and "shared.weight" in t5
    assert {"encoder.conv_in.weight", "decoder.up.3.upsample.conv.weight",
            "encoder.mid.attn_1.q.weight"} <= set(read_shapes(parts["vae"]))
    assert _tuples(flux_files.vae_config_from_shapes(read_shapes(parts["vae"]))) == \
        _tuples(expected["vae"])
    assert flux_files.rope_axes(128) == (16, 56, 56) and flux_files.rope_axes(16) == (4, 6, 6)
    for width in (16, 32, 64, 96, 128, 256):
        axes = flux_files.rope_axes(width)
        assert sum(axes) == width and all(a % 2 == 0 for a in axes)


def test_real_sizes_derive_flux1_devs_configs():
    """Flux.1 dev's own configs (black-forest-labs/FLUX.1-dev, as Forge bundles them in
    backend/huggingface) come back from the shapes of modules of that size (made on the meta
    device: no memory)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(num_layers=19, num_single_layers=38,
                                             guidance_embeds=True)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                     num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                            num_attention_heads=12, num_hidden_layers=12))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=16,
                            up_block_types=("UpDecoderBlock2D",) * 4)
    shapes = shapes_of(diffusers_to_bfl(dict(transformer.state_dict())))
    assert flux_files.transformer_config_from_shapes(shapes) == dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    derived = flux_files.t5_config_from_shapes(shapes_of(t5.state_dict()))
    assert {k: derived[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                                    "num_heads", "relative_attention_num_buckets")} == dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32)
    derived = flux_files.clip_config_from_shapes(shapes_of(clip.state_dict()))
    assert (derived["hidden_size"], derived["num_attention_heads"], derived["num_hidden_layers"],
            derived["intermediate_size"]) == (768, 12, 12, 3072)
    ldm = flux_files.vae_to_ldm(vae.state_dict(), 4)
    derived = flux_files.vae_config_from_shapes(shapes_of(ldm))
    assert (derived["block_out_channels"], derived["layers_per_block"], derived["latent_channels"],
            derived["norm_num_groups"]) == ([128, 256, 512, 512], 2, 16, 32)


@pytest.mark.parametrize("layout,variant", [("all-in-one", "dev"), ("all-in-one", "schnell"),
                                            ("transformer", "dev"), ("transformer", "schnell")])
def test_layouts_are_recognised_from_the_header(models, layout, variant, tmp_path):
    path = flux_files.save_flux_file(models[variant], tmp_path / "f.safetensors", layout=layout)
    shapes = read_shapes(path)  # the header only
    keys = set(shapes)
    prefix = "model.diffusion_model." if layout == "all-in-one" else ""
    assert {prefix + "double_blocks.0.img_attn.qkv.weight", prefix + "img_in.weight",
            prefix + "single_blocks.0.linear1.weight"} <= keys
    assert (prefix + "guidance_in.in_layer.weight" in keys) == (variant == "dev")
    found = flux_files.flux_file_of(shapes)
    assert flux_files.flux_variant_of(shapes) == found.variant == f"flux-{variant}"
    assert found.title == {"dev": "Flux.1 dev", "schnell": "Flux.1 schnell"}[variant]
    if layout == "all-in-one":
        t5 = "text_encoders.t5xxl.transformer."
        assert {"text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
                t5 + "shared.weight", t5 + "encoder.block.0.layer.0.SelfAttention.q.weight",
                "vae.encoder.down.0.block.0.conv1.weight"} <= keys
        assert found.missing == ()
    else:
        assert found.missing == ("clip_l", "t5xxl", "vae")


def test_other_files_are_not_flux(models, tmp_path):
    bfl = read_shapes(flux_files.save_flux_file(models["dev"], tmp_path / "t.safetensors",
                                                layout="transformer"))
    chroma = {k: v for k, v in bfl.items() if not k.startswith(("vector_in.", "guidance_in."))}
    fill = dict(bfl, **{"img_in.weight": (bfl["img_in.weight"][0], 384)})
    sd = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    assert [flux_files.flux_variant_of(s) for s in (chroma, fill, sd, {})] == [None] * 4
    diffusers = shapes_of(models["schnell"].unet.state_dict())
    found = flux_files.flux_file_of(diffusers)
    assert (found.variant, found.layout) == ("flux-schnell", "diffusers")


# --------------------------------------------------------------------------------------------
# Loading back


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_all_in_one_loads_back_to_the_same_outputs(models, variant, tmp_path, no_network):
    path = flux_files.save_flux_file(models[variant], tmp_path / "flux1.safetensors")
    loaded = flux_files.load_flux(path)
    mine, theirs = outputs(loaded), outputs(models[variant])
    for key in theirs:  # fp32 files: bit for bit
        assert torch.equal(mine[key], theirs[key]), key
    assert loaded.unet.config.guidance_embeds == (variant == "dev")
    assert loaded.noise_scheduler.config.shift == models[variant].noise_scheduler.config.shift
    assert all(p.dtype == torch.float32 for n in PARTS for p in getattr(loaded, n).parameters())


def test_transformer_only_file_needs_its_parts(models, tmp_path, no_network):
    path = flux_files.save_flux_file(models["dev"], tmp_path / "flux1-dev.safetensors",
                                     layout="transformer")
    with pytest.raises(CheckpointError) as error:
        flux_files.load_flux(path)
    text = str(error.value)
    assert "flux1-dev.safetensors" in text and "only the transformer" in text
    assert all(word in text for word in ("clip_l", "t5xxl", "ae.safetensors"))
    parts = flux_files.save_flux_parts(models["dev"], tmp_path / "parts")
    with pytest.raises(CheckpointError, match=r"flux1-dev.safetensors has no vae: choose the VAE"):
        flux_files.load_flux(path, clip_path=parts["clip_l"], t5_path=parts["t5xxl"])
    loaded = flux_files.load_flux(path, clip_path=parts["clip_l"], t5_path=parts["t5xxl"],
                                  vae_path=parts["vae"])
    mine, theirs = outputs(loaded), outputs(models["dev"])
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_all_in_one_without_a_part_names_it(models, tmp_path):
    path = flux_files.save_flux_file(models["schnell"], tmp_path / "whole.safetensors")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("vae.")}
    save_file(state, str(tmp_path / "novae.safetensors"))
    with pytest.raises(CheckpointError, match=r"novae.safetensors has no vae: choose the VAE "
                                              r"\(ae.safetensors in models/VAE\)"):
        flux_files.load_flux(tmp_path / "novae.safetensors")
    parts = flux_files.save_flux_parts(models["schnell"], tmp_path / "parts")
    loaded = flux_files.load_flux(tmp_path / "novae.safetensors", vae_path=parts["vae"])
    assert torch.equal(outputs(loaded)["vae_decode"], outputs(models["schnell"])["vae_decode"])


def test_parts_under_other_roots_and_a_diffusers_transformer(models, tmp_path, no_network):
    """CLIP-L without transformers' ``text_model.`` root (transformers 5 drops it), T5 under
    ComfyUI's root, and diffusers' own transformer and VAE files."""
    parts = flux_files.save_flux_parts(models["schnell"], tmp_path)
    clip = {k[len("text_model."):]: v for k, v in load_file(str(parts["clip_l"])).items()}
    save_file(clip, str(tmp_path / "clip_bare.safetensors"))
    t5 = {"text_encoders.t5xxl.transformer." + k: v
          for k, v in load_file(str(parts["t5xxl"])).items()}
    save_file(t5, str(tmp_path / "t5_comfy.safetensors"))
    state = {k: v.contiguous() for k, v in models["schnell"].unet.state_dict().items()}
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    vae = {k: v.contiguous() for k, v in models["schnell"].vae.state_dict().items()}
    save_file(vae, str(tmp_path / "vae_diffusers.safetensors"))
    loaded = flux_files.load_flux(tmp_path / "diffusion_pytorch_model.safetensors",
                                  clip_path=tmp_path / "clip_bare.safetensors",
                                  t5_path=tmp_path / "t5_comfy.safetensors",
                                  vae_path=tmp_path / "vae_diffusers.safetensors")
    mine, theirs = outputs(loaded), outputs(models["schnell"])
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with pytest.raises(CheckpointError, match="ae.safetensors is not a CLIP-L file"):
        flux_files.load_flux(tmp_path / "diffusion_pytorch_model.safetensors",
                             clip_path=parts["vae"], t5_path=parts["t5xxl"], vae_path=parts["vae"])


# Tolerances in units of the per-weight rounding error u (round to nearest: bf16 keeps 8
# significant bits, u = 2^-9; fp8 e4m3 keeps 4, u = 2^-4). An fp8 file stores the transformer's
# and T5's matrices in fp8 and the rest in bf16. Measured on the tiny model (seeds 0-2): the
# transformer and text encoders 1.1-3.5 u in bf16 and <= 1 u in fp8 (independent roundings
# partly cancel in each sum); the VAE up to 13 u (about 20 stacked convolutions and group norms
# of an untrained model amplify). The limits are about twice the worst measured.
UNIT = {"bf16": 2.0 ** -9, "fp8": 2.0 ** -4}


def tolerance(dtype: str, output: str) -> float:
    if dtype == "fp8" and output in ("transformer", "t5"):
        return 2 * UNIT["fp8"]
    return UNIT["bf16"] * (24 if output.startswith("vae") else 8)


@pytest.mark.parametrize("dtype,variant", [("bf16", "schnell"), ("fp8", "dev")])
def test_half_and_fp8_files_load_upcast(models, dtype, variant, tmp_path, no_network):
    path = flux_files.save_flux_file(models[variant], tmp_path / f"flux-{dtype}.safetensors",
                                     dtype=dtype)
    header = read_safetensors_header(path)
    stored = {v["dtype"] for k, v in header.items() if k.startswith("model.diffusion_model.")}
    assert stored == ({"F8_E4M3", "BF16"} if dtype == "fp8" else {"BF16"})
    loaded = flux_files.load_flux(path)
    assert all(p.dtype == torch.float32 for n in PARTS for p in getattr(loaded, n).parameters())
    mine = outputs(loaded)
    # exactly the built model with its weights rounded as the file stores them ...
    reference = outputs(rounded_like_file(models[variant], dtype))
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
    # ... and close to the unrounded model
    original = outputs(models[variant])
    errors = {k: relative_error(mine[k], original[k]) for k in original}
    assert all(errors[k] < tolerance(dtype, k) for k in errors), errors
    as_bf16 = flux_files.load_flux(path, dtype=torch.bfloat16)
    assert {p.dtype for p in as_bf16.unet.parameters()} == {torch.bfloat16}


def test_scaled_fp8_weights_are_multiplied_by_their_scales(models, tmp_path, no_network):
    """ComfyUI's scaled fp8: each matrix stored divided by ``<layer>.scale_weight`` (newer files:
    ``weight_scale``), a ``scaled_fp8`` marker; 4-bit layouts with a second scale are refused."""
    path = flux_files.save_flux_file(models["schnell"], tmp_path / "t.safetensors",
                                     layout="transformer")
    scaled, expected = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for index, (key, value) in enumerate(load_file(str(path)).items()):
        if value.ndim == 2:
            scale = value.abs().max() / 448
            stored = (value / scale).to(torch.float8_e4m3fn)
            name = ".scale_weight" if index % 2 else ".weight_scale"
            scaled[key[: -len(".weight")] + name] = scale.reshape(())
            expected[key] = stored.float() * scale
            value = stored
        scaled[key] = value
    save_file(scaled, str(tmp_path / "scaled.safetensors"))
    parts = flux_files.save_flux_parts(models["schnell"], tmp_path)
    loaded = flux_files.load_flux(tmp_path / "scaled.safetensors", clip_path=parts["clip_l"],
                                  t5_path=parts["t5xxl"], vae_path=parts["vae"])
    mine, theirs = outputs(loaded)["transformer"], outputs(models["schnell"])["transformer"]
    assert relative_error(mine, theirs) < tolerance("fp8", "transformer")
    want = bfl_to_diffusers({k: expected.get(k, v.float())
                             for k, v in load_file(str(path)).items()})
    assert all(torch.equal(loaded.unet.state_dict()[k], want[k]) for k in want)
    scaled["img_in.weight_scale_2"] = torch.ones(())
    save_file(scaled, str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(CheckpointError, match="not supported"):
        flux_files.load_flux(tmp_path / "nvfp4.safetensors", clip_path=parts["clip_l"],
                             t5_path=parts["t5xxl"], vae_path=parts["vae"])


# --------------------------------------------------------------------------------------------
# The T5 tokenizer of a real model


def test_t5_tokenizer_is_found_or_asked_for(tmp_path):
    checkpoint = tmp_path / "models" / "Stable-diffusion" / "flux1-dev.safetensors"
    checkpoint.parent.mkdir(parents=True)
    with pytest.raises(CheckpointError) as error:  # a real T5 (32128 ids): never the tiny one
        load_flux_t5_tokenizer(checkpoint, 32128)
    assert "flux1-dev.safetensors" in str(error.value) and "t5_tokenizer" in str(error.value)
    folder = tmp_path / "models" / "text_encoder" / "t5_tokenizer"
    load_tiny_t5_tokenizer().save_pretrained(str(folder))
    found = load_flux_t5_tokenizer(checkpoint, 32128)
    assert found("a photo").input_ids == load_tiny_t5_tokenizer()("a photo").input_ids
    assert folder in t5_tokenizer_places(checkpoint)
    with pytest.raises(CheckpointError, match="more than the T5"):
        load_flux_t5_tokenizer(checkpoint, 100)
