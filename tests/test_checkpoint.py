"""Checkpoint I/O: WebUI single files <-> diffusers components, offline, for SD1.x/SD2.x/SDXL."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import (KINDS, components, folder_listing, make_base, perturb,  # noqa: I001
                                 state)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.models import checkpoint as ck
from dreambooth.models import export as ex
from dreambooth.models import ldm_keys
from dreambooth.models import tiny
from dreambooth.models.checkpoint import CheckpointError

HALF = torch.float16


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bases")
    return {kind: make_base(folder, kind) for kind in KINDS}


def copy_base(bases, kind: str, folder: Path, name: str | None = None) -> Path:
    target = folder / (name or bases[kind].name)
    shutil.copyfile(bases[kind], target)
    if bases[kind].with_suffix(".yaml").exists():
        shutil.copyfile(bases[kind].with_suffix(".yaml"), target.with_suffix(".yaml"))
    return target


# ---------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("kind", KINDS)
def test_detect_kind_of_each_tiny_file(bases, kind):
    found = ck.detect_kind(bases[kind])
    assert found.kind == kind
    assert found.prediction_type == ("v_prediction" if kind == "sd2-v" else "epsilon")
    assert not found.inpainting and found.has_vae and not found.has_ema
    # the same answer from a state dict
    assert ck.detect_kind(load_file(str(bases[kind]))).family == found.family


def test_sd2_prediction_type_from_yaml_name_and_override(bases, tmp_path):
    plain = copy_base(bases, "sd2", tmp_path, "model.safetensors")
    assert ck.detect_kind(plain).kind == "sd2"
    plain.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert ck.detect_kind(plain).kind == "sd2-v"
    assert ck.detect_kind(plain, prediction_type="epsilon").kind == "sd2"  # the config wins
    named = copy_base(bases, "sd2", tmp_path, "sd21-768.safetensors")
    assert ck.detect_kind(named).prediction_type == "v_prediction"  # no yaml: 768 default


def test_tiny_save_checkpoint(tmp_path):
    path = tiny.save_checkpoint(tmp_path / "tiny.safetensors", kind="sd1", dtype="fp16")
    found = ck.detect_kind(path)
    assert found.kind == "sd1" and found.has_vae
    assert load_file(str(path))["model.diffusion_model.out.2.weight"].dtype == HALF


def test_detect_diffusers_folder(tmp_path):
    folder = tiny.save_diffusers_folder(components("sd1"), tmp_path / "diffusers")
    assert ck.detect_kind(folder).kind == "sd1"
    assert ck.detect_kind(folder).source == "diffusers"


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("kind", KINDS)
def test_load_gives_the_saved_weights(bases, kind):
    loaded, found = ck.load_components(bases[kind])
    original = components(kind)
    assert found.kind == kind
    for name in found.components:
        want, got = state(getattr(original, name)), state(getattr(loaded, name))
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name}.{key}"
    assert loaded.noise_scheduler.config.prediction_type == found.prediction_type
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368,
                                                              49407]
    if kind in ("sd2", "sd2-v"):
        assert loaded.tokenizer.pad_token == "!"  # OpenCLIP pads with id 0
    if kind == "sdxl":
        assert loaded.tokenizer.pad_token == "<|endoftext|>"
        assert loaded.tokenizer_2.pad_token == "!"


def test_tiny_sd1_pipeline_runs_after_load(bases):
    loaded, _ = ck.load_components(bases["sd1"])
    pipe = loaded.pipeline()
    image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_load_ckpt_and_fp16_file(bases, tmp_path):
    sd = load_file(str(bases["sd1"]))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, ckpt)
    loaded, found = ck.load_components(ckpt)
    assert found.kind == "sd1"
    assert torch.equal(state(loaded.unet)["conv_in.weight"],
                       state(components("sd1").unet)["conv_in.weight"])
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(half))
    loaded, _ = ck.load_components(half)
    assert next(loaded.unet.parameters()).dtype == torch.float32  # fp32 master weights


def test_load_ema_weights(bases, tmp_path):
    sd = load_file(str(bases["sd1"]))
    for key in [k for k in sd if k.startswith("model.diffusion_model.")]:
        sd["model_ema." + "".join(key.split(".")[1:])] = sd[key] + 1.0
    path = tmp_path / "ema.safetensors"
    save_file(sd, str(path))
    assert ck.detect_kind(path).has_ema
    live, _ = ck.load_components(path)
    ema, _ = ck.load_components(path, use_ema=True)
    key = "conv_in.weight"
    assert torch.equal(state(ema.unet)[key], state(live.unet)[key] + 1.0)
    with pytest.raises(CheckpointError, match="no EMA"):
        ck.load_components(bases["sd1"], use_ema=True)


def test_separate_vae_file(bases, tmp_path):
    other = tiny.build_components("tiny", seed=7).vae
    ldm = ldm_keys.vae_to_ldm(other.state_dict(), other.config)
    vae_file = tmp_path / "other.vae.safetensors"  # the models/VAE layout: no prefix
    save_file({k[len("first_stage_model."):]: v.contiguous() for k, v in ldm.items()}, str(vae_file))
    loaded, _ = ck.load_components(bases["sd1"], vae_path=vae_file)
    for key, value in state(other).items():
        assert torch.equal(state(loaded.vae)[key], value), key
    not_vae = tmp_path / "notes.safetensors"
    save_file({"weights": torch.zeros(3)}, str(not_vae))
    with pytest.raises(CheckpointError, match="not a VAE"):
        ck.load_components(bases["sd1"], vae_path=not_vae)


# ---------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_bit_identical_fp32_and_cast_fp16(bases, kind, tmp_path):
    loaded, found = ck.load_components(bases[kind])
    base = load_file(str(bases[kind]))
    out = ex.export_checkpoint(bases[kind], loaded, tmp_path / "fp32.safetensors",
                               trained=found.components, dtype="fp32")
    written = load_file(str(out))
    assert written.keys() == base.keys()
    assert all(torch.equal(written[k], base[k]) for k in base)
    out16 = ex.export_checkpoint(bases[kind], loaded, tmp_path / "fp16.safetensors")  # fp16
    written = load_file(str(out16))
    for key, value in base.items():
        # model weights are cast; the schedule buffers (betas, alphas_cumprod...) stay as they are
        weight = key.startswith(ck.WEIGHT_PREFIXES) and value.is_floating_point()
        expected = value.to(HALF) if weight else value
        assert written[key].dtype == expected.dtype and torch.equal(written[key], expected), key
    if kind != "sdxl":
        assert written["alphas_cumprod"].dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_trained_weights_reload_through_diffusers_own_loaders(bases, kind, tmp_path):
    """The independent check: diffusers' from_single_file reads back what we trained."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    trained, found = components(kind), ck.detect_kind(bases[kind])
    names = ("unet",) + found.text_encoders
    for i, name in enumerate(names):
        perturb(getattr(trained, name), seed=i + 1)
    out = ex.export_checkpoint(bases[kind], trained, tmp_path / "trained.safetensors",
                               trained=names, dtype="fp32")
    config = ck.config_folder(out, tmp_path / "config")
    unet = UNet2DConditionModel.from_single_file(str(out), config=str(config), subfolder="unet",
                                                 local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(out), config=str(config), subfolder="vae",
                                         local_files_only=True)
    sd = load_file(str(out))
    reloaded = {"unet": unet, "vae": vae}
    for name in found.text_encoders:
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        reloaded[name] = create_diffusers_clip_model_from_ldm(
            cls, sd, subfolder=name, config=str(config), local_files_only=True)
    for name in found.components:
        want, got = state(getattr(trained, name)), state(reloaded[name])
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name}.{key}"
    # the VAE was not trained: its tensors are the base's, bit for bit
    base = load_file(str(bases[kind]))
    assert all(torch.equal(sd[k], base[k]) for k in base if k.startswith("first_stage_model."))


def test_sd1_export_loads_in_diffusers_pipeline(bases, tmp_path):
    from diffusers import StableDiffusionPipeline

    trained = components("sd1")
    perturb(trained.unet)
    perturb(trained.text_encoder, seed=2)
    out = ex.export_checkpoint(bases["sd1"], trained, tmp_path / "dreambooth.safetensors")
    config = ck.config_folder(out, tmp_path / "config")
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(config),
                                                    local_files_only=True)
    for name in ("unet", "text_encoder"):
        want, got = state(getattr(trained, name)), state(getattr(pipe, name))
        for key, value in want.items():
            assert torch.equal(got[key].to(HALF), value.to(HALF)), f"{name}.{key}"


def test_unknown_keys_are_carried_over(bases, tmp_path):
    sd = load_file(str(bases["sd2"]))
    extras = {
        "alphas_cumprod": torch.linspace(0.99, 0.01, 1000, dtype=torch.float32),
        "model_ema.num_updates": torch.tensor(12345, dtype=torch.int32),
        "some_tool.custom": torch.arange(6, dtype=torch.float64).reshape(2, 3),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6),
    }
    sd.update(extras)
    base = tmp_path / "extras.safetensors"
    save_file(sd, str(base))
    trained, _ = ck.load_components(base)
    perturb(trained.unet)
    out = ex.export_checkpoint(base, trained, tmp_path / "out.safetensors")
    written = load_file(str(out))
    assert written.keys() == sd.keys()
    for key in ("alphas_cumprod", "model_ema.num_updates", "some_tool.custom"):
        assert written[key].dtype == extras[key].dtype and torch.equal(written[key], extras[key])
    # SD2's text_projection is not used by diffusers; it is carried over (cast to fp16)
    key = "cond_stage_model.model.text_projection"
    assert torch.equal(written[key], sd[key].half())


def test_text_model_prefix_dropped_by_transformers_5(bases, tmp_path, monkeypatch):
    trained = components("sd1")
    perturb(trained.text_encoder)
    encoder = trained.text_encoder
    full = state(encoder)
    stripped = {k[len("text_model."):]: v for k, v in full.items()}
    monkeypatch.setattr(encoder, "state_dict", lambda *a, **k: dict(stripped))
    out = ex.export_checkpoint(bases["sd1"], trained, tmp_path / "out.safetensors", dtype="fp32")
    written = load_file(str(out))
    prefix = "cond_stage_model.transformer.text_model."
    assert f"{prefix}encoder.layers.0.self_attn.q_proj.weight" in written
    assert not any(k.startswith("cond_stage_model.transformer.encoder.") for k in written)
    for key, value in full.items():
        if not key.endswith("position_ids"):
            assert torch.equal(written["cond_stage_model.transformer." + key], value), key


def test_diffusers_folder_saved_without_text_model_prefix_loads(tmp_path):
    original = components("sd1")
    folder = tiny.save_diffusers_folder(original, tmp_path / "folder")
    weights = folder / "text_encoder" / "model.safetensors"
    sd = load_file(str(weights))
    save_file({k.replace("text_model.", "", 1): v for k, v in sd.items()}, str(weights))
    loaded, found = ck.load_components(folder)
    for key, value in state(original.text_encoder).items():
        assert torch.equal(state(loaded.text_encoder)[key], value), key


def test_metadata_yaml_and_hash(bases, tmp_path):
    trained, _ = ck.load_components(bases["sd2-v"])
    out = ex.export_checkpoint(
        bases["sd2-v"], trained, tmp_path / "my-model.safetensors",
        metadata={"concepts": [{"instance_prompt": "photo of zwx toy", "class_prompt": "toy"}],
                  "steps": 400, "learning_rate": 2e-6, "resolution": 768})
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    hashes = ck.file_hash(bases["sd2-v"])
    assert len(hashes["short"]) == 10 and hashes["sha256"].startswith(hashes["short"])
    assert meta["dreambooth.base_model"] == bases["sd2-v"].name
    assert meta["dreambooth.base_hash"] == hashes["short"]
    assert meta["dreambooth.model_kind"] == "sd2-v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.resolution"] == "768x768"
    assert meta["modelspec.title"] == "my-model"
    assert "photo of zwx toy" in meta["modelspec.description"]
    assert json.loads(meta["dreambooth.concepts"])[0]["class_prompt"] == "toy"
    assert meta["dreambooth.steps"] == "400"
    assert "parameterization" in out.with_suffix(".yaml").read_text()
    assert ck.detect_kind(out).kind == "sd2-v"


def test_ckpt_output_and_bf16(bases, tmp_path):
    trained = components("sd1")
    out = ex.export_checkpoint(bases["sd1"], trained, tmp_path / "out.ckpt", dtype="bf16")
    loaded = torch.load(out, weights_only=True)
    assert loaded["state_dict"]["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.bfloat16
    assert ck.detect_kind(out).kind == "sd1"


def test_base_file_is_never_modified(bases, tmp_path):
    base = copy_base(bases, "sd1", tmp_path)
    before = ck.file_hash(base)["sha256"]
    trained, _ = ck.load_components(base)
    perturb(trained.unet)
    ex.export_checkpoint(base, trained, tmp_path / "out.safetensors", dtype="fp32")
    assert ck.file_hash(base)["sha256"] == before
    with pytest.raises(CheckpointError, match="base checkpoint itself"):
        ex.export_checkpoint(base, trained, base, overwrite=True)
    assert ck.file_hash(base)["sha256"] == before


def test_failed_self_check_deletes_output(bases, tmp_path, monkeypatch):
    trained = components("sd1")
    real_write = ex.write_tensors
    dropped = "model.diffusion_model.out.2.bias"

    def drop_a_key(tmp, fmt, layout, tensors, metadata):
        layout = {k: v for k, v in layout.items() if k != dropped}
        real_write(tmp, fmt, layout, ((k, t) for k, t in tensors if k != dropped), metadata)

    monkeypatch.setattr(ex, "write_tensors", drop_a_key)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError, match="out.2.bias"):
        ex.export_checkpoint(bases["sd1"], trained, out_dir / "x.safetensors")
    assert folder_listing(out_dir) == []


def test_self_check_catches_wrong_values(bases, tmp_path, monkeypatch):
    trained = components("sd1")
    real_write = ex.write_tensors
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"

    def corrupt(tmp, fmt, layout, tensors, metadata):
        real_write(tmp, fmt, layout, ((k, t + 1 if k == key else t) for k, t in tensors),
                   metadata)

    monkeypatch.setattr(ex, "write_tensors", corrupt)
    with pytest.raises(CheckpointError, match="down_blocks.0.resnets.0.conv1.weight"):
        ex.export_checkpoint(bases["sd1"], trained, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written


class NeedsCode:
    """Pickled into a .ckpt: loading it would need to run this module's code."""


def _bad_files(bases, folder: Path) -> dict[str, tuple[Path, str]]:
    raw = bases["sd1"].read_bytes()
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    not_model = folder / "notes.safetensors"
    save_file({"weights": torch.zeros(3), "bias": torch.ones(2)}, str(not_model))
    lora = folder / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(lora))
    unknown = folder / "flux.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)},
              str(unknown))
    inpaint = folder / "inpainting.safetensors"
    sd = load_file(str(bases["sd1"]))
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(sd, str(inpaint))
    pickled = folder / "pickle.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": NeedsCode()}, pickled)
    vae_only = folder / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
               "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(vae_only))
    return {
        "truncated": (truncated, "damaged or incomplete"),
        "not a checkpoint": (not_model, "not a Stable Diffusion checkpoint"),
        "lora": (lora, "LoRA"),
        "unknown architecture": (unknown, "unknown or unsupported architecture"),
        "inpainting": (inpaint, "inpainting"),
        "pickle": (pickled, "would run code when loaded"),
        "vae": (vae_only, "VAE on its own"),
        "missing": (folder / "missing.safetensors", "no such file"),
    }


def test_bad_inputs_are_refused_clearly(bases, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    trained = components("sd1")
    for label, (path, message) in _bad_files(bases, inputs).items():
        with pytest.raises(CheckpointError, match=message) as info:
            ck.detect_kind(path)
        assert path.name in str(info.value), label  # the message names the file
        assert "weights_only" not in str(info.value), label  # never torch's unsafe advice
        with pytest.raises(CheckpointError, match=message):
            ck.load_components(path)
        with pytest.raises(CheckpointError, match=message):
            ex.export_checkpoint(path, trained, out_dir / f"{label}.safetensors")
    assert folder_listing(out_dir) == []


def test_unwritable_or_colliding_output(bases, tmp_path):
    trained = components("sd1")
    with pytest.raises(CheckpointError, match="does not exist"):
        ex.export_checkpoint(bases["sd1"], trained, tmp_path / "nowhere" / "x.safetensors")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match="does not exist"):
        ex.export_checkpoint(bases["sd1"], trained, a_file / "x.safetensors")
    with pytest.raises(CheckpointError, match=".safetensors or .ckpt"):
        ex.export_checkpoint(bases["sd1"], trained, tmp_path / "x.bin")
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        ex.export_checkpoint(bases["sd1"], trained, existing)
    assert existing.read_bytes() == b"keep me"
    assert folder_listing(tmp_path) == ["file", "taken.safetensors"]
    ex.export_checkpoint(bases["sd1"], trained, existing, overwrite=True)
    assert ck.detect_kind(existing).kind == "sd1"


def test_read_only_output_folder(bases, tmp_path, monkeypatch):
    trained = components("sd1")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root ignores permissions: give the answer a normal user gets
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked
                            else real_access(path, mode))
    try:
        with pytest.raises(CheckpointError, match="not writable"):
            ex.export_checkpoint(bases["sd1"], trained, locked / "x.safetensors")
    finally:
        locked.chmod(0o700)


def test_wrong_components_are_refused(bases, tmp_path):
    sd2 = components("sd2")
    with pytest.raises(CheckpointError, match="does not match the base"):
        ex.export_checkpoint(bases["sd1"], sd2, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="cannot export"):
        ex.export_checkpoint(bases["sd1"], sd2, tmp_path / "x.safetensors",
                             trained=("text_encoder_2",))
    assert folder_listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# CLI


def test_convert_cli_both_ways(bases, tmp_path, capsys):
    from dreambooth.__main__ import main

    folder = tmp_path / "diffusers"
    assert main(["convert", str(bases["sd1"]), str(folder)]) == 0
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(folder), str(back)]) == 0
    base, written = load_file(str(bases["sd1"])), load_file(str(back))
    assert written.keys() == base.keys()
    assert all(torch.equal(written[k], base[k]) for k in base)
    half = tmp_path / "half.safetensors"
    assert main(["convert", str(bases["sd1"]), str(half), "--half"]) == 0
    assert load_file(str(half))["model.diffusion_model.input_blocks.0.0.weight"].dtype == HALF
    assert main(["convert", str(bases["sd1"]), str(half)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(bases["sd2"]), str(tmp_path / "v.safetensors"),
                 "--kind", "sd2-v"]) == 0
    assert ck.detect_kind(tmp_path / "v.safetensors").kind == "sd2-v"
    assert main(["convert", str(bases["sd1"]), str(tmp_path / "x.safetensors"),
                 "--kind", "sdxl"]) == 2


# ---------------------------------------------------------------------------------------------
# Real sizes (on the meta device: shapes only, no memory)


@pytest.mark.parametrize("kind", KINDS)
def test_configs_derived_from_real_size_shapes_match_the_bundled_ones(kind):
    """The same shape-reading code that loads the tiny files gives the real models' configs."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = ck.CONFIG_ROOT / kind
    bundled = {name: json.loads((root / name / "config.json").read_text())
               for name in ("unet", "vae", "text_encoder", "text_encoder_2")
               if (root / name).is_dir()}
    with init_empty_weights():
        models = {"unet": UNet2DConditionModel.from_config(bundled["unet"]),
                  "vae": AutoencoderKL.from_config(bundled["vae"])}
        for name in ("text_encoder", "text_encoder_2"):
            if name in bundled:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                models[name] = cls(CLIPTextConfig(**bundled[name]))
    found = ck.ModelKind(kind=kind)
    shapes = {k: tuple(v.shape) for k, v in ldm_keys.components_to_ldm(
        tiny.Components(tokenizer=None, noise_scheduler=None, **models), found).items()}
    if kind in ("sd2", "sd2-v"):  # real SD2 files hold a 24th OpenCLIP layer the WebUI skips
        for key in [k for k in shapes if ".resblocks.22." in k]:
            shapes[key.replace(".resblocks.22.", ".resblocks.23.")] = shapes[key]
    derived = ck.derive_configs(shapes, found)
    for name, config in bundled.items():
        for field, value in config.items():
            if field.startswith("_") or field in ("sample_size", "upcast_attention"):
                continue
            got = derived[name].get(field)
            assert json.loads(json.dumps(got)) == value or (
                isinstance(value, int) and got == [value] * len(derived[name]["block_out_channels"])
            ), f"{kind} {name}.{field}: {got} != {value}"
