"""What a run's model files are called and carry, shared by the full export and the adapter
export: the file names a run writes, which existing files are a run's own (its id in the
metadata), the base model's file, the EMA weights swapped in for an export, the metadata."""
from __future__ import annotations

import contextlib
from pathlib import Path

from dreambooth.common.config import ConfigError, FieldError, TrainingConfig


def run_id_of(path: Path) -> str | None:
    """The run id a model file of ours carries in its metadata (None: not ours, or unreadable)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("dreambooth.run_id")
    except Exception:  # a damaged or foreign file is simply not ours
        return None


def planned_outputs(config: TrainingConfig, total_steps: int) -> list[str]:
    """The file names a run will write into its output folder: its intermediate saves
    (``<name>_<step>``) and the final model."""
    names = []
    if config.save_every_n_steps:
        names += [model_file_name(config, f"_{step}")
                  for step in range(config.save_every_n_steps, total_steps,
                                    config.save_every_n_steps)]
    return names + [model_file_name(config)]


def model_file_name(config: TrainingConfig, suffix: str = "") -> str:
    """``<model_name><suffix>.<format>``; a LoRA is always a .safetensors file."""
    from dreambooth.common.names import output_file_name

    return output_file_name(config.model_name, suffix,
                            "safetensors" if config.trains_adapter else config.export_format)


def resolve_base_model(config: TrainingConfig) -> Path:
    path = Path(config.base_model).expanduser()
    if not path.exists():
        raise ConfigError([FieldError("base_model", f"{config.base_model} does not exist; pick a "
                                      "checkpoint file or a diffusers folder")])
    return path


@contextlib.contextmanager
def ema_weights(unet, ema):
    """Temporarily put the EMA weights in the UNet (samples and exports show what is saved)."""
    if ema is None:
        yield
        return
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        yield
    finally:
        ema.restore(unet.parameters())


def export_metadata(config: TrainingConfig, step: int, instance_pictures: int = 0,
                    class_pictures: int = 0) -> dict[str, object]:
    """What the exported file says about its training (``export.build_metadata`` adds the model
    kind, the base model and its hash): our own ``dreambooth.*`` keys (plain names here), and the
    ``ss_*`` keys kohya's sd-scripts write, which the WebUI's metadata viewer, Civitai and most
    model managers read."""
    concepts = [{"instance_prompt": c.instance_prompt, "class_prompt": c.class_prompt}
                for c in config.concepts]
    return {
        "steps": str(step),
        "learning_rate": str(config.learning_rate),
        "resolution": config.resolution,
        "concepts": concepts,
        "config": config.to_json(),
        "ss_training_comment": "DreamBooth: " + "; ".join(c["instance_prompt"] for c in concepts),
        "ss_steps": str(step),
        "ss_max_train_steps": str(step if not config.max_train_steps else config.max_train_steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str((config.text_encoder_lr or config.learning_rate)
                                  if config.train_text_encoder else 0),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": config.optimizer,
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_mixed_precision": config.mixed_precision,
        "ss_seed": str(config.seed),
        "ss_clip_skip": str(config.clip_skip),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": str(bool(config.aspect_ratio_buckets)),
        "ss_num_train_images": str(instance_pictures),
        "ss_num_reg_images": str(class_pictures),
        "ss_prior_loss_weight": str(config.prior_loss_weight if config.with_prior_preservation
                                    else 0),
        "ss_min_snr_gamma": str(config.min_snr_gamma or 0),
        "ss_noise_offset": str(config.offset_noise or 0),
        "ss_max_grad_norm": str(config.max_grad_norm or 0),
        "ss_gradient_checkpointing": str(bool(config.gradient_checkpointing)),
        "ss_cache_latents": str(bool(config.cache_latents)),
    }
