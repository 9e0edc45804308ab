"""The tab's presets: recommended values for a person, an object, a style, each also as a LoRA
(the seed's advice). A preset applied after another is that preset, not a mix."""
from __future__ import annotations

import dataclasses
from typing import Any

from dreambooth.common.config import ConfigError, FieldError, TrainingConfig, _default_of

PRESETS: dict[str, dict[str, Any]] = {
    # The seed's recipe: prior preservation, weight 1, lr 1e-6, 8-bit Adam, fp16, checkpointing.
    # (The full presets say training_method: one applied after a LoRA preset is a full run again.)
    "person": dict(training_method="full", with_prior_preservation=True, prior_loss_weight=1.0,
                   learning_rate=1e-6,
                   num_class_images=100, train_text_encoder=True, text_encoder_stop=0.3,
                   hflip=True, aspect_ratio_buckets=False, lr_scheduler="constant"),
    "object": dict(training_method="full", with_prior_preservation=True, prior_loss_weight=1.0,
                   learning_rate=1e-6,
                   num_class_images=100, train_text_encoder=False, hflip=True,
                   aspect_ratio_buckets=False, lr_scheduler="constant"),
    # Native training: no class pictures, per-picture captions, buckets, the style's "by [V]".
    "style": dict(training_method="full", with_prior_preservation=False, learning_rate=2e-6,
                  train_text_encoder=False,
                  aspect_ratio_buckets=True, hflip=True, shuffle_tags=True, keep_tokens=1,
                  class_clip_skip=2, clip_skip=2, lr_scheduler="cosine", lr_warmup_steps=100),
}


# The LoRA variants: what kohya_ss and OneTrainer users start from (rank 32 / 16, alpha = rank / 2,
# lr 1e-4 for the UNet and, where the text encoder trains (person-lora), 5e-5 for it; the others
# leave it frozen, and so its lr at the default).
_LORA = dict(training_method="lora", lora_alpha=16.0, lora_rank=32, learning_rate=1e-4,
             optimizer="adamw8bit", lr_scheduler="cosine")
PRESETS.update({
    "person-lora": {**PRESETS["person"], **_LORA, "train_text_encoder": True,
                    "text_encoder_lr": 5e-5},
    "object-lora": {**PRESETS["object"], **_LORA, "lora_rank": 16, "lora_alpha": 8.0},
    "style-lora": {**PRESETS["style"], **_LORA, "training_method": "locon", "lora_conv_rank": 8,
                   "lora_conv_alpha": 4.0},
})


def apply_preset(config: TrainingConfig, name: str) -> TrainingConfig:
    if name not in PRESETS:
        raise ConfigError([FieldError("preset", f"choose one of {', '.join(PRESETS)}")])
    return dataclasses.replace(config, **preset_values(name))


def preset_values(name: str) -> dict[str, Any]:
    """What preset ``name`` sets: its values, and every option any preset sets back at its
    default first — one preset after another is that preset, not a mix (person after
    person-lora is a full run at 1e-6 again)."""
    if name not in PRESETS:
        raise ConfigError([FieldError("preset", f"choose one of {', '.join(PRESETS)}")])
    touched = {key for values in PRESETS.values() for key in values}
    defaults = {f.name: _default_of(f) for f in dataclasses.fields(TrainingConfig)
                if f.name in touched}
    return {**defaults, **PRESETS[name]}
