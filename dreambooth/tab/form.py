"""The tab's form as data: which options it shows in which order, their labels, the host it
works with, and the conversions between form values and a TrainingConfig (pure functions, tested
without a browser)."""
from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth.app import service
from dreambooth.common.config import FieldError, TrainingConfig
from dreambooth.host import Host, get_host
from dreambooth.tab.ui_fields import CONCEPT_FIELDS, GROUPS, MODEL_FIELDS

CONCEPT_SLOTS = 4
AUTO = "auto (from the checkpoint)"
NO_VAE = "None (the checkpoint's own)"
NO_TEXT_ENCODER = "None (the checkpoint's own)"

# The host the tab works with: the WebUI's, or the one standalone_main() sets.
_HOST: Host | None = None


def current_host() -> Host:
    return _HOST if _HOST is not None else get_host()


def option_names() -> list[str]:
    return [name for _, _, items in GROUPS for name, _, _ in items]


def form_keys() -> list[str]:
    """The order of the form's values everywhere in this module."""
    keys = list(MODEL_FIELDS)
    keys += [f"concepts.{i}.{name}" for i in range(CONCEPT_SLOTS) for name, _, _ in CONCEPT_FIELDS]
    return keys + option_names()


def _labels() -> dict[str, str]:
    labels = {"base_model": "Base model", "vae_path": "VAE", "prediction_type": "Prediction type",
              "clip_l_path": "Flux: CLIP-L", "t5xxl_path": "Flux: T5-XXL",
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
    for name in ("clip_l_path", "t5xxl_path"):
        chosen = str(values.get(name) or "")
        data[name] = "" if chosen == NO_TEXT_ENCODER else chosen
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
                  clip_l_path=config.clip_l_path or NO_TEXT_ENCODER,
                  t5xxl_path=config.t5xxl_path or NO_TEXT_ENCODER,
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


def values_of(args: tuple) -> tuple[dict[str, Any], list]:
    keys = form_keys()
    return dict(zip(keys, args[:len(keys)])), (args[len(keys)] if len(args) > len(keys) else []) or []


def set_host(host: Host | None) -> None:
    """The host the tab works with from now on (the standalone app's; None: the WebUI's)."""
    global _HOST
    _HOST = host


def rows(items: list[tuple[str, str, str]]) -> list[list[tuple[str, str, str]]]:
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


def extra_note(extra: list) -> str:
    if not extra:
        return "<div class='dreambooth-note'></div>"
    return (f"<div class='dreambooth-note'>{len(extra)} more concept(s) from the imported file "
            f"are kept and trained too (only {CONCEPT_SLOTS} are shown).</div>")


@dataclass
class TabForm:
    """The form while the tab is built: the host, the values it starts with, each field's
    component by form key, the state that keeps imported concepts beyond the rows, and the
    outputs several sub-tabs update (the message line, the note on those extra concepts)."""

    host: Host
    start_values: dict[str, Any]
    start_extra: list
    comps: dict[str, Any] = field(default_factory=dict)
    extra_state: Any = None
    extra_note: Any = None
    action_msg: Any = None

    @property
    def fields(self) -> list[Any]:
        """Every field's component, in form_keys() order (what handlers take and update)."""
        return [self.comps[k] for k in form_keys()]

    @property
    def inputs(self) -> list[Any]:
        return self.fields + [self.extra_state]

    def fill(self, gr, config: TrainingConfig) -> list[Any]:
        """Updates that put ``config`` in the form (fields, extra concepts, their note)."""
        values, extra = config_to_values(config, self.host)
        return [gr.update(value=values[k]) for k in form_keys()] + [extra, extra_note(extra)]

    def unchanged(self, gr, extra: int = 0) -> list[Any]:
        """No change to the fields (and to ``extra`` more outputs)."""
        return [gr.update() for _ in range(len(form_keys()) + extra)]

