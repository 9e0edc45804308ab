"""The training loop: DreamBooth with prior preservation, and native fine-tuning, on accelerate.

Read it top to bottom like diffusers' train_dreambooth.py: ``train()`` loads the model, makes the
class pictures, caches latents and text embeddings, then runs the loop. Everything random is
derived from ``(config.seed, step)``, so a run resumed from a checkpoint continues exactly as an
uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
import gc
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from . import data
from .config import ConfigError, FieldError, TrainingConfig
from .eta import RunExtras
from .memory import give_memory_back
from .tiny import Components


class Cancelled(Exception):
    """Raised inside the loop when the user asked to stop."""


class Reporter:
    """What the loop tells the outside world; the job runner and the CLI subclass it."""

    def phase(self, name: str) -> None: ...

    def log(self, line: str) -> None:
        print(line, flush=True)

    def progress(self, step: int, total: int, loss: float | None, lr: float | None) -> None: ...

    def samples(self, paths: list[Path]) -> None: ...

    def holding(self, held: bool) -> None:
        """Whether the job holds the WebUI's generation lock (txt2img waits for it)."""

    def detail(self, text: str) -> None:
        """What the current phase is doing ("sampling step 500: 2 / 4 pictures")."""

    def extra_time(self, seconds: float) -> None:
        """Seconds the rest of the run needs besides its steps (samples, saves, export)."""

    def should_stop(self) -> bool:
        return False


@dataclass
class RunPaths:
    """Where a run writes: its work folder and the folder the WebUI lists checkpoints from."""

    work_dir: Path
    checkpoints_dir: Path

    @property
    def resume_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.work_dir / "samples"

    @property
    def logs_dir(self) -> Path:
        """The training log: train.jsonl always, TensorBoard event files when it is installed."""
        return self.work_dir / "logs"


@dataclass
class TrainResult:
    output_path: Path | None
    steps: int
    total_steps: int
    seconds: float
    cancelled: bool = False
    losses: list[float] = field(default_factory=list)
    ema: object | None = None  # the EMAModel when use_ema (its weights are what was exported)


# --------------------------------------------------------------------------------------------
# Pure pieces (tested on their own)
# --------------------------------------------------------------------------------------------

def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of each timestep: alpha_bar / (1 - alpha_bar)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v targets (the v loss already carries a factor SNR + 1)."""
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped / snr_values


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, *, n_instance: int,
                    prior_loss_weight: float, weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss = instance MSE + prior_loss_weight x class MSE; the first n_instance rows are instance
    pictures, the rest class pictures. Returns (loss, instance loss, prior loss or None)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    instance = per_sample[:n_instance].mean()
    if n_instance == per_sample.shape[0]:
        return instance, instance, None
    prior = per_sample[n_instance:].mean()
    return instance + prior_loss_weight * prior, instance, prior


def offset_noise(shape: tuple[int, ...], strength: float, generator: torch.Generator,
                 dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise plus a per-(sample, channel) constant: lets the model learn overall
    brightness (Guttenberg's offset noise)."""
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    if strength:
        noise = noise + strength * torch.randn(shape[:2] + (1,) * (len(shape) - 2),
                                               generator=generator, dtype=dtype)
    return noise


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for one step: randomness depends only on (seed, step), never on history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2 ** 63))


def encode_prompts(text_encoder, tokenizer, prompts: list[str], clip_skip: int,
                   device) -> torch.Tensor:
    """CLIP embeddings as the WebUI makes them: with clip_skip > 1, the hidden state that many
    layers from the end, passed through the final layer norm."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    if clip_skip <= 1:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return text_encoder.text_model.final_layer_norm(hidden)


def build_optimizer(name: str, param_groups: list[dict], config: TrainingConfig, device):
    """AdamW, 8-bit AdamW, Lion (32/8-bit), Prodigy or SGD over the given parameter groups."""
    betas = (config.adam_beta1, config.adam_beta2)
    if name == "adamw":
        extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(param_groups, betas=betas, eps=config.adam_epsilon,
                                 weight_decay=config.weight_decay, **extra)
    if name == "sgd":
        return torch.optim.SGD(param_groups, momentum=0.9, weight_decay=config.weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(param_groups, betas=betas, weight_decay=config.weight_decay)
    problem = eight_bit_problem(device) if name in ("adamw8bit", "lion8bit", "lion") else None
    if problem:
        raise ConfigError([FieldError("optimizer", problem)])
    import bitsandbytes as bnb

    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(param_groups, betas=betas, eps=config.adam_epsilon,
                                   weight_decay=config.weight_decay)
    if name == "lion8bit":
        return bnb.optim.Lion8bit(param_groups, betas=betas, weight_decay=config.weight_decay)
    if name == "lion":
        return bnb.optim.Lion(param_groups, betas=betas, weight_decay=config.weight_decay,
                              optim_bits=32)
    raise ConfigError([FieldError("optimizer", f"unknown optimizer {name!r}")])


def eight_bit_problem(device) -> str | None:
    """Why bitsandbytes' optimizers cannot run on this device, or None when they can."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # a broken install raises all sorts of errors at import
        return f"bitsandbytes is not usable ({exc}); choose adamw"
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if device.type == "cpu" and version < (0, 50):
        return (f"bitsandbytes {bnb.__version__} cannot run its optimizers on the CPU (0.50 is the "
                "first that can); choose adamw")
    return None


def frozen_dtype(mixed_precision: str, device) -> torch.dtype:
    """Frozen parts (VAE, text encoder when not trained) run in half precision on the GPU."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def set_attention(unet, attention: str) -> None:
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError as exc:
            raise ConfigError([FieldError(
                "attention", "xformers is not installed; choose sdpa (as fast on torch 2)")]) from exc
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    else:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())


class EMA:
    """Exponential moving average of the trained weights, with diffusers' warm-up
    (decay_t = min(decay, (1 + t) / (10 + t))). diffusers' own EMAModel lives in
    diffusers.training_utils, which fails to import with the WebUI's transformers 4.30."""

    def __init__(self, parameters, decay: float):
        self.decay = decay
        self.shadow_params = [p.detach().clone().float() for p in parameters]
        self.optimization_step = 0
        self._stored: list[torch.Tensor] | None = None

    def current_decay(self) -> float:
        t = self.optimization_step
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def step(self, parameters) -> None:
        self.optimization_step += 1
        weight = 1.0 - self.current_decay()
        for shadow, param in zip(self.shadow_params, parameters):
            if param.requires_grad:
                shadow.lerp_(param.detach().float(), weight)
            else:
                shadow.copy_(param.detach())

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for shadow, param in zip(self.shadow_params, parameters):
            param.copy_(shadow.to(param.device, param.dtype))

    def store(self, parameters) -> None:
        self._stored = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        for stored, param in zip(self._stored or [], parameters):
            param.copy_(stored)
        self._stored = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "optimization_step": self.optimization_step,
                "shadow_params": self.shadow_params}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.optimization_step = state["optimization_step"]
        self.shadow_params = [t.clone() for t in state["shadow_params"]]


# --------------------------------------------------------------------------------------------
# Data for the loop
# --------------------------------------------------------------------------------------------

class LatentSource:
    """Latents for (picture, flip, bucket): from the cache when caching is exact, else encoded now."""

    def __init__(self, vae, config: TrainingConfig, device, dtype):
        self.vae, self.config, self.device, self.dtype = vae, config, device, dtype
        self.cache: dict[tuple, torch.Tensor] | None = (
            {} if config.cache_latents and not data.has_random_augmentation(config) else None)
        self.scale = vae.config.scaling_factor

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return (dist.mean * self.scale).float()  # mean, not a sample: cached latents stay exact

    def fill_cache(self, items: list[tuple[data.Picture, bool, tuple[int, int]]],
                   should_stop: Callable[[], bool], progress: Callable[[int, int], None]) -> None:
        todo = [item for item in items if self.key(*item) not in self.cache]
        for done, (picture, flip, bucket) in enumerate(todo, 1):
            if should_stop():
                raise Cancelled
            pixels = data.picture_tensor(picture, self.config, flip=flip, bucket=bucket)
            self.cache[self.key(picture, flip, bucket)] = self.encode(pixels[None]).cpu()[0]
            progress(done, len(todo))

    @staticmethod
    def key(picture: data.Picture, flip: bool, bucket: tuple[int, int]) -> tuple:
        return (str(picture.path), flip, bucket)

    def get(self, picture: data.Picture, flip: bool, bucket: tuple[int, int],
            rng: random.Random) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[self.key(picture, flip, bucket)]
        pixels = data.picture_tensor(picture, self.config, flip=flip, rng=rng, bucket=bucket)
        return self.encode(pixels[None]).cpu()[0]


def epoch_batches(instances: list[data.Picture], config: TrainingConfig, epoch: int,
                  rank: int = 0, world: int = 1) -> list[list[int]]:
    batches = data.bucket_batches(instances, config.train_batch_size,
                                  random.Random(f"{config.seed}-epoch-{epoch}"))
    return batches[rank::world] if world > 1 else batches


def micro_batches(instances: list[data.Picture], config: TrainingConfig, start_micro: int,
                  rank: int = 0, world: int = 1) -> Iterator[tuple[int, list[int]]]:
    """(micro step number, picture indices) from start_micro on, epoch after epoch."""
    micro, epoch = 0, 0
    while True:
        batches = epoch_batches(instances, config, epoch, rank, world)
        if not batches:
            raise ConfigError([FieldError("train_batch_size",
                                          "no batch can be formed from the pictures")])
        for batch in batches:
            if micro >= start_micro:
                yield micro, batch
            micro += 1
        epoch += 1


def class_partner(classes: list[data.Picture], concept_index: int, micro: int,
                  slot: int) -> data.Picture:
    """A class picture of the same concept, taken round-robin so every one is used."""
    pool = [p for p in classes if p.concept_index == concept_index]
    return pool[(micro * 7 + slot) % len(pool)]


# --------------------------------------------------------------------------------------------
# What a run writes: resume points and models
# --------------------------------------------------------------------------------------------

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
    """The file names a run will write into the checkpoints folder: its intermediate saves
    (``<name>_<step>``) and the final model."""
    from .names import output_file_name

    names = []
    if config.save_every_n_steps:
        names += [output_file_name(config.model_name, f"_{step}", config.export_format)
                  for step in range(config.save_every_n_steps, total_steps,
                                    config.save_every_n_steps)]
    return names + [output_file_name(config.model_name, "", config.export_format)]


class RunWriter:
    """Writes what a run keeps — resume points and models — and knows which files are its own.

    A model file of this run (its metadata carries the run id, e.g. an intermediate save written
    before a crash) may be replaced; any other existing file only with ``overwrite``."""

    def __init__(self, config: TrainingConfig, paths: RunPaths, components: Components,
                 accelerator, unet, text_encoder, ema, optimizer, lr_scheduler,
                 reporter: Reporter, run_id: str, pictures: tuple[int, int] = (0, 0)):
        self.config, self.paths, self.components = config, paths, components
        self.pictures = pictures  # instance and class pictures, for the file's metadata
        self.accelerator, self.unet, self.text_encoder, self.ema = accelerator, unet, text_encoder, ema
        self.optimizer, self.lr_scheduler, self.reporter = optimizer, lr_scheduler, reporter
        self.run_id = run_id

    def trained_models(self) -> dict[str, torch.nn.Module]:
        models = {"unet": self.accelerator.unwrap_model(self.unet)}
        if self.config.train_text_encoder:
            models["text_encoder"] = self.accelerator.unwrap_model(self.text_encoder)
        return models

    def resume_point(self, step: int) -> Path:
        from . import resume

        models = self.trained_models()
        state = {"optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None}
        point = resume.save_resume_point(
            self.paths.resume_dir, step, models, state, run_id=self.run_id,
            limit=self.config.checkpoints_total_limit,
            needed_bytes=resume.estimate_bytes(models, self.optimizer))
        self.reporter.log(f"saved resume point at step {step}")
        return point

    def model(self, step: int, suffix: str = "") -> Path | None:
        """Export the model; an intermediate save (``suffix``) whose name is taken by a file that
        is not this run's is skipped with a warning (the final one raises OutputExistsError)."""
        from .files import OutputExistsError
        from .names import output_file_name

        out = self.paths.checkpoints_dir / output_file_name(self.config.model_name, suffix,
                                                            self.config.export_format)
        replace = self.config.overwrite or run_id_of(out) == self.run_id
        if out.exists() and not replace:
            if not suffix:
                raise OutputExistsError(out)
            self.reporter.log(f"warning: {out.name} already exists and is not from this run; "
                              "this intermediate save is skipped (turn on overwrite to replace it)")
            return None
        return export(self.config, self.paths, self.components, self.accelerator, self.unet,
                      self.text_encoder, self.ema, step, self.reporter, suffix=suffix,
                      overwrite=replace, run_id=self.run_id, pictures=self.pictures)

    def rescue(self, step: int, failure: Exception, saved_step: int | None) -> Exception:
        """After a failed write: keep the trained weights as a resume point (unless that was the
        write that failed, or the newest point already holds this step) and say so in the error."""
        from . import resume
        from .files import WriteError, with_note

        if step <= 0:
            return failure
        newest = resume.list_resume_points(self.paths.resume_dir)
        if isinstance(failure, WriteError) and self.paths.resume_dir in failure.target.parents:
            kept = (f"the newest complete resume point is {newest[-1].name}" if newest
                    else "no resume point could be kept")
            return with_note(failure, kept)
        if saved_step == step and newest:
            note = f"the trained weights of step {step} are kept in the resume point {newest[-1]}"
        else:
            try:
                note = f"the trained weights are kept as the resume point {self.resume_point(step)}"
            except (WriteError, OSError) as second:
                return with_note(failure, f"the resume point could not be written either ({second})")
        return with_note(failure, f"{note}; fix that, then resume the run (Resume in the tab, "
                                  "--resume on the command line) to finish without training again")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def new_accelerator(precision: str):
    """An Accelerator for this run. accelerate keeps its settings in a process-wide singleton;
    a WebUI process runs many jobs, each with its own precision, so the per-run part is reset
    (the distributed part, set up by accelerate launch / torchrun, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def resolve_base_model(config: TrainingConfig) -> Path:
    path = Path(config.base_model).expanduser()
    if not path.exists():
        raise ConfigError([FieldError("base_model", f"{config.base_model} does not exist; pick a "
                                      "checkpoint file or a diffusers folder")])
    return path


def load_model(config: TrainingConfig) -> tuple[Components, str]:
    """Components and prediction type of the base model."""
    from . import checkpoint

    components, kind = checkpoint.load_components(
        resolve_base_model(config), prediction_type=config.prediction_type or None,
        use_ema=config.base_use_ema, vae_path=config.vae_path or None)
    return components, kind.prediction_type


def train(config: TrainingConfig, paths: RunPaths, *, reporter: Reporter | None = None,
          **kwargs) -> TrainResult:
    """Run one training job (see :func:`run_training`); a cancel before the first step (while
    loading, making class pictures or caching) ends it as cancelled too."""
    reporter = reporter or Reporter()
    started = time.time()
    try:
        return run_training(config, paths, reporter=reporter, **kwargs)
    except Cancelled:
        reporter.log("cancelled before training started")
        return TrainResult(None, 0, 0, time.time() - started, cancelled=True)


def run_training(config: TrainingConfig, paths: RunPaths, *, reporter: Reporter,
                 components: Components | None = None, prediction_type: str | None = None,
                 resume: bool = False, export_model: bool = True) -> TrainResult:
    """Run one training job. ``components`` skips loading (tests and benchmarks pass the tiny
    model, trained in place); the export always starts from ``config.base_model``'s own file;
    ``export_model=False`` skips it (benchmarks of the loop alone)."""
    from diffusers.optimization import get_scheduler

    started = time.time()
    config.check()
    for note in config.warnings():
        reporter.log(f"warning: {note}")
    instances = data.collect_pictures(config, include_class=False)  # bad input fails here, early
    from . import resume as resume_points
    from .files import OutputExistsError, WriteError, sweep
    from .names import output_file_name

    final_output = paths.checkpoints_dir / output_file_name(config.model_name, "",
                                                            config.export_format)
    if export_model and final_output.exists() and not config.overwrite:
        raise ConfigError([FieldError("model_name", f"{final_output} already exists; choose another "
                                      "name or turn on overwrite")])
    points = resume_points.list_resume_points(paths.resume_dir)
    if points and not resume and not config.overwrite:
        raise ConfigError([FieldError("model_name", f"{paths.work_dir} holds resume points of an "
                                      f"earlier run (step {resume_points.point_step(points[-1])}): "
                                      "resume it, choose another name, or turn on overwrite to "
                                      "discard them")])

    precision = config.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        reporter.log("fp16 needs a CUDA GPU: training in full precision on the CPU")
        precision = "no"
    accelerator = new_accelerator(precision)
    device = accelerator.device
    if config.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.optimizer in ("adamw8bit", "lion8bit", "lion"):
        problem = eight_bit_problem(device)
        if problem:
            raise ConfigError([FieldError("optimizer", problem)])
    main = accelerator.is_main_process
    if main:  # leftovers of killed runs, then the config of this one (all checks passed)
        folders = [(paths.checkpoints_dir, False), (paths.work_dir, True)]
        folders += [(Path(c.class_data_dir).expanduser(), False) for c in config.concepts
                    if c.class_data_dir.strip()]
        for folder, deep in folders:
            for stale in sweep(folder, recursive=deep):
                reporter.log(f"removed {stale.name}, left by an interrupted run")
        for stale in resume_points.sweep_resume_dir(paths.resume_dir):
            reporter.log(f"removed the incomplete resume point {stale.name}")
        if points and not resume:
            resume_points.remove_all(paths.resume_dir)
            reporter.log(f"overwrite: discarded the resume points of the earlier run in {paths.work_dir}")
        config.save(paths.work_dir / "config.json")
    reporter.log(f"training on {device.type}" + (f" with {accelerator.num_processes} processes"
                                                 if accelerator.num_processes > 1 else "")
                 + f", precision {precision}")

    reporter.phase("loading")
    if components is None:
        components, prediction_type = load_model(config)
    if getattr(components, "text_encoder_2", None) is not None:
        raise ConfigError([FieldError("base_model", "SDXL checkpoints load and convert, but this "
                                      "version trains SD1.x and SD2.x only; pick an SD1.x/2.x model")])
    prediction_type = config.prediction_type or prediction_type or "epsilon"
    unet, vae, text_encoder, tokenizer = (components.unet, components.vae,
                                          components.text_encoder, components.tokenizer)
    noise_scheduler = components.noise_scheduler
    if noise_scheduler.config.prediction_type != prediction_type:
        noise_scheduler = type(noise_scheduler).from_config(noise_scheduler.config,
                                                            prediction_type=prediction_type)
    weight_dtype = frozen_dtype(precision, device)

    if config.with_prior_preservation:
        reporter.phase("class_images")
        from . import prior

        if main:
            vae.to(device, weight_dtype)
            text_encoder.to(device, weight_dtype)
            unet.to(device, weight_dtype)
            pipe = components.pipeline()
            pipe.set_progress_bar_config(disable=True)
            prior.generate_class_pictures(
                config, pipe, should_stop=reporter.should_stop, log=reporter.log,
                progress=lambda done, total: reporter.progress(done, total, None, None))
            del pipe
            if reporter.should_stop():
                raise Cancelled
        accelerator.wait_for_everyone()
    # Native training has no class pictures: the early scan already holds every picture.
    pictures = (data.collect_pictures(config, include_class=True)
                if config.with_prior_preservation else instances)
    instances = [p for p in pictures if not p.is_class]
    classes = [p for p in pictures if p.is_class]
    if config.with_prior_preservation:
        missing = {p.concept_index for p in instances} - {p.concept_index for p in classes}
        if missing:
            raise ConfigError([FieldError(f"concepts[{i}].class_data_dir",
                                          "holds no class pictures") for i in sorted(missing)])
    if config.train_batch_size > len(instances):
        raise ConfigError([FieldError("train_batch_size", f"is {config.train_batch_size} but there "
                                      f"are only {len(instances)} instance pictures")])
    for line in data.prompt_warnings(pictures, tokenizer):
        reporter.log(f"warning: {line}")
    total_steps = config.total_steps(len(instances))
    te_stop = config.text_encoder_stop_step(total_steps)

    # Models: only what is trained keeps fp32 weights (the optimizer's master copy).
    unet.to(device, torch.float32).train()
    unet.requires_grad_(True)
    vae.requires_grad_(False).to(device, weight_dtype).eval()
    text_encoder.requires_grad_(False)
    if config.train_text_encoder:
        text_encoder.to(device, torch.float32).train().requires_grad_(True)
    else:
        text_encoder.to(device, weight_dtype).eval()
    set_attention(unet, config.attention)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)

    # Caches, so the VAE (and the frozen text encoder) can leave the GPU during training.
    latents = LatentSource(vae, config, device, weight_dtype)
    if latents.cache is not None:
        reporter.phase("caching")
        flips = data.cache_flips(config)
        items = [(p, f, p.bucket) for p in instances for f in flips]
        items += [(c, f, b) for c in classes for f in flips
                  for b in sorted({p.bucket for p in instances if p.concept_index == c.concept_index})]
        latents.fill_cache(items, reporter.should_stop,
                           lambda done, total: reporter.progress(done, total, None, None))
        reporter.log(f"cached {len(latents.cache)} latents")
        vae.to("cpu")
    elif config.cache_latents:
        reporter.log("latents are encoded at every step: random crop, rotation or jitter change "
                     "the picture each time")
    text_cache = None
    if config.cache_text_embeddings and not config.train_text_encoder \
            and not (config.shuffle_tags or config.tag_dropout):
        # Prompts are fixed: encode each once, then the text encoder leaves the GPU.
        text_cache = {}
        unique = list(dict.fromkeys(p.caption for p in pictures))
        with torch.no_grad():
            for i in range(0, len(unique), 16):
                chunk = unique[i:i + 16]
                encoded = encode_prompts(text_encoder, tokenizer, chunk, config.clip_skip, device)
                text_cache.update({p: e.cpu() for p, e in zip(chunk, encoded)})
        text_encoder.to("cpu")
        reporter.log(f"cached {len(text_cache)} text embeddings")
    elif config.cache_text_embeddings and not config.train_text_encoder:
        reporter.log("text embeddings are encoded at every step: tag shuffle or dropout change "
                     "the prompts each time")

    def embeddings(prompts: list[str], train_te: bool) -> torch.Tensor:
        if train_te:
            return encode_prompts(text_encoder, tokenizer, prompts, config.clip_skip, device)
        if text_cache is not None:
            return torch.stack([text_cache[p] for p in prompts]).to(device)
        with torch.no_grad():
            return encode_prompts(text_encoder, tokenizer, prompts, config.clip_skip, device)

    # Optimizer and learning-rate schedule (stepped once per optimizer step).
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad],
               "lr": config.learning_rate}]
    if config.train_text_encoder:
        groups.append({"params": list(text_encoder.parameters()),
                       "lr": config.text_encoder_lr or config.learning_rate})
    optimizer = build_optimizer(config.optimizer, groups, config, device)
    schedule = config.lr_scheduler
    if schedule == "constant" and config.lr_warmup_steps:  # diffusers' "constant" ignores warmup
        schedule = "constant_with_warmup"
    lr_scheduler = get_scheduler(schedule, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=total_steps, num_cycles=config.lr_num_cycles,
                                 power=config.lr_power)
    if config.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = EMA(accelerator.unwrap_model(unet).parameters(), config.ema_decay) if config.use_ema else None

    step, state, run_id = 0, None, resume_points.new_run_id()
    if resume:
        points = resume_points.list_resume_points(paths.resume_dir)
        if points:
            models = {"unet": accelerator.unwrap_model(unet)}
            if config.train_text_encoder:
                models["text_encoder"] = accelerator.unwrap_model(text_encoder)
            saved, state = resume_points.load_resume_point(points[-1], models)
            step, run_id = int(saved["step"]), str(saved.get("run_id") or run_id)
            reporter.log(f"resumed from {points[-1].name} (step {step})")
        else:
            reporter.log("no resume checkpoint found: starting from step 0")
    train_te = config.train_text_encoder and step < te_stop
    if config.train_text_encoder and not train_te:
        freeze_text_encoder(text_encoder, optimizer)
    if state is not None:  # after the freeze, so the parameter groups match the saved ones
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])

    # The step count first, then the phase: whoever sees "training" sees the right step.
    reporter.progress(step, total_steps, None, lr_scheduler.get_last_lr()[0])
    reporter.phase("training")
    alphas_cumprod = noise_scheduler.alphas_cumprod
    accum = config.gradient_accumulation_steps
    losses: list[float] = []
    output_path = None
    step_started = time.time()
    writer = RunWriter(config, paths, components, accelerator, unet, text_encoder, ema, optimizer,
                       lr_scheduler, reporter, run_id, pictures=(len(instances), len(classes)))
    base_file = Path(config.base_model).expanduser()
    extras = RunExtras(total_steps=total_steps, sample_every=config.sample_every_n_steps,
                       save_every=config.save_every_n_steps,
                       resume_every=config.checkpoint_every_n_steps, export=export_model and main,
                       base_file=base_file if base_file.is_file() else None)

    def timed(kind: str, action: Callable[[], Any]) -> Any:
        began = time.time()
        try:
            return action()
        finally:
            extras.measured(kind, time.time() - began)

    def samples(final: bool = False) -> None:
        reporter.phase("sampling")
        reporter.samples(timed("samples", lambda: make_samples(
            components, config, paths, step, device, accelerator, unet, ema, reporter)))
        if not final:
            reporter.phase("training")
    saved_step = step if state is not None else None  # the newest resume point's step
    try:
        batches = micro_batches(instances, config, step * accum, accelerator.process_index,
                                accelerator.num_processes)
        pending = torch.zeros((), device=device)
        for micro, batch in batches:
            if step >= total_steps:  # resumed from the last step: only the export is left
                break
            if reporter.should_stop():
                raise Cancelled
            rng = random.Random(f"{config.seed}-micro-{micro}")
            chosen = [instances[i] for i in batch]
            bucket = chosen[0].bucket
            rows = [(p, f) for p, f in zip(chosen, data.epoch_flips(len(chosen), config, rng))]
            if config.with_prior_preservation:
                partners = [class_partner(classes, p.concept_index, micro, slot)
                            for slot, p in enumerate(chosen)]
                rows += list(zip(partners, data.epoch_flips(len(partners), config, rng)))
            model_input = torch.stack([latents.get(p, f, bucket, rng) for p, f in rows]).to(device)
            prompts = [data.prompt_variant(p.caption, config, rng) for p, _ in rows]

            gen = step_generator(config.seed, micro)
            noise = offset_noise(tuple(model_input.shape), config.offset_noise, gen).to(device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                      (model_input.shape[0],), generator=gen).to(device)
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            target = (noise_scheduler.get_velocity(model_input, noise, timesteps)
                      if prediction_type == "v_prediction" else noise)
            weights = None
            if config.min_snr_gamma:
                weights = min_snr_weights(snr(alphas_cumprod, timesteps), config.min_snr_gamma,
                                          prediction_type)
            with accelerator.autocast():
                hidden = embeddings(prompts, train_te)
                pred = unet(noisy, timesteps, hidden).sample
                loss, _, _ = dreambooth_loss(pred, target, n_instance=len(chosen),
                                             prior_loss_weight=config.prior_loss_weight,
                                             weights=weights)
            accelerator.backward(loss / accum)
            pending = pending + loss.detach() / accum
            if (micro + 1) % accum:
                continue

            if config.max_grad_norm:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            if train_te and step >= te_stop:
                train_te = False
                freeze_text_encoder(text_encoder, optimizer)
                reporter.log(f"text encoder frozen after step {step}")
            # The only host-device sync of the step: the loss for the progress display.
            loss_value = float(pending)
            pending = torch.zeros((), device=device)
            losses.append(loss_value)
            reporter.extra_time(extras.remaining(step))
            reporter.progress(step, total_steps, loss_value, lr_scheduler.get_last_lr()[0])

            # Models and samples first, the resume point last: a run resumed from this step has
            # everything before it done (a crash in between redoes this step's saves).
            if main and export_model and config.save_every_n_steps \
                    and step % config.save_every_n_steps == 0 and step < total_steps:
                timed("save", lambda: writer.model(step, suffix=f"_{step}"))
            if main and config.sample_every_n_steps and step % config.sample_every_n_steps == 0 \
                    and step < total_steps:
                samples()
            if main and config.checkpoint_every_n_steps and step % config.checkpoint_every_n_steps == 0 \
                    and step < total_steps:
                timed("resume", lambda: writer.resume_point(step))
                saved_step = step
            if step >= total_steps:
                break
        accelerator.wait_for_everyone()
        # Training is over: the optimizer's state (two copies of the trained weights for AdamW)
        # is not needed for the samples or the export, nor by a resume point of the last step
        # (resuming there only exports): give its memory back before the export needs some.
        optimizer.state.clear()
        give_memory_back()
        if main:
            # Always a last look at the result (sample_every_n_steps = 0: only this one).
            samples(final=True)
            if export_model:
                output_path = timed("export", lambda: writer.model(step))
        cancelled = False
    except Cancelled:
        cancelled = True
        reporter.log(f"cancelled at step {step}")
        try:
            if main and step > 0 and saved_step != step:  # a cancelled run can always be resumed
                writer.resume_point(step)
                saved_step = step
            if main and step > 0 and config.save_on_cancel and export_model:
                output_path = writer.model(step, suffix=f"_{step}")
        except (WriteError, OutputExistsError) as failure:
            raise writer.rescue(step, failure, saved_step) from failure
    except (WriteError, OutputExistsError) as failure:
        if not main:
            raise
        raise writer.rescue(step, failure, saved_step) from failure
    finally:
        release(accelerator, components)
    seconds = time.time() - started
    stepping = time.time() - step_started - extras.spent  # samples, saves and export left out
    reporter.log(f"{step}/{total_steps} steps in {seconds:.1f} s"
                 + (f" ({stepping / max(step, 1):.3f} s/step)" if step else ""))
    return TrainResult(output_path, step, total_steps, seconds, cancelled, losses, ema)


def freeze_text_encoder(text_encoder, optimizer) -> None:
    """Stop training the text encoder and free its optimizer state."""
    te_params = set(text_encoder.parameters())
    for group in optimizer.param_groups:
        if any(p in te_params for p in group["params"]):
            for p in group["params"]:
                optimizer.state.pop(p, None)
                p.grad = None
            group["params"] = []
    text_encoder.requires_grad_(False).eval()


def make_samples(components: Components, config: TrainingConfig, paths: RunPaths, step: int,
                 device, accelerator, unet, ema, reporter: Reporter | None = None) -> list[Path]:
    from .sampling import generate_samples

    def progress(done: int, total: int) -> None:
        if reporter is not None:
            reporter.detail(f"sampling step {step}: {done} / {total} pictures")

    live = accelerator.unwrap_model(unet)
    with ema_weights(live, ema):
        return generate_samples(components, config, paths.samples_dir, step, device,
                                progress=progress)


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


def export(config: TrainingConfig, paths: RunPaths, components: Components, accelerator, unet,
           text_encoder, ema, step: int, reporter: Reporter, suffix: str = "", *,
           overwrite: bool = False, run_id: str = "", pictures: tuple[int, int] = (0, 0)) -> Path:
    """Write the model into the checkpoints folder: into the base file's own layout, or (a
    diffusers folder as the base) as a new single file in the standard layout."""
    from . import checkpoint
    from . import export as export_module
    from .files import ensure_folder
    from .names import output_file_name

    reporter.phase("saving")
    ensure_folder(paths.checkpoints_dir)
    out = paths.checkpoints_dir / output_file_name(config.model_name, suffix, config.export_format)
    reporter.detail(f"writing {out.name}")
    trained = ("unet", "text_encoder") if config.train_text_encoder else ("unet",)
    metadata = export_metadata(config, step, *pictures)
    if run_id:
        metadata["dreambooth.run_id"] = run_id
    live = accelerator.unwrap_model(unet)
    base = resolve_base_model(config)
    with ema_weights(live, ema):
        if base.is_dir():
            result = export_module.save_single_file(
                components, out, kind=checkpoint.detect_kind(base).kind, dtype=config.export_dtype,
                metadata=metadata, overwrite=overwrite, base_name=base.name)
        else:
            result = export_module.export_checkpoint(
                base, components, out, trained=trained, dtype=config.export_dtype,
                metadata=metadata, overwrite=overwrite)
    reporter.log(f"saved {result}")
    if suffix:  # an intermediate save: training goes on
        reporter.phase("training")
    return result


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


def release(accelerator, components: Components) -> None:
    """Free what the run put on the GPU: the WebUI needs the memory back."""
    accelerator.free_memory()
    for model in (components.unet, components.vae, components.text_encoder):
        model.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
