"""The Parameters sub-tab: the training method first (what the run trains and writes), presets
and card-size presets, the estimate line, then every other option in its group."""
from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from typing import Any

from dreambooth.app import service
from dreambooth.app.card_presets import CARDS
from dreambooth.app.presets import PRESETS
from dreambooth.common.config import ConfigError
from dreambooth.tab.actions import estimate_html, resolution_info
from dreambooth.tab.form import CONCEPT_SLOTS, TabForm, form_keys, form_to_config, rows, values_of
from dreambooth.tab.ui_fields import GROUPS, shown_for_base
from dreambooth.tab.ui_method import METHOD_KEYS, method_note, method_view, preset_values
from dreambooth.tab.ui_render import message
from dreambooth.tab.widgets import HIDDEN, component

# What the estimate line follows (besides the concepts' folders).
ESTIMATE_FIELDS = ("base_model", "max_train_steps", "train_batch_size",
                   "gradient_accumulation_steps", "recursive", "optimizer", "train_text_encoder",
                   "gradient_checkpointing", "resolution", "mixed_precision", "training_method",
                   "lora_rank", "lora_conv_rank", "cache_text_embeddings", "fused_backward",
                   "trained_precision", "base_weights_8bit", "base_weights_4bit",
                   "blocks_to_swap", "with_prior_preservation")


@dataclass
class ParametersTab:
    method_box: Any
    preset: Any
    apply_preset: Any
    card: Any
    apply_card: Any
    estimate: Any


def _option_rows(gr, form: TabForm, items, view: dict[str, dict]) -> None:
    """Two fields a row, as the WebUI's own forms; text fields alone; the options of other
    training methods hidden."""
    for row in rows(items):
        with gr.Row():
            for name, label, info in row:
                if name == "resolution":
                    info = resolution_info(form.start_values["base_model"], form.host)
                shown = view.get(name, {})
                form.comps[name] = component(gr, name, label, shown.get("info", info),
                                             form.start_values[name],
                                             visible=shown.get("visible", True))


def build(gr, form: TabForm) -> ParametersTab:
    start = form.start_values
    view = method_view(start["training_method"])
    shown = shown_for_base(service.flow_base(form.host, start["base_model"] or ""))
    view.update({name: {"visible": visible} for name, visible in shown.items()})
    with gr.Tab("Parameters", id="dreambooth_tab_parameters", elem_id="dreambooth_tab_parameters"):
        # what the run trains first, unfolded: the rest of the form follows it
        with gr.Column(elem_id="dreambooth_group_method", elem_classes=["dreambooth-method"]):
            _option_rows(gr, form, next(items for group_id, _, items in GROUPS
                                        if group_id == "method"), view)
            method_box = gr.HTML(method_note(start["training_method"], start["learning_rate"]),
                                 elem_id="dreambooth_method_note")
        with gr.Row():
            preset = gr.Dropdown(choices=list(PRESETS), value=None, label="Preset",
                                 elem_id="dreambooth_preset",
                                 info="person / object: DreamBooth with prior preservation; "
                                      "style: native training with captions and buckets; "
                                      "-lora: the same as a LoRA (style-lora: LoCon)")
            apply_preset = gr.Button("Apply preset", elem_id="dreambooth_apply_preset", scale=0,
                                     min_width=140)
            card = gr.Dropdown(choices=list(CARDS), value=None, label="Card size",
                               elem_id="dreambooth_card",
                               info="the memory settings that fit this GPU (estimate below)")
            apply_card = gr.Button("Fit to card", elem_id="dreambooth_apply_card", scale=0,
                                   min_width=140)
        estimate = gr.HTML("", elem_id="dreambooth_estimate")
        for group_id, title, items in GROUPS:
            if group_id != "method":
                with gr.Accordion(title, open=group_id == "basics",
                                  elem_id=f"dreambooth_group_{group_id}"):
                    _option_rows(gr, form, items, view)
    return ParametersTab(method_box, preset, apply_preset, card, apply_card, estimate)


def wire(gr, form: TabForm, tab: ParametersTab) -> None:
    comps, host = form.comps, form.host

    def on_preset(name):
        if not name or name not in PRESETS:
            return form.unchanged(gr)
        chosen = preset_values(name)
        return [gr.update(value=chosen[k]) if k in chosen else gr.update() for k in form_keys()]

    tab.apply_preset.click(on_preset, inputs=[tab.preset], outputs=form.fields, queue=False)

    def on_card(name, *args):  # the memory fields of the rung that fits, and what it changed
        try:
            config, _ = form_to_config(*values_of(args))
            # the base model's family, from its file (a WebUI title resolved first)
            base = service.resolve_base_model(config.base_model, host)
            if base is not None:
                config = dataclasses.replace(config, base_model=str(base))
            choice = service.card_preset(name, config)
        except ConfigError as exc:
            return form.unchanged(gr) + [message(str(exc), "error")]
        updates = [gr.update(value=choice.values[k]) if k in choice.values else gr.update()
                   for k in form_keys()]
        said = "<br>".join(html.escape(t) for t in [choice.line()] + choice.change_lines())
        return updates + [f"<div class='dreambooth-note'>{said}</div>"]

    tab.apply_card.click(on_card, inputs=[tab.card] + form.inputs,
                         outputs=form.fields + [tab.estimate], queue=False)

    # the options of the chosen training method only (a filled form changes the method's
    # value, which comes here too)
    def on_method(method, learning_rate):
        view = method_view(method)
        return [gr.update(**view[k]) for k in METHOD_KEYS] + [method_note(method, learning_rate)]

    method_inputs = [comps["training_method"], comps["learning_rate"]]
    comps["training_method"].change(on_method, inputs=method_inputs,
                                    outputs=[comps[k] for k in METHOD_KEYS] + [tab.method_box],
                                    queue=False, show_progress=HIDDEN)
    comps["learning_rate"].change(method_note, inputs=method_inputs, outputs=[tab.method_box],
                                  queue=False, show_progress=HIDDEN)

    triggers = [comps[k] for k in ESTIMATE_FIELDS]
    triggers += [comps[f"concepts.{i}.instance_data_dir"] for i in range(CONCEPT_SLOTS)]
    for trigger in triggers:
        trigger.change(lambda *args: estimate_html(*values_of(args), host), inputs=form.inputs,
                       outputs=[tab.estimate], queue=False, show_progress=HIDDEN)
