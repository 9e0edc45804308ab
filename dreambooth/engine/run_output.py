"""What a run writes: resume points, intermediate and final models, samples; and which
existing files are its own (may be replaced after a resume)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from dreambooth.common.config import TrainingConfig
from dreambooth.common.run_types import Reporter, RunPaths
from dreambooth.engine.model_files import (ema_weights, export_metadata, model_file_name,
                                           resolve_base_model, run_id_of)
from dreambooth.models.components import Components
from dreambooth.models.schedules import is_zero_terminal_snr, prediction_of


class RunWriter:
    """Writes what a run keeps — resume points and models — and knows which files are its own.

    A model file of this run (its metadata carries the run id, e.g. an intermediate save written
    before a crash) may be replaced; any other existing file only with ``overwrite``."""

    def __init__(self, config: TrainingConfig, paths: RunPaths, components: Components,
                 accelerator, trained: dict[str, torch.nn.Module], ema, optimizer, lr_scheduler,
                 reporter: Reporter, run_id: str, pictures: tuple[int, int] = (0, 0)):
        self.config, self.paths, self.components = config, paths, components
        self.pictures = pictures  # instance and class pictures, for the file's metadata
        # The trained models by component name ("unet", "text_encoder", ...), as prepared.
        self.accelerator, self.trained, self.ema = accelerator, trained, ema
        self.optimizer, self.lr_scheduler, self.reporter = optimizer, lr_scheduler, reporter
        self.run_id = run_id
        # more of the run's state for its resume points (the best validation so far)
        self.extra_state: Callable[[], dict[str, Any]] | None = None

    def trained_models(self) -> dict[str, torch.nn.Module]:
        return {name: self.accelerator.unwrap_model(m) for name, m in self.trained.items()}

    def resume_point(self, step: int) -> Path:
        from dreambooth.engine import resume

        models = self.trained_models()
        state = {"optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 **(self.extra_state() if self.extra_state is not None else {})}
        point = resume.save_resume_point(
            self.paths.resume_dir, step, models, state, run_id=self.run_id,
            limit=self.config.checkpoints_total_limit,
            needed_bytes=resume.estimate_bytes(models, self.optimizer),
            settings=resume.settings_of(self.config))
        self.reporter.log(f"saved resume point at step {step}")
        return point

    def model(self, step: int, suffix: str = "") -> Path | None:
        """Export the model; an intermediate save (``suffix``) whose name is taken by a file that
        is not this run's is skipped with a warning (the final one raises OutputExistsError)."""
        from dreambooth.common.files import OutputExistsError

        out = self.paths.output_dir(self.config.trains_adapter) / model_file_name(self.config, suffix)
        replace = self.config.overwrite or run_id_of(out) == self.run_id
        if out.exists() and not replace:
            if not suffix:
                raise OutputExistsError(out)
            self.reporter.log(f"warning: {out.name} already exists and is not from this run; "
                              "this intermediate save is skipped (turn on overwrite to replace it)")
            return None
        write = export
        if self.config.trains_adapter:
            from dreambooth.engine.adapter_output import export_adapter as write
        return write(self.config, self.paths, self.components, self.accelerator,
                     self.trained_models(), self.ema, step, self.reporter, suffix=suffix,
                     overwrite=replace, run_id=self.run_id, pictures=self.pictures)

    def rescue(self, step: int, failure: Exception, saved_step: int | None) -> Exception:
        """After a failed write: keep the trained weights as a resume point (unless that was the
        write that failed, or the newest point already holds this step) and say so in the error."""
        from dreambooth.common.files import WriteError, with_note
        from dreambooth.engine import resume

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


def make_samples(components: Components, config: TrainingConfig, paths: RunPaths, step: int,
                 device, accelerator, unet, ema, reporter: Reporter | None = None,
                 encode=None) -> list[Path]:
    from dreambooth.engine.sampling import generate_samples

    def progress(done: int, total: int) -> None:
        if reporter is not None:
            reporter.detail(f"sampling step {step}: {done} / {total} pictures")

    live = accelerator.unwrap_model(unet)
    with ema_weights(live, ema):
        return generate_samples(components, config, paths.samples_dir, step, device,
                                progress=progress, encode=encode)


def export(config: TrainingConfig, paths: RunPaths, components: Components, accelerator,
           trained: dict[str, torch.nn.Module], ema, step: int, reporter: Reporter,
           suffix: str = "", *, overwrite: bool = False, run_id: str = "",
           pictures: tuple[int, int] = (0, 0)) -> Path:
    """Write the model into the checkpoints folder: into the base file's own layout, or (a
    diffusers folder as the base) as a new single file in the standard layout. ``trained``: the
    trained models by component name (their weights are the components', trained in place)."""
    from dreambooth.common.files import ensure_folder
    from dreambooth.common.names import output_file_name
    from dreambooth.models import checkpoint
    from dreambooth.models import export as export_module

    reporter.phase("saving")
    ensure_folder(paths.checkpoints_dir)
    out = paths.checkpoints_dir / output_file_name(config.model_name, suffix, config.export_format)
    reporter.detail(f"writing {out.name}")
    metadata = export_metadata(config, step, *pictures)
    if is_zero_terminal_snr(components.noise_scheduler):  # the schedule it was trained with
        metadata["ss_zero_terminal_snr"] = "True"
    if run_id:
        metadata["dreambooth.run_id"] = run_id
    live = trained["unet"]
    base = resolve_base_model(config)
    with ema_weights(live, ema):
        if base.is_dir():
            result = export_module.save_single_file(
                components, out, kind=checkpoint.detect_kind(base).kind, dtype=config.export_dtype,
                metadata=metadata, overwrite=overwrite, base_name=base.name)
        else:
            result = export_module.export_checkpoint(
                base, components, out, trained=tuple(trained), dtype=config.export_dtype,
                metadata=metadata, overwrite=overwrite,
                prediction_type=prediction_of(components.noise_scheduler))
    reporter.log(f"saved {result}")
    if suffix:  # an intermediate save: training goes on
        reporter.phase("training")
    return result


