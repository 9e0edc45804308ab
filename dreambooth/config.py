"""Every training option in one place: defaults, JSON round trip, validation with clear errors.

The CLI, the tab and the API all build a :class:`TrainingConfig`. Validation names the field and the
reason (``ConfigError.errors`` is a list of :class:`FieldError`); nothing here touches the GPU.
The seed's names (``pretrained_model_name_or_path``, ``use_8bit_adam``, ``save_interval`` ...) and
its ``concepts_list`` file (JSON or the Python-literal form with ``#`` comments) are accepted too.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPTIMIZERS = ("adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "sgd")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
ATTENTION = ("sdpa", "xformers", "default")
EXPORT_DTYPES = ("fp16", "bf16", "fp32")
EXPORT_FORMATS = ("safetensors", "ckpt")
PREDICTION_TYPES = ("", "epsilon", "v_prediction")
STEPS_PER_PICTURE = 100  # the seed's rule of thumb: steps = pictures x 100


@dataclass
class FieldError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ConfigError(ValueError):
    """One or more options are wrong; ``errors`` names each field and what to do."""

    def __init__(self, errors: list[FieldError]):
        self.errors = list(errors)
        super().__init__("invalid training config:\n" + "\n".join(f"  - {e}" for e in errors))


@dataclass
class Concept:
    """One subject or style: its pictures, its prompt, and its class for prior preservation."""

    instance_data_dir: str = ""
    instance_prompt: str = ""  # e.g. "photo of zwx dog"; [filewords] is replaced by the caption
    class_data_dir: str = ""  # generated pictures only (the seed: never real photos)
    class_prompt: str = ""  # e.g. "photo of a dog"
    class_negative_prompt: str = ""
    num_class_images: int | None = None  # None: the run's num_class_images
    sample_prompt: str = ""  # preview prompt; empty: the instance prompt


@dataclass
class TrainingConfig:
    # --- model -------------------------------------------------------------------------------
    base_model: str = ""  # checkpoint file, diffusers folder, or WebUI checkpoint title
    model_name: str = ""  # output name: <models>/Stable-diffusion/<model_name>.safetensors
    vae_path: str = ""  # a separate VAE (the seed's --pretrained_vae_name_or_path)
    prediction_type: str = ""  # "" = from the checkpoint; or epsilon / v_prediction
    base_use_ema: bool = False  # train from the base file's EMA weights when it has them
    models_dir: str = ""  # "" = the WebUI's models folder (or ./models standalone)
    # --- concepts ----------------------------------------------------------------------------
    concepts: list[Concept] = field(default_factory=list)
    with_prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_batch_size: int = 4
    class_sample_steps: int = 30
    class_guidance_scale: float = 7.5
    class_clip_skip: int = 1  # the seed advises 2 for anime/NovelAI-family models
    # --- pictures ----------------------------------------------------------------------------
    resolution: int = 512
    aspect_ratio_buckets: bool = False  # suits native training; poor with DreamBooth
    random_crop: bool = False  # False: center crop
    hflip: bool = False
    rotation_degrees: float = 0.0
    brightness_jitter: float = 0.0
    contrast_jitter: float = 0.0
    caption_extension: str = ".txt"
    shuffle_tags: bool = False
    keep_tokens: int = 0  # leading tags kept in place when shuffling / dropping
    tag_dropout: float = 0.0
    alpha_background: str = "white"
    recursive: bool = False
    skip_bad_images: bool = False
    # --- training ----------------------------------------------------------------------------
    max_train_steps: int = 0  # 0: instance pictures x 100 (the seed's rule of thumb)
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    optimizer: str = "adamw8bit"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0: no clipping
    train_text_encoder: bool = False
    text_encoder_lr: float = 0.0  # 0: the UNet's learning rate
    text_encoder_stop: float = 1.0  # <= 1: fraction of the steps; > 1: a step number
    clip_skip: int = 1
    offset_noise: float = 0.0
    min_snr_gamma: float = 0.0  # 0: off; 5 is the paper's value
    use_ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 1337
    # --- memory and speed --------------------------------------------------------------------
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = True
    attention: str = "sdpa"
    allow_tf32: bool = True
    cache_latents: bool = True
    cache_text_embeddings: bool = True  # only while the text encoder is frozen
    # --- saving ------------------------------------------------------------------------------
    save_every_n_steps: int = 0  # 0: only at the end (the seed's save_interval)
    checkpoint_every_n_steps: int = 500  # resume points; 0: none
    checkpoints_total_limit: int = 2
    save_on_cancel: bool = True
    export_dtype: str = "fp16"  # the seed's --half
    export_format: str = "safetensors"
    overwrite: bool = False
    # --- preview samples ---------------------------------------------------------------------
    sample_every_n_steps: int = 0  # 0: only at the end when sample prompts exist
    sample_prompts: list[str] = field(default_factory=list)
    sample_negative_prompt: str = ""
    sample_steps: int = 20
    sample_guidance_scale: float = 7.5
    sample_seed: int = 1337
    sample_size: int = 0  # 0: the training resolution

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingConfig":
        """Build from a dict (our names or the seed's); unknown or mistyped fields are errors."""
        if not isinstance(data, dict):
            raise ConfigError([FieldError("config", "must be a JSON object")])
        data = _translate_seed_names(dict(data))
        errors: list[FieldError] = []
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                errors.append(FieldError(key, "unknown option (check the spelling)"))
                continue
            if key == "concepts":
                concepts, concept_errors = _concepts_from(value)
                errors += concept_errors
                values[key] = concepts
                continue
            coerced = _coerce(key, value, _default_of(known[key]))
            if isinstance(coerced, FieldError):
                errors.append(coerced)
            else:
                values[key] = coerced
        if errors:
            raise ConfigError(errors)
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "TrainingConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([FieldError("config", f"cannot read {path}: {exc.strerror}")]) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([FieldError(
                "config", f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})")]) from exc
        return cls.from_dict(data)

    # ----------------------------------------------------------------------------------------
    def class_images_for(self, concept: Concept) -> int:
        return self.num_class_images if concept.num_class_images is None else concept.num_class_images

    def total_steps(self, instance_pictures: int) -> int:
        """max_train_steps, or the seed's rule of thumb when it is 0."""
        return self.max_train_steps or max(1, instance_pictures * STEPS_PER_PICTURE)

    def text_encoder_stop_step(self, total_steps: int) -> int:
        """The step after which the text encoder is frozen (total_steps: never)."""
        if not self.train_text_encoder:
            return 0
        if self.text_encoder_stop <= 1:
            return int(math.ceil(self.text_encoder_stop * total_steps))
        return min(total_steps, int(self.text_encoder_stop))

    def validate(self) -> list[FieldError]:
        """Errors that need no file system: types, ranges, choices, combinations."""
        errors: list[FieldError] = []

        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                errors.append(FieldError(name, message))

        need(bool(self.base_model.strip()), "base_model", "pick the checkpoint to start from")
        need(bool(self.concepts), "concepts", "add at least one concept (pictures and a prompt)")
        for i, concept in enumerate(self.concepts):
            where = f"concepts[{i}]"
            need(bool(concept.instance_data_dir.strip()), f"{where}.instance_data_dir",
                 "give the folder with this concept's pictures")
            need(bool(concept.instance_prompt.strip()), f"{where}.instance_prompt",
                 "give a prompt with a rare identifier, e.g. 'photo of zwx dog', or [filewords]")
            if self.with_prior_preservation:
                need(bool(concept.class_prompt.strip()), f"{where}.class_prompt",
                     "prior preservation is on: describe the class, e.g. 'photo of a dog' "
                     "(or turn prior preservation off for native training)")
                need(bool(concept.class_data_dir.strip()), f"{where}.class_data_dir",
                     "prior preservation is on: give a folder for the generated class pictures")
                need(self.class_images_for(concept) > 0, f"{where}.num_class_images",
                     "must be at least 1 with prior preservation on")
        need(self.max_train_steps >= 0, "max_train_steps", "must be 0 (automatic) or more")
        need(self.train_batch_size >= 1, "train_batch_size", "must be at least 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
             "must be at least 1")
        need(self.learning_rate > 0, "learning_rate", "must be greater than 0")
        need(self.text_encoder_lr >= 0, "text_encoder_lr", "must be 0 (same as UNet) or more")
        need(self.resolution >= 64 and self.resolution % 8 == 0, "resolution",
             "must be a multiple of 8, at least 64 (e.g. 512)")
        need(self.prior_loss_weight >= 0, "prior_loss_weight", "must be 0 or more")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
        need(self.lr_scheduler in SCHEDULERS, "lr_scheduler",
             f"choose one of {', '.join(SCHEDULERS)}")
        need(self.mixed_precision in PRECISIONS, "mixed_precision",
             f"choose one of {', '.join(PRECISIONS)}")
        need(self.attention in ATTENTION, "attention", f"choose one of {', '.join(ATTENTION)}")
        need(self.export_dtype in EXPORT_DTYPES, "export_dtype",
             f"choose one of {', '.join(EXPORT_DTYPES)}")
        need(self.export_format in EXPORT_FORMATS, "export_format",
             f"choose one of {', '.join(EXPORT_FORMATS)}")
        need(self.prediction_type in PREDICTION_TYPES, "prediction_type",
             "leave empty (from the checkpoint) or choose epsilon / v_prediction")
        need(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be 0 or more")
        need(self.lr_num_cycles >= 1, "lr_num_cycles", "must be at least 1")
        need(0 < self.text_encoder_stop and (self.text_encoder_stop <= 1
                                             or float(self.text_encoder_stop).is_integer()),
             "text_encoder_stop", "a fraction in (0, 1] or a whole step number")
        need(1 <= self.clip_skip <= 12, "clip_skip", "must be between 1 and 12")
        need(1 <= self.class_clip_skip <= 12, "class_clip_skip", "must be between 1 and 12")
        need(0 <= self.tag_dropout < 1, "tag_dropout", "must be in [0, 1)")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        need(self.min_snr_gamma >= 0, "min_snr_gamma", "must be 0 (off) or more")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be 0 (no clipping) or more")
        need(0 <= self.rotation_degrees <= 45, "rotation_degrees", "must be between 0 and 45")
        need(0 <= self.brightness_jitter < 1, "brightness_jitter", "must be in [0, 1)")
        need(0 <= self.contrast_jitter < 1, "contrast_jitter", "must be in [0, 1)")
        need(self.sample_size == 0 or self.sample_size % 8 == 0, "sample_size",
             "must be 0 (training resolution) or a multiple of 8")
        for name in ("save_every_n_steps", "checkpoint_every_n_steps", "sample_every_n_steps",
                     "checkpoints_total_limit", "keep_tokens", "class_batch_size",
                     "class_sample_steps", "sample_steps"):
            need(getattr(self, name) >= 0, name, "must be 0 or more")
        return errors

    def check(self) -> "TrainingConfig":
        errors = self.validate()
        if errors:
            raise ConfigError(errors)
        return self

    def warnings(self) -> list[str]:
        """Advice from the seed that does not stop training."""
        notes = []
        if self.aspect_ratio_buckets and self.with_prior_preservation:
            notes.append("aspect-ratio buckets work poorly with DreamBooth (prior preservation); "
                         "they suit native training")
        if self.with_prior_preservation and len(self.concepts) > 1:
            notes.append("subjects trained together cannot appear together in one picture: "
                         "their features blend")
        for concept in self.concepts:
            words = concept.instance_prompt.lower().replace(",", " ").split()
            if "sks" in words:
                notes.append(f"'sks' in {concept.instance_prompt!r} is a poor identifier (it is a "
                             "rifle); pick a rare single token")
        return notes


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Coerce JSON/UI values to the field's type; a FieldError when it cannot be done."""
    expected = type(default)
    try:
        if name == "num_class_images" and value is None:
            raise TypeError
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            raise TypeError
        if isinstance(default, int):
            if isinstance(value, bool) or not float(value).is_integer():
                raise TypeError
            return int(float(value))
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if not math.isfinite(number):
                raise TypeError
            return number
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(default, list):
            if isinstance(value, str):
                return [line for line in value.splitlines() if line.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
    except (TypeError, ValueError):
        return FieldError(name, f"expected {expected.__name__}, got {value!r}")
    return value


def _concepts_from(value: Any) -> tuple[list[Concept], list[FieldError]]:
    if not isinstance(value, list):
        return [], [FieldError("concepts", "must be a list of concepts")]
    known = {f.name for f in dataclasses.fields(Concept)}
    concepts, errors = [], []
    for i, item in enumerate(value):
        if isinstance(item, Concept):
            concepts.append(item)
            continue
        if not isinstance(item, dict):
            errors.append(FieldError(f"concepts[{i}]", "must be an object"))
            continue
        for key in item:
            if key not in known:
                errors.append(FieldError(f"concepts[{i}].{key}", "unknown concept field"))
        values = {}
        for key in known & item.keys():
            if key == "num_class_images":
                number = item[key]
                if number is None or (isinstance(number, (int, float)) and not isinstance(number, bool)
                                      and float(number).is_integer()):
                    values[key] = None if number is None else int(number)
                else:
                    errors.append(FieldError(f"concepts[{i}].{key}", "expected a whole number"))
            elif isinstance(item[key], str):
                values[key] = item[key]
            else:
                errors.append(FieldError(f"concepts[{i}].{key}", "expected text"))
        concepts.append(Concept(**values))
    return concepts, errors


# The seed's train_dreambooth.py argument names -> ours.
SEED_NAMES = {
    "pretrained_model_name_or_path": "base_model",
    "pretrained_vae_name_or_path": "vae_path",
    "concepts_list": "concepts",
    "train_batch_size": "train_batch_size",
    "save_interval": "save_every_n_steps",
    "lr_warmup_steps": "lr_warmup_steps",
    "output_dir": "models_dir",
}


def _translate_seed_names(data: dict[str, Any]) -> dict[str, Any]:
    for old, new in SEED_NAMES.items():
        if old in data and old != new:
            data.setdefault(new, data.pop(old))
    if "use_8bit_adam" in data:
        data.setdefault("optimizer", "adamw8bit" if data.pop("use_8bit_adam") else "adamw")
    return data


def read_concepts_list(path: str | Path) -> list[Concept]:
    """Read a concepts_list file: JSON, or the seed's Python-literal form with ``#`` comments
    (optionally ``concepts_list = [...]``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _python_literal(text, path)
    if isinstance(data, dict) and "concepts_list" in data:
        data = data["concepts_list"]
    concepts, errors = _concepts_from(data)
    if errors:
        raise ConfigError(errors)
    return concepts


def _python_literal(text: str, path: Path) -> Any:
    try:
        module = ast.parse(text)
    except SyntaxError as exc:
        raise ConfigError([FieldError(
            "concepts_list", f"{path} is neither JSON nor a Python list (line {exc.lineno})")]) from exc
    for node in module.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "concepts_list" for t in node.targets):
            return ast.literal_eval(node.value)
        if isinstance(node, ast.Expr):
            return ast.literal_eval(node.value)
    raise ConfigError([FieldError("concepts_list", f"{path} holds no list of concepts")])


def write_concepts_list(concepts: list[Concept], path: str | Path) -> Path:
    path = Path(path)
    data = [{k: v for k, v in dataclasses.asdict(c).items() if v not in ("", None)} for c in concepts]
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


PRESETS: dict[str, dict[str, Any]] = {
    # The seed's recipe: prior preservation, weight 1, lr 1e-6, 8-bit Adam, fp16, checkpointing.
    "person": dict(with_prior_preservation=True, prior_loss_weight=1.0, learning_rate=1e-6,
                   num_class_images=100, train_text_encoder=True, text_encoder_stop=0.3,
                   hflip=True, aspect_ratio_buckets=False, lr_scheduler="constant"),
    "object": dict(with_prior_preservation=True, prior_loss_weight=1.0, learning_rate=1e-6,
                   num_class_images=100, train_text_encoder=False, hflip=True,
                   aspect_ratio_buckets=False, lr_scheduler="constant"),
    # Native training: no class pictures, per-picture captions, buckets, the style's "by [V]".
    "style": dict(with_prior_preservation=False, learning_rate=2e-6, train_text_encoder=False,
                  aspect_ratio_buckets=True, hflip=True, shuffle_tags=True, keep_tokens=1,
                  class_clip_skip=2, clip_skip=2, lr_scheduler="cosine", lr_warmup_steps=100),
}


def apply_preset(config: TrainingConfig, name: str) -> TrainingConfig:
    if name not in PRESETS:
        raise ConfigError([FieldError("preset", f"choose one of {', '.join(PRESETS)}")])
    return dataclasses.replace(config, **PRESETS[name])
