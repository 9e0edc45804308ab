"""A Flux.1 LoRA trained through the one loop, from an all-in-one file as Forge keeps them: it
learns, writes kohya's Flux names with metadata naming Flux, resumes bit for bit, honours its
options, trains CLIP-L with T5 cached, and what Flux cannot do is refused before any write."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from dreambooth.common.config import ConfigError
from dreambooth.engine.trainer import train
from dreambooth.models.adapters.file import read_lora
from dreambooth.models.families import for_kind
from dreambooth.models.flux_files import save_flux_file
from dreambooth.models.tiny_flux import build_flux
from trainer_fixtures import Crash, RecordingReporter, base_config, crash_at, run_paths

FAST = dict(training_method="lora", model_name="zwx-flux", with_prior_preservation=False,
            learning_rate=1e-2, lora_rank=4, lora_alpha=2.0, max_train_steps=3, sample_steps=0,
            t5_max_length=256, resolution=64)


@functools.lru_cache(maxsize=2)
def _built(variant: str):
    return build_flux(variant, seed=0)


def flux_components(variant: str = "dev"):
    return copy.deepcopy(_built(variant))


def flux_base(root: Path, variant: str = "dev") -> Path:
    base = root / "base.safetensors"
    if not base.exists():
        root.mkdir(parents=True, exist_ok=True)
        save_flux_file(_built(variant), base, layout="all-in-one")
    return base


def flux_run(root: Path, reporter=None, components=None, variant: str = "dev", **overrides):
    flux_base(root, variant)
    config = base_config(root, **{**FAST, **overrides})
    result = train(config, run_paths(root), reporter=reporter or RecordingReporter(),
                   components=components or flux_components(variant))
    return result, config


def adapter(result) -> dict[str, torch.Tensor]:
    return read_lora(result.output_path)[0]


def picture_latents(components, folder: Path) -> torch.Tensor:
    """The instance pictures at 64 px as Flux latents ((mean - shift) x scale)."""
    import numpy as np
    from PIL import Image

    pixels = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((64, 64))).copy())
              for p in sorted(folder.glob("*.png"))]
    batch = torch.stack(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = components.vae
    with torch.no_grad():
        mean = vae.encode(batch).latent_dist.mean
    return (mean - vae.config.shift_factor) * vae.config.scaling_factor


def flow_loss(components, latents: torch.Tensor, family) -> float:
    """The flow loss of ``components`` on ``latents`` at fixed noise levels and noise."""
    generator = torch.Generator().manual_seed(3)
    total = 0.0
    with torch.no_grad():
        conditioning = family.encode(components, ["photo of zwx toy"] * len(latents), 1, "cpu")
        for sigma in (0.2, 0.5, 0.8):
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = torch.full((len(latents),), sigma)
            noisy = (1 - sigma) * latents + sigma * noise
            pred = family.predict(components.unet, noisy, sigmas, conditioning, None)
            total += torch.nn.functional.mse_loss(pred, noise - latents).item()
    return total / 3


def applied_in_forge(components, lora: dict[str, torch.Tensor]):
    """``components`` with ``lora`` applied as Forge applies it (its ComfyUI-derived rules on
    BFL's layout: tests/fake_webui/comfy_lora.py), read back into the diffusers transformer."""
    from dreambooth.models import flux_layout
    from fake_webui import comfy_lora

    bfl = flux_layout.diffusers_to_bfl(copy.deepcopy(components.unet.state_dict()))
    state = comfy_lora.loaded_flux_model(bfl)
    patched = comfy_lora.apply_lora(state, lora, 1.0, host="forge").state
    prefix = "diffusion_model."
    back = flux_layout.bfl_to_diffusers({k[len(prefix):]: v for k, v in patched.items()})
    applied = copy.deepcopy(components)
    applied.unet.load_state_dict(back)
    return applied


def test_a_flux_lora_lands_in_models_lora_with_kohya_flux_names_and_metadata(tmp_path):
    components = flux_components()
    before = copy.deepcopy(components.unet.state_dict())
    reporter = RecordingReporter()
    result, _ = flux_run(tmp_path, reporter=reporter, components=components)
    assert result.output_path.parent.name == "Lora"
    tensors, metadata = read_lora(result.output_path)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in tensors
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in tensors
    assert not any("transformer_blocks" in key or "to_q" in key for key in tensors)
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["ss_network_module"] == "networks.lora_flux"
    assert any(line.startswith("Flux.1, flow prediction") for line in reporter.lines)
    # the adapter lived beside the base: the transformer is what it was
    assert all(torch.equal(v, before[k]) for k, v in components.unet.state_dict().items())


def test_the_file_applied_as_forge_applies_it_has_learned_the_pictures(tmp_path):
    components = flux_components()
    result, config = flux_run(tmp_path, max_train_steps=30, learning_rate=2e-2)
    family = for_kind("flux-dev").configured(config)
    latents = picture_latents(components, Path(config.concepts[0].instance_data_dir))
    base_loss = flow_loss(components, latents, family)
    trained_loss = flow_loss(applied_in_forge(components, adapter(result)), latents, family)
    assert trained_loss < base_loss * 0.9, (base_loss, trained_loss)


@pytest.mark.parametrize("option,value", [("flux_guidance", 3.5), ("t5_max_length", 512),
                                          ("flux_timestep_sampling", "sigmoid")])
def test_each_flux_option_changes_what_is_learned(tmp_path, option, value):
    plain = adapter(flux_run(tmp_path / "a")[0])
    changed = adapter(flux_run(tmp_path / "b", **{option: value})[0])
    assert plain.keys() == changed.keys()
    assert any(not torch.equal(plain[k], changed[k]) for k in plain), option


def test_a_cancelled_flux_run_resumes_to_the_same_adapter(tmp_path):
    options = dict(max_train_steps=4, checkpoint_every_n_steps=2)
    straight = adapter(flux_run(tmp_path / "a", **options)[0])
    with pytest.raises(Crash):
        flux_run(tmp_path / "b", reporter=crash_at(3), **options)
    reporter = RecordingReporter()
    config = base_config(tmp_path / "b", **{**FAST, **options})
    result = train(config, run_paths(tmp_path / "b"), reporter=reporter,
                   components=flux_components(), resume=True)
    assert [s for s, _, _ in reporter.steps] == [3, 4]
    resumed = adapter(result)
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_clip_l_trains_while_t5_is_cached_and_left_alone(tmp_path):
    components = flux_components()
    t5_before = copy.deepcopy(components.text_encoder_2.state_dict())
    reporter = RecordingReporter()
    result, _ = flux_run(tmp_path, reporter=reporter, components=components,
                         train_text_encoder=True)
    tensors = adapter(result)
    assert any(k.startswith("lora_te1_") for k in tensors)  # kohya's CLIP-L prefix for Flux
    assert not any(k.startswith(("lora_te2_", "lora_te3_")) for k in tensors)
    assert any("T5-XXL's part" in line for line in reporter.lines)
    for key, value in components.text_encoder_2.state_dict().items():
        assert torch.equal(value, t5_before[key]), key


def test_the_file_is_read_by_the_run_itself(tmp_path):
    """No components given: the all-in-one file is detected and loaded as Flux.1 dev."""
    flux_base(tmp_path)
    reporter = RecordingReporter()
    config = base_config(tmp_path, **FAST)
    result = train(config, run_paths(tmp_path), reporter=reporter)
    assert result.output_path.is_file()
    assert any(line.startswith("Flux.1") for line in reporter.lines)


@pytest.mark.parametrize("field,value", [("training_method", "full"), ("min_snr_gamma", 5.0),
                                         ("resolution", 72)])
def test_what_flux_cannot_do_stops_the_run_before_anything_is_written(tmp_path, field, value):
    with pytest.raises(ConfigError, match=field):
        flux_run(tmp_path, **{field: value})
    assert not (tmp_path / "Lora").exists() and not (tmp_path / "Stable-diffusion").exists()
    assert not list((tmp_path / "work").glob("resume*"))


def test_schnell_trains_without_a_guidance_input(tmp_path):
    result, _ = flux_run(tmp_path, variant="schnell")
    metadata = read_lora(result.output_path)[1]
    assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"
    assert json.loads(metadata["ss_network_args"])["algo"] == "lora"


def test_buckets_ema_and_intermediate_saves_go_through_the_same_loop(tmp_path):
    result, _ = flux_run(tmp_path, max_train_steps=4, aspect_ratio_buckets=True, use_ema=True,
                         ema_decay=0.5, save_every_n_steps=2, hflip=True)
    saved = sorted(p.name for p in result.output_path.parent.glob("*.safetensors"))
    assert saved == ["zwx-flux.safetensors", "zwx-flux_2.safetensors"]
    assert adapter(result).keys() == read_lora(result.output_path.with_name(
        "zwx-flux_2.safetensors"))[0].keys()


def test_an_fp8_layer_computes_as_its_weight_and_keeps_only_fp8_for_the_backward():
    from dreambooth.models.adapters.fp8 import FP8, fp8_linears, to_fp8, upcast

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    layer.weight.data *= 0.02  # Flux-sized weights: most below fp8's smallest normal number
    plain = copy.deepcopy(layer)
    stored = fp8_linears(torch.nn.Sequential(layer))
    assert stored.layers == 1 and layer.weight.dtype == FP8 and not layer.weight.requires_grad
    assert stored.bytes_after < stored.bytes_before / 3  # fp32 -> 1 byte + a scale per row
    # per-row scales keep the small weights: within fp8's 3 mantissa bits
    weight, scale = to_fp8(plain.weight)
    error = (upcast(weight, scale, torch.float32) - plain.weight).abs().max()
    assert error <= plain.weight.abs().max() * 2 ** -4
    x = torch.randn(8, 64, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert torch.allclose(y, plain(x), atol=2e-2)
    assert [d for d, shape in saved if shape == (32, 64)] == [FP8]  # no upcast copy kept
    expected = torch.ones(8, 32) @ upcast(weight, scale, torch.float32)
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_an_fp8_base_trains_the_same_lora_keys_with_a_base_of_one_byte_a_weight(tmp_path):
    reporter = RecordingReporter()
    components = flux_components()
    fp8 = adapter(flux_run(tmp_path / "fp8", reporter=reporter, components=components,
                           base_weights_8bit=True)[0])
    plain = adapter(flux_run(tmp_path / "plain")[0])
    assert fp8.keys() == plain.keys()
    assert any("in fp8 (e4m3, a scale per row)" in line for line in reporter.lines)
    # trained beside the fp8 base: close to the plain run, not the same
    key = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
    assert not torch.equal(fp8[key], plain[key])
    assert torch.allclose(fp8[key].float(), plain[key].float(), atol=0.05)


def test_a_transformer_only_file_trains_with_the_parts_chosen_from_the_models_folders(tmp_path):
    """BFL's transformer-only file: the text encoders from models/text_encoder and the VAE from
    models/VAE, by name as the tab offers them; without them, refused by field before any
    write; an SD base given a text encoder is refused by that field."""
    from dreambooth.app import preflight
    from dreambooth.host import StandaloneHost
    from dreambooth.models.flux_files import save_flux_parts

    models = tmp_path / "models"
    host = StandaloneHost(models)
    base = save_flux_file(_built("dev"), models / "Stable-diffusion" / "flux1-dev.safetensors",
                          layout="transformer")
    parts = save_flux_parts(_built("dev"), models / "text_encoder")
    (models / "VAE").mkdir()
    parts["vae"].rename(models / "VAE" / "ae.safetensors")
    config = base_config(tmp_path, **{**FAST, "base_model": str(base)})
    _, errors = preflight.preflight(config, host)
    assert {e.field for e in errors} >= {"clip_l_path", "t5xxl_path", "vae_path"}
    assert all("holds only the transformer" in e.message for e in errors
               if e.field in ("clip_l_path", "t5xxl_path", "vae_path"))
    assert not (tmp_path / "work").exists()
    chosen = base_config(tmp_path, **{**FAST, "base_model": str(base),
                                      "clip_l_path": "clip_l.safetensors",
                                      "t5xxl_path": "t5xxl", "vae_path": "ae.safetensors"})
    resolved, errors = preflight.preflight(chosen, host)
    assert [e for e in errors if e.field in ("clip_l_path", "t5xxl_path", "vae_path")] == []
    assert resolved.clip_l_path == str(models / "text_encoder" / "clip_l.safetensors")
    result = train(resolved, run_paths(tmp_path), reporter=RecordingReporter())
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in adapter(result)
    from dreambooth.models import tiny

    sd = tiny.save_checkpoint(tmp_path / "sd.safetensors")
    _, errors = preflight.preflight(base_config(tmp_path, **{
        **FAST, "base_model": str(sd), "clip_l_path": "clip_l.safetensors"}), host)
    assert [e.field for e in errors if "Flux bases" in e.message] == ["clip_l_path"]


def test_schnell_says_that_the_training_guidance_does_not_apply(tmp_path):
    reporter = RecordingReporter()
    flux_run(tmp_path, reporter=reporter, variant="schnell", flux_guidance=3.5)
    assert any("schnell has no guidance input" in line for line in reporter.lines)


def test_locon_on_flux_is_lora_and_says_so(tmp_path):
    """Flux's transformer has no convolutions: LoCon adapts the same linear layers as LoRA, so
    the run writes the same file (the keys Forge's Flux loader reads) and says why."""
    plain, _ = flux_run(tmp_path / "lora")
    reporter = RecordingReporter()
    locon, _ = flux_run(tmp_path / "locon", reporter=reporter, training_method="locon")
    ours, theirs = adapter(locon), adapter(plain)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any("locon adapts the same linear layers as lora" in line for line in reporter.lines)
