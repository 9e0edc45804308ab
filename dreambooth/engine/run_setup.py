"""The phases before the loop: checks before any write, the run's folder, the model, the pictures,
the models placed for training, the optimizer. Each is a function of what it needs, called in
order by :func:`dreambooth.engine.trainer.run_training`."""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreambooth import data
from dreambooth.common.config import ConfigError, FieldError, TrainingConfig
from dreambooth.common.memory import give_memory_back
from dreambooth.common.run_types import Cancelled, Reporter, RunPaths
from dreambooth.engine import fused
from dreambooth.engine import resume as resume_points
from dreambooth.engine.model_files import model_file_name, resolve_base_model
from dreambooth.engine.optimizers import build_optimizer, eight_bit_problem
from dreambooth.models import adapters, families
from dreambooth.models.components import Components
from dreambooth.models.schedules import noise_schedule


# ---------------------------------------------------------------------------------------------
# Precision, attention, the accelerator
# ---------------------------------------------------------------------------------------------
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
    from dreambooth.models import checkpoint

    return checkpoint.load_components(
        resolve_base_model(config), prediction_type=config.prediction_type or None,
        use_ema=config.base_use_ema, vae_path=config.vae_path or None,
        clip_path=config.clip_l_path or None, t5_path=config.t5xxl_path or None)


def release(accelerator, components: Components, block_swaps=()) -> None:
    """Free what the run put on the GPU: the WebUI needs the memory back."""
    for swap in block_swaps or ():  # the swapped blocks' weights back in place (on the host)
        swap.close()
    accelerator.free_memory()
    for model in components.modules():
        model.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Phase 1: everything known before the first write, then the run's folder
# ---------------------------------------------------------------------------------------------
@dataclass
class Start:
    """What the first phase settles: the device and the processes, the precision the run
    computes in, this run's id and (on resume) its resume points, its instance pictures."""

    accelerator: Any
    precision: str
    run_id: str
    own_points: list[Path]
    instances: list[data.Picture]
    resume: bool = False
    validation: list[data.Picture] = dataclasses.field(default_factory=list)  # held out

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _refusals(config: TrainingConfig, paths: RunPaths, resume: bool, export_model: bool
              ) -> list[Path]:
    """ConfigError for what stops the run whatever the machine; the run's own resume points."""
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
    changed = resume_points.setting_errors(own_points[-1], config) if own_points else []
    if changed:
        raise ConfigError(changed)  # before anything is written
    return own_points


def _machine_refusals(config: TrainingConfig, precision: str, accelerator) -> None:
    """ConfigError for what this machine cannot run, known once the device is."""
    device = accelerator.device
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
    if config.base_weights_4bit:  # bitsandbytes' NF4, probed before any work
        from dreambooth.models.adapters.nf4 import problem as nf4_problem

        problem = nf4_problem(device, frozen_dtype(precision, device))
        if problem:
            raise ConfigError([FieldError("base_weights_4bit", problem)])
    found = families.base_family(config) if config.base_weights_8bit else None
    if config.base_weights_8bit and not (found and found[0].base_8bit == "fp8"):
        # bitsandbytes' int8, probed before the loading, the class pictures and the caches
        from dreambooth.models.adapters.quantize import problem as int8_problem

        problem = int8_problem(device, frozen_dtype(precision, device))
        if problem:
            raise ConfigError([FieldError("base_weights_8bit", problem)])


def _write_run_folder(config: TrainingConfig, paths: RunPaths, start: Start, reporter: Reporter,
                      earlier_points: bool) -> None:
    """Leftovers of killed runs swept; a new run's config.json and run id (a resumed run's are
    written once its point has loaded)."""
    from dreambooth.common.files import sweep

    folders = [(paths.output_dir(config.trains_adapter), False), (paths.work_dir, True)]
    folders += [(Path(c.class_data_dir).expanduser(), False) for c in config.concepts
                if c.class_data_dir.strip()]
    for folder, deep in folders:
        for stale in sweep(folder, recursive=deep):
            reporter.log(f"removed {stale.name}, left by an interrupted run")
    for stale in resume_points.sweep_resume_dir(paths.resume_dir):
        reporter.log(f"removed the incomplete resume point {stale.name}")
    if earlier_points:
        reporter.log(f"overwrite: the resume points of the earlier run in {paths.work_dir} "
                     "are removed once this run has written its own")
    if not start.own_points:
        config.save(paths.work_dir / "config.json")
        resume_points.write_run_id(paths.work_dir, start.run_id)


def start_run(config: TrainingConfig, paths: RunPaths, reporter: Reporter, *, resume: bool,
              export_model: bool) -> Start:
    """Check everything known before training (bad input fails here, before any write), then
    make the accelerator and the run's folder."""
    config.check()
    for note in config.warnings():
        reporter.log(f"warning: {note}")
    from dreambooth.engine.validation import split_validation

    instances, held = split_validation(data.collect_pictures(config, include_class=False), config)
    own_points = _refusals(config, paths, resume, export_model)
    run_id = ((own_points and resume_points.read_state(own_points[-1]).get("run_id"))
              or (resume and resume_points.read_run_id(paths.work_dir))
              or resume_points.new_run_id())
    precision = config.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        reporter.log("mixed_precision: 'fp16' → 'no' (fp16 needs a CUDA GPU: full precision on "
                     "the CPU)")
        precision = "no"
    accelerator = new_accelerator(precision)
    if config.allow_tf32 and accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _machine_refusals(config, precision, accelerator)
    start = Start(accelerator, precision, str(run_id), own_points, instances, resume, held)
    if start.main:
        earlier = bool(resume_points.list_resume_points(paths.resume_dir)) and not resume
        _write_run_folder(config, paths, start, reporter, earlier)
    reporter.log(f"training on {start.device.type}"
                 + (f" with {accelerator.num_processes} processes"
                    if accelerator.num_processes > 1 else "") + f", precision {precision}")
    return start


# ---------------------------------------------------------------------------------------------
# Phase 2: the model and its family
# ---------------------------------------------------------------------------------------------
@dataclass
class Model:
    """The loaded model as the loop uses it: its components and family, the training
    objective, the noise schedule, the dtypes of its frozen parts and the run's config (with
    the model's own resolution when the config left it at 0)."""

    config: TrainingConfig
    components: Components
    family: families.Family
    objective: Any
    noise_scheduler: Any
    prediction_type: str
    zero_terminal_snr: bool
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    block_swap: Any = None  # the models.block_swap.BlockSwap of each chain while swapping

    @property
    def encoders(self) -> list[tuple[str, torch.nn.Module]]:
        return self.family.encoder_modules(self.components)  # [(name, module)], prompt order


def _swap_problems(family: families.Family, components: Components,
                   config: TrainingConfig) -> list[FieldError]:
    """``blocks_to_swap`` against the loaded model's own blocks (each chain keeps one)."""
    chains = family.swap_blocks(components.unet) if config.blocks_to_swap else []
    most = sum(len(chain) for chain in chains) - len(chains)
    if not chains or config.blocks_to_swap <= most:
        return []
    return [FieldError("blocks_to_swap", f"this model has {most + len(chains)} blocks and keeps "
                       f"one of each kind: at most {most} can be swapped")]


def open_model(config: TrainingConfig, start: Start, reporter: Reporter,
               components: Components | None, prediction_type: str | None) -> Model:
    """Load the base model (unless ``components`` are given) and settle what it is."""
    reporter.phase("loading")
    zero_terminal_snr = config.zero_terminal_snr
    if components is None:
        components, kind = load_model(config)
        prediction_type = kind.prediction_type
        zero_terminal_snr = zero_terminal_snr or getattr(kind, "zero_terminal_snr", False)
    family = families.of_components(components).configured(config)
    problems = family.config_problems(config) + _swap_problems(family, components, config)
    if problems:
        raise ConfigError(problems)
    for note in family.notes(config, components):
        reporter.log(f"note: {note}")
    prediction_type = config.prediction_type or prediction_type or family.default_prediction
    if zero_terminal_snr and prediction_type == "flow" and not config.zero_terminal_snr:
        reporter.log("note: the file's zero-terminal-SNR mark does not apply to rectified flow "
                     "(its flow ends at pure noise)")
        zero_terminal_snr = False
    if zero_terminal_snr and prediction_type != "v_prediction":
        # At SNR 0 an epsilon model sees pure noise and must give back the noise: it learns
        # nothing there, and DDIM's x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by zero.
        raise ConfigError([FieldError("zero_terminal_snr", "needs v-prediction (Lin et al. 2023): "
                                      "set prediction_type to v_prediction, or turn it off")])
    if not config.resolution:  # "the model's own": known now that the model is
        config = config.with_resolution(family.default_resolution(prediction_type))
        from dreambooth.engine.validation import split_validation

        start.instances, start.validation = split_validation(
            data.collect_pictures(config, include_class=False), config)
    rectified = family.rectified_flow and prediction_type == "flow"
    reporter.log(f"{family.title}, " + (f"rectified flow, shift {config.flow_shift:g}"
                                        if rectified else f"{prediction_type} prediction")
                 + (", zero terminal SNR" if zero_terminal_snr else "")
                 + f", {config.resolution} px")
    # Samples, class pictures and new single files use the schedule training uses.
    scheduler = components.noise_scheduler = noise_schedule(
        components.noise_scheduler, prediction_type, zero_terminal_snr,
        flow_shift=config.flow_shift)
    weight_dtype = frozen_dtype(start.precision, start.device)
    return Model(config, components, family, family.objective(scheduler, prediction_type, config),
                 scheduler, prediction_type, zero_terminal_snr, weight_dtype,
                 latent_dtype(family, config, weight_dtype))


# ---------------------------------------------------------------------------------------------
# Phase 3: the pictures (class pictures made first)
# ---------------------------------------------------------------------------------------------
@dataclass
class Pictures:
    instances: list[data.Picture]
    classes: list[data.Picture]
    validation: list[data.Picture] = dataclasses.field(default_factory=list)  # held out

    @property
    def all(self) -> list[data.Picture]:
        return self.instances + self.classes


def make_class_pictures(model: Model, start: Start, reporter: Reporter) -> None:
    """Generate the missing class pictures with the base model itself (main process)."""
    from dreambooth.engine import prior

    components, device, family = model.components, start.device, model.family
    components.vae.to(device, torch.float32 if model.vae_dtype == torch.float32
                      else model.weight_dtype)
    for _, encoder in model.encoders:
        encoder.to(device, model.weight_dtype)
    encoded = _encoded_class_prompts(model, device) if family.encodes_for_pipeline else None
    swaps = _denoiser_on_device(model, device)
    pipe = components.pipeline()
    pipe.set_progress_bar_config(disable=True)
    try:
        prior.generate_class_pictures(
            model.config, pipe, should_stop=reporter.should_stop, log=reporter.log,
            negative_prompts=family.negative_prompts,
            pipeline_kwargs=family.pipeline_kwargs(model.config),
            progress=lambda done, total: reporter.progress(done, total, None, None),
            prompt_inputs=None if encoded is None else lambda prompts: family.prompt_inputs(
                families.Conditioning.stack([encoded[p] for p in prompts], device)))
    finally:
        for swap in swaps:
            swap.close()
    del pipe
    if reporter.should_stop():
        raise Cancelled


def _encoded_class_prompts(model: Model, device) -> dict[str, families.Conditioning] | None:
    """Each class prompt encoded once (Flux), the text encoders then back on the CPU so the
    transformer has the card; None when no class picture is missing."""
    from dreambooth.engine.prior import class_pictures_needed, class_prompt_for_generation

    needed = class_pictures_needed(model.config)
    if not any(missing for _, missing in needed):
        return None
    prompts = list(dict.fromkeys(class_prompt_for_generation(model.config.concepts[i].class_prompt)
                                 for i, missing in needed if missing))
    with torch.no_grad():
        rows = model.family.encode(model.components, prompts, 1, device).rows()
    for _, encoder in model.encoders:
        encoder.to("cpu")
    give_memory_back()
    return dict(zip(prompts, rows))


def _swap_chains(model: Model) -> tuple[list[list[torch.nn.Module]], list[torch.nn.Module]]:
    """The denoiser's chains of blocks to swap (none without ``blocks_to_swap``), and all their
    blocks in one list."""
    chains = (model.family.swap_blocks(model.components.unet) if model.config.blocks_to_swap
              else [])
    return chains, [block for chain in chains for block in chain]


def _denoiser_on_device(model: Model, device) -> list:
    """The denoiser on ``device`` for inference: whole, or with ``blocks_to_swap`` of its blocks
    swapped in as their turn comes (closed by the caller)."""
    unet, config = model.components.unet, model.config
    chains, blocks = _swap_chains(model)
    if not chains:
        unet.to(device, model.weight_dtype)
        return []
    from dreambooth.models import block_swap

    unet.to(model.weight_dtype)
    block_swap.to_device_but(unet, blocks, device)
    return block_swap.install(unet, chains, config.blocks_to_swap, device)


def gather_pictures(model: Model, start: Start, reporter: Reporter) -> Pictures:
    """The instance pictures and (prior preservation) the class pictures, made if missing."""
    config = model.config
    if not config.with_prior_preservation:  # the early scan already holds every picture
        pictures = start.instances
    else:
        reporter.phase("class_images")
        if start.main:
            make_class_pictures(model, start, reporter)
        start.accelerator.wait_for_everyone()
        pictures = data.collect_pictures(config, include_class=True)
    held = {str(p.path) for p in start.validation}
    found = Pictures([p for p in pictures if not p.is_class and str(p.path) not in held],
                     [p for p in pictures if p.is_class], list(start.validation))
    if found.validation:
        count = len(found.validation)
        reporter.log(f"validation: {count} picture{'s' if count > 1 else ''} held out "
                     f"({', '.join(p.path.name for p in found.validation[:5])}"
                     f"{', ...' if len(found.validation) > 5 else ''})")
    if config.with_prior_preservation:
        missing = ({p.concept_index for p in found.instances}
                   - {p.concept_index for p in found.classes})
        if missing:
            raise ConfigError([FieldError(f"concepts[{i}].class_data_dir",
                                          "holds no class pictures") for i in sorted(missing)])
    if config.train_batch_size > len(found.instances):
        raise ConfigError([FieldError("train_batch_size", f"is {config.train_batch_size} but there "
                                      f"are only {len(found.instances)} instance pictures")])
    for line in data.prompt_warnings(pictures, model.components.tokenizer):
        reporter.log(f"warning: {line}")
    if config.masked_training:  # said, so a run's log shows whether its masks were found
        source = "their alpha channel" if config.mask_source == "alpha" else "<name>.mask.png"
        masked = sum(p.mask is not None for p in found.instances)
        reporter.log(f"masked training: {masked} of {len(found.instances)} instance pictures "
                     f"have a mask ({source}), background weight "
                     f"{config.mask_background_weight:g}")
    return found


# ---------------------------------------------------------------------------------------------
# Phase 4: what trains, placed; the optimizer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainedEncoder:
    """A text encoder that trains: its optimizer group's lr and the step it is frozen after."""

    name: str
    module: torch.nn.Module
    lr: float
    stop: int


def trained_encoders(model: Model, total_steps: int) -> list[TrainedEncoder]:
    config = model.config
    found = [TrainedEncoder(name, module, config.text_encoder_learning_rate(i),
                            config.text_encoder_stop_step(total_steps, i))
             for i, (name, module) in enumerate(model.encoders)]
    trainable = model.family.trainable_text_encoders
    return [entry for entry in found[:trainable] if entry.stop > 0]


def _checkpointing(config: TrainingConfig, unet, encoders: list[TrainedEncoder]) -> None:
    unet.enable_gradient_checkpointing()
    for entry in encoders:
        if config.trains_adapter:  # frozen inputs: reentrant checkpointing needs them to
            entry.module.enable_input_require_grads()  # carry gradients to the adapter inside
        try:  # transformers >= 4.35 takes the kwargs; torch wants use_reentrant said
            entry.module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        except TypeError:  # the WebUI's transformers 4.30
            entry.module.gradient_checkpointing_enable()


def place_models(model: Model, encoders: list[TrainedEncoder], device, reporter: Reporter
                 ) -> dict[str, torch.nn.Module]:
    """What trains keeps fp32 weights (the optimizer's master copy): the models themselves, or
    the adapter networks beside the frozen models; by component name."""
    config, unet = model.config, model.components.unet
    model.components.vae.requires_grad_(False).to(device, model.vae_dtype).eval()
    too_wide = adapters.rank_warning(config, {"unet": unet, **{e.name: e.module for e in encoders}})
    if too_wide:
        reporter.log(f"warning: {too_wide}")
    chains, blocks = _swap_chains(model)
    trained = adapters.place(config, unet, model.encoders, {e.name for e in encoders}, device,
                             model.weight_dtype, base_8bit=model.family.base_8bit,
                             host_blocks=blocks)
    if chains:
        from dreambooth.models import block_swap

        model.block_swap = block_swap.install(unet, chains, config.blocks_to_swap, device)
        reporter.log(f"block swap: {len(blocks) - config.blocks_to_swap} of the transformer's "
                     f"{len(blocks)} blocks on the {device.type.upper()} at a time, "
                     f"{config.blocks_to_swap} copied in from host memory as their turn comes")
    give_memory_back()  # the fp32 weights a cast to half precision or int8 left free (GBs)
    if config.base_weights_4bit:
        from dreambooth.models.adapters.nf4 import nf4_layers

        reporter.log(f"base model: {nf4_layers(unet)} linear layers of the "
                     f"{model.family.title} denoiser in NF4 (4 bits, a scale per 64 weights)")
    elif config.base_weights_8bit and model.family.base_8bit == "fp8":
        from dreambooth.models.adapters.fp8 import fp8_layers

        reporter.log(f"base model: {fp8_layers(unet)} linear layers of the {model.family.title} "
                     "transformer in fp8 (e4m3, a scale per row)")
    elif config.base_weights_8bit:
        from dreambooth.models.adapters.quantize import int8_layers

        reporter.log(f"base model: {int8_layers(unet)} linear layers of the UNet in int8")
    if model.family.attention_processors:  # Flux keeps its own joint-attention processors
        set_attention(unet, config.attention)
    if config.gradient_checkpointing:
        _checkpointing(config, unet, encoders)
    if device.type == "cuda" and model.family.attention_processors:  # a UNet's convolutions
        unet.to(memory_format=torch.channels_last)
    if config.compile_unet:  # in place (Module.compile): the state_dict keys, so the export and
        unet.compile()  # the resume points, stay as they are; compiled at the first step
    return trained


def make_optimizer(config: TrainingConfig, trained: dict[str, torch.nn.Module],
                   encoders: list[TrainedEncoder], total_steps: int, device):
    """The optimizer (one group per trained model) and its learning-rate schedule."""
    from diffusers.optimization import get_scheduler

    groups = [{"params": [p for p in trained["unet"].parameters() if p.requires_grad],
               "lr": config.learning_rate}]
    groups += [{"params": list(trained[e.name].parameters()), "lr": e.lr} for e in encoders]
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
    lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=total_steps, num_cycles=config.lr_num_cycles,
                                 power=config.lr_power)
    return optimizer, lr_scheduler


def prepared(model: Model, accelerator, trained: dict[str, torch.nn.Module], optimizer
             ) -> tuple[dict[str, torch.nn.Module], Any, Any, Components]:
    """What trains as the loop and the writer use it (wrapped for several processes): the
    trained models, the optimizer, the denoiser the loop calls and the components it encodes
    prompts with."""
    config, components = model.config, model.components
    if config.trains_adapter:  # kept out of DDP: adapters.average_gradients syncs them
        return trained, accelerator.prepare(optimizer), components.unet, components
    *models, optimizer = accelerator.prepare(*trained.values(), optimizer)
    trained = dict(zip(trained, models))
    # the loop calls the (wrapped) trained models themselves; an adapter works inside the
    # base models' layers
    encoding = dataclasses.replace(components, **{n: m for n, m in trained.items() if n != "unet"})
    return trained, optimizer, trained["unet"], encoding
