"""Checking a run before a job starts: everything known before training (the config's own checks,
the base model's file, the VAE, the name, the picture folders, the files the run will write and
room for them, resume points and their settings, what this machine cannot run), each error by
field, before anything is written."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from dreambooth.app.estimates import count_pictures, memory_figure_gb
from dreambooth.common.config import ConfigError, FieldError, TrainingConfig
from dreambooth.common.names import output_file_name, sanitize_model_name
from dreambooth.common.run_types import RunPaths
from dreambooth.engine import resume as resume_points
from dreambooth.engine.model_files import planned_outputs, run_id_of
from dreambooth.engine.resume import list_resume_points, point_step, read_state
from dreambooth.host import Host, without_hash
from dreambooth.models.families import base_family, with_model_resolution


def resolve_base_model(base: str, host: Host) -> Path | None:
    """The file (or diffusers folder) behind ``base``: an existing path, else a checkpoint the
    host lists under that title / name / hash; None when neither."""
    text = (base or "").strip()
    if not text:
        return None
    path = Path(text).expanduser()
    if path.exists():
        return path
    entry = host.resolve_checkpoint(text)
    if entry is not None:
        return Path(entry.filename)
    # The WebUI's list may be empty for a moment (Forge rescans at every page load): a name in
    # the checkpoints folder is that file all the same.
    named = host.checkpoints_dir() / without_hash(text)
    try:
        inside = named.resolve().is_relative_to(host.checkpoints_dir().resolve())
    except (OSError, ValueError):
        inside = False
    return named if inside and named.is_file() else None


def resolve_vae(vae: str, host: Host) -> Path | None:
    """A VAE given as a path, or by its name in the host's VAE folder (the WebUI's models/VAE)."""
    return _resolve_in(vae, host.list_vaes(), host.vae_dir())


def resolve_text_encoder(name: str, host: Host) -> Path | None:
    """A text encoder file (Flux's clip_l, t5xxl) given as a path, or by its name in the host's
    text encoder folder (Forge's models/text_encoder)."""
    return _resolve_in(name, host.list_text_encoders(), host.text_encoder_dir())


def _resolve_in(text: str, files: list[Path], root: Path) -> Path | None:
    text = (text or "").strip()
    if not text:
        return None
    path = Path(text).expanduser()
    if path.exists():
        return path
    for candidate in files:
        if text in (candidate.name, candidate.stem, str(candidate)):
            return candidate
        try:
            if text == candidate.relative_to(root).as_posix():
                return candidate
        except ValueError:
            pass
    return None


# What a Flux file may lack (ModelKind.missing_parts) -> the field that supplies it, and where.
FLUX_PART_FIELDS = {"clip_l": ("clip_l_path", "CLIP-L (clip_l.safetensors in models/text_encoder)"),
                    "t5xxl": ("t5xxl_path", "T5-XXL (t5xxl_fp16.safetensors in models/text_encoder)"),
                    "vae": ("vae_path", "the Flux VAE (ae.safetensors in models/VAE)")}


def text_encoder_fields(config: TrainingConfig, host: Host, kind) -> tuple[dict, list[FieldError]]:
    """The text encoder files resolved ({field: path}), and the errors: a file that is not there,
    or a part a transformer-only Flux file lacks and no field gives."""
    resolved, errors = {}, []
    flux = getattr(kind, "family", "") == "flux"
    for field_ in ("clip_l_path", "t5xxl_path"):
        text = getattr(config, field_).strip()
        if not text:
            continue
        if kind is not None and not flux:
            errors.append(FieldError(field_, "is for Flux bases (their text encoders); this base "
                                             "holds its own: leave it empty"))
            continue
        path = resolve_text_encoder(text, host)
        if path is None:
            errors.append(FieldError(field_, f"{text!r} is not a file or a text encoder in "
                                             f"{host.text_encoder_dir()}"))
        else:
            resolved[field_] = str(path)
    for part in getattr(kind, "missing_parts", ()):
        field_, what = FLUX_PART_FIELDS[part]
        if not getattr(config, field_).strip():
            errors.append(FieldError(field_, f"{Path(config.base_model).name} holds only the "
                                             f"transformer: choose {what}"))
    return resolved, errors


def output_file(config: TrainingConfig, host: Host) -> Path:
    """Where the trained checkpoint will be written (the trainer's naming)."""
    return host.output_dir() / output_file_name(config.model_name, "", config.export_format)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _output_errors(config: TrainingConfig, host: Host, resume: bool) -> list[FieldError]:
    """What would stop the run at its end or at an intermediate save, found before it starts:
    a file in the way (not this run's own), resume points of an earlier run under the same
    name, too little disk for the export."""
    from dreambooth.common.files import free_bytes, human_bytes
    from dreambooth.models.checkpoint import export_size_estimate

    errors = []
    work = host.work_dir(config.model_name)
    points = list_resume_points(work / "checkpoints")
    own_run = None
    if resume:  # the run's own files may be replaced; its point must fit the settings
        own = resume_points.run_points(work, work / "checkpoints")
        own_run = ((own and str(read_state(own[-1]).get("run_id") or ""))
                   or resume_points.read_run_id(work))
        errors += resume_points.setting_errors(own[-1], config) if own else []
    if points and not resume and not config.overwrite:
        errors.append(FieldError("model_name", f"{work} holds resume points of an earlier run "
                                 f"(step {point_step(points[-1])}): resume it, choose another "
                                 "name, or turn on overwrite to discard them"))
    out_dir = host.lora_dir() if config.trains_adapter else host.output_dir()
    if not config.overwrite:
        total = config.total_steps(count_pictures(config))
        taken = [name for name in planned_outputs(config, total)
                 if (out_dir / name).exists()
                 and not (own_run and run_id_of(out_dir / name) == own_run)]
        if taken:
            errors.append(FieldError("model_name", f"{', '.join(taken[:3])} already "
                                     f"exist{'s' if len(taken) == 1 else ''} in "
                                     f"{out_dir}; choose another name or turn on "
                                     "'overwrite'"))
    from dreambooth.models import adapters

    problem = adapters.unavailable(config)
    if problem:
        errors.append(FieldError("training_method", problem))
    for folder, what in ((out_dir, "the trained model"), (work, "the run's folder")):
        problem = _writable_problem(folder)
        if problem:
            errors.append(FieldError("model_name", f"{problem}: {what} cannot be written there. "
                                     "Fix the folder's permissions or choose another models "
                                     "folder"))
    base = Path(config.base_model)
    needed = (_adapter_file_bytes(config) if config.trains_adapter
              else export_size_estimate(base, config.export_dtype) if base.exists() else None)
    free = free_bytes(out_dir)
    if needed and free is not None and free < needed:
        errors.append(FieldError("model_name", f"{out_dir} has {human_bytes(free)} free; the "
                                 f"trained model needs about {human_bytes(needed)}. Free some "
                                 "space or choose another output folder"))
    return errors


def _adapter_file_bytes(config: TrainingConfig) -> int:
    """About how many bytes the adapter file takes (its trained weights, from the estimate)."""
    figures, _ = memory_figure_gb(config)
    return int(figures["trained weights"] * 2 ** 30)


def base_model_problem(base: Path, config: TrainingConfig) -> str | None:
    """Why the base model cannot be trained (not a checkpoint, a LoRA, damaged, truncated, a
    pickle that asks for code, an absurd header), from its header (a .safetensors file) or the
    safe loader (.ckpt); None when it can."""
    from dreambooth.models.detect import CheckpointError, detect_kind_cached

    try:
        detect_kind_cached(base, prediction_type=config.prediction_type or None)
    except CheckpointError as exc:
        return str(exc)
    except (OSError, MemoryError, RecursionError) as exc:
        return f"{base} cannot be read ({type(exc).__name__}: {exc})"
    return None


def host_family_problem(base: Path, config: TrainingConfig, host: Host) -> str | None:
    """Why this WebUI could not use a model trained from ``base`` (Forge Neo and Classic have no
    SD2); None when it can."""
    from dreambooth.common.host_types import unusable_family_problem
    from dreambooth.models.detect import detect_kind_cached

    kind = detect_kind_cached(base, prediction_type=config.prediction_type or None)
    webui = host.webui_name()
    if kind.family == "sdxl" and kind.prediction_type == "flow" and webui not in (
            "Forge Neo", "standalone"):
        return (f"{base.name} trains as rectified-flow SDXL ({kind.prediction_source}), which "
                f"Forge Neo samples; {webui} would sample the result as an ordinary SDXL model "
                "and get noise: train it in Forge Neo or headless, or choose prediction_type "
                "epsilon / v_prediction if it is an ordinary model")
    return unusable_family_problem(kind.family, webui, host.families())


def _rectified_name_errors(config: TrainingConfig, found) -> list[FieldError]:
    """A rectified-flow SDXL checkpoint is sampled as one only with "rectified" in its path
    (Neo's rule): a full run's name must say it (an adapter rides on its base's name)."""
    from dreambooth.models.detect import is_rectified_name

    if (not found or found[1].family != "sdxl" or found[1].prediction_type != "flow"
            or config.trains_adapter or is_rectified_name(config.model_name)):
        return []
    return [FieldError("model_name", "a rectified-flow SDXL checkpoint needs 'rectified' in "
                       "its name, or Forge Neo samples it as an ordinary SDXL model: e.g. "
                       f"{config.model_name}-rectified")]


def _writable_problem(folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (or the nearest folder that exists above it,
    where it will be made); None when it can."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so the folder {folder} cannot be made"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def preflight(config: TrainingConfig, host: Host, *, check_output: bool = True,
              resume: bool = False) -> tuple[TrainingConfig, list[FieldError]]:
    """The config with the base model, VAE and name resolved, and every error found on the way.

    Cheap: reads folder listings and file headers, never pictures' pixels or model weights."""
    errors = list(config.validate())
    resolved, found = config, None
    base = resolve_base_model(config.base_model, host)
    if config.base_model.strip() and base is None:
        errors.append(FieldError("base_model", f"{config.base_model!r} is neither a file nor a "
                                 "checkpoint in the list; pick one (press 🔄 after adding files; on the command "
                                 "line, give the file's path or a name in --models-dir's "
                                 "Stable-diffusion folder)"))
    elif base is not None:
        problem = base_model_problem(base, config) or host_family_problem(base, config, host)
        if problem:  # before the run folder, config.json or any deletion: nothing is touched
            errors.append(FieldError("base_model", problem))
        resolved = with_model_resolution(replace(resolved, base_model=str(base)))
        found = base_family(resolved)
        if found:  # what this family cannot honour (Flux: DDPM options, full runs...), by field
            errors += found[0].configured(resolved).config_problems(resolved)
        encoders, problems = text_encoder_fields(config, host, found[1] if found else None)
        resolved = replace(resolved, **encoders)
        errors += problems
        if found and config.zero_terminal_snr and found[1].prediction_type != "v_prediction" and not config.prediction_type:
            model = ("a rectified-flow" if found[1].prediction_type == "flow"
                     else "an epsilon")
            errors.append(FieldError("zero_terminal_snr", f"needs v-prediction, and {base.name} is "
                                     f"{model} model: set prediction_type to v_prediction (a "
                                     "new objective to learn), or turn it off"))
    if config.vae_path.strip():
        vae = resolve_vae(config.vae_path, host)
        if vae is None:
            errors.append(FieldError("vae_path", f"{config.vae_path!r} is not a file or a VAE in "
                                     f"{host.vae_dir()}"))
        else:
            resolved = replace(resolved, vae_path=str(vae))
    try:
        name = sanitize_model_name(config.model_name)
        host.work_dir(name)  # raises for a name that would leave the work folder
        resolved = replace(resolved, model_name=name)
        errors += _rectified_name_errors(resolved, found)
        if check_output:
            errors += _output_errors(resolved, host, resume)
    except ValueError as exc:
        errors.append(FieldError("model_name", str(exc)))
    for index, concept in enumerate(config.concepts):
        folder = concept.instance_data_dir.strip()
        if folder and not Path(folder).expanduser().is_dir():
            errors.append(FieldError(f"concepts[{index}].instance_data_dir",
                                     f"{folder} is not a folder"))
        elif folder:
            from dreambooth.data import list_pictures

            if not list_pictures(Path(folder).expanduser(), recursive=config.recursive):
                errors.append(FieldError(f"concepts[{index}].instance_data_dir",
                                         f"{folder} holds no pictures (PNG, JPEG, WebP ...)"))
    if config.optimizer in ("adamw8bit", "lion8bit", "lion"):
        from dreambooth.engine.optimizers import eight_bit_problem

        problem = eight_bit_problem(_device())
        if problem:
            errors.append(FieldError("optimizer", problem))
    fp8 = bool(found) and found[0].base_8bit == "fp8"  # Flux's 8-bit base needs no package
    if config.base_weights_8bit and not fp8:  # the run probes the int8 layer; said now
        try:
            import bitsandbytes  # noqa: F401
        except ModuleNotFoundError:
            from dreambooth.models.adapters.quantize import BITSANDBYTES_MISSING

            errors.append(FieldError("base_weights_8bit", f"{BITSANDBYTES_MISSING}: turn this off"))
        except Exception:  # a broken install: the run's probe says what fails
            pass
    from dreambooth.app.card_presets import bitsandbytes_installed

    if config.base_weights_4bit and not bitsandbytes_installed():
        from dreambooth.models.adapters.quantize import BITSANDBYTES_MISSING

        errors.append(FieldError("base_weights_4bit", f"{BITSANDBYTES_MISSING}: turn this off"))
    # the same field named twice (validate() and a check here) is shown once
    unique: dict[tuple[str, str], FieldError] = {(e.field, e.message): e for e in errors}
    return resolved, list(unique.values())


def prepare(config: TrainingConfig, host: Host, *, resume: bool = False
            ) -> tuple[TrainingConfig, RunPaths]:
    """The resolved config and its paths; ConfigError naming every field at fault."""
    resolved, errors = preflight(config, host, resume=resume)
    if errors:
        raise ConfigError(errors)
    return resolved, RunPaths(work_dir=host.work_dir(resolved.model_name),
                              checkpoints_dir=host.output_dir(), lora_dir=host.lora_dir())
