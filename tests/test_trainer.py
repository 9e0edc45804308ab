"""The training loop on the tiny model: every option changes training as it should."""
from __future__ import annotations

import math

import pytest
import torch

from dreambooth.models import families
from dreambooth.engine import resume
from dreambooth.common.config import ConfigError, TrainingConfig
from dreambooth.models.objective import dreambooth_loss, min_snr_weights, offset_noise, snr
from dreambooth.engine.optimizers import build_optimizer
from dreambooth.engine.trainer import train

from trainer_fixtures import (RecordingReporter, base_config, flat, run_paths, tiny_components)


def run(tmp_path, reporter=None, components=None, **overrides):
    config = base_config(tmp_path, **overrides)
    components = components or tiny_components()
    result = train(config, run_paths(tmp_path), reporter=reporter or RecordingReporter(),
                   components=components, export_model=False)
    return result, components


# ---------------------------------------------------------------------------------------------
# Pure pieces: the formulas themselves
# ---------------------------------------------------------------------------------------------

def test_prior_loss_weight_adds_exactly_the_weighted_prior_term():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    no_prior, instance, prior = dreambooth_loss(pred, target, n_instance=2, prior_loss_weight=0.0)
    weighted, _, _ = dreambooth_loss(pred, target, n_instance=2, prior_loss_weight=0.75)
    assert torch.allclose(weighted - no_prior, 0.75 * prior)
    assert torch.allclose(instance, ((pred[:2] - target[:2]) ** 2).mean())
    assert torch.allclose(prior, ((pred[2:] - target[2:]) ** 2).mean())


def test_native_training_loss_has_no_prior_term():
    pred, target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    loss, instance, prior = dreambooth_loss(pred, target, n_instance=2, prior_loss_weight=1.0)
    assert prior is None and loss.item() == pytest.approx(1.0)


def test_min_snr_weights_follow_the_formula_for_epsilon_and_v():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([10, 300, 999])
    s = snr(sched.alphas_cumprod, t)
    a = sched.alphas_cumprod[t]
    assert torch.allclose(s, a / (1 - a))
    eps = min_snr_weights(s, 5.0, "epsilon")
    v = min_snr_weights(s, 5.0, "v_prediction")
    assert torch.allclose(eps, torch.minimum(s, torch.tensor(5.0)) / s)
    assert torch.allclose(v, torch.minimum(s, torch.tensor(5.0)) / (s + 1))
    assert eps[0] < 1 and eps[-1] == pytest.approx(1.0)  # low-noise steps are down-weighted


def test_offset_noise_shifts_each_channel_mean():
    plain = offset_noise((2, 4, 32, 32), 0.0, torch.Generator().manual_seed(0))
    shifted = offset_noise((2, 4, 32, 32), 0.5, torch.Generator().manual_seed(0))
    diff = shifted - plain
    per_channel = diff.mean(dim=(2, 3))
    # the difference is a constant per (sample, channel), with a spread set by the strength
    assert torch.allclose(diff, per_channel[..., None, None].expand_as(diff), atol=1e-6)
    assert 0.1 < per_channel.abs().mean() < 1.0


@pytest.mark.bitsandbytes
def test_adamw8bit_keeps_its_state_in_8_bits():
    config = TrainingConfig(optimizer="adamw8bit")
    layer = torch.nn.Linear(256, 256)
    opt = build_optimizer("adamw8bit", [{"params": layer.parameters(), "lr": 1e-3}], config,
                          torch.device("cpu"))
    layer(torch.randn(4, 256)).sum().backward()
    opt.step()
    state = opt.state[layer.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


@pytest.mark.parametrize("name", [pytest.param("lion8bit", marks=pytest.mark.bitsandbytes),
                                  pytest.param("lion", marks=pytest.mark.bitsandbytes),
                                  "prodigy", "adafactor", "sgd"])
def test_every_optimizer_builds_and_steps(name):
    config = TrainingConfig(optimizer=name)
    layer = torch.nn.Linear(256, 64)
    before = layer.weight.detach().clone()
    opt = build_optimizer(name, [{"params": layer.parameters(), "lr": 1e-3}], config,
                          torch.device("cpu"))
    layer(torch.randn(4, 256)).sum().backward()
    opt.step()
    assert not torch.equal(before, layer.weight)
    if name == "lion8bit":
        assert opt.state[layer.weight]["state1"].dtype == torch.uint8


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def test_same_seed_same_weights_and_another_seed_differs(tmp_path):
    _, a = run(tmp_path)
    _, b = run(tmp_path)
    _, c = run(tmp_path, seed=8)
    assert torch.equal(flat(a.unet), flat(b.unet))
    assert not torch.equal(flat(a.unet), flat(c.unet))


def test_loss_on_fixed_noise_decreases_with_training(tmp_path):
    from dreambooth import data

    config = base_config(tmp_path, with_prior_preservation=False, max_train_steps=40,
                         learning_rate=2e-3)
    components = tiny_components()
    pictures = data.collect_pictures(config, include_class=False)
    pixels = torch.stack([data.picture_tensor(p, config) for p in pictures])

    def fixed_loss():
        with torch.no_grad():
            latents = components.vae.encode(pixels).latent_dist.mean * 0.18215
            gen = torch.Generator().manual_seed(0)
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (len(latents),), generator=gen)
            noisy = components.noise_scheduler.add_noise(latents, noise, t)
            emb = families.encode_clip(components.text_encoder, components.tokenizer,
                                       [p.caption for p in pictures], 1, "cpu")
            return torch.nn.functional.mse_loss(components.unet(noisy, t, emb).sample, noise).item()

    before = fixed_loss()
    train(config, run_paths(tmp_path), reporter=RecordingReporter(), components=components,
          export_model=False)
    assert fixed_loss() < before * 0.9


# Options whose whole point is to change what is learned: on vs off must give other weights.
CHANGES_WEIGHTS = {
    "prior_loss_weight": 0.25,
    "learning_rate": 5e-4,
    "lr_scheduler": "linear",
    "lr_warmup_steps": 2,
    "adam_beta1": 0.5,
    "adam_beta2": 0.9,
    "adam_epsilon": 1e-3,
    "weight_decay": 0.5,
    "max_grad_norm": 1e-3,
    "gradient_accumulation_steps": 2,
    "train_batch_size": 2,
    "clip_skip": 2,
    "offset_noise": 0.1,
    "min_snr_gamma": 1.0,
    "seed": 99,
    "hflip": True,
    "random_crop": True,
    "rotation_degrees": 10.0,
    "brightness_jitter": 0.3,
    "contrast_jitter": 0.3,
    "resolution": 72,
    "with_prior_preservation": False,
    "train_text_encoder": True,
    "optimizer": "sgd",
    "prediction_type": "v_prediction",
    "mixed_precision": "bf16",
    "attention": "default",
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    _, components = run(root)
    return root, flat(components.unet)


@pytest.mark.parametrize("option", sorted(CHANGES_WEIGHTS))
def test_option_changes_training(option, baseline):
    root, reference = baseline
    _, components = run(root, **{option: CHANGES_WEIGHTS[option]})
    assert not torch.equal(flat(components.unet), reference), f"{option} had no effect"


def test_caption_options_change_the_prompts(tmp_path, monkeypatch):
    from pathlib import Path

    config = base_config(tmp_path)
    for i, picture in enumerate(sorted(Path(config.concepts[0].instance_data_dir).glob("*.png"))):
        picture.with_suffix(".txt").write_text(f"zwx toy, red, disc, table {i}, photo")
    concepts = [dict(instance_data_dir=config.concepts[0].instance_data_dir,
                     instance_prompt="[filewords]")]
    real = families.SD1.encode
    prompts: dict[str, list[str]] = {}
    for label, overrides in {"plain": {}, "shuffle": {"shuffle_tags": True},
                             "dropout": {"tag_dropout": 0.5}}.items():
        seen: list[str] = []

        def spy(family, components, batch, clip_skip, device, seen=seen):
            seen.extend(batch)
            return real(family, components, batch, clip_skip, device)

        monkeypatch.setattr(families.SD1, "encode", spy)
        run(tmp_path, with_prior_preservation=False, cache_text_embeddings=False,
            concepts=TrainingConfig.from_dict({"concepts": concepts}).concepts, **overrides)
        prompts[label] = seen
    assert all(p.startswith("zwx toy, red, disc, table") for p in prompts["plain"])
    assert prompts["plain"] != prompts["shuffle"]
    assert prompts["plain"] != prompts["dropout"]


def test_text_encoder_changes_before_its_stop_step_and_not_after(tmp_path):
    snapshots = {}
    components = tiny_components()
    initial = flat(components.text_encoder)
    reporter = RecordingReporter(on_step=lambda step: snapshots.__setitem__(
        step, flat(components.text_encoder)))
    run(tmp_path, reporter=reporter, components=components, train_text_encoder=True,
        text_encoder_stop=0.5, max_train_steps=4, text_encoder_lr=1e-3)
    assert not torch.equal(snapshots[1], initial)
    assert not torch.equal(snapshots[2], snapshots[1])
    assert torch.equal(snapshots[3], snapshots[2]) and torch.equal(snapshots[4], snapshots[2])
    assert any("text encoder frozen after step 2" in line for line in reporter.lines)


def test_text_encoder_lr_is_its_own(tmp_path):
    _, a = run(tmp_path, train_text_encoder=True, text_encoder_lr=1e-3)
    _, b = run(tmp_path, train_text_encoder=True, text_encoder_lr=1e-5)
    assert not torch.equal(flat(a.text_encoder), flat(b.text_encoder))


def test_frozen_text_encoder_is_untouched(tmp_path):
    components = tiny_components()
    before = flat(components.text_encoder)
    run(tmp_path, components=components)
    assert torch.equal(before, flat(components.text_encoder))


def test_gradient_checkpointing_is_active_on_the_unet(tmp_path):
    _, on = run(tmp_path, gradient_checkpointing=True)
    _, off = run(tmp_path, gradient_checkpointing=False)
    assert on.unet.is_gradient_checkpointing and not off.unet.is_gradient_checkpointing
    # recomputation gives the same numbers: checkpointing trades time for memory only
    assert torch.allclose(flat(on.unet), flat(off.unet), atol=1e-5)


def test_sdpa_attention_is_set(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    _, sdpa = run(tmp_path, attention="sdpa")
    _, plain = run(tmp_path, attention="default")
    assert all(isinstance(p, AttnProcessor2_0) for p in sdpa.unet.attn_processors.values())
    assert all(isinstance(p, AttnProcessor) for p in plain.unet.attn_processors.values())


def test_xformers_missing_is_a_clear_error(tmp_path):
    # xformers is never installed in the CPU lanes
    with pytest.raises(ConfigError, match="attention: xformers is not installed"):
        run(tmp_path, attention="xformers")


def test_flip_caches_both_orientations(tmp_path):
    plain = RecordingReporter()
    run(tmp_path, reporter=plain, hflip=False)
    flipped = RecordingReporter()
    run(tmp_path, reporter=flipped, hflip=True)
    # 4 instance + 4 class pictures; with flip, each is cached twice
    assert "cached 8 latents" in plain.lines and "cached 16 latents" in flipped.lines


def test_latent_cache_is_used_and_exact(tmp_path):
    calls = {"n": 0}
    components = tiny_components()
    real = components.vae.encode

    def counting(x, *a, **k):
        calls["n"] += 1
        return real(x, *a, **k)

    components.vae.encode = counting
    run(tmp_path, components=components, cache_latents=True, max_train_steps=4)
    cached_calls = calls["n"]
    calls["n"] = 0
    other = tiny_components()
    other.vae.encode = counting
    run(tmp_path, components=other, cache_latents=False, max_train_steps=4)
    assert cached_calls == 8  # each picture once
    assert calls["n"] == 4 * 2  # every step encodes its instance and class picture
    assert torch.allclose(flat(components.unet), flat(other.unet), atol=1e-6)


def test_ema_weights_differ_from_live_weights(tmp_path):
    result, components = run(tmp_path, use_ema=True, ema_decay=0.9)
    ema = torch.cat([p.flatten() for p in result.ema.shadow_params])
    assert not torch.equal(ema, flat(components.unet))
    assert result.ema.optimization_step == 3 and result.ema.current_decay() <= 0.9


def test_lr_schedulers_follow_their_shape(tmp_path):
    lrs = {}
    for name in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                 "polynomial"):
        reporter = RecordingReporter()
        run(tmp_path, reporter=reporter, lr_scheduler=name, lr_warmup_steps=2, max_train_steps=5,
            lr_num_cycles=2, lr_power=2.0)
        lrs[name] = [lr for _, _, lr in reporter.steps]
    assert lrs["constant"] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3])  # warm-up applies
    assert lrs["constant_with_warmup"] == lrs["constant"]
    assert lrs["linear"][1] == pytest.approx(1e-3) and lrs["linear"][-1] == pytest.approx(0.0)
    assert lrs["cosine"] != lrs["linear"] and lrs["cosine_with_restarts"] != lrs["cosine"]
    assert lrs["polynomial"] != lrs["linear"]
    assert len({tuple(v) for v in lrs.values()}) == 5


def test_max_train_steps_zero_uses_pictures_times_100(tmp_path):
    config = base_config(tmp_path, max_train_steps=0)
    assert config.total_steps(4) == 400


# 8-bit AdamW's quantised state, and plain AdamW where bitsandbytes is missing (the neo lane)
@pytest.mark.parametrize("optimizer", [pytest.param("adamw8bit", marks=pytest.mark.bitsandbytes),
                                       "adamw"])
def test_resume_after_a_crash_gives_the_same_weights(tmp_path, optimizer):
    _, straight = run(tmp_path / "a", max_train_steps=6, checkpoint_every_n_steps=3,
                      train_text_encoder=True, use_ema=True, optimizer=optimizer)

    class Crash(RuntimeError):
        pass

    def crash(step):
        if step == 4:
            raise Crash

    components = tiny_components()
    with pytest.raises(Crash):
        run(tmp_path / "b", reporter=RecordingReporter(on_step=crash), components=components,
            max_train_steps=6, checkpoint_every_n_steps=3, train_text_encoder=True, use_ema=True,
            optimizer=optimizer)
    resumed = tiny_components()
    reporter = RecordingReporter()
    config = base_config(tmp_path / "b", max_train_steps=6, checkpoint_every_n_steps=3,
                         train_text_encoder=True, use_ema=True, optimizer=optimizer)
    result = train(config, run_paths(tmp_path / "b"), reporter=reporter, components=resumed,
                   resume=True, export_model=False)
    assert any("resumed from step-000003" in line for line in reporter.lines)
    assert [s for s, _, _ in reporter.steps] == [4, 5, 6]
    assert result.steps == 6
    assert torch.equal(flat(resumed.unet), flat(straight.unet))
    assert torch.equal(flat(resumed.text_encoder), flat(straight.text_encoder))


def test_resume_points_keep_the_retention_limit(tmp_path):
    run(tmp_path, max_train_steps=9, checkpoint_every_n_steps=2, checkpoints_total_limit=2)
    points = resume.list_resume_points(run_paths(tmp_path).resume_dir)
    assert [p.name for p in points] == ["step-000006", "step-000008"]


def test_samples_are_written_every_n_steps(tmp_path):
    reporter = RecordingReporter()
    shown = []
    reporter.samples = lambda paths: shown.extend(paths)
    run(tmp_path, reporter=reporter, max_train_steps=4, sample_every_n_steps=2, sample_steps=2,
        sample_prompts=["photo of zwx toy", "zwx toy on a beach"])
    names = sorted(p.name for p in shown)
    assert names == ["step-000002-0.png", "step-000002-1.png", "step-000004-0.png",
                     "step-000004-1.png"]
    from PIL import Image

    assert Image.open(shown[0]).size == (64, 64)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any heavy work
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    ({"max_train_steps": -1}, "max_train_steps"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"resolution": 500}, "resolution"),
    ({"optimizer": "adam9000"}, "optimizer"),
    ({"train_batch_size": 5}, "train_batch_size"),
])
def test_bad_options_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        run(tmp_path, **overrides)
    assert any(e.field == field for e in err.value.errors), err.value


def test_missing_class_prompt_with_prior_preservation(tmp_path):
    config = base_config(tmp_path)
    config.concepts[0].class_prompt = ""
    with pytest.raises(ConfigError, match=r"concepts\[0\].class_prompt"):
        train(config, run_paths(tmp_path), components=tiny_components(), export_model=False)


@pytest.mark.parametrize("problem", ["missing", "empty", "no pictures"])
def test_bad_instance_folder_is_named(tmp_path, problem):
    folder = tmp_path / "pics"
    if problem != "missing":
        folder.mkdir()
    if problem == "no pictures":
        (folder / "notes.txt").write_text("hello")
    config = base_config(tmp_path)
    config.concepts[0].instance_data_dir = str(folder)
    with pytest.raises(ValueError, match="instance_data_dir"):
        train(config, run_paths(tmp_path), components=tiny_components(), export_model=False)


def test_unknown_option_in_json_is_named():
    with pytest.raises(ConfigError, match="learnin_rate: unknown option"):
        TrainingConfig.from_dict({"learnin_rate": 1e-6})
    assert math.isclose(TrainingConfig.from_dict({"learning_rate": "2e-6"}).learning_rate, 2e-6)


def test_an_existing_output_is_refused_before_training(tmp_path):
    paths = run_paths(tmp_path)
    paths.checkpoints_dir.mkdir(parents=True)
    (paths.checkpoints_dir / "test-model.safetensors").write_bytes(b"precious")
    config = base_config(tmp_path)
    reporter = RecordingReporter()
    with pytest.raises(ConfigError, match="model_name: .* already exists"):
        train(config, paths, reporter=reporter, components=tiny_components())
    assert reporter.phases == []  # nothing heavy started
    assert (paths.checkpoints_dir / "test-model.safetensors").read_bytes() == b"precious"


def test_sd2_v_prediction_model_trains(tmp_path):
    from dreambooth.models.tiny import build_variant

    components = build_variant("sd2-v")
    before = flat(components.unet)
    config = base_config(tmp_path)
    result = train(config, run_paths(tmp_path), reporter=RecordingReporter(), components=components,
                   prediction_type="v_prediction", export_model=False)
    assert result.steps == 3 and not torch.equal(before, flat(components.unet))


def test_text_embedding_cache_encodes_each_prompt_once(tmp_path, monkeypatch):
    real = families.SD1.encode
    counts = {}
    for cached in (True, False):
        calls = []
        monkeypatch.setattr(families.SD1, "encode",
                            lambda fam, comps, batch, cs, dev, calls=calls: calls.append(list(batch))
                            or real(fam, comps, batch, cs, dev))
        reporter = RecordingReporter()
        components = tiny_components()
        run(tmp_path, reporter=reporter, components=components, cache_text_embeddings=cached,
            max_train_steps=4)
        counts[cached] = calls
        if cached:
            assert "cached 2 text embeddings" in reporter.lines
            assert next(components.text_encoder.parameters()).device.type == "cpu"
    assert counts[True] == [["photo of zwx toy", "photo of a toy"]]  # once, before training
    assert len(counts[False]) == 4  # every step


def test_save_every_n_steps_and_save_on_cancel_export_models(tmp_path):
    from dreambooth.models import tiny

    base = tmp_path / "base.safetensors"
    tiny.save_checkpoint(base, size="tiny", seed=0)
    paths = run_paths(tmp_path)
    config = base_config(tmp_path, base_model=str(base), max_train_steps=4, save_every_n_steps=2)
    train(config, paths, reporter=RecordingReporter(), components=tiny_components())
    assert sorted(p.name for p in paths.checkpoints_dir.iterdir()) == [
        "test-model.safetensors", "test-model_2.safetensors"]

    for save_on_cancel, expected in ((True, ["other_2.safetensors"]), (False, [])):
        out = tmp_path / f"cancel-{save_on_cancel}"
        reporter = RecordingReporter()
        reporter.should_stop = lambda: len(reporter.steps) >= 2
        config = base_config(tmp_path, base_model=str(base), model_name="other",
                             max_train_steps=50, save_on_cancel=save_on_cancel)
        result = train(config, run_paths(out), reporter=reporter, components=tiny_components())
        assert result.cancelled and result.steps == 2
        found = sorted(p.name for p in run_paths(out).checkpoints_dir.glob("*.safetensors")) \
            if run_paths(out).checkpoints_dir.exists() else []
        assert found == expected
        assert [p.name for p in resume.list_resume_points(run_paths(out).resume_dir)] == [
            "step-000002"]  # a cancelled run can always be resumed


@pytest.mark.parametrize("option, value", [("sample_negative_prompt", "blurry"),
                                           ("sample_guidance_scale", 2.0),
                                           ("sample_seed", 7),
                                           ("sample_steps", 3)])
def test_sample_options_change_the_sample(tmp_path, option, value):
    import numpy as np
    from PIL import Image

    from dreambooth.engine.sampling import generate_samples

    components = tiny_components()
    base = base_config(tmp_path, sample_steps=2, sample_prompts=["photo of zwx toy"])
    first = generate_samples(components, base, tmp_path / "a", 1, torch.device("cpu"))[0]
    changed = base_config(tmp_path, **{"sample_steps": 2, "sample_prompts": ["photo of zwx toy"],
                                       option: value})
    second = generate_samples(components, changed, tmp_path / "b", 1, torch.device("cpu"))[0]
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_sample_size_sets_the_picture_size(tmp_path):
    from PIL import Image

    from dreambooth.engine.sampling import generate_samples

    config = base_config(tmp_path, sample_steps=1, sample_size=48, sample_prompts=["zwx"])
    path = generate_samples(tiny_components(), config, tmp_path, 1, torch.device("cpu"))[0]
    assert Image.open(path).size == (48, 48)
