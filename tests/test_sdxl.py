"""SDXL through the one training loop, on the tiny SDXL-shaped model (both tokenizers from the
bundled CLIP vocabulary): its conditioning equals diffusers', each part of it reaches the UNet,
prior preservation splits the loss as for SD1, its options change training, and a trained file
reloads through diffusers' own loaders with the base's markers kept."""
from __future__ import annotations

import copy
import functools
import json
import random

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth import data
from dreambooth.models import families
from dreambooth.engine import trainer
from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.models.detect import detect_kind
from dreambooth.models.tiny import Components, build_variant, save_checkpoint
from dreambooth.engine.trainer import LatentSource, train
from trainer_fixtures import RecordingReporter, base_config, flat, run_paths

SDXL = families.for_kind("sdxl")


@functools.lru_cache(maxsize=1)
def _tiny_sdxl() -> Components:
    return build_variant("sdxl", seed=0)


def tiny_sdxl() -> Components:
    return copy.deepcopy(_tiny_sdxl())


def run(tmp_path, components=None, reporter=None, **overrides):
    config = base_config(tmp_path, **overrides)
    components = components or tiny_sdxl()
    result = train(config, run_paths(tmp_path), reporter=reporter or RecordingReporter(),
                   components=components, export_model=False)
    return result, components


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clip_skip", [1, 2])
def test_prompt_encoding_equals_diffusers_encode_prompt(clip_skip):
    components = tiny_sdxl()
    prompts = ["photo of zwx toy", "a red toy, on a table, studio light"]
    ours = SDXL.encode(components, prompts, clip_skip, "cpu")
    with torch.no_grad():
        hidden, _, pooled, _ = components.pipeline().encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
            clip_skip=clip_skip - 1 if clip_skip > 1 else None)
    assert torch.equal(ours.hidden, hidden) and torch.equal(ours.pooled, pooled)
    # both encoders' hidden states, side by side; the pooled projection of the second
    widths = components.text_encoder.config.hidden_size + components.text_encoder_2.config.hidden_size
    assert ours.hidden.shape == (2, 77, widths)
    assert ours.pooled.shape == (2, components.text_encoder_2.config.projection_dim)


def test_clip_skip_changes_the_sdxl_conditioning():
    components = tiny_sdxl()
    one = SDXL.encode(components, ["photo of zwx toy"], 1, "cpu")
    two = SDXL.encode(components, ["photo of zwx toy"], 2, "cpu")
    assert not torch.equal(one.hidden, two.hidden)


def _picture(tmp_path, size=(100, 60)):
    folder = tmp_path / "pictures"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(folder / "zwx.png")
    config = TrainingConfig(concepts=[Concept(instance_data_dir=str(folder),
                                              instance_prompt="photo of zwx toy")],
                            with_prior_preservation=False, resolution=64)
    return config, data.collect_pictures(config, include_class=False)[0]


def test_size_and_crop_conditioning_follow_the_picture(tmp_path):
    """add_time_ids = original (h, w), crop top-left (top, left) in the resized picture, bucket
    (h, w): a 100x60 picture covers 64x64 as 107x64, so the centre crop starts 21 px in."""
    config, picture = _picture(tmp_path)
    source = LatentSource(tiny_sdxl().vae, config, "cpu", torch.float32, SDXL)
    assert source.encode(picture, False, (64, 64), None).conditioning.tolist() == [
        60, 100, 0, 21, 64, 64]
    # mirrored: the crop's left edge is measured from the other side
    assert source.encode(picture, True, (64, 64), None).conditioning.tolist() == [
        60, 100, 0, 22, 64, 64]
    # another bucket (width 48, height 64): target and crop follow it
    assert source.encode(picture, False, (48, 64), None).conditioning.tolist() == [
        60, 100, 0, 29, 64, 48]
    # a random crop moves the corner with the window it picks
    crops = {tuple(source.encode(picture, False, (64, 64), random.Random(seed))
                   .conditioning.tolist()) for seed in range(8)}
    assert len(crops) == 1  # random_crop is off: the rng does not move it
    config.random_crop = True
    source = LatentSource(tiny_sdxl().vae, config, "cpu", torch.float32, SDXL)
    crops = {tuple(source.encode(picture, False, (64, 64), random.Random(seed))
                   .conditioning.tolist()[2:4]) for seed in range(8)}
    assert len(crops) > 1


def test_sd1_pictures_bring_no_extra_conditioning(tmp_path):
    config, picture = _picture(tmp_path)
    source = LatentSource(tiny_sdxl().vae, config, "cpu", torch.float32, families.for_kind("sd1"))
    assert source.encode(picture, False, (64, 64), None).conditioning is None


def test_each_part_of_the_conditioning_changes_the_unet_output():
    components = tiny_sdxl()
    torch.manual_seed(0)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = SDXL.encode(components, ["photo of zwx toy"], 1, "cpu")

    def out(conditioning, original=(60, 100), crop=(0, 21), target=(64, 64)):
        ids = SDXL.picture_conditioning(original, crop, target)[None]
        with torch.no_grad():
            return components.unet(latents, t, **SDXL.unet_inputs(conditioning, ids)).sample

    reference = out(cond)
    assert torch.equal(out(cond), reference)
    changed = {
        "original size": out(cond, original=(120, 200)),
        "crop": out(cond, crop=(10, 0)),
        "target size": out(cond, target=(64, 48)),
        "pooled embedding": out(families.Conditioning(cond.hidden, torch.zeros_like(cond.pooled))),
        "hidden states": out(SDXL.encode(components, ["photo of zwx toy"], 2, "cpu")),
    }
    for what, value in changed.items():
        assert not torch.allclose(value, reference), f"{what} does not reach the UNet"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def test_prior_preservation_splits_the_loss_as_for_sd1(tmp_path, monkeypatch):
    from dreambooth.engine.training_log import read_log

    seen = []
    real = families.SDXL.unet_inputs

    def spy(family, conditioning, picture_conditioning):
        seen.append(picture_conditioning.clone())
        return real(family, conditioning, picture_conditioning)

    monkeypatch.setattr(families.SDXL, "unet_inputs", spy)
    run(tmp_path, prior_loss_weight=0.5, max_train_steps=3)
    records = [r for r in read_log(run_paths(tmp_path).logs_dir / "train.jsonl") if "loss" in r]
    assert len(records) == 3
    for record in records:
        assert record["loss"] == pytest.approx(record["loss_instance"] + 0.5 * record["loss_prior"],
                                               rel=1e-5)
        assert record["loss_instance"] != record["loss_prior"]
    # the instance row (a 72 px picture) first, then its class partner (64 px): each row
    # conditioned on its own picture's size, from the latent cache
    for ids in seen:
        assert ids.shape == (2, 6)
        assert ids[0].tolist() == [72, 72, 0, 0, 64, 64] and ids[1].tolist() == [64, 64, 0, 0, 64, 64]


def test_sdxl_trains_both_text_encoders_each_with_its_own_lr_and_stop(tmp_path):
    initial = tiny_sdxl()
    snapshots = {}
    components = tiny_sdxl()
    reporter = RecordingReporter(on_step=lambda step: snapshots.__setitem__(
        step, (flat(components.text_encoder), flat(components.text_encoder_2))))
    run(tmp_path, components=components, reporter=reporter, train_text_encoder=True,
        text_encoder_stop=1.0, text_encoder_2_stop=2, max_train_steps=4)
    first, second = flat(initial.text_encoder), flat(initial.text_encoder_2)
    assert not torch.equal(snapshots[1][0], first) and not torch.equal(snapshots[1][1], second)
    assert not torch.equal(snapshots[2][1], snapshots[1][1])
    assert not torch.equal(snapshots[4][0], snapshots[2][0])  # the first trains on
    assert torch.equal(snapshots[4][1], snapshots[2][1])  # the second stopped after step 2
    assert "text encoder 2 frozen after step 2" in reporter.lines

    _, frozen = run(tmp_path / "frozen", train_text_encoder=True, text_encoder_2_stop=0)
    assert torch.equal(flat(frozen.text_encoder_2), second)
    assert not torch.equal(flat(frozen.text_encoder), first)


# Options that must change an SDXL run: on vs the baseline, other weights.
SDXL_CHANGES = {
    "text_encoder_2_lr": ("text_encoder_2", dict(train_text_encoder=True, text_encoder_2_lr=1e-5)),
    "text_encoder_2_stop": ("text_encoder_2", dict(train_text_encoder=True, text_encoder_2_stop=2)),
    "clip_skip": ("unet", dict(train_text_encoder=True, clip_skip=2)),
    "optimizer": ("unet", dict(train_text_encoder=True, optimizer="adafactor")),
    "prediction_type": ("unet", dict(train_text_encoder=True, prediction_type="v_prediction")),
}


@pytest.fixture(scope="module")
def sdxl_baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-baseline")
    _, components = run(root, train_text_encoder=True)
    return root, components


@pytest.mark.parametrize("option", sorted(SDXL_CHANGES))
def test_sdxl_option_changes_training(option, sdxl_baseline):
    root, reference = sdxl_baseline
    part, overrides = SDXL_CHANGES[option]
    _, components = run(root, **overrides)
    assert not torch.equal(flat(getattr(components, part)), flat(getattr(reference, part))), \
        f"{option} had no effect on the {part}"


def test_zero_terminal_snr_changes_v_training_and_is_refused_with_epsilon(tmp_path):
    from dreambooth.common.config import ConfigError

    _, plain = run(tmp_path / "v", prediction_type="v_prediction")
    reporter = RecordingReporter()
    _, rescaled = run(tmp_path / "v-ztsnr", reporter=reporter, prediction_type="v_prediction",
                      zero_terminal_snr=True)
    assert not torch.equal(flat(plain.unet), flat(rescaled.unet))
    assert "SDXL, v_prediction prediction, zero terminal SNR, 64 px" in reporter.lines
    assert rescaled.noise_scheduler.alphas_cumprod[-1] == 0  # the last timestep is pure noise
    with pytest.raises(ConfigError, match="zero_terminal_snr: needs v-prediction"):
        run(tmp_path / "eps", zero_terminal_snr=True)


def test_frozen_text_encoders_are_cached_and_leave_the_gpu(tmp_path, monkeypatch):
    calls = []
    real = families.SDXL.encode
    monkeypatch.setattr(families.SDXL, "encode", lambda fam, comps, batch, cs, dev: calls.append(
        list(batch)) or real(fam, comps, batch, cs, dev))
    reporter = RecordingReporter()
    components = tiny_sdxl()
    run(tmp_path, components=components, reporter=reporter, max_train_steps=4)
    assert calls == [["photo of zwx toy", "photo of a toy"]]  # once each, before training
    assert "cached 2 text embeddings" in reporter.lines


def test_sdxl_latents_are_encoded_in_fp32_unless_the_vae_is_fp16_safe():
    config = TrainingConfig()
    half = torch.float16
    assert trainer.latent_dtype(SDXL, config, half) == torch.float32
    assert trainer.latent_dtype(SDXL, TrainingConfig(vae_fp16_safe=True), half) == half
    assert trainer.latent_dtype(families.for_kind("sd1"), config, half) == half


def test_the_latent_scale_comes_from_the_vae(tmp_path):
    components = tiny_sdxl()
    assert components.vae.config.scaling_factor == pytest.approx(0.13025)
    config, picture = _picture(tmp_path)
    source = LatentSource(components.vae, config, "cpu", torch.float32, SDXL)
    encoded = source.encode(picture, False, (64, 64), None)
    view = data.picture_view(picture, config, bucket=(64, 64))
    with torch.no_grad():
        raw = components.vae.encode(view.pixels[None]).latent_dist.mean[0]
    assert torch.allclose(encoded.mean, raw * 0.13025)


def test_resolution_zero_is_the_models_own(tmp_path):
    base = save_checkpoint(tmp_path / "xl.safetensors", kind="sdxl")
    sd1 = save_checkpoint(tmp_path / "one.safetensors", kind="sd1")
    assert families.with_model_resolution(TrainingConfig(base_model=str(base))).resolution == 1024
    assert families.with_model_resolution(TrainingConfig(base_model=str(sd1))).resolution == 512
    assert families.with_model_resolution(
        TrainingConfig(base_model=str(base), resolution=768)).resolution == 768
    reporter = RecordingReporter()
    run(tmp_path / "run", reporter=reporter, resolution=0, max_train_steps=1,
        with_prior_preservation=False, sample_steps=0)
    assert "SDXL, epsilon prediction, 1024 px" in reporter.lines


# ---------------------------------------------------------------------------------------------
# The whole path: a v-pred / zero-terminal-SNR SDXL file in, a trained file out
# ---------------------------------------------------------------------------------------------

def _marked_base(path):
    """A tiny SDXL single file carrying NoobAI's v_pred / ztsnr markers."""
    save_checkpoint(path, kind="sdxl")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors.update(v_pred=torch.zeros(0), ztsnr=torch.zeros(0))
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_trained_sdxl_file_reloads_in_diffusers_with_its_markers(tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    from dreambooth.models import checkpoint

    base = _marked_base(tmp_path / "noob-vpred.safetensors")
    config = base_config(tmp_path, base_model=str(base), train_text_encoder=True,
                         export_dtype="fp32", sample_steps=2)
    reporter = RecordingReporter()
    components, _ = checkpoint.load_components(base)
    result = train(config, run_paths(tmp_path), reporter=reporter, components=None)
    assert "SDXL, v_prediction prediction, zero terminal SNR, 64 px" in reporter.lines
    out = result.output_path
    written, original = load_file(str(out)), load_file(str(base))
    assert written.keys() == original.keys() and "v_pred" in written and "ztsnr" in written
    assert all(torch.equal(written[k], original[k]) for k in original
               if k.startswith("first_stage_model."))  # the VAE was not trained
    changed = [k for k in original if k.startswith("model.diffusion_model.")
               and not torch.equal(written[k], original[k])]
    assert changed
    kind = detect_kind(out)
    assert (kind.kind, kind.prediction_type, kind.zero_terminal_snr) == ("sdxl", "v_prediction", True)

    # diffusers' own loaders read what the run trained, bit for bit (fp32 export)
    trained, _ = checkpoint.load_components(out)
    folder = checkpoint.config_folder(out, tmp_path / "config")
    unet = UNet2DConditionModel.from_single_file(str(out), config=str(folder), subfolder="unet",
                                                 local_files_only=True)
    encoder_2 = create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection, written, subfolder="text_encoder_2", config=str(folder),
        local_files_only=True)
    assert torch.equal(flat(unet), flat(trained.unet))
    assert torch.equal(flat(encoder_2), flat(trained.text_encoder_2))
    assert not torch.equal(flat(trained.text_encoder_2), flat(components.text_encoder_2))
    # the sample was made with the v / zero-SNR sampler (trailing DDIM, CFG rescale)
    assert result.steps == 3 and list(run_paths(tmp_path).samples_dir.glob("*.png"))
    settings = json.loads(safe_open(str(out), "pt").metadata()["dreambooth.config"])
    assert settings["train_text_encoder"] is True


def test_samples_use_the_zero_snr_sampler(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    calls = []
    real = StableDiffusionXLPipeline.__call__

    def spy(pipe, *args, **kwargs):
        calls.append((pipe.scheduler.config.timestep_spacing,
                      pipe.scheduler.config.rescale_betas_zero_snr, kwargs.get("guidance_rescale")))
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", spy)
    run(tmp_path, zero_terminal_snr=True, prediction_type="v_prediction", sample_steps=2,
        max_train_steps=1)
    assert calls == [("trailing", True, 0.7)]
    calls.clear()
    run(tmp_path / "plain", sample_steps=2, max_train_steps=1)
    assert calls and calls[0][1] is False and calls[0][2] == 0.0


# ---------------------------------------------------------------------------------------------
# The command line and the API on an SDXL base
# ---------------------------------------------------------------------------------------------

def test_the_command_line_trains_an_sdxl_base(tmp_path, capsys):
    from dreambooth.__main__ import main

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    base = save_checkpoint(models / "Stable-diffusion" / "xl-base.safetensors", kind="sdxl")
    config = base_config(tmp_path, base_model=str(base), model_name="xl-cli",
                         models_dir=str(models), max_train_steps=2, sample_steps=0)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert main(["train", str(path)]) == 0
    out = models / "Stable-diffusion" / "xl-cli.safetensors"
    printed = capsys.readouterr().out
    assert "trained 2/2 steps" in printed and str(out) in printed
    assert detect_kind(out).kind == "sdxl"


def test_the_api_trains_an_sdxl_base(tmp_path):
    import time

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from dreambooth.app import api
    from dreambooth.app.job import runner
    from dreambooth.host import StandaloneHost
    from ui_fixtures import quick_config

    host = StandaloneHost(tmp_path / "models")
    host.checkpoints_dir().mkdir(parents=True, exist_ok=True)
    save_checkpoint(host.checkpoints_dir() / "xl-base.safetensors", kind="sdxl")
    app = FastAPI()
    api.mount(app, host=host, credentials={})
    client = TestClient(app, base_url="http://127.0.0.1:7860")
    body = quick_config(tmp_path, base="xl-base.safetensors", name="xl-api", steps=2).to_dict()
    body.pop("models_dir")
    try:
        assert client.post(f"{api.PREFIX}/train", json=body).status_code == 200
        deadline = time.time() + 120
        while (status := client.get(f"{api.PREFIX}/status").json())["phase"] not in (
                "done", "failed") and time.time() < deadline:
            time.sleep(0.2)
        assert status["phase"] == "done", status["log"][-10:]
        assert any("SDXL, epsilon prediction, 64 px" in line for line in status["log"])
    finally:
        runner().cancel()
        runner().wait(120)
    titles = [c["title"] for c in client.get(f"{api.PREFIX}/models").json()["checkpoints"]]
    assert "xl-api.safetensors" in titles
    assert detect_kind(host.checkpoints_dir() / "xl-api.safetensors").kind == "sdxl"


def test_the_memory_estimate_knows_the_family():
    estimate = dict(train_text_encoder=False, optimizer="adamw8bit", gradient_checkpointing=True,
                    mixed_precision="fp16", pictures=1)
    sd1 = families.for_kind("sd1").memory_estimate(resolution=512, **estimate)["total"]
    xl = SDXL.memory_estimate(resolution=1024, **estimate)["total"]
    assert xl > 2 * sd1
    assert SDXL.memory_estimate(resolution=512, **estimate)["total"] < xl  # smaller pictures, less
