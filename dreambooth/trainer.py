"""The training loop: DreamBooth with prior preservation, and native fine-tuning, on accelerate.

Read it top to bottom like diffusers' train_dreambooth.py: ``train()`` loads the model, makes the
class pictures, caches latents and text embeddings, then runs the loop. Everything random is
derived from ``(config.seed, step)``, so a run resumed from a checkpoint continues exactly as an
uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import gc
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from . import adapters, data, families, fused
from .families.base import CHUNK_TOKENS, chunk_count
from .config import ConfigError, FieldError, TrainingConfig
from .eta import RunExtras
from .memory import give_memory_back
from .objective import (dreambooth_loss, mask_weights, offset_noise, posterior_latents, snr,
                        step_generator, timestep_weights)
from .optimizers import EMA, build_optimizer, eight_bit_problem, freeze_text_encoder
from .run_output import RunWriter, make_samples, resolve_base_model
from .run_types import Cancelled, Reporter, RunPaths, TrainResult
from .schedules import noise_schedule
from .tiny import Components
from .training_log import TrainingLog

# Re-exported: the job runner, the CLI, the demo and the tests take these from here.
__all__ = ["Cancelled", "Reporter", "RunPaths", "TrainResult", "train", "run_training",
           "load_model"]



def frozen_dtype(mixed_precision: str, device) -> torch.dtype:
    """Frozen parts (VAE, text encoder when not trained) run in half precision on the GPU; on
    the CPU in bf16 when bf16 is asked (the CPU's autocast has bf16, not fp16), so a run there
    holds what it would on a GPU (the bench's memory figures rest on it)."""
    if device.type != "cuda" and mixed_precision != "bf16":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def latent_dtype(family: families.Family, config: TrainingConfig,
                 weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's precision for encoding latents: the frozen parts' one, except fp32 for a
    family whose stock VAE overflows in half precision (SDXL's) unless the VAE is fp16-safe."""
    if family.vae_needs_fp32 and not config.vae_fp16_safe:
        return torch.float32
    return weight_dtype


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



# --------------------------------------------------------------------------------------------
# Data for the loop
# --------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """What training needs of one picture: its latents (the VAE posterior's mean, and its std
    when latents are sampled), its mask on the latent grid (masked training), and what the
    family conditions on besides the prompt (SDXL: size and crop)."""

    mean: torch.Tensor
    std: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    conditioning: torch.Tensor | None = None


class LatentSource:
    """Latents for (picture, flip, bucket): from the cache when caching is exact, else encoded now."""

    def __init__(self, vae, config: TrainingConfig, device, dtype, family: families.Family):
        self.vae, self.config, self.device, self.dtype = vae, config, device, dtype
        self.family = family
        self.cache: dict[tuple, Encoded] | None = (
            {} if config.cache_latents and not data.has_random_augmentation(config) else None)
        self.scale = vae.config.scaling_factor
        self.sampled = config.latents_from == "sample"

    @torch.no_grad()
    def encode(self, picture: data.Picture, flip: bool, bucket: tuple[int, int],
               rng: random.Random | None) -> Encoded:
        view = data.picture_view(picture, self.config, flip=flip, rng=rng, bucket=bucket,
                                 mask=picture.mask)
        dist = self.vae.encode(view.pixels[None].to(self.device, self.dtype)).latent_dist
        mean = (dist.mean * self.scale).float().cpu()[0]
        std = (dist.std * self.scale).float().cpu()[0] if self.sampled else None
        mask = view.mask
        if mask is not None:  # the share of each latent pixel's 8 x 8 patch that is subject
            mask = F.interpolate(mask[None], size=tuple(mean.shape[-2:]), mode="area")[0]
        width, height = picture.size
        conditioning = self.family.picture_conditioning(
            (height, width), view.crop_top_left, tuple(view.pixels.shape[-2:]))
        return Encoded(mean, std, mask, conditioning)

    def fill_cache(self, items: list[tuple[data.Picture, bool, tuple[int, int]]],
                   should_stop: Callable[[], bool], progress: Callable[[int, int], None]) -> None:
        todo = [item for item in items if self.key(*item) not in self.cache]
        for done, (picture, flip, bucket) in enumerate(todo, 1):
            if should_stop():
                raise Cancelled
            self.cache[self.key(picture, flip, bucket)] = self.encode(picture, flip, bucket, None)
            progress(done, len(todo))

    @staticmethod
    def key(picture: data.Picture, flip: bool, bucket: tuple[int, int]) -> tuple:
        return (str(picture.path), flip, bucket)

    def get(self, picture: data.Picture, flip: bool, bucket: tuple[int, int],
            rng: random.Random) -> Encoded:
        if self.cache is not None:
            return self.cache[self.key(picture, flip, bucket)]
        return self.encode(picture, flip, bucket, rng)


def batch_inputs(encoded: list[Encoded], generator: torch.Generator, background: float,
                 device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The latents of a batch (a posterior sample when stds are kept, drawn from ``generator``),
    its per-pixel loss weights (None when no row has a mask; rows without one weigh 1) and its
    pictures' extra conditioning (None for families without)."""
    means = torch.stack([e.mean for e in encoded])
    stds = torch.stack([e.std for e in encoded]) if encoded[0].std is not None else None
    latents = posterior_latents(means, stds, generator)
    pixel_weights = None
    if any(e.mask is not None for e in encoded):
        masks = torch.stack([e.mask if e.mask is not None else torch.ones_like(means[i, :1])
                             for i, e in enumerate(encoded)])
        pixel_weights = mask_weights(masks, background).to(device)
    conditioning = (torch.stack([e.conditioning for e in encoded]).to(device)
                    if encoded[0].conditioning is not None else None)
    return latents.to(device), pixel_weights, conditioning


def step_record(figures: list[float], lr: float, seconds: float, *, prior: bool,
                text_encoder_lrs: dict[str, float]) -> dict[str, float]:
    """One step's line of the training log. ``figures``: loss, instance loss, prior loss and,
    when clipping computed it, the gradient norm; ``lr``: the UNet's lr the step used;
    ``text_encoder_lrs``: the lr of each text encoder that trained in the step, by name."""
    record = {"loss": figures[0], "lr": lr, "step_seconds": round(seconds, 4)}
    if prior:
        record.update(loss_instance=figures[1], loss_prior=figures[2])
    for name, value in text_encoder_lrs.items():
        record[f"lr_{name}"] = value
    if len(figures) > 3:
        record["grad_norm"] = figures[3]
    return record


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



def load_model(config: TrainingConfig):
    """Components of the base model and what it is (its ``ModelKind``: prediction type, zero
    terminal SNR ...)."""
    from . import checkpoint

    return checkpoint.load_components(
        resolve_base_model(config), prediction_type=config.prediction_type or None,
        use_ema=config.base_use_ema, vae_path=config.vae_path or None)


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
    from .run_output import model_file_name

    problem = adapters.unavailable(config)
    if problem:
        raise ConfigError([FieldError("training_method", problem)])
    final_output = paths.output_dir(config.trains_adapter) / model_file_name(config)
    if export_model and final_output.exists() and not config.overwrite:
        raise ConfigError([FieldError("model_name", f"{final_output} already exists; choose another "
                                      "name or turn on overwrite")])
    points = resume_points.list_resume_points(paths.resume_dir)
    if points and not resume and not config.overwrite:
        raise ConfigError([FieldError("model_name", f"{paths.work_dir} holds resume points of an "
                                      f"earlier run (step {resume_points.point_step(points[-1])}): "
                                      "resume it, choose another name, or turn on overwrite to "
                                      "discard them")])
    own_points = resume_points.run_points(paths.work_dir, paths.resume_dir) if resume else []
    if own_points and resume_points.setting_errors(own_points[-1], config):
        raise ConfigError(resume_points.setting_errors(own_points[-1], config))  # nothing written
    run_id = ((own_points and resume_points.read_state(own_points[-1]).get("run_id"))
              or (resume and resume_points.read_run_id(paths.work_dir))
              or resume_points.new_run_id())

    precision = config.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        reporter.log("mixed_precision: 'fp16' → 'no' (fp16 needs a CUDA GPU: full precision on "
                     "the CPU)")
        precision = "no"
    accelerator = new_accelerator(precision)
    device = accelerator.device
    if config.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.fused_backward:
        problem = fused.runtime_problem(precision, accelerator.num_processes)
        if problem:
            raise ConfigError([problem])
    if config.optimizer in ("adamw8bit", "lion8bit", "lion"):
        problem = eight_bit_problem(device)
        if problem:
            raise ConfigError([FieldError("optimizer", problem)])
    if config.compile_unet and not hasattr(torch.nn.Module, "compile"):
        raise ConfigError([FieldError("compile_unet", f"needs torch >= 2.2 (this is "
                                      f"{torch.__version__}): turn it off")])
    if config.base_weights_8bit:  # before the loading, the class pictures and the caches
        from .adapters.quantize import problem as int8_problem

        problem = int8_problem(device, frozen_dtype(precision, device))
        if problem:
            raise ConfigError([FieldError("base_weights_8bit", problem)])
    main = accelerator.is_main_process
    if main:  # leftovers of killed runs, then the config of this one (all checks passed)
        folders = [(paths.output_dir(config.trains_adapter), False), (paths.work_dir, True)]
        folders += [(Path(c.class_data_dir).expanduser(), False) for c in config.concepts
                    if c.class_data_dir.strip()]
        for folder, deep in folders:
            for stale in sweep(folder, recursive=deep):
                reporter.log(f"removed {stale.name}, left by an interrupted run")
        for stale in resume_points.sweep_resume_dir(paths.resume_dir):
            reporter.log(f"removed the incomplete resume point {stale.name}")
        if points and not resume:
            reporter.log(f"overwrite: the resume points of the earlier run in {paths.work_dir} "
                         "are removed once this run has written its own")
        if not own_points:  # a resumed run's config.json is written once its point has loaded
            config.save(paths.work_dir / "config.json")
            resume_points.write_run_id(paths.work_dir, run_id)
    reporter.log(f"training on {device.type}" + (f" with {accelerator.num_processes} processes"
                                                 if accelerator.num_processes > 1 else "")
                 + f", precision {precision}")

    reporter.phase("loading")
    zero_terminal_snr = config.zero_terminal_snr
    if components is None:
        components, kind = load_model(config)
        prediction_type = kind.prediction_type
        zero_terminal_snr = zero_terminal_snr or getattr(kind, "zero_terminal_snr", False)
    family = families.of_components(components)
    prediction_type = config.prediction_type or prediction_type or "epsilon"
    if zero_terminal_snr and prediction_type != "v_prediction":
        # At SNR 0 an epsilon model sees pure noise and must give back the noise: it learns
        # nothing there, and DDIM's x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by zero.
        raise ConfigError([FieldError("zero_terminal_snr", "needs v-prediction (Lin et al. 2023): "
                                      "set prediction_type to v_prediction, or turn it off")])
    if not config.resolution:  # "the model's own": known now that the model is
        config = config.with_resolution(family.default_resolution(prediction_type))
        instances = data.collect_pictures(config, include_class=False)
    reporter.log(f"{family.title}, {prediction_type} prediction"
                 + (", zero terminal SNR" if zero_terminal_snr else "")
                 + f", {config.resolution} px")
    unet, vae = components.unet, components.vae
    encoders = family.encoder_modules(components)  # [(name, module)], in prompt order
    # Samples, class pictures and new single files use the schedule training uses.
    noise_scheduler = components.noise_scheduler = noise_schedule(
        components.noise_scheduler, prediction_type, zero_terminal_snr)
    weight_dtype = frozen_dtype(precision, device)
    vae_dtype = latent_dtype(family, config, weight_dtype)

    if config.with_prior_preservation:
        reporter.phase("class_images")
        from . import prior

        if main:
            vae.to(device, torch.float32 if vae_dtype == torch.float32 else weight_dtype)
            for _, encoder in encoders:
                encoder.to(device, weight_dtype)
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
    for line in data.prompt_warnings(pictures, components.tokenizer):
        reporter.log(f"warning: {line}")
    total_steps = config.total_steps(len(instances))
    # The text encoders trained, each with its own lr and the step it is frozen after.
    trained_te = [(name, module, config.text_encoder_learning_rate(i),
                   config.text_encoder_stop_step(total_steps, i))
                  for i, (name, module) in enumerate(encoders)]
    trained_te = [entry for entry in trained_te if entry[3] > 0]

    # Models: what trains keeps fp32 weights (the optimizer's master copy): the models
    # themselves, or the adapter networks beside the frozen models.
    vae.requires_grad_(False).to(device, vae_dtype).eval()
    too_wide = adapters.rank_warning(config, {"unet": unet, **{t[0]: t[1] for t in trained_te}})
    if too_wide:
        reporter.log(f"warning: {too_wide}")
    trained = adapters.place(config, unet, encoders, {t[0] for t in trained_te}, device, weight_dtype)
    give_memory_back()  # the fp32 weights a cast to half precision or int8 left free (GBs)
    if config.base_weights_8bit:
        from .adapters.quantize import int8_layers

        reporter.log(f"base model: {int8_layers(unet)} linear layers of the UNet in int8")
    set_attention(unet, config.attention)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for _, encoder, _, _ in trained_te:
            if config.trains_adapter:  # frozen inputs: reentrant checkpointing needs them to
                encoder.enable_input_require_grads()  # carry gradients to the adapter inside
            try:  # transformers >= 4.35 takes the kwargs; torch wants use_reentrant said
                encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            except TypeError:  # the WebUI's transformers 4.30
                encoder.gradient_checkpointing_enable()
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    if config.compile_unet:  # in place (Module.compile): the state_dict keys, so the export and
        unet.compile()  # the resume points, stay as they are; compiled at the first step

    # Caches, so the VAE (and the frozen text encoders) can leave the GPU during training.
    latents = LatentSource(vae, config, device, vae_dtype, family)
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
    if config.cache_text_embeddings and not trained_te \
            and not (config.shuffle_tags or config.tag_dropout):
        # Prompts are fixed: encode each once, then the text encoders leave the GPU.
        text_cache = {}
        unique = list(dict.fromkeys(p.caption for p in pictures))
        tokens = CHUNK_TOKENS + 2
        chunks = {p: chunk_count(components.tokenizer, p) for p in unique}
        with torch.no_grad():
            for i in range(0, len(unique), 16):
                chunk = unique[i:i + 16]
                rows = family.encode(components, chunk, config.clip_skip, device).rows()
                for prompt, row in zip(chunk, rows):  # each kept at its own number of chunks
                    row.hidden = row.hidden[:chunks[prompt] * tokens]
                    text_cache[prompt] = row
            # an empty chunk fills up the shorter prompts of a batch with a long one
            empty_chunk = (family.encode(components, [""], config.clip_skip, device).rows()[0]
                           if max(chunks.values()) > 1 else None)
        for _, encoder in encoders:
            encoder.to("cpu")
        reporter.log(f"cached {len(text_cache)} text embeddings")
    elif config.cache_text_embeddings and not trained_te:
        reporter.log("text embeddings are encoded at every step: tag shuffle or dropout change "
                     "the prompts each time")

    def conditioning(prompts: list[str]) -> families.Conditioning:
        if training_te:  # through the (wrapped) trained encoders, with gradients
            return family.encode(encoding, prompts, config.clip_skip, device)
        if text_cache is not None:
            return families.Conditioning.stack([text_cache[p] for p in prompts], device,
                                               empty=empty_chunk)
        with torch.no_grad():
            return family.encode(encoding, prompts, config.clip_skip, device)

    # Optimizer and learning-rate schedule (stepped once per optimizer step).
    groups = [{"params": [p for p in trained["unet"].parameters() if p.requires_grad],
               "lr": config.learning_rate}]
    groups += [{"params": list(trained[name].parameters()), "lr": lr}
               for name, _, lr, _ in trained_te]
    if fused.use_per_weight(config):  # fused: each weight stepped in the backward pass, its
        # gradient freed; bf16 weights: each stepped through an fp32 copy, stochastically rounded
        generator = None
        if config.trained_precision == "bf16":
            generator = torch.Generator(device).manual_seed(config.seed)
        optimizer = fused.PerWeightOptimizer(
            groups, lambda one: build_optimizer(config.optimizer, one, config, device),
            in_backward=config.fused_backward, generator=generator)
    else:
        optimizer = build_optimizer(config.optimizer, groups, config, device)
    schedule = config.lr_scheduler
    if schedule == "constant" and config.lr_warmup_steps:  # diffusers' "constant" ignores warmup
        schedule = "constant_with_warmup"
    lr_scheduler = get_scheduler(schedule, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=total_steps, num_cycles=config.lr_num_cycles,
                                 power=config.lr_power)
    if config.trains_adapter:  # kept out of DDP: adapters.average_gradients syncs them
        optimizer = accelerator.prepare(optimizer)
    else:  # what trains as the loop and the writer use it (wrapped for several processes)
        *models, optimizer = accelerator.prepare(*trained.values(), optimizer)
        trained = dict(zip(trained, models))
    encoding = components
    if not config.trains_adapter:  # the loop calls the (wrapped) trained models themselves;
        unet = trained["unet"]     # an adapter works inside the base models' layers
        encoding = dataclasses.replace(components, **{n: m for n, m in trained.items() if n != "unet"})
    ema = (EMA(accelerator.unwrap_model(trained["unet"]).parameters(), config.ema_decay)
           if config.use_ema else None)

    step, state = 0, None
    if own_points:
        models = {name: accelerator.unwrap_model(model) for name, model in trained.items()}
        saved, state = resume_points.load_resume_point(own_points[-1], models)
        step = int(saved["step"])
        reporter.log(f"resumed from {own_points[-1].name} (step {step})")
        if main:  # the settings it continues with (a longer run, another learning rate)
            config.save(paths.work_dir / "config.json")
            resume_points.write_run_id(paths.work_dir, run_id)
    elif resume:
        reporter.log("no resume point of this run found: starting from step 0")
    # Text encoders still training (name -> its optimizer group and the step it stops after).
    training_te = {name: (group, stop) for group, (name, _, _, stop) in enumerate(trained_te, 1)
                   if step < stop}
    for name, _, _, _ in trained_te:
        if name not in training_te:
            freeze_text_encoder(trained[name], optimizer)
    if state is not None:  # after the freeze, so the parameter groups match the saved ones
        problem = fused.resume_problem(config, state["optimizer"])
        if problem:
            raise ConfigError([problem])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:  # other parameter groups: another run's settings
            raise resume_points.ResumeError(
                f"{own_points[-1]}'s optimizer state does not fit this run's settings ({exc}). "
                "Resume with the settings in the run's config.json, or start a new run under "
                "another name") from exc
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
    writer = RunWriter(config, paths, components, accelerator, trained, ema, optimizer,
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
        made = timed("samples", lambda: make_samples(
            components, config, paths, step, device, accelerator, trained["unet"], ema, reporter))
        if training_log is not None:
            training_log.samples(step, made)
        reporter.samples(made)
        if not final:
            reporter.phase("training")
    saved_step = step if state is not None else None  # the newest resume point's step
    training_log = None
    try:
        if main:
            training_log = TrainingLog(paths.logs_dir, settings=config.to_dict(),
                                       resume_step=step if state is not None else None)
            if training_log.tensorboard_note:
                reporter.log(f"training log: {training_log.path} (no TensorBoard files: "
                             f"{training_log.tensorboard_note})")
            else:
                reporter.log(f"training log: {training_log.path} and TensorBoard files "
                             f"(tensorboard --logdir {paths.logs_dir})")
        batches = micro_batches(instances, config, step * accum, accelerator.process_index,
                                accelerator.num_processes)
        pending = torch.zeros(3, device=device)  # loss, instance loss, prior loss
        last_step_at = time.time()
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
            encoded = [latents.get(p, f, bucket, rng) for p, f in rows]
            prompts = [data.prompt_variant(p.caption, config, rng) for p, _ in rows]

            gen = step_generator(config.seed, micro)
            model_input, pixel_weights, picture_conditioning = batch_inputs(
                encoded, step_generator(config.seed, micro, salt=1),
                config.mask_background_weight, device)
            noise = offset_noise(tuple(model_input.shape), config.offset_noise, gen).to(device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                      (model_input.shape[0],), generator=gen).to(device)
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            target = (noise_scheduler.get_velocity(model_input, noise, timesteps)
                      if prediction_type == "v_prediction" else noise)
            weights = timestep_weights(snr(alphas_cumprod, timesteps), config.min_snr_gamma,
                                       prediction_type, n_instance=len(chosen),
                                       on_prior=config.min_snr_on_prior)
            with accelerator.autocast():
                inputs = family.unet_inputs(conditioning(prompts), picture_conditioning)
                pred = unet(noisy, timesteps, **inputs).sample
                loss, instance_loss, prior_loss = dreambooth_loss(
                    pred, target, n_instance=len(chosen),
                    prior_loss_weight=config.prior_loss_weight, weights=weights,
                    pixel_weights=pixel_weights)
            accelerator.backward(loss / accum)
            if prior_loss is None:
                prior_loss = torch.zeros_like(instance_loss)
            pending = pending + torch.stack([loss, instance_loss, prior_loss]).detach() / accum
            if (micro + 1) % accum:
                continue

            adapters.average_gradients(config, trained, accelerator)
            grad_norm = None
            if config.max_grad_norm:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            lrs = lr_scheduler.get_last_lr()  # what this step trains with (the log's "lr")
            te_lrs = {name: lrs[group] for name, (group, _) in training_te.items()}
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.step(accelerator.unwrap_model(trained["unet"]).parameters())
            # The only host-device sync of the step: the figures for the progress and the log.
            figures = (torch.cat([pending, grad_norm.detach().float().reshape(1)])
                       if grad_norm is not None else pending).tolist()
            pending = torch.zeros(3, device=device)
            loss_value = figures[0]
            losses.append(loss_value)
            if training_log is not None:
                training_log.step(step, step_record(
                    figures, lrs[0], time.time() - last_step_at,
                    prior=config.with_prior_preservation, text_encoder_lrs=te_lrs))
            for name, (_, stop) in list(training_te.items()):
                if step >= stop:
                    del training_te[name]
                    freeze_text_encoder(trained[name], optimizer)
                    reporter.log(f"{name.replace('_', ' ')} frozen after step {step}")
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
            last_step_at = time.time()  # a step's time leaves its saves and samples out
            if step >= total_steps:
                break
        accelerator.wait_for_everyone()
        adapters.check_processes_agree(config, trained, accelerator)
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
            # overwrite: an earlier run's points go once this run's model is written
            resume_points.remove_other_runs(paths.resume_dir, run_id)
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
        if training_log is not None:
            training_log.close()
        adapters.release(config, {n: accelerator.unwrap_model(m) for n, m in trained.items()})
        release(accelerator, components)
    seconds = time.time() - started
    stepping = time.time() - step_started - extras.spent  # samples, saves and export left out
    reporter.log(f"{step}/{total_steps} steps in {seconds:.1f} s"
                 + (f" ({stepping / max(step, 1):.3f} s/step)" if step else ""))
    return TrainResult(output_path, step, total_steps, seconds, cancelled, losses, ema)



def release(accelerator, components: Components) -> None:
    """Free what the run put on the GPU: the WebUI needs the memory back."""
    accelerator.free_memory()
    for model in components.modules():
        model.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
