"""The training loop: DreamBooth with prior preservation, and native fine-tuning, on accelerate.

Read it top to bottom like diffusers' train_dreambooth.py: :func:`run_training` is the run's
phases in order (checks and the run's folder, the model, the class pictures, what trains, the
caches, the optimizer, the resume point, the loop, the export); :func:`micro_step` is one
forward and backward pass — batch → conditioning → noise → prediction → loss → backward — and
:func:`optimizer_step` the step after it. What differs between model families (the objective,
the latent layout, the denoiser's call) the family says; no family is named here. Everything
random is derived from ``(config.seed, step)``, so a run resumed from a checkpoint continues
exactly as an uninterrupted one would have.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dreambooth import data
from dreambooth.common.config import ConfigError, TrainingConfig
from dreambooth.common.memory import give_memory_back
from dreambooth.common.run_types import Cancelled, Reporter, RunPaths, TrainResult
from dreambooth.engine import fused
from dreambooth.engine import resume as resume_points
from dreambooth.engine.eta import RunExtras
from dreambooth.engine.model_files import ema_weights, model_file_name
from dreambooth.engine.optimizers import EMA, freeze_text_encoder
from dreambooth.engine.run_data import (Encoded, LatentSource, TextConditioning, batch_inputs,
                                        class_partner, micro_batches, step_record)
from dreambooth.engine.run_output import RunWriter, make_samples
from dreambooth.engine.run_setup import (Model, Pictures, Start, TrainedEncoder, frozen_dtype,
                                         gather_pictures, latent_dtype, load_model, make_optimizer,
                                         open_model, place_models, prepared, release, set_attention,
                                         start_run, trained_encoders)
from dreambooth.engine.training_log import TrainingLog
from dreambooth.engine.validation import Validator, eval_mode
from dreambooth.models import adapters
from dreambooth.models.components import Components
from dreambooth.models.objective import dreambooth_loss, step_generator

# Re-exported: the job runner, the CLI, the demo and the tests take these from here.
__all__ = ["Cancelled", "Reporter", "RunPaths", "TrainResult", "train", "run_training",
           "load_model", "LatentSource", "Encoded", "frozen_dtype", "latent_dtype",
           "set_attention"]


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
    started = time.time()
    start = start_run(config, paths, reporter, resume=resume, export_model=export_model)
    model = open_model(config, start, reporter, components, prediction_type)
    config = model.config
    pictures = gather_pictures(model, start, reporter)
    total_steps = config.total_steps(len(pictures.instances))
    encoders = trained_encoders(model, total_steps)
    trained = place_models(model, encoders, start.device, reporter)
    latents, text, validator = fill_caches(model, pictures, encoders, start.device, reporter)
    optimizer, lr_scheduler = make_optimizer(config, trained, encoders, total_steps, start.device)
    trained, optimizer, denoiser, text.encoding = prepared(model, start.accelerator, trained,
                                                           optimizer)
    ema = (EMA(start.accelerator.unwrap_model(trained["unet"]).parameters(), config.ema_decay)
           if config.use_ema else None)
    run = Run(config, paths, reporter, start, model, pictures, total_steps, trained, denoiser,
              latents, text, optimizer, lr_scheduler, ema, export=export_model, started=started,
              validator=validator)
    restore(run, encoders)
    return loop(run)


# ---------------------------------------------------------------------------------------------
# The caches, the run's state, the resume point
# ---------------------------------------------------------------------------------------------
def fill_caches(model: Model, pictures: Pictures, encoders: list[TrainedEncoder], device,
                reporter: Reporter) -> tuple[LatentSource, TextConditioning, Validator | None]:
    """Latents and text embeddings computed once where they cannot change, so the VAE (and the
    frozen text encoders) can leave the GPU during training."""
    config, components = model.config, model.components
    latents = LatentSource(components.vae, config, device, model.vae_dtype, model.family)
    validator = (Validator.prepare(pictures.validation, latents, model.objective, config)
                 if pictures.validation else None)  # encoded now: the VAE may leave the GPU
    if latents.cache is not None:
        reporter.phase("caching")
        flips = data.cache_flips(config)
        items = [(p, f, p.bucket) for p in pictures.instances for f in flips]
        items += [(c, f, b) for c in pictures.classes for f in flips
                  for b in sorted({p.bucket for p in pictures.instances
                                   if p.concept_index == c.concept_index})]
        latents.fill_cache(items, reporter.should_stop,
                           lambda done, total: reporter.progress(done, total, None, None))
        reporter.log(f"cached {len(latents.cache)} latents")
        components.vae.to("cpu")
    elif config.cache_latents:
        reporter.log("latents are encoded at every step: random crop, rotation or jitter change "
                     "the picture each time")
    text = TextConditioning(model.family, components, config, device)
    if config.cache_text_embeddings and not encoders \
            and not (config.shuffle_tags or config.tag_dropout):
        count = text.fill_cache([p.caption for p in pictures.all + pictures.validation]
                                + _sample_prompts(model))
        for _, encoder in model.encoders:
            encoder.to("cpu")
        reporter.log(f"cached {count} text embeddings")
    elif config.cache_text_embeddings and not encoders:
        reporter.log("text embeddings are encoded at every step: tag shuffle or dropout change "
                     "the prompts each time")
    elif config.cache_text_embeddings and not (config.shuffle_tags or config.tag_dropout):
        _cache_frozen_encoders(model, text, pictures, encoders, reporter)
    return latents, text, validator


def _sample_prompts(model: Model) -> list[str]:
    """The sample prompts, cached beside the captions where the family's samples are made from
    encoded prompts (Flux: T5 stays off the GPU for them)."""
    from dreambooth.engine.sampling import sample_prompts

    if not model.family.encodes_for_pipeline or model.config.sample_steps <= 0:
        return []
    return sample_prompts(model.config)


def _cache_frozen_encoders(model: Model, text: TextConditioning, pictures: Pictures,
                           encoders: list[TrainedEncoder], reporter: Reporter) -> None:
    """While a text encoder trains, the encoders that never do (Flux's T5) give each prompt's
    part once and leave the GPU."""
    count = text.fill_frozen_cache([p.caption for p in pictures.all + pictures.validation]
                                   + _sample_prompts(model))
    if not count:
        return
    training = {e.name for e in encoders}
    frozen = [model.family.encoder_titles.get(name, name) for name, _ in model.encoders
              if name not in training]
    for name, encoder in model.encoders:
        if name not in training:
            encoder.to("cpu")
    reporter.log(f"cached {', '.join(frozen)}'s part of {count} prompts (it leaves the GPU)")


@dataclass
class Run:
    """What the loop works with; ``step`` and ``pending`` change as it goes."""

    config: TrainingConfig
    paths: RunPaths
    reporter: Reporter
    start: Start
    model: Model
    pictures: Pictures
    total_steps: int
    trained: dict[str, torch.nn.Module]
    denoiser: Any
    latents: LatentSource
    text: TextConditioning
    optimizer: Any
    lr_scheduler: Any
    ema: EMA | None
    export: bool
    started: float
    step: int = 0
    saved_step: int | None = None  # the newest resume point's step
    # text encoders still training: name -> (its optimizer group, the step it stops after)
    training_te: dict[str, tuple[int, int]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    pending: torch.Tensor | None = None  # loss, instance loss, prior loss of the micro-steps
    validator: Validator | None = None  # the held-out pictures (validation_split)

    @property
    def accelerator(self):
        return self.start.accelerator

    def unwrapped(self) -> dict[str, torch.nn.Module]:
        return {name: self.accelerator.unwrap_model(m) for name, m in self.trained.items()}


def restore(run: Run, encoders: list[TrainedEncoder]) -> None:
    """Continue from the run's newest resume point (weights, optimizer, schedule, EMA), if any;
    freeze the text encoders whose stop step is behind."""
    start, paths, config = run.start, run.paths, run.config
    state = None
    if start.own_points:
        point = start.own_points[-1]
        saved, state = resume_points.load_resume_point(point, run.unwrapped())
        run.step = run.saved_step = int(saved["step"])
        run.reporter.log(f"resumed from {point.name} (step {run.step})")
        if start.main:  # the settings it continues with (a longer run, another learning rate)
            config.save(paths.work_dir / "config.json")
            resume_points.write_run_id(paths.work_dir, start.run_id)
    elif start.resume:
        run.reporter.log("no resume point of this run found: starting from step 0")
    run.training_te = {e.name: (group, e.stop) for group, e in enumerate(encoders, 1)
                       if run.step < e.stop}
    for entry in encoders:
        if entry.name not in run.training_te:
            freeze_text_encoder(run.trained[entry.name], run.optimizer)
    if state is not None:  # after the freeze, so the parameter groups match the saved ones
        _load_training_state(run, state, start.own_points[-1])


def _load_training_state(run: Run, state: dict, point: Path) -> None:
    problem = fused.resume_problem(run.config, state["optimizer"])
    if problem:
        raise ConfigError([problem])
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:  # other parameter groups: another run's settings
        raise resume_points.ResumeError(
            f"{point}'s optimizer state does not fit this run's settings ({exc}). Resume with "
            "the settings in the run's config.json, or start a new run under another name"
        ) from exc
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if run.ema is not None and state.get("ema"):
        run.ema.load_state_dict(state["ema"])
    if run.validator is not None and state.get("validation_best"):
        run.validator.best = dict(state["validation_best"])


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------
def batch_rows(run: Run, micro: int, batch: list[int], rng: random.Random
               ) -> list[tuple[data.Picture, bool]]:
    """(picture, flipped) of each row: the batch's instance pictures, then (prior
    preservation) a class picture of the same concept for each."""
    config, pictures = run.config, run.pictures
    chosen = [pictures.instances[i] for i in batch]
    rows = list(zip(chosen, data.epoch_flips(len(chosen), config, rng)))
    if config.with_prior_preservation:
        partners = [class_partner(pictures.classes, p.concept_index, micro, slot)
                    for slot, p in enumerate(chosen)]
        rows += list(zip(partners, data.epoch_flips(len(partners), config, rng)))
    return rows


def micro_step(run: Run, micro: int, batch: list[int]) -> torch.Tensor:
    """One forward and backward pass; returns (loss, instance loss, prior loss) / accumulation."""
    config, family, objective = run.config, run.model.family, run.model.objective
    device, accum = run.start.device, config.gradient_accumulation_steps
    rng = random.Random(f"{config.seed}-micro-{micro}")
    rows = batch_rows(run, micro, batch, rng)
    bucket = rows[0][0].bucket
    encoded = [run.latents.get(p, f, bucket, rng) for p, f in rows]
    prompts = [data.prompt_variant(p.caption, config, rng) for p, _ in rows]
    latents, pixel_weights, picture_conditioning = batch_inputs(
        encoded, step_generator(config.seed, micro, salt=1), config.mask_background_weight, device)
    noise, timesteps = objective.draw(tuple(latents.shape), step_generator(config.seed, micro),
                                      device)
    noisy, target = objective.noisy_and_target(latents, noise, timesteps)
    weights = objective.row_weights(timesteps, n_instance=len(batch))
    # torch's own generator (dropout in an adapter or a text encoder) seeded by (seed, micro):
    # the same masks whatever ran before (another run, a validation, a resume)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(step_generator(config.seed, micro, salt=2).initial_seed())
        with run.accelerator.autocast():
            conditioning = run.text(prompts, training_encoders=bool(run.training_te))
            pred = family.predict(run.denoiser, noisy, objective.model_timesteps(timesteps),
                                  conditioning, picture_conditioning)
            loss, instance_loss, prior_loss = dreambooth_loss(
                pred, target, n_instance=len(batch), prior_loss_weight=config.prior_loss_weight,
                weights=weights, pixel_weights=pixel_weights)
        run.accelerator.backward(loss / accum)
    if prior_loss is None:
        prior_loss = torch.zeros_like(instance_loss)
    return torch.stack([loss, instance_loss, prior_loss]).detach() / accum


def optimizer_step(run: Run) -> tuple[list[float], float, dict[str, float]]:
    """Clip, step and count; returns the step's figures (loss, instance and prior loss, the
    gradient norm when clipping computed it), the UNet's lr it used and each training text
    encoder's."""
    config, optimizer, accelerator = run.config, run.optimizer, run.accelerator
    adapters.average_gradients(config, run.trained, accelerator)
    grad_norm = None
    if config.max_grad_norm:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
    lrs = run.lr_scheduler.get_last_lr()  # what this step trains with (the log's "lr")
    te_lrs = {name: lrs[group] for name, (group, _) in run.training_te.items()}
    optimizer.step()
    run.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if run.ema is not None:
        run.ema.step(accelerator.unwrap_model(run.trained["unet"]).parameters())
    # The only host-device sync of the step: the figures for the progress and the log.
    figures = (torch.cat([run.pending, grad_norm.detach().float().reshape(1)])
               if grad_norm is not None else run.pending).tolist()
    run.pending = torch.zeros(3, device=run.start.device)
    run.losses.append(figures[0])
    return figures, lrs[0], te_lrs


def freeze_finished_encoders(run: Run) -> None:
    for name, (_, stop) in list(run.training_te.items()):
        if run.step >= stop:
            del run.training_te[name]
            freeze_text_encoder(run.trained[name], run.optimizer)
            run.reporter.log(f"{name.replace('_', ' ')} frozen after step {run.step}")


# ---------------------------------------------------------------------------------------------
# The loop and what it writes
# ---------------------------------------------------------------------------------------------
class Outputs:
    """What the loop writes besides the weights' updates: intermediate saves, samples, resume
    points, the training log, and their time (for the ETA of what is still to come)."""

    def __init__(self, run: Run):
        config, start = run.config, run.start
        self.run, self.main = run, start.main
        self.writer = RunWriter(config, run.paths, run.model.components, run.accelerator,
                                run.trained, run.ema, run.optimizer, run.lr_scheduler,
                                run.reporter, start.run_id,
                                pictures=(len(run.pictures.instances), len(run.pictures.classes)))
        base_file = Path(config.base_model).expanduser()
        self.extras = RunExtras(total_steps=run.total_steps, sample_every=config.sample_every_n_steps,
                                save_every=config.save_every_n_steps,
                                resume_every=config.checkpoint_every_n_steps,
                                export=run.export and self.main,
                                base_file=base_file if base_file.is_file() else None,
                                validate_every=(config.validate_every_n_steps
                                                if run.validator is not None else None))
        if run.validator is not None:
            self.writer.extra_state = lambda: {"validation_best": dict(run.validator.best)}
        self.log: TrainingLog | None = None
        if self.main:
            self.log = TrainingLog(run.paths.logs_dir, settings=config.to_dict(),
                                   resume_step=run.saved_step)
            where = run.paths.logs_dir
            run.reporter.log(f"training log: {self.log.path} (no TensorBoard files: "
                             f"{self.log.tensorboard_note})" if self.log.tensorboard_note else
                             f"training log: {self.log.path} and TensorBoard files "
                             f"(tensorboard --logdir {where})")

    def timed(self, kind: str, action: Callable[[], Any]) -> Any:
        began = time.time()
        try:
            return action()
        finally:
            self.extras.measured(kind, time.time() - began)

    def samples(self, final: bool = False) -> None:
        run = self.run
        run.reporter.phase("sampling")
        made = self.timed("samples", lambda: make_samples(
            run.model.components, run.config, run.paths, run.step, run.start.device,
            run.accelerator, run.trained["unet"], run.ema, run.reporter,
            encode=lambda prompts: run.text(prompts, training_encoders=False)))
        if self.log is not None:
            self.log.samples(run.step, made)
        run.reporter.samples(made)
        if not final:
            run.reporter.phase("training")

    def validate(self) -> None:
        """Score the held-out pictures now; log it; with keep_best, save a new best step."""
        run = self.run

        def score():
            with ema_weights(run.trained["unet"], run.ema), \
                    eval_mode([*run.trained.values(), run.denoiser]):
                return run.validator.score(run, run.step)

        result = self.timed("validation", score)
        best = run.validator.best
        run.reporter.log(f"validation loss {result.loss:.5f} at step {run.step}"
                         + (" (EMA weights)" if result.ema else "")
                         + (", the best so far" if best["step"] == run.step else
                            f"; the best: {best['loss']:.5f} at step {best['step']}"))
        if self.log is not None:
            self.log.validation(run.step, result.record())
        if (run.config.keep_best and best["step"] == run.step and self.main and run.export):
            self.timed("save", lambda: self.writer.model(run.step, suffix="_best"))
        kept = run.paths.output_dir(run.config.trains_adapter) / model_file_name(run.config,
                                                                                  "_best")
        run.reporter.validation(run.step, result.loss, best["step"],
                                kept if run.config.keep_best and kept.is_file() else None)

    def after_step(self) -> None:
        """Models and samples first, the resume point last: a run resumed from this step has
        everything before it done (a crash in between redoes this step's saves)."""
        run, config = self.run, self.run.config
        step, due = run.step, (lambda every: every and run.step % every == 0
                               and run.step < run.total_steps)
        if self.main and run.export and due(config.save_every_n_steps):
            self.timed("save", lambda: self.writer.model(step, suffix=f"_{step}"))
        if self.main and due(config.sample_every_n_steps):
            self.samples()
        if run.validator is not None and due(config.validate_every_n_steps):
            self.validate()
        if self.main and due(config.checkpoint_every_n_steps):
            self.timed("resume", lambda: self.writer.resume_point(step))
            run.saved_step = step


def loop(run: Run) -> TrainResult:
    """Train from ``run.step`` to the last step, then the final samples and export; a cancel
    keeps a resume point (and, if set, the model); a failed write keeps the weights."""
    from dreambooth.common.files import OutputExistsError, WriteError

    config, reporter, accelerator = run.config, run.reporter, run.accelerator
    # The step count first, then the phase: whoever sees "training" sees the right step.
    reporter.progress(run.step, run.total_steps, None, run.lr_scheduler.get_last_lr()[0])
    reporter.phase("training")
    outputs, output_path, step_started = None, None, time.time()
    try:
        outputs = Outputs(run)
        batches = micro_batches(run.pictures.instances, config,
                                run.step * config.gradient_accumulation_steps,
                                accelerator.process_index, accelerator.num_processes)
        run.pending = torch.zeros(3, device=run.start.device)
        last_step_at = time.time()
        for micro, batch in batches:
            if run.step >= run.total_steps:  # resumed from the last step: only the export is left
                break
            if reporter.should_stop():
                raise Cancelled
            run.pending = run.pending + micro_step(run, micro, batch)
            if (micro + 1) % config.gradient_accumulation_steps:
                continue
            figures, lr, te_lrs = optimizer_step(run)
            if outputs.log is not None:
                outputs.log.step(run.step, step_record(
                    figures, lr, time.time() - last_step_at,
                    prior=config.with_prior_preservation, text_encoder_lrs=te_lrs))
            freeze_finished_encoders(run)
            reporter.extra_time(outputs.extras.remaining(run.step))
            reporter.progress(run.step, run.total_steps, figures[0],
                              run.lr_scheduler.get_last_lr()[0])
            outputs.after_step()
            last_step_at = time.time()  # a step's time leaves its saves and samples out
            if run.step >= run.total_steps:
                break
        output_path = finish(run, outputs)
        cancelled = False
    except Cancelled:
        cancelled = True
        output_path = on_cancel(run, outputs)
    except (WriteError, OutputExistsError) as failure:
        if not run.start.main or outputs is None:
            raise
        raise outputs.writer.rescue(run.step, failure, run.saved_step) from failure
    finally:
        if outputs is not None and outputs.log is not None:
            outputs.log.close()
        adapters.release(config, run.unwrapped())
        release(accelerator, run.model.components, run.model.block_swap)
    return summary(run, output_path, cancelled, step_started, outputs)


def finish(run: Run, outputs: Outputs) -> Path | None:
    """After the last step: the final samples and the export (main process)."""
    run.accelerator.wait_for_everyone()
    adapters.check_processes_agree(run.config, run.trained, run.accelerator)
    # Training is over: the optimizer's state (two copies of the trained weights for AdamW)
    # is not needed for the samples or the export, nor by a resume point of the last step
    # (resuming there only exports): give its memory back before the export needs some.
    run.optimizer.state.clear()
    give_memory_back()
    if run.validator is not None:  # every process: a full model's DDP forward syncs buffers
        outputs.validate()
    if not run.start.main:
        return None
    outputs.samples(final=True)  # always a last look at the result
    output_path = outputs.timed("export", lambda: outputs.writer.model(run.step)) \
        if run.export else None
    # overwrite: an earlier run's points go once this run's model is written
    resume_points.remove_other_runs(run.paths.resume_dir, run.start.run_id)
    return output_path


def on_cancel(run: Run, outputs: Outputs | None) -> Path | None:
    """A cancelled run can always be resumed: a resume point at this step, and the model if the
    run saves on cancel."""
    from dreambooth.common.files import OutputExistsError, WriteError

    run.reporter.log(f"cancelled at step {run.step}")
    if outputs is None or not run.start.main or run.step <= 0:
        return None
    output_path = None
    try:
        if run.saved_step != run.step:
            outputs.writer.resume_point(run.step)
            run.saved_step = run.step
        if run.config.save_on_cancel and run.export:
            output_path = outputs.writer.model(run.step, suffix=f"_{run.step}")
    except (WriteError, OutputExistsError) as failure:
        raise outputs.writer.rescue(run.step, failure, run.saved_step) from failure
    return output_path


def summary(run: Run, output_path: Path | None, cancelled: bool, step_started: float,
            outputs: Outputs | None) -> TrainResult:
    seconds = time.time() - run.started
    spent = outputs.extras.spent if outputs is not None else 0.0
    stepping = time.time() - step_started - spent  # samples, saves and export left out
    run.reporter.log(f"{run.step}/{run.total_steps} steps in {seconds:.1f} s"
                     + (f" ({stepping / max(run.step, 1):.3f} s/step)" if run.step else ""))
    best = run.validator.best if run.validator is not None else None
    if best:
        kept = (f": saved as {model_file_name(run.config, '_best')}"
                if run.config.keep_best and run.export else "")
        run.reporter.log(f"best validation loss {best['loss']:.5f} at step {best['step']}{kept}")
    return TrainResult(output_path, run.step, run.total_steps, seconds, cancelled, run.losses,
                       run.ema)
