"""Rectified-flow SDXL (Forge Neo's "rectified" in the path): trained as Neo samples it — the
noisy latents on the straight line (1 - s)·x + s·noise, the UNet given the float 1000·s, the
velocity noise - x as the target, s shifted by ``flow_shift`` — and its pictures made by that
flow; the checkpoint keeps "rectified" in its name and says "flow" in its metadata."""
from __future__ import annotations

import functools
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.common.config import ConfigError
from dreambooth.engine.trainer import train
from dreambooth.models import families, tiny
from dreambooth.models.checkpoint import load_components
from dreambooth.models.detect import detect_kind
from dreambooth.models.objective import step_generator
from dreambooth.models.schedules import noise_schedule
from trainer_fixtures import RecordingReporter, base_config, run_paths

SDXL = families.for_kind("sdxl")


@functools.lru_cache(maxsize=1)
def _tiny_sdxl_file(folder: str):
    from pathlib import Path

    return tiny.save_checkpoint(Path(folder) / "tiny-sdxl.safetensors", kind="sdxl")


@pytest.fixture
def rectified_base(tmp_path, tmp_path_factory):
    """The tiny SDXL file under a name Neo reads as rectified flow."""
    cache = tmp_path_factory.getbasetemp() / "rectified-bases"
    cache.mkdir(exist_ok=True)
    path = tmp_path / "noob-rectified.safetensors"
    shutil.copy(_tiny_sdxl_file(str(cache)), path)
    return path


def test_the_objective_is_neo_s_flow_with_the_shift_asked_for():
    """What Neo's flow predictor assumes: x_s = (1 - s)·x + s·noise, the UNet at 1000·s, the
    model's output the velocity noise - x (Neo's x0 = x_s - s·output); the noise levels drawn
    logit-normal and shifted by flow_shift: s' = k·s / (1 + (k - 1)·s)."""
    from diffusers import DDPMScheduler

    from dreambooth.common.config import TrainingConfig

    for shift in (1.0, 3.0):
        config = TrainingConfig(flow_shift=shift)
        scheduler = noise_schedule(DDPMScheduler(), "flow", False, flow_shift=shift)
        objective = SDXL.objective(scheduler, "flow", config)
        noise, sigmas = objective.draw((4, 4, 8, 8), step_generator(7, 0), "cpu")
        again = step_generator(7, 0)
        torch.randn((4, 4, 8, 8), generator=again)  # the noise comes first
        s = torch.sigmoid(torch.randn(4, generator=again))
        assert torch.allclose(sigmas, shift * s / (1 + (shift - 1) * s))
        latents = torch.randn(4, 4, 8, 8)
        noisy, target = objective.noisy_and_target(latents, noise, sigmas)
        level = sigmas.reshape(-1, 1, 1, 1)
        assert torch.allclose(noisy, (1 - level) * latents + level * noise)
        assert torch.equal(target, noise - latents)
        assert torch.allclose(noisy - level * target, latents, atol=1e-6)  # Neo's x0
        assert torch.allclose(objective.model_timesteps(sigmas), 1000 * sigmas)
        assert objective.row_weights(sigmas, 4) is None


def test_a_rectified_sdxl_file_trains_and_samples_by_the_flow(rectified_base, tmp_path,
                                                               monkeypatch):
    from diffusers import UNet2DConditionModel

    given: list[tuple[bool, torch.Tensor, tuple[int, ...]]] = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, *args, **kwargs):
        given.append((torch.is_grad_enabled(), torch.as_tensor(timestep).detach().clone(),
                      tuple(sample.shape)))
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    config = base_config(tmp_path, base_model=str(rectified_base), model_name="zwx-rectified",
                         export_dtype="fp32", sample_steps=3, flow_shift=3.0)
    reporter = RecordingReporter()
    result = train(config, run_paths(tmp_path), reporter=reporter)
    assert "SDXL, rectified flow, shift 3, 64 px" in reporter.lines

    # training: the UNet was given 1000·s of the noise levels each step drew (its own
    # generator: the noise first, then N(0, 1) through a sigmoid, shifted by 3)
    trained = [(t, shape) for grad, t, shape in given if grad]
    assert len(trained) == 3
    for micro, (timesteps, shape) in enumerate(trained):
        generator = step_generator(config.seed, micro)
        torch.randn(shape, generator=generator)
        s = torch.sigmoid(torch.randn(shape[0], generator=generator))
        assert timesteps.is_floating_point()
        assert torch.allclose(timesteps, 1000 * 3 * s / (1 + 2 * s))
    # class pictures and the sample: the flow's Euler steps from pure noise (1000·1), shift 3
    sampled = [t for grad, t, _ in given if not grad]
    assert sampled and float(sampled[0].flatten()[0]) == pytest.approx(1000.0)
    levels = torch.tensor(sorted({float(t.flatten()[0]) for t in sampled}, reverse=True)) / 1000
    assert len(levels) == 3 and bool((levels[1:] < levels[:-1]).all())
    unshifted = levels / (3 - 2 * levels)  # evenly spaced before the shift of 3
    assert torch.allclose(unshifted[0] - unshifted[1], unshifted[1] - unshifted[2], atol=1e-5)
    assert list(run_paths(tmp_path).samples_dir.glob("*.png"))

    # the checkpoint: "rectified" in its name, "flow" in its metadata, read back as flow
    out = result.output_path
    assert out.name == "zwx-rectified.safetensors"
    metadata = safe_open(str(out), "pt").metadata()
    assert metadata["modelspec.prediction_type"] == "flow"
    assert detect_kind(out).prediction_type == "flow"
    changed = [k for k, v in load_file(str(out)).items() if k.startswith("model.diffusion_model.")
               and not torch.equal(v, load_file(str(rectified_base))[k])]
    assert changed


def test_flow_shift_changes_what_is_trained_and_the_plain_name_trains_by_noise(
        rectified_base, tmp_path):
    """flow_shift moves the noise levels trained; the same file without "rectified" in its
    path is an ordinary SDXL model and trains by noise prediction (other weights again)."""
    def trained(folder, base, **overrides):
        config = base_config(tmp_path / folder, base_model=str(base), model_name="zwx-rectified",
                             with_prior_preservation=False, export_dtype="fp32", **overrides)
        reporter = RecordingReporter()
        components, kind = load_components(base)
        train(config, run_paths(tmp_path / folder), reporter=reporter, components=components,
              prediction_type=kind.prediction_type, export_model=False)
        return torch.cat([p.detach().flatten() for p in components.unet.parameters()]), reporter

    plain = tmp_path / "plain.safetensors"
    shutil.copy(rectified_base, plain)
    shift_1, _ = trained("a", rectified_base, flow_shift=1.0)
    shift_5, _ = trained("b", rectified_base, flow_shift=5.0)
    by_noise, reporter = trained("c", plain)
    assert "SDXL, epsilon prediction, 64 px" in reporter.lines
    assert not torch.equal(shift_1, shift_5)
    assert not torch.equal(shift_1, by_noise) and not torch.equal(shift_5, by_noise)


def test_rectified_flow_options_are_checked_by_field(tmp_path):
    from dreambooth.app import preflight
    from dreambooth.host import StandaloneHost

    sd1 = tiny.save_checkpoint(tmp_path / "sd1.safetensors", kind="sd1")
    config = base_config(tmp_path, base_model=str(sd1), prediction_type="flow")
    _, errors = preflight.preflight(config, StandaloneHost(tmp_path / "models"))
    assert any(e.field == "prediction_type" and "SDXL" in e.message for e in errors), errors
    for field, value in (("min_snr_gamma", 5.0), ("zero_terminal_snr", True)):
        with pytest.raises(ConfigError) as refused:
            base_config(tmp_path, prediction_type="flow", **{field: value}).check()
        assert field in {e.field for e in refused.value.errors}
