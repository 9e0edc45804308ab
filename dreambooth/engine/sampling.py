"""Preview pictures during training: the configured prompts, seeded, saved in the work folder."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Callable

import torch

from dreambooth.common.config import TrainingConfig
from dreambooth.common.files import write_bytes
from dreambooth.models.components import Components
from dreambooth.models.families import of_components
from dreambooth.models.schedules import guidance_rescale


def sample_prompts(config: TrainingConfig) -> list[str]:
    """The configured sample prompts, else each concept's sample prompt or instance prompt."""
    if config.sample_prompts:
        return list(config.sample_prompts)
    prompts = []
    for concept in config.concepts:
        prompt = concept.sample_prompt or concept.instance_prompt.replace("[filewords]", "").strip(" ,")
        if prompt and prompt not in prompts:
            prompts.append(prompt)
    return prompts


@contextlib.contextmanager
def on_device(models, device):
    """Move models to the device for sampling and put each back where it was."""
    places = [(m, next(m.parameters()).device) for m in models]
    for model, _ in places:
        model.to(device)
    try:
        yield
    finally:
        for model, place in places:
            model.to(place)


def generate_samples(components: Components, config: TrainingConfig, out_dir: Path, step: int,
                     device, progress: Callable[[int, int], None] | None = None,
                     encode: Callable[[list[str]], Any] | None = None) -> list[Path]:
    """One picture per sample prompt with the current weights; returns the saved paths.
    ``progress(done, total)`` before the first picture and after each. ``encode``: the run's
    conditioning of prompts (its caches); a family that ``encodes_for_pipeline`` (Flux) is
    given its prompts encoded by it, and its text encoders stay where they are."""
    prompts = sample_prompts(config) if config.sample_steps > 0 else []
    if not prompts:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = config.sample_size or config.resolution
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    # The frozen VAE is in half precision when the run is (the trained parts in fp32 or bf16):
    # autocast makes them meet — on the GPU, and on the CPU for bf16 (its one half type).
    half = next(components.vae.parameters()).dtype
    autocast = (torch.autocast(device.type, dtype=half)
                if half in (torch.float16, torch.bfloat16)
                and (device.type == "cuda" or half == torch.bfloat16) else contextlib.nullcontext())
    family = of_components(components).configured(config)
    extra = family.pipeline_kwargs(config)
    encoded = encode is not None and family.encodes_for_pipeline
    models = [components.unet, components.vae] if encoded else components.modules()
    if family.negative_prompts:  # classifier-free guidance: SD's pipelines
        extra.update(negative_prompt=config.sample_negative_prompt or None,
                     guidance_rescale=guidance_rescale(pipe.scheduler),  # zero terminal SNR
                     clip_skip=config.clip_skip - 1 if config.clip_skip > 1 else None)
    was_training = [m.training for m in models]
    paths = []
    with on_device(models, device), torch.no_grad(), autocast:
        for m in models:
            m.eval()
        if progress is not None:
            progress(0, len(prompts))
        for index, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(config.sample_seed + index)
            given = family.prompt_inputs(encode([prompt])) if encoded else {"prompt": prompt}
            image = pipe(**given, num_inference_steps=config.sample_steps,
                         guidance_scale=config.sample_guidance_scale, height=size, width=size,
                         generator=generator, **extra).images[0]
            path = out_dir / f"step-{step:06d}-{index}.png"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            paths.append(write_bytes(path, buffer.getvalue(), overwrite=True))
            if progress is not None:
                progress(index + 1, len(prompts))
    for model, training in zip(models, was_training):
        model.train(training)
    return paths
