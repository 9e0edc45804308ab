"""The built-in demo: the whole path on the tiny model, on the CPU, in about a minute.

It builds a tiny Stable-Diffusion-shaped checkpoint (SD1, or SDXL with ``family="sdxl"``: two
text encoders, size and crop conditioning, the SGM file layout; or a tiny Flux.1 dev with
``family="flux"``: a LoRA by flow matching, from an all-in-one file as Forge keeps them), draws a handful of pictures of a
"zwx toy" (a red disc on varied backgrounds), then trains with prior preservation exactly as the
tab would: class pictures, latent cache, training, samples, export of a ``.safetensors`` file.
"""
from __future__ import annotations

import random
from pathlib import Path

from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.engine.trainer import Reporter, RunPaths, TrainResult, train

DEMO_NAME = "dreambooth-demo"
FAMILIES = ("sd1", "sdxl", "flux")


def run_paths(config: TrainingConfig, models_dir: str | Path | None = None) -> RunPaths:
    """Standalone layout: <models>/dreambooth/<name>/ and <models>/Stable-diffusion/."""
    from dreambooth.host import StandaloneHost

    host = StandaloneHost(Path(models_dir or config.models_dir or "models"))
    return RunPaths(work_dir=host.work_dir(config.model_name),
                    checkpoints_dir=host.output_dir(), lora_dir=host.lora_dir())


def base_path(models_dir: Path, family: str = "sd1") -> Path:
    name = "tiny-sd-base" if family == "sd1" else f"tiny-{family}-base"
    return models_dir / "Stable-diffusion" / f"{name}.safetensors"


def demo_name(family: str = "sd1") -> str:
    return DEMO_NAME if family == "sd1" else f"{DEMO_NAME}-{family}"


def pictures_dir(models_dir: Path) -> Path:
    return models_dir / "dreambooth" / "demo-pictures"


def draw_pictures(folder: Path, count: int = 6, size: int = 96, seed: int = 0) -> list[Path]:
    """A red disc (the subject) at varied places, sizes and backgrounds."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        background = tuple(rng.randrange(40, 220) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        radius = rng.randrange(size // 5, size // 3)
        cx, cy = (rng.randrange(radius, size - radius) for _ in range(2))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(220, 30, 30))
        path = folder / f"zwx_{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def demo_config(models_dir: Path, steps: int, family: str = "sd1") -> TrainingConfig:
    pictures = pictures_dir(models_dir)
    flux = dict(training_method="lora", lora_rank=8, lora_alpha=8.0, learning_rate=1e-3,
                t5_max_length=256, sample_guidance_scale=3.5) if family == "flux" else {}
    return TrainingConfig(**{**dict(
        base_model=str(base_path(models_dir, family)), model_name=demo_name(family),
        models_dir=str(models_dir), train_text_encoder=family == "sdxl",
        concepts=[Concept(instance_data_dir=str(pictures), instance_prompt="photo of zwx toy",
                          class_data_dir=str(models_dir / "dreambooth" / "demo-class-toy"),
                          class_prompt="photo of a toy", sample_prompt="photo of zwx toy on a table")],
        with_prior_preservation=True, num_class_images=4, class_batch_size=4, class_sample_steps=4,
        resolution=64, hflip=True, max_train_steps=steps, learning_rate=1e-4, optimizer="adamw",
        mixed_precision="no", sample_every_n_steps=max(steps // 3, 1), sample_steps=4,
        checkpoint_every_n_steps=max(steps // 2, 1), overwrite=True, seed=1337), **flux})


def run(models_dir: Path, steps: int = 60, reporter: Reporter | None = None,
        family: str = "sd1") -> tuple[TrainResult, RunPaths]:
    """The demo on the tiny model of ``family`` (sd1; sdxl: both text encoders trained; flux:
    a LoRA in models/Lora)."""
    from dreambooth.models import tiny

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    models_dir = Path(models_dir)
    base = base_path(models_dir, family)
    if not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        if family == "flux":  # an all-in-one file: transformer, CLIP-L, T5 and VAE
            from dreambooth.models.flux_files import save_flux_file
            from dreambooth.models.tiny_flux import build_flux

            save_flux_file(build_flux("dev", seed=0), base, layout="all-in-one")
        else:
            tiny.save_checkpoint(base, size="tiny", seed=0, kind=family)
    draw_pictures(pictures_dir(models_dir))
    config = demo_config(models_dir, steps, family)
    paths = run_paths(config)
    return train(config, paths, reporter=reporter), paths
