"""What the tab's buttons and fields do, as plain functions of the form's values (so tests call
them without a browser): start, resume, cancel, check, the notes under fields, the estimate, the
output's buttons, the choices of the lists."""
from __future__ import annotations

import dataclasses
import html
import tempfile
from pathlib import Path
from typing import Any

from dreambooth.app import service
from dreambooth.app.job import JobBusy, runner
from dreambooth.common.config import ConfigError, FieldError, TrainingConfig, write_concepts_list
from dreambooth.host import Host, sanitize_model_name
from dreambooth.tab import ui_poll
from dreambooth.tab.form import (CONCEPT_SLOTS, NO_TEXT_ENCODER, NO_VAE, current_host, describe_field, error_panel,
                                 form_to_config)
from dreambooth.tab.ui_fields import ADAPTERS, CONCEPT_FIELDS, GROUPS
from dreambooth.tab.ui_render import message


def poll(model_name: str, seen: str | dict | None, built_models: list[str] | None = None) -> tuple:
    return ui_poll.poll(model_name, seen, current_host(), built_models)


def restore_form(host: Host | None = None) -> TrainingConfig | None:
    return ui_poll.restore_form(host or current_host())




def start_from_form(values: dict[str, Any], extra: list | None, *, host: Host | None = None,
                    what: str = "train") -> tuple[str, list[FieldError], list[int]]:
    """Validate the form and start training (or class pictures): (message html, errors, rows)."""
    host = host or current_host()
    try:
        config, row_of = form_to_config(values, extra)
    except ConfigError as exc:
        return error_panel(exc.errors, []), exc.errors, []
    try:
        if what == "class_pictures":
            service.start_class_pictures(config, host)
            return message("Making class pictures… (Cancel stops after the current batch; what "
                           "was made stays)"), [], row_of
        service.start_training(config, host)
    except ConfigError as exc:
        return error_panel(exc.errors, row_of), exc.errors, row_of
    except JobBusy as exc:
        return message(str(exc), "error"), [], row_of
    warnings = config.warnings()
    text = "Training started." + (" Note: " + "; ".join(warnings) if warnings else "")
    return message(text, "warning" if warnings else "info"), [], row_of


def resume_run(name: str, host: Host | None = None) -> str:
    host = host or current_host()
    if not name:
        return message("Choose a previous run to resume.", "error")
    try:
        run = next((r for r in service.list_runs(host) if r.name == name), None)
        if run is None or not run.resume_points:
            return message(f"{name} has no resume points: set 'Resume point every N steps' "
                           "above 0 before training to be able to resume", "error")
        # A cancelled run may have saved its model already: the resumed run replaces that file.
        config = dataclasses.replace(service.run_config(host, name), overwrite=True)
        service.start_training(config, host, resume=True)
    except ConfigError as exc:
        return error_panel(exc.errors, [], f"{name} cannot be resumed")
    except (JobBusy, ValueError) as exc:
        return message(str(exc), "error")
    return message(f"Resuming {name} from its latest resume point.")


def cancel_job() -> str:
    if runner().cancel():
        return message("Cancel requested: the job stops after the current step.", "warning")
    return message("Nothing is running.")


def check_dataset_report(values: dict[str, Any], extra: list | None, host: Host | None = None) -> str:
    """The dataset check as text (preflight errors first: base model, folders, name)."""
    from dreambooth.data.dataset_check import check_dataset

    host = host or current_host()
    try:
        config, row_of = form_to_config(values, extra)
    except ConfigError as exc:
        return "\n".join(f"error: {e}" for e in exc.errors)
    resolved, errors = service.preflight(config, host)
    report = check_dataset(resolved, tokenizer=service.tokenizer())
    lines = [report.to_text()]
    extra_errors = [e for e in errors if str(e) not in report.errors]
    if extra_errors:
        lines.append("\nbefore training can start:")
        lines += [f"  - {describe_field(e.field, row_of)}: {e.message}" for e in extra_errors]
    return "\n".join(lines)


def identifier_html(instance_prompt: str, class_prompt: str) -> str:
    report = service.identifier_check(instance_prompt, class_prompt)
    if report is None:
        return "<div class='dreambooth-ident'></div>"
    verdict = report["verdict"]
    text = report["message"]
    if report.get("suggestions"):
        text += f" — try: {', '.join(report['suggestions'])}"
    return (f"<div class='dreambooth-ident dreambooth-ident-{verdict}'>"
            f"identifier <b>{html.escape(report['identifier'])}</b>: {html.escape(text)}</div>")


def model_name_note(name: str, overwrite: bool = False, host: Host | None = None,
                    method: str = "full") -> str:
    """The line under the name: the file the run writes (a LoRA run's in the Lora folder)."""
    host = host or current_host()
    if not (name or "").strip():
        return "<div class='dreambooth-note'>Give the new model a name.</div>"
    try:
        clean = sanitize_model_name(name)
        folder = host.lora_dir() if (method or "full") in ADAPTERS else host.output_dir()
        out = folder / f"{clean}.safetensors"
        work = host.work_dir(clean)
    except ValueError as exc:
        return f"<div class='dreambooth-note dreambooth-error-text'>⚠ {html.escape(str(exc))}</div>"
    text = f"saves {html.escape(str(out))}"
    if clean != name.strip():
        text = f"name becomes <b>{html.escape(clean)}</b>; " + text
    warn = ""
    if out.exists():
        warn = (" — ⚠ this file exists: tick 'Overwrite' or choose another name" if not overwrite
                else " — ⚠ this file exists and will be replaced")
    elif (work / "config.json").is_file():
        warn = " — a run of this name exists (its resume points are kept)"
    return f"<div class='dreambooth-note'>{text}{html.escape(warn) if warn else ''}</div>"


def resolution_info(base: str, host: Host | None = None) -> str:
    """The Resolution field's info, with what 0 means for the chosen base model (its family's
    own size, read from the file's header)."""
    from dreambooth.models.families import with_model_resolution

    info = next(i for _, _, items in GROUPS for n, _, i in items if n == "resolution")
    path = service.resolve_base_model(base, host or current_host()) if (base or "").strip() else None
    own = with_model_resolution(TrainingConfig(base_model=str(path))).resolution if path else 0
    return f"{info}; the chosen model: {own} px" if own else info


def estimate_html(values: dict[str, Any], extra: list | None, host: Host | None = None) -> str:
    """Steps, epochs and expected memory of the form's run, for the base model it names
    (a WebUI title resolved to its file, so the memory figure is that model's family's)."""
    try:
        config, _ = form_to_config(values, extra)
    except ConfigError as exc:
        return message("; ".join(str(e) for e in exc.errors), "error")
    base = service.resolve_base_model(config.base_model, host or current_host())
    if base is not None:
        config = dataclasses.replace(config, base_model=str(base))
    return f"<div class='dreambooth-note'>{html.escape(service.step_estimate(config))}</div>"


def use_output(output_path: str, host: Host | None = None) -> tuple[str, str, str]:
    """The "Use in txt2img" button: (checkpoint title for the page's selectCheckpoint, LoRA tag
    for the page to add to the txt2img prompt, message). A LoRA file (a LoRA run's, an
    extraction's) gives a tag and the WebUI's Lora list rescanned; a checkpoint is loaded as
    the WebUI's active model (:func:`load_output`)."""
    host = host or current_host()
    if service.is_lora_file(host, output_path):
        tag, text = service.use_lora_in_txt2img(host, output_path)
        return "", tag or "", message(text, "info" if tag or not host.is_webui else "error")
    title, text = load_output(output_path, host)
    return title, "", text


def extract_visible(output_path: str, host: Host | None = None) -> bool:
    """Whether the output shown is a full run's checkpoint (Extract LoRA applies to it)."""
    host = host or current_host()
    return bool(output_path) and not service.is_lora_file(host, output_path) \
        and Path(output_path).suffix.lower() in (".safetensors", ".ckpt") \
        and Path(output_path).is_file()


def extract_lora(output_path: str, rank: Any, conv_rank: Any, overwrite: bool,
                 host: Host | None = None) -> str:
    """The "Extract LoRA" button: start the extraction job; a message for the tab."""
    host = host or current_host()
    try:
        rank_, conv = int(rank), int(conv_rank)
        if rank_ != float(rank) or conv != float(conv_rank):
            raise ValueError
    except (TypeError, ValueError):
        return message(f"rank and conv rank must be whole numbers, not {rank!r} / {conv_rank!r}",
                       "error")
    try:
        service.start_lora_extraction(host, output_path, rank=rank_, conv_rank=conv,
                                      overwrite=bool(overwrite))
    except (ValueError, JobBusy) as exc:
        return message(str(exc), "error")
    target = service.extraction_target(host, output_path)
    return message(f"Extracting a LoRA (rank {rank_}" + (f", conv rank {conv}" if conv else "")
                   + f") into {target}… (Cancel stops it between two model parts; nothing is "
                   "written then)")


def load_output(output_path: str, host: Host | None = None) -> tuple[str, str]:
    """The "Load in txt2img" button: (checkpoint title for the page's selectCheckpoint, message)."""
    title, text = service.load_in_txt2img(host or current_host(), output_path)
    return title or "", message(text, "info" if title else "error")


def checkpoint_choices(host: Host | None = None) -> list[str]:
    return [e.shown for e in (host or current_host()).list_checkpoints()]


def refresh_checkpoints(current: str, host: Host | None = None) -> tuple[list[str], str]:
    """Rescan, and keep the selection on the same file when its title changed (hash added)."""
    host = host or current_host()
    host.refresh_checkpoints()
    choices = checkpoint_choices(host)
    value = current or ""
    if value and value not in choices:
        entry = host.resolve_checkpoint(value)
        if entry is not None:
            value = entry.shown
    return choices, value


def _names_in(files: list, root) -> list[str]:
    """Files shown by their path inside ``root`` (the whole path when elsewhere)."""
    names = []
    for path in files:
        try:
            names.append(path.relative_to(root).as_posix())
        except ValueError:
            names.append(str(path))
    return names


def text_encoder_choices(host: Host | None = None) -> list[str]:
    """The files of the host's text encoder folder (Forge's models/text_encoder)."""
    host = host or current_host()
    return [NO_TEXT_ENCODER, *_names_in(host.list_text_encoders(), host.text_encoder_dir())]


def vae_choices(host: Host | None = None) -> list[str]:
    host = host or current_host()
    return [NO_VAE, *_names_in(host.list_vaes(), host.vae_dir())]


def run_choices(host: Host | None = None) -> list[str]:
    return [r.name for r in service.list_runs(host or current_host())]


def export_concepts(values: dict[str, Any], extra: list | None) -> str | None:
    """Writes the concepts to a concepts_list.json for download; None when there are none."""
    rows = [{name: values.get(f"concepts.{i}.{name}") for name, _, _ in CONCEPT_FIELDS}
            for i in range(CONCEPT_SLOTS)]
    concepts = service.concepts_from_rows(rows) + list(extra or [])
    if not concepts:
        return None
    folder = Path(tempfile.mkdtemp(prefix="dreambooth-concepts-"))
    return str(write_concepts_list(concepts, folder / "concepts_list.json"))
