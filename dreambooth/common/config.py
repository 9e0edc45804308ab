"""Every training option in one place: defaults, JSON round trip, validation with clear errors.

The CLI, the tab and the API all build a :class:`TrainingConfig`. Validation names the field and the
reason (``ConfigError.errors`` is a list of :class:`FieldError`); nothing here touches the GPU.
The seed's names (``pretrained_model_name_or_path``, ``use_8bit_adam``, ``save_interval`` ...) and
its ``concepts_list`` file (JSON or the Python-literal form with ``#`` comments) are accepted too.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth.common.config_files import (MAX_NESTING, TOO_DEEP, _read_json_or_literal,
                                            _relative_to, _too_deep, control_character_errors)
from dreambooth.common.errors import ConfigError, FieldError, merge_errors  # noqa: F401  (theirs)

OPTIMIZERS = ("adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "adafactor", "sgd")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
TRAINED_PRECISIONS = ("fp32", "bf16")  # the trained weights themselves (master copy)
ATTENTION = ("sdpa", "xformers", "default")
EXPORT_DTYPES = ("fp16", "bf16", "fp32")
EXPORT_FORMATS = ("safetensors", "ckpt")
PREDICTION_TYPES = ("", "epsilon", "v_prediction", "flow")  # flow: rectified-flow SDXL
LATENT_SOURCES = ("mean", "sample")  # the VAE posterior's mean, or a fresh sample of it each step
# The whole model, or an adapter file (the LyCORIS kinds the WebUI's own Lora extension applies).
TRAINING_METHODS = ("full", "lora", "locon", "loha", "lokr")
LORA_LAYERS = ("attention", "attention_mlp")  # + ResNet convolutions: locon (or a conv rank)
FLUX_TIMESTEP_SAMPLING = ("shift", "sigmoid", "uniform")  # models.objective.FlowMatchObjective
T5_LENGTHS = (256, 512)  # Flux.1 schnell was trained with 256 T5 tokens, dev with 512
MASK_SOURCES = ("file", "alpha")  # <name>.mask.png beside the picture, or its alpha channel
STEPS_PER_PICTURE = 100  # the seed's rule of thumb: steps = pictures x 100
MAX_STEPS = 10_000_000
MAX_SEED = 2 ** 32 - 1  # the WebUI's seed range
@dataclass(frozen=True)
class Range:
    """The values a number option may take: ``low``..``high``, either end open or closed."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def problem(self, value: float) -> str | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return "must be a number"
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if not (too_low or too_high):
            return None
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        text = f"must be in {left}{_num(self.low)}, {_num(self.high)}{right}, not {_num(value)}"
        return f"{text} ({self.hint})" if self.hint else text


def _num(value: float) -> str:
    if isinstance(value, int):
        text = str(value)
        return text if len(text) <= 20 else f"a {len(text)}-digit number"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:g}"


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
    validation_data_dir: str = ""  # held-out pictures of this concept (else validation_split)


@dataclass
class TrainingConfig:
    # --- model -------------------------------------------------------------------------------
    base_model: str = ""  # checkpoint file, diffusers folder, or WebUI checkpoint title
    model_name: str = ""  # output name: <models>/Stable-diffusion/<model_name>.safetensors
    vae_path: str = ""  # a separate VAE (the seed's --pretrained_vae_name_or_path)
    prediction_type: str = ""  # "" = from the checkpoint; or epsilon / v_prediction / flow
    zero_terminal_snr: bool = False  # rescaled zero-terminal-SNR schedule (on too when the file says)
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
    resolution: int = 0  # 0: the model's own (512 SD1.x/2.x, 768 SD2.x v, 1024 SDXL)
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
    masked_training: bool = False  # weight the loss by a mask per picture (white = subject)
    mask_source: str = "file"  # file: <name>.mask.png beside the picture; alpha: its alpha channel
    mask_background_weight: float = 0.1  # loss weight where the mask is black (0: ignored)
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
    text_encoder_2_lr: float = 0.0  # SDXL's second encoder; 0: as the first
    text_encoder_2_stop: float = 1.0  # as text_encoder_stop; 0: the second encoder stays frozen
    clip_skip: int = 1
    offset_noise: float = 0.0
    min_snr_gamma: float = 0.0  # 0: off; 5 is the paper's value
    min_snr_on_prior: bool = True  # False: class rows unweighted, as diffusers' example does
    latents_from: str = "mean"  # mean: the VAE posterior's mean; sample: a sample of it
    # --- Flux.1 (the flow-matching family; no effect on SD bases) ----------------------------
    flux_timestep_sampling: str = "shift"  # shift: by the picture's size, as Flux dev samples
    flux_guidance: float = 1.0  # the guidance value Flux dev's transformer is given in training
    flow_shift: float = 3.0  # rectified-flow SDXL: noise levels shifted towards noise (Neo's Shift)
    t5_max_length: int = 512  # T5 tokens per prompt (256 for schnell, 512 for dev)
    clip_l_path: str = ""  # a transformer-only Flux file's CLIP-L (models/text_encoder)
    t5xxl_path: str = ""  # ... and its T5-XXL
    use_ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 1337
    # --- training method: the whole model, or an adapter beside the frozen model -------------
    training_method: str = "full"  # full | lora | locon | loha | lokr (LyCORIS kinds)
    lora_rank: int = 16  # the network dim
    lora_alpha: float = 8.0  # scale alpha / rank; 0: alpha = rank (scale 1)
    lora_layers: str = "attention_mlp"  # attention | attention_mlp
    lora_conv_rank: int = 8  # ResNet convolutions: locon always; loha/lokr when > 0
    lora_conv_alpha: float = 4.0
    lora_dropout: float = 0.0  # dropout on the adapter's output while training
    dora: bool = False  # weight-decomposed LoRA (DoRA), as the WebUI applies it
    lokr_factor: int = -1  # LoKr's Kronecker factor; -1: as balanced as the shape allows
    # --- memory and speed --------------------------------------------------------------------
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = True
    fused_backward: bool = False  # step each weight as its gradient arrives (no full gradient set)
    trained_precision: str = "fp32"  # bf16: trained weights in bf16, stochastic rounding in the update
    base_weights_8bit: bool = False  # adapters: the frozen base's linear layers in int8 (bitsandbytes)
    base_weights_4bit: bool = False  # adapters: ... in NF4 (bitsandbytes), 4 bits a weight
    blocks_to_swap: int = 0  # Flux: transformer blocks kept in host memory, swapped in per use
    attention: str = "sdpa"
    compile_unet: bool = False  # torch.compile the UNet in place (torch >= 2.2)
    allow_tf32: bool = True
    cache_latents: bool = True
    vae_fp16_safe: bool = False  # the VAE does not overflow in fp16 (SDXL's stock VAE does)
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
    sample_every_n_steps: int = 0  # 0: only at the end
    sample_prompts: list[str] = field(default_factory=list)
    sample_negative_prompt: str = ""
    sample_steps: int = 20
    sample_guidance_scale: float = 7.5
    sample_seed: int = 1337
    sample_size: int = 0  # 0: the training resolution
    validation_split: float = 0.0  # share of each concept's instance pictures held out; 0: off
    validate_every_n_steps: int = 0  # 0: only at the end (when pictures are held out)
    validation_timesteps: int = 4  # fixed noise levels spread over the schedule
    keep_best: bool = False  # also save the best-scoring step as <name>_best

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        from dreambooth.common.files import write_text

        return write_text(Path(path), self.to_json() + "\n", overwrite=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | list, base_dir: str | Path | None = None
                  ) -> "TrainingConfig":
        """Build from a dict (our names or the seed's); unknown or mistyped fields are errors.

        A bare list is the seed's concepts_list (every other option at its default); a
        ``concepts_list`` that is a string names such a file (relative to ``base_dir``, the
        config file's folder, else the working folder). Raises ConfigError naming every field
        that does not parse (see :meth:`parse` for the config without raising)."""
        config, errors = cls.parse(data, base_dir)
        if errors:
            raise ConfigError(errors)
        return config

    @classmethod
    def parse(cls, data: Any, base_dir: str | Path | None = None
              ) -> tuple["TrainingConfig", list[FieldError]]:
        """Like :meth:`from_dict` but never raises: the config built from every field that
        parsed (the others at their defaults) and the list of parse errors (unknown options,
        mistyped values, unreadable concepts_list files), in the order ``from_dict`` reports them.

        With errors the config is a *partial* one, meant only for finding the other problems
        at once (``validate()``, the service's preflight): a concept that is not an object is
        kept as an empty ``Concept()`` so that ``concepts[i]`` still names the same concept;
        :func:`merge_errors` drops the later errors of fields that failed here."""
        if isinstance(data, list):
            data = {"concepts": data}
        if not isinstance(data, dict):
            return cls(), [FieldError(
                "config", "must be a JSON object of options, or a list of concepts "
                          "(the seed's concepts_list)")]
        errors: list[FieldError] = []
        data = dict(data)
        for key in ("concepts_list", "concepts"):
            if isinstance(data.get(key), str):
                try:
                    data[key] = read_concepts_list(_relative_to(data[key], base_dir), key)
                except ConfigError as exc:
                    errors += exc.errors
                    data.pop(key)
        data = _translate_seed_names(data)
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                errors.append(FieldError(key, "unknown option (check the spelling)"))
                continue
            if _too_deep(value, MAX_NESTING - 1):  # so nothing below recurses through it
                errors.append(FieldError(key, TOO_DEEP))
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
        return cls(**values), errors

    @classmethod
    def load(cls, path: str | Path) -> "TrainingConfig":
        """A config file: a JSON object of options, or the seed's concepts_list file (a JSON list,
        or its Python-literal form with ``#`` comments)."""
        path = Path(path)
        return cls.from_dict(_read_json_or_literal(path, "config"), base_dir=path.parent)

    # ----------------------------------------------------------------------------------------
    def class_images_for(self, concept: Concept) -> int:
        return self.num_class_images if concept.num_class_images is None else concept.num_class_images

    def total_steps(self, instance_pictures: int) -> int:
        """max_train_steps, or the seed's rule of thumb when it is 0."""
        return self.max_train_steps or max(1, instance_pictures * STEPS_PER_PICTURE)

    def text_encoder_stop_step(self, total_steps: int, index: int = 0) -> int:
        """The step after which text encoder ``index`` (SDXL has two) is frozen (total_steps:
        never; 0: not trained at all)."""
        if not self.train_text_encoder:
            return 0
        stop = self.text_encoder_stop if index == 0 else self.text_encoder_2_stop
        if stop <= 1:
            return int(math.ceil(stop * total_steps))
        return min(total_steps, int(stop))

    def text_encoder_learning_rate(self, index: int = 0) -> float:
        """The learning rate of text encoder ``index``: its own, else the first's, else the UNet's."""
        own = self.text_encoder_2_lr if index > 0 else 0.0
        return own or self.text_encoder_lr or self.learning_rate

    @property
    def trains_adapter(self) -> bool:
        """A LoRA-family run: the model stays frozen, the output goes to models/Lora."""
        return self.training_method != "full"

    def with_resolution(self, default: int) -> "TrainingConfig":
        """This config with ``resolution`` 0 ("the model's own") set to the model's ``default``."""
        return self if self.resolution else dataclasses.replace(self, resolution=default)

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
        for name, rule in RANGES.items():
            problem = rule.problem(getattr(self, name))
            if problem:
                errors.append(FieldError(name, problem))
        for i, concept in enumerate(self.concepts):
            if concept.num_class_images is not None:
                problem = RANGES["num_class_images"].problem(concept.num_class_images)
                need(not problem, f"concepts[{i}].num_class_images", problem or "")
        need(self.resolution % 8 == 0, "resolution", "must be a multiple of 8 (e.g. 512)")
        need(self.resolution == 0 or self.resolution >= 64, "resolution",
             f"must be 0 (the model's own) or at least 64, not {self.resolution}")
        need(self.text_encoder_2_stop <= 1 or float(self.text_encoder_2_stop).is_integer(),
             "text_encoder_2_stop", "0, a fraction in (0, 1] or a whole step number")
        need(self.sample_size % 8 == 0, "sample_size",
             "must be 0 (training resolution) or a multiple of 8")
        need(self.text_encoder_stop <= 1 or float(self.text_encoder_stop).is_integer(),
             "text_encoder_stop", "a fraction in (0, 1] or a whole step number")
        choices = {"optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS,
                   "mixed_precision": PRECISIONS, "attention": ATTENTION,
                   "export_dtype": EXPORT_DTYPES, "export_format": EXPORT_FORMATS,
                   "latents_from": LATENT_SOURCES, "mask_source": MASK_SOURCES,
                   "training_method": TRAINING_METHODS, "lora_layers": LORA_LAYERS,
                   "trained_precision": TRAINED_PRECISIONS,
                   "flux_timestep_sampling": FLUX_TIMESTEP_SAMPLING, "t5_max_length": T5_LENGTHS}
        for name, allowed in choices.items():
            need(getattr(self, name) in allowed, name,
                 f"choose one of {', '.join(map(str, allowed))}")
        need(not (self.zero_terminal_snr and self.prediction_type in ("epsilon", "flow")),
             "zero_terminal_snr", "needs v-prediction: set prediction_type to v_prediction, or "
             "turn it off")
        need(not (self.min_snr_gamma and self.prediction_type == "flow"), "min_snr_gamma",
             "Min-SNR weighs the DDPM objective; rectified flow has no SNR weights: set 0")
        need(not (self.training_method == "locon" and self.lora_conv_rank == 0), "lora_conv_rank",
             "LoCon trains the ResNet convolutions: give them a rank (or choose lora)")
        need(self.lokr_factor != 0, "lokr_factor", "-1 (balanced) or a factor of at least 1")
        held_out = self.validation_split or any(c.validation_data_dir for c in self.concepts)
        for name in ("validate_every_n_steps", "keep_best"):
            need(not (getattr(self, name) and not held_out), name, "needs held-out pictures: "
                 "set validation_split (e.g. 0.2) or a concept's validation folder")
        need(not (self.dora and self.training_method in ("loha", "lokr")), "dora",
             "DoRA is offered with lora and locon")
        need(not (self.dora and self.lora_dropout), "lora_dropout",
             "DoRA rebuilds each weight, so adapter dropout does not apply: set it to 0")
        need(not (self.trained_precision == "bf16" and self.mixed_precision != "bf16"),
             "trained_precision", "bf16 weights compute in bf16: set mixed_precision to bf16 "
             "(or keep fp32 weights)")
        need(not (self.trained_precision == "bf16" and self.optimizer == "prodigy"),
             "trained_precision", "bf16 weights are stepped one by one; prodigy computes one step "
             "size from all weights together: choose another optimizer or fp32 weights")
        for name, bits in (("base_weights_8bit", "8 bits"), ("base_weights_4bit", "4 bits")):
            need(not (getattr(self, name) and not self.trains_adapter), name, f"only a frozen "
                 f"base can be kept in {bits}: choose an adapter method (lora, locon, loha, "
                 "lokr) or turn it off")
            need(not (getattr(self, name) and self.dora), name, "DoRA rebuilds each weight from "
                 "the base's own: turn DoRA off or keep the base in half precision")
        need(not (self.base_weights_8bit and self.base_weights_4bit), "base_weights_4bit",
             "the base is kept in 8 bits or in 4: turn one of them off")
        need(self.prediction_type in PREDICTION_TYPES, "prediction_type",
             "leave empty (from the checkpoint) or choose epsilon / v_prediction / flow")
        if self.model_name:
            from dreambooth.common.names import sanitize_model_name

            try:
                sanitize_model_name(self.model_name)
            except ValueError as exc:
                errors.append(FieldError("model_name", str(exc)))
        errors += control_character_errors(self)
        return errors + fused_problems(self)

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
        advice = learning_rate_advice(self.training_method, self.learning_rate)
        if advice:
            notes.append(advice)
        if not self.train_text_encoder and (self.text_encoder_lr or self.text_encoder_2_lr):
            notes.append("text_encoder_lr is set but train_text_encoder is off: the text encoder "
                         "stays frozen and its learning rate does nothing")
        for concept in self.concepts:
            words = concept.instance_prompt.lower().replace(",", " ").split()
            if "sks" in words:
                notes.append(f"'sks' in {concept.instance_prompt!r} is a poor identifier (it is a "
                             "rifle); pick a rare single token")
        return notes


# The learning rates each training method trains well at: full fine-tunes about 1e-6 (the
# seed's), the adapters about 1e-4 (their presets'). LoHa's update is the product of two low-rank
# pairs, about 50x LoCon's at the same rate: at 1e-3 its A1111 generations were all NaN, so its
# ceiling is lower. Outside the range the tab and the run's log warn; nothing is refused.
LEARNING_RATES = {"full": (1e-7, 5e-5), "lora": (1e-5, 1e-3), "locon": (1e-5, 1e-3),
                  "loha": (1e-5, 3e-4), "lokr": (1e-5, 1e-3)}


def learning_rate_advice(method: str, lr: float) -> str | None:
    """A warning when ``lr`` is far from what ``method`` trains well with (None: it is not)."""
    low, high = LEARNING_RATES.get(method, LEARNING_RATES["lora"])
    if method == "full" and lr >= high:
        return (f"learning rate {lr:g} is a LoRA's: a full fine-tune at that rate overcooks in a "
                "few hundred steps (1e-6 is the classic value)")
    if method != "full" and lr < low:
        return (f"learning rate {lr:g} is a full fine-tune's: {method} usually trains at 1e-4 "
                "(the -lora presets set it)")
    if method != "full" and lr > high:
        why = (" (LoHa multiplies two low-rank pairs: its update is about 50x LoCon's, and at 1e-3 "
               "its generations came out NaN)" if method == "loha" else "")
        return (f"learning rate {lr:g} is high for {method}{why}: it trains well at 1e-4, up to "
                f"{high:g}")
    return None


# Every number option and the values it may take (checked before any work starts).
RANGES: dict[str, Range] = {
    "prior_loss_weight": Range(0, 100),
    "num_class_images": Range(0, 100_000),
    "class_batch_size": Range(1, 256),
    "class_sample_steps": Range(1, 1000),
    "class_guidance_scale": Range(0, 50),
    "class_clip_skip": Range(1, 12),
    "resolution": Range(0, 4096, hint="0: the model's own; else a multiple of 8, e.g. 512"),
    "rotation_degrees": Range(0, 45),
    "brightness_jitter": Range(0, 1, high_open=True),
    "contrast_jitter": Range(0, 1, high_open=True),
    "keep_tokens": Range(0, 75),
    "tag_dropout": Range(0, 1, high_open=True),
    "max_train_steps": Range(0, MAX_STEPS, hint="0: pictures x 100"),
    "train_batch_size": Range(1, 256),
    "gradient_accumulation_steps": Range(1, 1024),
    "learning_rate": Range(0, 10, low_open=True, hint="DreamBooth uses about 1e-6"),
    "lr_warmup_steps": Range(0, MAX_STEPS),
    "lr_num_cycles": Range(1, 10_000),
    "lr_power": Range(0, 100, low_open=True),
    "adam_beta1": Range(0, 1, high_open=True),
    "adam_beta2": Range(0, 1, high_open=True),
    "adam_epsilon": Range(0, 1, low_open=True),
    "weight_decay": Range(0, 10),
    "max_grad_norm": Range(0, 1e6, hint="0: no clipping"),
    "text_encoder_lr": Range(0, 10, hint="0: the UNet's learning rate"),
    "text_encoder_stop": Range(0, MAX_STEPS, low_open=True,
                               hint="a fraction in (0, 1] or a whole step number"),
    "text_encoder_2_lr": Range(0, 10, hint="0: as the first text encoder"),
    "text_encoder_2_stop": Range(0, MAX_STEPS, hint="0: frozen; a fraction or a step number"),
    "clip_skip": Range(1, 12),
    "offset_noise": Range(0, 1),
    "min_snr_gamma": Range(0, 1000, hint="0: off, 5 is the paper's value"),
    "flux_guidance": Range(0, 100, hint="1 is kohya's and ai-toolkit's default"),
    "flow_shift": Range(1, 20, hint="1: no shift; 3 the default"),
    "mask_background_weight": Range(0, 1, hint="0: the background is ignored, 1: no masking"),
    "ema_decay": Range(0, 1, high_open=True),
    "lora_rank": Range(1, 1024),
    "lora_alpha": Range(0, 4096, hint="0: alpha = rank (scale 1)"),
    "lora_conv_rank": Range(0, 1024, hint="0: no convolutions (loha/lokr)"),
    "lora_conv_alpha": Range(0, 4096, hint="0: alpha = rank"),
    "lora_dropout": Range(0, 1, high_open=True),
    "lokr_factor": Range(-1, 1024, hint="-1: balanced"),
    "seed": Range(0, MAX_SEED),
    "save_every_n_steps": Range(0, MAX_STEPS),
    "checkpoint_every_n_steps": Range(0, MAX_STEPS),
    "checkpoints_total_limit": Range(0, 1000),
    "sample_every_n_steps": Range(0, MAX_STEPS),
    "sample_steps": Range(0, 1000),  # 0: no sample pictures
    "sample_guidance_scale": Range(0, 50),
    "sample_seed": Range(0, MAX_SEED),
    "sample_size": Range(0, 4096, hint="0: the training resolution"),
    "validation_split": Range(0, 1, high_open=True, hint="0: off; 0.1-0.2 holds out a few"),
    "validate_every_n_steps": Range(0, MAX_STEPS, hint="0: only at the end"),
    "blocks_to_swap": Range(0, 1000, hint="0: every block on the GPU"),
    "validation_timesteps": Range(1, 100),
}
# Text options that name files or folders: no control character at all.
FUSABLE = ("adamw", "adamw8bit", "lion", "lion8bit", "adafactor", "sgd")


def fused_problems(config: "TrainingConfig") -> list[FieldError]:
    """What in ``config`` the fused backward pass (``fused_backward``, dreambooth.engine.fused)
    cannot honour (empty: it can run)."""
    if not config.fused_backward:
        return []
    errors = []
    if config.optimizer not in FUSABLE:
        errors.append(FieldError("fused_backward", f"{config.optimizer} computes one step from "
                                 f"all weights together; fusable: {', '.join(FUSABLE)}"))
    if config.max_grad_norm:
        errors.append(FieldError("max_grad_norm", "the fused backward pass steps each weight as "
                                 "its gradient arrives, before a global norm exists: set 0"))
    if config.gradient_accumulation_steps > 1:
        errors.append(FieldError("gradient_accumulation_steps", "the fused backward pass steps "
                                 "at every backward pass: set 1 (use a larger batch instead)"))
    return errors


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
            return _whole_number(value)
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
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
    except (TypeError, ValueError, OverflowError):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        what = {"int": "a whole number", "float": "a number", "bool": "true or false",
                "str": "text", "list": "a list of text"}.get(expected.__name__, expected.__name__)
        return FieldError(name, f"expected {what}, got {shown}")
    return value


def _whole_number(value: Any) -> int:
    """An int from an int, a whole float or a numeral string; TypeError otherwise (an int too
    large for a float is fine here: the range check names it)."""
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise TypeError
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return _whole_number(float(text))
    raise TypeError


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
            concepts.append(Concept())  # a placeholder: concepts[i+1] keeps its index
            continue
        for key in item:
            if key not in known:
                errors.append(FieldError(f"concepts[{i}].{key}", "unknown concept field"))
        values = {}
        for key in known & item.keys():
            if key == "num_class_images":
                number = item[key]
                try:
                    values[key] = None if number is None else _whole_number(number)
                except (TypeError, ValueError, OverflowError):
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


def read_concepts_list(path: str | Path, field_name: str = "concepts_list") -> list[Concept]:
    """Read a concepts_list file: JSON, or the seed's Python-literal form with ``#`` comments
    (optionally ``concepts_list = [...]``)."""
    path = Path(path)
    data = _read_json_or_literal(path, field_name)
    if isinstance(data, dict) and "concepts_list" in data:
        data = data["concepts_list"]
    concepts, errors = _concepts_from(data)
    if errors:
        raise ConfigError([FieldError(f"{field_name} ({path.name}): {e.field}", e.message)
                           for e in errors])
    return concepts


def write_concepts_list(concepts: list[Concept], path: str | Path) -> Path:
    from dreambooth.common.files import write_json

    data = [{k: v for k, v in dataclasses.asdict(c).items() if v not in ("", None)} for c in concepts]
    return write_json(Path(path), data, overwrite=True)
