"""A LoRA run's model file: ``models/Lora/<name>.safetensors`` (or ``<name>_<step>``), with the
metadata the WebUI's Lora cards and the ecosystem read, and ``<name>.png`` beside it (the run's
newest sample) so the card shows a picture."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import torch

from dreambooth.common.config import TrainingConfig
from dreambooth.common.run_types import Reporter, RunPaths
from dreambooth.models.adapters import file as lora_file
from dreambooth.models.adapters import lycoris
from dreambooth.models.components import Components
from dreambooth.models.families import of_components


def tag_frequency(config: TrainingConfig) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per concept folder, how often each comma-separated tag of
    the instance prompts occurs."""
    from dreambooth import data

    found: dict[str, Counter] = {}
    for picture in data.collect_pictures(config, include_class=False):
        folder = Path(config.concepts[picture.concept_index].instance_data_dir).name
        tags = [t.strip() for t in picture.caption.split(",") if t.strip()]
        found.setdefault(folder, Counter()).update(tags)
    return {folder: dict(counts) for folder, counts in found.items()}


def newest_sample(samples_dir: Path) -> Path | None:
    pictures = sorted(samples_dir.glob("step-*.png")) if samples_dir.is_dir() else []
    return pictures[-1] if pictures else None


def export_adapter(config: TrainingConfig, paths: RunPaths, components: Components, accelerator,
                   trained: dict[str, torch.nn.Module], ema, step: int, reporter: Reporter,
                   suffix: str = "", *, overwrite: bool = False, run_id: str = "",
                   pictures: tuple[int, int] = (0, 0)) -> Path:
    """Write the adapter (``trained``: its networks by component name) as a LoRA file."""
    from dreambooth.common.files import ensure_folder, write_bytes
    from dreambooth.engine.model_files import (ema_weights, export_metadata, model_file_name,
                                               resolve_base_model)
    from dreambooth.models import checkpoint
    from dreambooth.models.export import build_metadata

    reporter.phase("saving")
    folder = ensure_folder(paths.output_dir(True))
    out = folder / model_file_name(config, suffix)
    reporter.detail(f"writing {out.name}")
    base = resolve_base_model(config)
    prediction = components.noise_scheduler.config.get("prediction_type") or "flow"
    kind = dataclasses.replace(checkpoint.detect_kind(base), prediction_type=prediction)
    extra = export_metadata(config, step, *pictures)
    if run_id:
        extra["dreambooth.run_id"] = run_id
    metadata = build_metadata(kind, out, base=base if base.is_file() else None,
                              dtype=config.export_dtype, trained=tuple(trained), extra=extra)
    metadata.update(lora_file.lora_metadata(
        kind=kind.kind, method=config.training_method, rank=config.lora_rank,
        alpha=config.lora_alpha, conv_rank=config.lora_conv_rank if
        lycoris.trains_convolutions(config) else 0, conv_alpha=config.lora_conv_alpha,
        dora=config.dora, title=out.stem, resolution=config.resolution,
        tag_frequency=tag_frequency(config)))
    with ema_weights(trained["unet"], ema):
        tensors = of_components(components).adapter_file_tensors(lycoris.adapter_state(trained))
        result = lora_file.write_lora(out, tensors, metadata, dtype=config.export_dtype,
                                      overwrite=overwrite)
    preview = newest_sample(paths.samples_dir)
    card = out.with_suffix(".png")
    if preview is not None and (overwrite or not card.exists()):
        write_bytes(card, preview.read_bytes(), overwrite=True)
    reporter.log(f"saved {result}")
    if suffix:
        reporter.phase("training")
    return result
