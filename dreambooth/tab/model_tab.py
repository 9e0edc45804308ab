"""The Model sub-tab: the base model (the WebUI's list), the VAE, prediction type and EMA, the
new model's name and the file it writes, the previous runs (load their settings, resume, compare
them: :mod:`dreambooth.tab.ui_compare`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dreambooth.app import service
from dreambooth.common.config import ConfigError
from dreambooth.tab.actions import (checkpoint_choices, model_name_note, refresh_checkpoints,
                                    resolution_info, resume_run, run_choices,
                                    text_encoder_choices, vae_choices)
from dreambooth.tab import ui_compare
from dreambooth.tab.form import AUTO, LABELS, TabForm
from dreambooth.tab.ui_fields import BASE_DEPENDENT, shown_for_base
from dreambooth.tab.ui_render import message
from dreambooth.tab.widgets import HIDDEN, tool_button


@dataclass
class ModelTab:
    refresh_models: Any
    refresh_vaes: Any
    text_encoders: Any  # the row of Flux's text encoder files, shown for a Flux base
    model_kind: Any
    name_note: Any
    previous: Any
    refresh_runs: Any
    load_settings: Any
    resume: Any
    compare: ui_compare.CompareBox


def build(gr, form: TabForm) -> ModelTab:
    host, start, comps = form.host, form.start_values, form.comps
    with gr.Tab("Model", id="dreambooth_tab_model", elem_id="dreambooth_tab_model"):
        with gr.Row():
            comps["base_model"] = gr.Dropdown(
                choices=checkpoint_choices(host), value=start["base_model"] or None,
                label=LABELS["base_model"], elem_id="dreambooth_base_model",
                info="the checkpoint to start from (the WebUI's list); it is never modified",
                allow_custom_value=True)
            refresh_models = tool_button(gr, "\U0001f504", "dreambooth_refresh_models",
                                         "Refresh the checkpoint list")
        model_kind = gr.HTML(service.describe_model(host, start["base_model"]),
                             elem_id="dreambooth_model_kind")
        with gr.Row():
            comps["vae_path"] = gr.Dropdown(
                choices=vae_choices(host), value=start["vae_path"], label=LABELS["vae_path"],
                elem_id="dreambooth_vae_path", info="a separate VAE from models/VAE (the seed's "
                "--pretrained_vae_name_or_path)", allow_custom_value=True)
            refresh_vaes = tool_button(gr, "\U0001f504", "dreambooth_refresh_vaes",
                                       "Refresh the VAE list")
        with gr.Row(visible=service.is_flux_base(host, start["base_model"]),
                    elem_id="dreambooth_text_encoders") as text_encoders:
            for name, info in (("clip_l_path", "clip_l.safetensors from models/text_encoder"),
                               ("t5xxl_path", "t5xxl_fp16.safetensors from models/text_encoder")):
                comps[name] = gr.Dropdown(
                    choices=text_encoder_choices(host), value=start[name], label=LABELS[name],
                    elem_id=f"dreambooth_{name}", allow_custom_value=True,
                    info=f"{info}: needed when the Flux file holds only the transformer")
        with gr.Row():
            comps["prediction_type"] = gr.Dropdown(
                choices=[AUTO, "epsilon", "v_prediction", "flow"],
                value=start["prediction_type"],
                label=LABELS["prediction_type"], elem_id="dreambooth_prediction_type",
                info="v_prediction for SD 2.x 768 models; flow: rectified-flow SDXL (Forge Neo: "
                     "'rectified' in the file's path); auto reads the checkpoint")
            comps["base_use_ema"] = gr.Checkbox(
                value=start["base_use_ema"], label=LABELS["base_use_ema"],
                elem_id="dreambooth_base_use_ema",
                info="when the file holds EMA weights (model_ema.*)")
        comps["model_name"] = gr.Textbox(
            value=start["model_name"], label=LABELS["model_name"], elem_id="dreambooth_model_name",
            info="file name of the result in the checkpoints folder")
        name_note = gr.HTML(model_name_note(start["model_name"], host=host,
                                            method=start["training_method"]),
                            elem_id="dreambooth_name_note")
        with gr.Row():
            previous = gr.Dropdown(choices=run_choices(host), value=None, label="Previous runs",
                                   elem_id="dreambooth_runs", info="reload a run's settings, or "
                                   "resume it from its latest resume point")
            refresh_runs = tool_button(gr, "\U0001f504", "dreambooth_refresh_runs",
                                       "Refresh the list of runs")
        with gr.Row():
            load_settings = gr.Button("Load its settings", elem_id="dreambooth_load_settings")
            resume = gr.Button("Resume", elem_id="dreambooth_resume")
        compare = ui_compare.build(gr, host)
    return ModelTab(refresh_models, refresh_vaes, text_encoders, model_kind, name_note, previous, refresh_runs,
                    load_settings, resume, compare)


def wire(gr, form: TabForm, tab: ModelTab) -> None:
    host, comps = form.host, form.comps

    def on_refresh_models(current):
        choices, value = refresh_checkpoints(current, host)
        return gr.update(choices=choices, value=value or None)

    tab.refresh_models.click(on_refresh_models, inputs=[comps["base_model"]],
                             outputs=[comps["base_model"]], queue=False)
    tab.refresh_vaes.click(lambda: gr.update(choices=vae_choices(host)),
                           outputs=[comps["vae_path"]], queue=False)
    tab.refresh_runs.click(lambda chosen: (gr.update(choices=run_choices(host)),
                                           ui_compare.refreshed_runs(gr, host, chosen)),
                           inputs=[tab.compare.runs], outputs=[tab.previous, tab.compare.runs],
                           queue=False)
    def on_base_model(base):
        flow = service.flow_base(host, base or "")
        shown = shown_for_base(flow)
        return (service.describe_model(host, base or ""),
                gr.update(info=resolution_info(base, host)), gr.update(visible=flow == "flux"),
                *(gr.update(visible=shown[name]) for name in BASE_DEPENDENT))

    # the parts of one kind of base (Flux's text encoder files and options, the flow options
    # of Flux and rectified-flow SDXL) follow the base model
    comps["base_model"].change(on_base_model, inputs=[comps["base_model"]],
                               outputs=[tab.model_kind, comps["resolution"], tab.text_encoders]
                               + [comps[name] for name in BASE_DEPENDENT],
                               queue=False, show_progress=HIDDEN)
    naming = [comps["model_name"], comps["overwrite"], comps["training_method"]]
    for trigger in naming:
        trigger.change(lambda name, over, method: model_name_note(name, over, host, method),
                       inputs=naming, outputs=[tab.name_note], queue=False, show_progress=HIDDEN)

    def on_load_settings(name):
        if not name:
            return form.unchanged(gr, 2) + [message("Choose a previous run.", "error")]
        try:
            config = service.run_config(host, name)
        except (ConfigError, ValueError) as exc:
            return form.unchanged(gr, 2) + [message(str(exc), "error")]
        return form.fill(gr, config) + [message(f"Loaded the settings of {name}.")]

    tab.load_settings.click(on_load_settings, inputs=[tab.previous],
                            outputs=form.fields + [form.extra_state, form.extra_note,
                                                   form.action_msg])
    tab.resume.click(lambda name: resume_run(name, host), inputs=[tab.previous],
                     outputs=[form.action_msg])
    ui_compare.wire(gr, tab.compare, host)
