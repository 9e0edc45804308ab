"""It learns: a short DreamBooth run on the tiny model must teach it the instance pictures, and
prior preservation must keep the base model's class pictures and hold the class prompt back.

Measure: the denoising error (epsilon MSE) at fixed noise and 16 fixed timesteps in 0..249 (where
the picture, not the noise, decides what the model must predict), on the instance pictures'
latents and on the class pictures' latents (VAE posterior mean x scaling factor, as the trainer
encodes them). The class pictures are made by the trainer from the base model, as in real use.

The tiny VAE's latents are about 30 times smaller than SD's at SD's 0.18215, so small that a
picture changes the noisy latent less than the noise does at nearly every timestep; the test
calibrates its copy of the model as SD calibrated 0.18215 (1 / std of the latents: 5.5 here), so
the pictures matter to the UNet as much as in SD.

Figures (60 steps, lr 5e-3, adamw, model seed = s, config seed = s + 7), measured with
`PYTHONPATH=. python tests/test_learning.py 0 1 2 3 4`:

  seed | instance error / base      | class-picture error / base | class prompt's instance bias
       | prior      no prior        | prior      no prior        | drift prior  drift no prior
  0    | 0.48       0.52            | 0.68       1.08            | 0.28         0.51
  1    | 0.52       0.55            | 0.73       1.03            | 0.28         0.46
  2    | 0.58       0.58            | 0.75       0.97            | 0.22         0.40
  3    | 0.57       0.50            | 0.73       1.03            | 0.21         0.51
  4    | 0.52       0.47            | 0.71       1.00            | 0.27         0.53

"drift" = 1 - E(class prompt, instance pictures) / E(class prompt, class pictures): 0 for the base
model (it knows neither), larger the more the class prompt fits the instance pictures better than
the base model's own class pictures. Thresholds below: instance < 0.75 of base; class pictures with
prior < 0.9 of base and below the run without prior; drift without prior > 0.2 and > 1.3 x drift
with prior.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.models.tiny import build_components
from dreambooth.engine.trainer import Reporter, RunPaths, train

INSTANCE_PROMPT, CLASS_PROMPT = "photo of zwx toy", "photo of a toy"
LATENT_SCALE = 5.5  # 1 / std of the tiny VAE's raw latents (SD: 0.18215 for its VAE)
SEEDS = (0, 3)


def draw_instance_pictures(folder, count=4):
    """The subject: a red-on-blue checkerboard, a little different in each picture."""
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (64, 64), (30, 30, 200))
        draw = ImageDraw.Draw(image)
        for x in range(0, 64, 16):
            for y in range(0, 64, 16):
                if (x // 16 + y // 16) % 2:
                    draw.rectangle([x, y, x + 15, y + 15], fill=(230, 40 + 10 * i, 30))
        image.save(folder / f"zwx_{i}.png")


def model(seed):
    components = build_components("tiny", seed=seed)
    components.vae.register_to_config(scaling_factor=LATENT_SCALE)
    return components


def latents_of(components, folder):
    pictures = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    pixels = torch.stack([
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1)
        .permute(2, 0, 1) for p in pictures])
    with torch.no_grad():
        return components.vae.encode(pixels).latent_dist.mean * components.vae.config.scaling_factor


def denoising_error(components, prompt, latents, timesteps=16):
    """Epsilon MSE at fixed noise and fixed timesteps 0..249, with the prompt's embedding."""
    x0 = latents.repeat(timesteps, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(99))
    t = torch.linspace(0, 249, timesteps).long().repeat_interleave(len(latents))
    tok = components.tokenizer
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = components.text_encoder(ids)[0].expand(len(x0), -1, -1)
        noisy = components.noise_scheduler.add_noise(x0, noise, t)
        pred = components.unet(noisy, t, hidden).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


def errors(components, instance_latents, class_latents):
    return {"instance": denoising_error(components, INSTANCE_PROMPT, instance_latents),
            "class": denoising_error(components, CLASS_PROMPT, class_latents),
            "class_on_instance": denoising_error(components, CLASS_PROMPT, instance_latents)}


def drift(e):
    """How much better the class prompt fits the instance pictures than the class pictures."""
    return 1 - e["class_on_instance"] / e["class"]


def measure(seed, root):
    """Train with and without prior preservation from the same base; the errors of all three."""
    draw_instance_pictures(root / "instance")
    trained = {}
    for prior in (True, False):
        components = model(seed)
        config = TrainingConfig(
            base_model=str(root / "base.safetensors"), model_name="learning",
            concepts=[Concept(instance_data_dir=str(root / "instance"),
                              instance_prompt=INSTANCE_PROMPT, class_data_dir=str(root / "class"),
                              class_prompt=CLASS_PROMPT)],
            with_prior_preservation=prior, num_class_images=4, class_sample_steps=10,
            resolution=64, max_train_steps=60, learning_rate=5e-3, optimizer="adamw",
            mixed_precision="no", gradient_checkpointing=False, checkpoint_every_n_steps=0,
            sample_steps=0, seed=seed + 7)
        paths = RunPaths(work_dir=root / f"work-{prior}", checkpoints_dir=root / "models")
        result = train(config, paths, reporter=Reporter(), components=components,
                       export_model=False)
        assert result.steps == 60 and not result.cancelled
        trained[prior] = components
    base = model(seed)
    instance_latents = latents_of(base, root / "instance")
    class_latents = latents_of(base, root / "class")  # made by the run with prior, from the base
    assert len(class_latents) == 4
    return {"base": errors(base, instance_latents, class_latents),
            "prior": errors(trained[True], instance_latents, class_latents),
            "no_prior": errors(trained[False], instance_latents, class_latents)}


@pytest.fixture(scope="module", params=SEEDS, ids=lambda s: f"seed{s}")
def runs(request, tmp_path_factory):
    return measure(request.param, tmp_path_factory.mktemp(f"learning{request.param}"))


@pytest.mark.parametrize("run", ["prior", "no_prior"])
def test_training_teaches_the_instance_pictures(runs, run):
    base, after = runs["base"]["instance"], runs[run]["instance"]
    assert after < 0.75 * base, f"instance error {base:.3f} -> {after:.3f}"


def test_prior_preservation_keeps_the_base_models_class_pictures(runs):
    base, prior, no_prior = (runs[k]["class"] for k in ("base", "prior", "no_prior"))
    assert prior < 0.9 * base, f"class-picture error {base:.3f} -> {prior:.3f} with prior"
    assert prior < no_prior, f"class-picture error {prior:.3f} with prior, {no_prior:.3f} without"


def test_without_prior_the_class_prompt_drifts_more_toward_the_instance(runs):
    with_prior, without = drift(runs["prior"]), drift(runs["no_prior"])
    assert abs(drift(runs["base"])) < 0.05  # the base model favours neither set of pictures
    assert without > 0.2, f"drift {without:.3f} without prior: the class prompt barely moved"
    assert without > 1.3 * with_prior, f"drift {with_prior:.3f} with prior, {without:.3f} without"


if __name__ == "__main__":  # the per-seed table of the module docstring
    import sys
    import tempfile
    from pathlib import Path

    torch.set_num_threads(2)
    print("seed  instance/base prior no-prior  class/base prior no-prior  drift prior no-prior")
    for arg in sys.argv[1:] or ["0", "1", "2", "3", "4"]:
        e = measure(int(arg), Path(tempfile.mkdtemp()))
        b = e["base"]
        print(f"{arg:>4}  {e['prior']['instance'] / b['instance']:.2f} "
              f"{e['no_prior']['instance'] / b['instance']:.2f}  "
              f"{e['prior']['class'] / b['class']:.2f} {e['no_prior']['class'] / b['class']:.2f}  "
              f"{drift(e['prior']):.2f} {drift(e['no_prior']):.2f}  (base drift {drift(b):+.3f})",
              flush=True)
