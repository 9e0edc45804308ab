"""The DreamBooth tab, for gradio 3.41 (AUTOMATIC1111 1.10) and 4.40 (Forge), and standalone.

Layout (like the WebUI's own tabs): settings on the left in three sub-tabs (Model, Concepts,
Parameters), actions and live output on the right.

How progress reaches the page
-----------------------------
The state of a run lives in the process's job runner (``job.runner().snapshot()``), never in the
page: several browser tabs show the same run, and a reloaded page shows it again at its next poll.
``javascript/dreambooth.js`` clicks a hidden button (``#dreambooth_poll``) every second while the
tab is visible (every 4 s when idle). Its event is registered with ``queue=False``: it is a plain
HTTP request answered at once, never put in gradio's queue, so it does not wait behind a
generation or another long event, and it works the same on gradio 3.41 (which has no
``gr.Timer``) and 4.40. Each browser session keeps a small ``gr.State`` with what it last
received, so the gallery, plot and log are only re-sent when they changed (no flicker).

Only this module imports gradio; the WebUI is reached only through ``webui.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from dreambooth.app import service
from dreambooth.tab import ui_captions, ui_poll
from dreambooth.tab.ui_poll import LOG_TAIL, PollSessions
from dreambooth.tab.ui_render import loss_plot_svg, message, progress_html, status_html
from dreambooth.app.presets import PRESETS
from dreambooth.common.config import (ConfigError, FieldError, TrainingConfig, read_concepts_list,
                                      write_concepts_list)
# The form's tables (every option of TrainingConfig, grouped, with labels and info)
from dreambooth.tab.ui_fields import (ADAPTERS, CHOICES, CONCEPT_FIELDS, CONCEPT_LAYOUT, GROUPS,
                                      MODEL_FIELDS, NOT_IN_FORM)  # noqa: F401 (NOT_IN_FORM: read by the tests)
from dreambooth.app.card_presets import CARDS
from dreambooth.app.job import JobBusy, runner
from dreambooth.tab.ui_method import (METHOD_KEYS, method_note, method_view, preset_values)  # noqa: F401
from dreambooth.host import Host, StandaloneHost, get_host, sanitize_model_name, tool_button_class

TAB_TITLE = "DreamBooth"
TAB_ELEM_ID = "dreambooth"
CONCEPT_SLOTS = 4
AUTO = "auto (from the checkpoint)"
NO_VAE = "None (the checkpoint's own)"
REPO_ROOT = Path(__file__).resolve().parents[2]

# The host the tab works with: the WebUI's, or the one standalone_main() sets.
_HOST: Host | None = None
_TIMERS_STOPPED = threading.Event()


def current_host() -> Host:
    return _HOST if _HOST is not None else get_host()


# No spinner over small live-updating parts (gradio 3.41 and 4.x both take "hidden").
HIDDEN = "hidden"


def option_names() -> list[str]:
    return [name for _, _, items in GROUPS for name, _, _ in items]


def form_keys() -> list[str]:
    """The order of the form's values everywhere in this module."""
    keys = list(MODEL_FIELDS)
    keys += [f"concepts.{i}.{name}" for i in range(CONCEPT_SLOTS) for name, _, _ in CONCEPT_FIELDS]
    return keys + option_names()


def _labels() -> dict[str, str]:
    labels = {"base_model": "Base model", "vae_path": "VAE", "prediction_type": "Prediction type",
              "base_use_ema": "Train from the checkpoint's EMA weights",
              "model_name": "Name of the new model"}
    for i in range(CONCEPT_SLOTS):
        for name, label, _ in CONCEPT_FIELDS:
            labels[f"concepts.{i}.{name}"] = label
    for _, _, items in GROUPS:
        for name, label, _ in items:
            labels[name] = label
    return labels


LABELS = _labels()


# ---------------------------------------------------------------------------------------------
# Form values <-> TrainingConfig (pure functions, tested without a browser)
# ---------------------------------------------------------------------------------------------
def form_to_config(values: dict[str, Any], extra_concepts: list | None = None
                   ) -> tuple[TrainingConfig, list[int]]:
    """The config the form describes, and for each of its concepts the form row it came from
    (-1: a concept imported from a file beyond the rows). Raises ConfigError naming fields."""
    data: dict[str, Any] = {name: values[name] for name in option_names() if name in values}
    data["base_model"] = str(values.get("base_model") or "")
    data["model_name"] = str(values.get("model_name") or "")
    vae = str(values.get("vae_path") or "")
    data["vae_path"] = "" if vae == NO_VAE else vae
    prediction = str(values.get("prediction_type") or "")
    data["prediction_type"] = "" if prediction == AUTO else prediction
    data["base_use_ema"] = bool(values.get("base_use_ema"))
    rows, row_of = [], []
    for i in range(CONCEPT_SLOTS):
        row = {name: values.get(f"concepts.{i}.{name}") for name, _, _ in CONCEPT_FIELDS}
        concepts = service.concepts_from_rows([row])
        if concepts:
            rows += concepts
            row_of.append(i)
    extra = list(extra_concepts or [])
    data["concepts"] = rows + [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c
                               for c in extra]
    row_of += [-1] * len(extra)
    return TrainingConfig.from_dict(data), row_of


def config_to_values(config: TrainingConfig, host: Host | None = None) -> tuple[dict[str, Any], list]:
    """Form values for a config, and the concepts that do not fit in the rows."""
    values: dict[str, Any] = {name: getattr(config, name) for name in option_names()}
    values["sample_prompts"] = "\n".join(config.sample_prompts)
    base = config.base_model
    if host is not None and base:
        entry = None
        try:
            for candidate in host.list_checkpoints():
                if Path(candidate.filename).resolve() == Path(base).expanduser().resolve():
                    entry = candidate
        except OSError:
            entry = None
        base = entry.shown if entry is not None else base
    values.update(base_model=base, model_name=config.model_name,
                  vae_path=config.vae_path or NO_VAE,
                  prediction_type=config.prediction_type or AUTO, base_use_ema=config.base_use_ema)
    for i in range(CONCEPT_SLOTS):
        concept = config.concepts[i] if i < len(config.concepts) else None
        for name, _, _ in CONCEPT_FIELDS:
            value = getattr(concept, name) if concept is not None else ""
            if name == "num_class_images":
                value = value or 0
            values[f"concepts.{i}.{name}"] = value
    return values, list(config.concepts[CONCEPT_SLOTS:])


def field_key(field: str, row_of: list[int]) -> str | None:
    """The form key for an error's field ("concepts[1].instance_prompt" -> its row's key)."""
    if field.startswith("concepts[") and "]" in field:
        index = int(field[len("concepts["):field.index("]")])
        rest = field[field.index("]") + 1:].lstrip(".")
        row = row_of[index] if index < len(row_of) else -1
        if row < 0 or not rest:
            return None
        key = f"concepts.{row}.{rest}"
        return key if key in LABELS else None
    return field if field in LABELS else None


def describe_field(field: str, row_of: list[int]) -> str:
    key = field_key(field, row_of)
    if key is None:
        return field
    if key.startswith("concepts."):
        _, row, _name = key.split(".", 2)
        return f"Concept {int(row) + 1} › {LABELS[key]}"
    return LABELS[key]


def error_panel(errors: list[FieldError], row_of: list[int], title: str = "Fix these first") -> str:
    items = "".join(f"<li><b>{html.escape(describe_field(e.field, row_of))}</b> "
                    f"<code>{html.escape(e.field)}</code>: {html.escape(e.message)}</li>"
                    for e in errors)
    return (f"<div class='dreambooth-message dreambooth-error' id='dreambooth_errors'>"
            f"<b>{html.escape(title)}</b><ul>{items}</ul></div>")


def label_updates(gr, errors: list[FieldError], row_of: list[int]) -> list[Any]:
    """A label update for every form field: '⚠ reason' on those at fault, the plain label back
    on the others (errors shown next to the fields they concern)."""
    marks: dict[str, str] = {}
    for error in errors:
        key = field_key(error.field, row_of)
        if key is not None:
            marks.setdefault(key, error.message)
    return [gr.update(label=f"{LABELS[key]} — ⚠ {marks[key]}" if key in marks else LABELS[key])
            for key in form_keys()]


# ---------------------------------------------------------------------------------------------
# Live output: ui_poll.py (the tab's poll answers from the process's runner)
# ---------------------------------------------------------------------------------------------
def poll(model_name: str, seen: str | dict | None) -> tuple:
    return ui_poll.poll(model_name, seen, current_host())


def restore_form(host: Host | None = None) -> TrainingConfig | None:
    return ui_poll.restore_form(host or current_host())




# ---------------------------------------------------------------------------------------------
# Actions (called by the buttons; plain functions so tests can call them)
# ---------------------------------------------------------------------------------------------
def _values(args: tuple) -> tuple[dict[str, Any], list]:
    keys = form_keys()
    return dict(zip(keys, args[:len(keys)])), (args[len(keys)] if len(args) > len(keys) else []) or []


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


# Every option whose visibility or info text follows the training method, in form order.
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


def vae_choices(host: Host | None = None) -> list[str]:
    host = host or current_host()
    root = host.vae_dir()
    names = []
    for path in host.list_vaes():
        try:
            names.append(path.relative_to(root).as_posix())
        except ValueError:
            names.append(str(path))
    return [NO_VAE, *names]


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


# ---------------------------------------------------------------------------------------------
# Building the tab
# ---------------------------------------------------------------------------------------------
def _gradio4(gr) -> bool:
    return int(gr.__version__.split(".")[0]) >= 4


def _js(gr, code: str) -> dict[str, str]:
    """gradio 3 calls it ``_js``, gradio 4 ``js`` (Forge shims ``_js`` too; plain 4.40 does not)."""
    return {"js": code} if _gradio4(gr) else {"_js": code}


def _tool_button(gr, value: str, elem_id: str, tooltip: str):
    cls = tool_button_class()
    if cls is not None:
        try:
            return cls(value=value, elem_id=elem_id, tooltip=tooltip)
        except TypeError:
            return cls(value=value, elem_id=elem_id)
    return gr.Button(value=value, elem_id=elem_id, elem_classes=["tool", "dreambooth-tool"],
                     scale=0, min_width=40)


def _component(gr, key: str, label: str, info: str, value: Any, visible: bool = True):
    elem_id = "dreambooth_" + key.replace(".", "_")
    common = dict(label=label, elem_id=elem_id)
    if not visible:
        common["visible"] = False
    if info:
        common["info"] = info
    name = key.split(".")[-1]
    if name in CHOICES:
        return gr.Dropdown(choices=list(CHOICES[name]), value=value, **common)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, **common)
    if isinstance(value, int) or name == "num_class_images":
        return gr.Number(value=value or 0, precision=0, **common)
    if isinstance(value, float):
        return gr.Number(value=value, **common)
    if isinstance(value, list):
        return gr.Textbox(value="\n".join(value), lines=3, **common)
    return gr.Textbox(value=value, **common)


def build_tab(host: Host | None = None, initial: TrainingConfig | None = None) -> Any:
    """The tab's Blocks (not rendered anywhere yet)."""
    import gradio as gr

    host = host or current_host()
    initial = initial or TrainingConfig()
    start_values, start_extra = config_to_values(initial, host)
    # Building the CLIP tokenizer takes seconds: do it now, so the identifier check under the
    # first prompt typed answers at once.
    threading.Thread(target=service.tokenizer, name="dreambooth-tokenizer", daemon=True).start()
    comps: dict[str, Any] = {}

    with gr.Blocks(analytics_enabled=False) as blocks:
        extra_state = gr.State(start_extra)
        sessions = PollSessions()
        with gr.Row(elem_id="dreambooth_main"):
            with gr.Column(scale=3, elem_id="dreambooth_settings"):
                with gr.Tabs(elem_id="dreambooth_settings_tabs"):
                    with gr.Tab("Model", id="dreambooth_tab_model", elem_id="dreambooth_tab_model"):
                        with gr.Row():
                            choices = checkpoint_choices(host)
                            comps["base_model"] = gr.Dropdown(
                                choices=choices, value=start_values["base_model"] or None,
                                label=LABELS["base_model"], elem_id="dreambooth_base_model",
                                info="the checkpoint to start from (the WebUI's list); it is "
                                     "never modified", allow_custom_value=True)
                            refresh_models = _tool_button(gr, "\U0001f504", "dreambooth_refresh_models",
                                                          "Refresh the checkpoint list")
                        model_kind = gr.HTML(service.describe_model(host, start_values["base_model"]),
                                             elem_id="dreambooth_model_kind")
                        with gr.Row():
                            comps["vae_path"] = gr.Dropdown(
                                choices=vae_choices(host), value=start_values["vae_path"],
                                label=LABELS["vae_path"], elem_id="dreambooth_vae_path",
                                info="a separate VAE from models/VAE (the seed's "
                                     "--pretrained_vae_name_or_path)", allow_custom_value=True)
                            refresh_vaes = _tool_button(gr, "\U0001f504", "dreambooth_refresh_vaes",
                                                        "Refresh the VAE list")
                        with gr.Row():
                            comps["prediction_type"] = gr.Dropdown(
                                choices=[AUTO, "epsilon", "v_prediction"],
                                value=start_values["prediction_type"], label=LABELS["prediction_type"],
                                elem_id="dreambooth_prediction_type",
                                info="v_prediction for SD 2.x 768 models; auto reads the checkpoint")
                            comps["base_use_ema"] = gr.Checkbox(
                                value=start_values["base_use_ema"], label=LABELS["base_use_ema"],
                                elem_id="dreambooth_base_use_ema",
                                info="when the file holds EMA weights (model_ema.*)")
                        comps["model_name"] = gr.Textbox(
                            value=start_values["model_name"], label=LABELS["model_name"],
                            elem_id="dreambooth_model_name",
                            info="file name of the result in the checkpoints folder")
                        name_note = gr.HTML(model_name_note(start_values["model_name"], host=host,
                                                            method=start_values["training_method"]),
                                            elem_id="dreambooth_name_note")
                        with gr.Row():
                            previous = gr.Dropdown(choices=run_choices(host), value=None,
                                                   label="Previous runs", elem_id="dreambooth_runs",
                                                   info="reload a run's settings, or resume it "
                                                        "from its latest resume point")
                            refresh_runs = _tool_button(gr, "\U0001f504", "dreambooth_refresh_runs",
                                                        "Refresh the list of runs")
                        with gr.Row():
                            load_settings = gr.Button("Load its settings", elem_id="dreambooth_load_settings")
                            resume = gr.Button("Resume", elem_id="dreambooth_resume")

                    with gr.Tab("Concepts", id="dreambooth_tab_concepts",
                                elem_id="dreambooth_tab_concepts"):
                        ident_boxes = []
                        for i in range(CONCEPT_SLOTS):
                            with gr.Accordion(f"Concept {i + 1}", open=i == 0,
                                              elem_id=f"dreambooth_concept_{i}"):
                                info_of = {name: (label, info) for name, label, info in CONCEPT_FIELDS}
                                for row in CONCEPT_LAYOUT:
                                    with gr.Row():
                                        for name in row:
                                            key = f"concepts.{i}.{name}"
                                            comps[key] = _component(gr, key, *info_of[name],
                                                                    start_values[key])
                                    if "instance_prompt" in row:
                                        ident_boxes.append(gr.HTML(
                                            identifier_html(start_values[f"concepts.{i}.instance_prompt"],
                                                            start_values[f"concepts.{i}.class_prompt"]),
                                            elem_id=f"dreambooth_ident_{i}"))
                        extra_note = gr.HTML(_extra_note(start_extra), elem_id="dreambooth_extra_note")
                        with gr.Row():
                            concepts_file = gr.File(label="Import concepts_list.json (JSON or the "
                                                    "seed's Python list)", file_types=[".json", ".txt", ".py"],
                                                    elem_id="dreambooth_import_concepts")
                            concepts_out = gr.File(label="Exported concepts_list.json",
                                                   interactive=False, elem_id="dreambooth_concepts_out")
                        export_btn = gr.Button("Export concepts_list.json", elem_id="dreambooth_export_concepts")
                        caption_panel = ui_captions.build_panel(gr, host)

                    with gr.Tab("Parameters", id="dreambooth_tab_parameters",
                                elem_id="dreambooth_tab_parameters"):
                        start_method = start_values["training_method"]
                        view = method_view(start_method)

                        def option_rows(items):
                            # two fields a row, as the WebUI's own forms; text fields alone;
                            # the options of other training methods hidden
                            for row in _rows(items):
                                with gr.Row():
                                    for name, label, info in row:
                                        if name == "resolution":
                                            info = resolution_info(start_values["base_model"], host)
                                        shown = view.get(name, {})
                                        comps[name] = _component(
                                            gr, name, label, shown.get("info", info),
                                            start_values[name], visible=shown.get("visible", True))

                        # what the run trains first, unfolded: the rest of the form follows it
                        with gr.Column(elem_id="dreambooth_group_method",
                                       elem_classes=["dreambooth-method"]):
                            option_rows(next(items for group_id, _, items in GROUPS
                                             if group_id == "method"))
                            method_box = gr.HTML(method_note(start_method,
                                                             start_values["learning_rate"]),
                                                 elem_id="dreambooth_method_note")
                        with gr.Row():
                            preset = gr.Dropdown(choices=list(PRESETS), value=None, label="Preset",
                                                 elem_id="dreambooth_preset",
                                                 info="person / object: DreamBooth with prior "
                                                      "preservation; style: native training with "
                                                      "captions and buckets; -lora: the same as "
                                                      "a LoRA (style-lora: LoCon)")
                            apply_preset = gr.Button("Apply preset", elem_id="dreambooth_apply_preset",
                                                     scale=0, min_width=140)
                            card = gr.Dropdown(choices=list(CARDS), value=None, label="Card size",
                                               elem_id="dreambooth_card",
                                               info="the memory settings that fit this GPU "
                                                    "(estimate below)")
                            apply_card = gr.Button("Fit to card", elem_id="dreambooth_apply_card",
                                                   scale=0, min_width=140)
                        estimate = gr.HTML("", elem_id="dreambooth_estimate")
                        for group_id, title, items in GROUPS:
                            if group_id == "method":
                                continue
                            with gr.Accordion(title, open=group_id == "basics",
                                              elem_id=f"dreambooth_group_{group_id}"):
                                option_rows(items)

            with gr.Column(scale=2, elem_id="dreambooth_output_column"):
                with gr.Row(elem_id="dreambooth_actions"):
                    train = gr.Button("Train", variant="primary", elem_id="dreambooth_train")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="dreambooth_cancel")
                with gr.Row():
                    check = gr.Button("Check dataset", elem_id="dreambooth_check")
                    make_class = gr.Button("Generate class pictures", elem_id="dreambooth_make_class")
                action_msg = gr.HTML("", elem_id="dreambooth_message")
                snap = runner().snapshot()
                status = gr.HTML(status_html(snap), elem_id="dreambooth_status")
                progress = gr.HTML(progress_html(snap), elem_id="dreambooth_progress")
                plot = gr.HTML(loss_plot_svg(snap.loss_history, snap.lr_history),
                               elem_id="dreambooth_loss_plot")
                gallery = gr.Gallery(value=None, label="Samples", elem_id="dreambooth_gallery",
                                     columns=4, height=220, object_fit="contain", preview=False)
                log = gr.Textbox("", label="Log", lines=LOG_TAIL, max_lines=LOG_TAIL, interactive=False,
                                 elem_id="dreambooth_log")
                with gr.Row(elem_id="dreambooth_output_row"):
                    output = gr.Textbox("", label="Output file", interactive=False,
                                        elem_id="dreambooth_output", scale=3)
                training_log = gr.HTML("", elem_id="dreambooth_training_log_box")
                with gr.Row():
                    load_btn = gr.Button("Use in txt2img", elem_id="dreambooth_load_txt2img")
                    open_btn = gr.Button("\U0001f4c2 Open folder", elem_id="dreambooth_open_folder")
                load_title = gr.Textbox("", visible=False, elem_id="dreambooth_load_title")
                lora_tag = gr.Textbox("", visible=False, elem_id="dreambooth_lora_tag")
                with gr.Accordion("Extract LoRA", open=False, elem_id="dreambooth_extract",
                                  visible=extract_visible(snap.output_path or "", host)) as extract_box:
                    gr.HTML("<div class='dreambooth-note'>A LoRA file from this full run: the "
                            "difference between its checkpoint and the base model, cut to the "
                            "rank by SVD, written to the Lora folder as "
                            "<code>&lt;name&gt;-lora.safetensors</code>; the log shows how much "
                            "of the difference the rank keeps.</div>",
                            elem_id="dreambooth_extract_note")
                    with gr.Row():
                        extract_rank = gr.Number(value=service.EXTRACT_RANK, precision=0,
                                                 label="Rank", elem_id="dreambooth_extract_rank",
                                                 info="32 keeps most of a DreamBooth run; more "
                                                      "keeps more, the file grows")
                        extract_conv = gr.Number(value=service.EXTRACT_CONV_RANK, precision=0,
                                                 label="Conv rank",
                                                 elem_id="dreambooth_extract_conv_rank",
                                                 info="the ResNet convolutions too (LoCon); "
                                                      "0 = none")
                    with gr.Row():
                        extract_overwrite = gr.Checkbox(False, label="Overwrite an existing file",
                                                        elem_id="dreambooth_extract_overwrite")
                        extract_btn = gr.Button("Extract LoRA", elem_id="dreambooth_extract_lora")
                report = gr.Textbox("", label="Dataset check", lines=6, max_lines=24,
                                    interactive=False, elem_id="dreambooth_report")
                poll_btn = gr.Button("poll", elem_id="dreambooth_poll",
                                     elem_classes=["dreambooth-hidden"])
                restore_btn = gr.Button("restore", elem_id="dreambooth_restore",
                                        elem_classes=["dreambooth-hidden"])

        fields = [comps[k] for k in form_keys()]
        form_inputs = fields + [extra_state]

        # --- live output: JS clicks #dreambooth_poll; queue=False never waits in gradio's queue
        poll_outputs = [status, progress, plot, gallery, log, output, training_log, action_msg,
                        previous]

        def poll_page(request):
            session = str(getattr(request, "session_hash", None) or "")
            *parts, seen = poll("", sessions.get(session))
            sessions.put(session, seen)
            return parts

        # gradio injects the request by this annotation (a real class: this module's
        # annotations are strings, and gradio is imported here, not at the top)
        poll_page.__annotations__ = {"request": gr.Request}

        poll_btn.click(poll_page, inputs=None, outputs=poll_outputs, queue=False,
                       show_progress=HIDDEN)

        # --- model section
        def on_refresh_models(current):
            choices_, value = refresh_checkpoints(current, host)
            return gr.update(choices=choices_, value=value or None)

        refresh_models.click(on_refresh_models, inputs=[comps["base_model"]],
                             outputs=[comps["base_model"]], queue=False)
        refresh_vaes.click(lambda: gr.update(choices=vae_choices(host)), outputs=[comps["vae_path"]],
                           queue=False)
        refresh_runs.click(lambda: gr.update(choices=run_choices(host)), outputs=[previous], queue=False)
        comps["base_model"].change(lambda base: (service.describe_model(host, base or ""),
                                                 gr.update(info=resolution_info(base, host))),
                                   inputs=[comps["base_model"]],
                                   outputs=[model_kind, comps["resolution"]], queue=False,
                                   show_progress=HIDDEN)
        for trigger in (comps["model_name"], comps["overwrite"], comps["training_method"]):
            trigger.change(lambda name, over, method: model_name_note(name, over, host, method),
                           inputs=[comps["model_name"], comps["overwrite"],
                                   comps["training_method"]], outputs=[name_note],
                           queue=False, show_progress=HIDDEN)

        def fill(config: TrainingConfig):
            values, extra = config_to_values(config, host)
            return [gr.update(value=values[k]) for k in form_keys()] + [extra, _extra_note(extra)]

        def on_load_settings(name):
            if not name:
                return [gr.update() for _ in fields] + [gr.update(), gr.update(),
                                                        message("Choose a previous run.", "error")]
            try:
                config = service.run_config(host, name)
            except (ConfigError, ValueError) as exc:
                return [gr.update() for _ in fields] + [gr.update(), gr.update(),
                                                        message(str(exc), "error")]
            return fill(config) + [message(f"Loaded the settings of {name}.")]

        load_settings.click(on_load_settings, inputs=[previous],
                            outputs=fields + [extra_state, extra_note, action_msg])
        resume.click(lambda name: resume_run(name, host), inputs=[previous], outputs=[action_msg])

        # --- concepts
        for i in range(CONCEPT_SLOTS):
            ip, cp = comps[f"concepts.{i}.instance_prompt"], comps[f"concepts.{i}.class_prompt"]
            for trigger in (ip, cp):
                trigger.change(identifier_html, inputs=[ip, cp], outputs=[ident_boxes[i]], queue=False,
                               show_progress=HIDDEN)

        def on_import(file):
            if file is None:
                return [gr.update() for _ in fields] + [gr.update(), gr.update(), gr.update()]
            path = getattr(file, "name", file)
            try:
                concepts = read_concepts_list(path)
            except (ConfigError, OSError, ValueError, SyntaxError) as exc:
                return [gr.update() for _ in fields] + [gr.update(), gr.update(),
                                                        message(f"cannot read {Path(path).name}: {exc}",
                                                                "error")]
            values, extra = config_to_values(TrainingConfig(concepts=concepts))
            updates = [gr.update(value=values[k]) if k.startswith("concepts.") else gr.update()
                       for k in form_keys()]
            return updates + [extra, _extra_note(extra),
                              message(f"Imported {len(concepts)} concept(s).")]

        concepts_file.upload(on_import, inputs=[concepts_file],
                             outputs=fields + [extra_state, extra_note, action_msg])

        def on_export(*args):
            values, extra = _values(args)
            return export_concepts(values, extra)

        export_btn.click(on_export, inputs=form_inputs, outputs=[concepts_out])

        # --- parameters
        def on_preset(name):
            if not name or name not in PRESETS:
                return [gr.update() for _ in fields]
            chosen = preset_values(name)
            return [gr.update(value=chosen[k]) if k in chosen else gr.update() for k in form_keys()]

        apply_preset.click(on_preset, inputs=[preset], outputs=fields, queue=False)

        def on_card(name, *args):  # the memory fields of the rung that fits, and its estimate
            try:
                config, _ = form_to_config(*_values(args))
                choice = service.card_preset(name, config)
            except ConfigError as exc:
                return [gr.update() for _ in fields] + [message(str(exc), "error")]
            updates = [gr.update(value=choice.values[k]) if k in choice.values else gr.update()
                       for k in form_keys()]
            said = "<br>".join(html.escape(t) for t in [choice.line()] + choice.change_lines())
            return updates + [f"<div class='dreambooth-note'>{said}</div>"]

        apply_card.click(on_card, inputs=[card] + form_inputs, outputs=fields + [estimate],
                         queue=False)

        # the options of the chosen training method only (a filled form changes the method's
        # value, which comes here too)
        method_outputs = [comps[k] for k in METHOD_KEYS]

        def on_method(method, learning_rate):
            view = method_view(method)
            return [gr.update(**view[k]) for k in METHOD_KEYS] + [method_note(method,
                                                                              learning_rate)]

        comps["training_method"].change(on_method, inputs=[comps["training_method"],
                                                           comps["learning_rate"]],
                                        outputs=method_outputs + [method_box], queue=False,
                                        show_progress=HIDDEN)
        comps["learning_rate"].change(method_note, inputs=[comps["training_method"],
                                                           comps["learning_rate"]],
                                      outputs=[method_box], queue=False, show_progress=HIDDEN)

        def on_estimate(*args):
            return estimate_html(*_values(args), host)

        estimate_triggers = [comps[k] for k in ("base_model", "max_train_steps", "train_batch_size",
                                                "gradient_accumulation_steps", "recursive",
                                                "optimizer", "train_text_encoder",
                                                "gradient_checkpointing", "resolution",
                                                "mixed_precision", "training_method", "lora_rank",
                                                "lora_conv_rank", "cache_text_embeddings",
                                                "fused_backward", "trained_precision",
                                                "base_weights_8bit", "with_prior_preservation")]
        estimate_triggers += [comps[f"concepts.{i}.instance_data_dir"] for i in range(CONCEPT_SLOTS)]
        for trigger in estimate_triggers:
            trigger.change(on_estimate, inputs=form_inputs, outputs=[estimate], queue=False,
                           show_progress=HIDDEN)

        # --- actions
        def on_train(*args):
            values, extra = _values(args)
            text, errors, row_of = start_from_form(values, extra, host=host)
            return [text] + label_updates(gr, errors, row_of)

        def on_make_class(*args):
            values, extra = _values(args)
            text, errors, row_of = start_from_form(values, extra, host=host, what="class_pictures")
            return [text] + label_updates(gr, errors, row_of)

        # A new action clears what the last one left on screen (message, dataset report).
        train.click(lambda *a: [""] + on_train(*a), inputs=form_inputs,
                    outputs=[report, action_msg] + fields, queue=False)
        make_class.click(lambda *a: [""] + on_make_class(*a), inputs=form_inputs,
                         outputs=[report, action_msg] + fields, queue=False)
        cancel.click(cancel_job, outputs=[action_msg], queue=False)
        ui_captions.wire(caption_panel, form_inputs, lambda a: form_to_config(*_values(a))[0],
                         [action_msg], host)

        def on_check(*args):
            values, extra = _values(args)
            return check_dataset_report(values, extra, host), ""

        check.click(on_check, inputs=form_inputs, outputs=[report, action_msg])

        def on_restore():
            config = restore_form(host)
            if config is None:
                return [gr.update() for _ in fields] + [gr.update(), gr.update()]
            return fill(config)

        # clicked once by the page's script when the tab is first shown (a reload, a 2nd tab)
        restore_btn.click(on_restore, outputs=fields + [extra_state, extra_note], queue=False,
                          show_progress=HIDDEN)

        # a checkpoint: the WebUI loads it, the page selects it; a LoRA: the page adds its tag
        # to the txt2img prompt (the WebUI's Lora list rescanned first)
        load_btn.click(lambda path: use_output(path, host), inputs=[output],
                       outputs=[load_title, lora_tag, action_msg]).then(
            None, inputs=[load_title, lora_tag], outputs=None,
            **_js(gr, "(title, tag) => { if (tag) { dreamboothUseLora(tag); } "
                      "else { dreamboothLoadInTxt2img(title); } return []; }"))
        # Extract LoRA: on a full run's checkpoint only, as a job of the runner
        output.change(lambda path: gr.update(visible=extract_visible(path, host)),
                      inputs=[output], outputs=[extract_box], queue=False, show_progress=HIDDEN)
        extract_btn.click(lambda path, rank, conv, over: extract_lora(path, rank, conv, over, host),
                          inputs=[output, extract_rank, extract_conv, extract_overwrite],
                          outputs=[action_msg], queue=False)
        open_btn.click(lambda path: message(service.open_folder(path or host.output_dir())),
                       inputs=[output], outputs=[action_msg], queue=False)

    blocks.dreambooth_components = comps  # for tests and for other scripts that want them
    return blocks


def _rows(items: list[tuple[str, str, str]]) -> list[list[tuple[str, str, str]]]:
    """Options paired two by two; list-valued (multi-line) ones get a row of their own."""
    rows: list[list[tuple[str, str, str]]] = []
    for item in items:
        wide = isinstance(getattr(TrainingConfig(), item[0]), list)
        if wide or not rows or len(rows[-1]) == 2 or isinstance(
                getattr(TrainingConfig(), rows[-1][0][0]), list):
            rows.append([item])
        else:
            rows[-1].append(item)
    return rows


def _extra_note(extra: list) -> str:
    if not extra:
        return "<div class='dreambooth-note'></div>"
    return (f"<div class='dreambooth-note'>{len(extra)} more concept(s) from the imported file "
            f"are kept and trained too (only {CONCEPT_SLOTS} are shown).</div>")


def create_tab() -> list[tuple[Any, str, str]]:
    """``on_ui_tabs`` callback: ``[(blocks, "DreamBooth", "dreambooth")]``, built outside any Blocks."""
    _TIMERS_STOPPED.clear()
    return [(build_tab(), TAB_TITLE, TAB_ELEM_ID)]


def stop_timers() -> None:
    """``on_script_unloaded`` callback ("Reload UI"). Polling lives in the page (a JS interval
    that dies with it) and the server keeps no timer, so nothing runs on; a running job is kept
    and the reloaded tab re-attaches to it at its first poll."""
    _TIMERS_STOPPED.set()


# ---------------------------------------------------------------------------------------------
# Standalone: python -m dreambooth ui
# ---------------------------------------------------------------------------------------------
def standalone_blocks(host: Host, initial: TrainingConfig | None = None) -> Any:
    """The tab inside a page laid out like the WebUI's (same element ids), with our CSS and JS."""
    import gradio as gr

    global _HOST
    _HOST = host
    css = (REPO_ROOT / "style.css").read_text(encoding="utf-8")
    script = (REPO_ROOT / "javascript" / "dreambooth.js").read_text(encoding="utf-8")
    tab = build_tab(host, initial)
    with gr.Blocks(css=css, title="DreamBooth", analytics_enabled=False) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem(TAB_TITLE, id=TAB_ELEM_ID, elem_id=f"tab_{TAB_ELEM_ID}"):
                tab.render()
        # The WebUI injects javascript/*.js into its page; standalone, gradio runs it on load.
        demo.load(None, inputs=None, outputs=None, **_js(gr, "() => {\n" + script + "\n}"))
    return demo


def standalone_main(argv: list[str]) -> int:
    """``python -m dreambooth ui [--models-dir DIR] [--port N] [--config FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m dreambooth ui",
                                     description="Serve the DreamBooth tab without the WebUI, on "
                                                 "127.0.0.1.")
    parser.add_argument("--models-dir", default=os.environ.get("DREAMBOOTH_MODELS_DIR", "models"),
                        help="models folder laid out like the WebUI's (Stable-diffusion/, VAE/); "
                             "default ./models")
    parser.add_argument("--port", type=int, default=7861, help="port on 127.0.0.1 (default 7861)")
    parser.add_argument("--config", help="a TrainingConfig JSON to fill the form with")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="another web page allowed to use the API, e.g. "
                             "http://127.0.0.1:3000 (repeatable; default: none but this app)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    models = Path(args.models_dir).expanduser().resolve()
    initial = None
    if args.config:
        try:
            initial = TrainingConfig.load(args.config)
        except ConfigError as exc:
            print(exc)
            return 2
    demo, _, url = standalone_app(models, args.port, args.allow_origin, initial)
    print(f"DreamBooth: serving {url} (models: {models}); Ctrl+C stops", flush=True)

    serve_until_stopped(demo)
    return 0


def standalone_app(models: Path, port: int, allow_origin: list[str] = (),
                   initial: TrainingConfig | None = None) -> tuple[Any, Any, str]:
    """The standalone app serving on 127.0.0.1:``port`` (gradio's thread): (demo, app, URL).
    Every route, gradio's too, is behind ``api.AppGate``: other pages and host names are refused,
    and gradio's file routes serve only the runs' samples and its own temp files."""
    from dreambooth.app import api
    from dreambooth.app.service import sweep_leftovers

    (models / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    host = StandaloneHost(models)
    sweep_leftovers(host)
    work = host.work_root()
    ui_poll.ALLOWED_PATHS[:] = [work]  # gradio 4 takes samples there by path (it copies them)
    demo = standalone_blocks(host, initial)
    demo.queue()
    policy, files = api.RequestPolicy.from_settings({"origins": allow_origin}), api.FileRule(work)
    app, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                              allowed_paths=[str(work)], quiet=True, show_api=False,
                              app_kwargs={"middleware": [api.app_gate(policy, files)]})
    api.drop_wildcard_cors(app)
    api.mount(app, host=host, credentials={}, policy=policy)
    api.guard_app(app, policy, files)  # outermost, now that gradio added its own middleware
    return demo, app, url


def serve_until_stopped(demo: Any, wait_s: float = 60) -> None:
    """Block until Ctrl+C or SIGTERM; then cancel a running job (it stops at a step boundary and
    saves, if set to), and close the server."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        if runner().cancel():
            runner().wait(wait_s)
        demo.close()
