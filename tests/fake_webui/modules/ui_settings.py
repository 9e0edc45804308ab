"""``modules/ui_settings.py``: the quicksettings row at the top of the page and the hidden
``#change_checkpoint`` button that the page's ``selectCheckpoint(name)`` clicks.

A1111 1.10: the row holds the ``sd_model_checkpoint`` setting as a dropdown
(``#setting_sd_model_checkpoint``, choices = titles "name [hash]") with its 🔄
(``#refresh_sd_model_checkpoint``); the hidden button runs ``run_settings_single``.
Forge 2.0: the row starts with ``modules_forge.main_entry.make_checkpoint_manager_ui()``
(choices = plain names); the hidden button maps the name with ``match_checkpoint_to_name``.
"""
from __future__ import annotations

import gradio as gr

from modules import sd_models, shared, ui_common

_GRADIO4 = int(gr.__version__.split(".")[0]) >= 4

opts = shared.opts
component_dict: dict = {}
text_settings = None
dummy_component = None


def _js(code: str) -> dict:
    return {"js": code} if _GRADIO4 else {"_js": code}


def checkpoint_component_args() -> dict:
    """A1111's ``component_args`` of the sd_model_checkpoint option."""
    return {"choices": sd_models.checkpoint_tiles(opts.sd_checkpoint_dropdown_use_short)}


def match_checkpoint_to_name(name):
    """Forge's ``sd_models.match_checkpoint_to_name``: a title or name -> the dropdown's format."""
    name = name.split(" [")[0]
    for info in sd_models.checkpoints_list.values():
        title = info.title.split(" [")[0]
        if (name in title) or (title in name):
            return info.short_title if opts.sd_checkpoint_dropdown_use_short else info.name.split(" [")[0]
    return name


def get_value_for_setting(key):
    args = checkpoint_component_args() if key == "sd_model_checkpoint" else {}
    return gr.update(value=getattr(opts, key), **args)


def run_settings_single(value, key):
    if value is None or not opts.set(key, value):
        return gr.update(value=getattr(opts, key)), opts.dumpjson()
    opts.save(shared.config_filename)
    return get_value_for_setting(key), opts.dumpjson()


def add_quicksettings():
    with gr.Row(elem_id="quicksettings", variant="compact"):
        if shared.flavour in ("forge", "neo"):
            from modules_forge import main_entry

            main_entry.make_checkpoint_manager_ui()
        else:
            key = "sd_model_checkpoint"
            info = opts.data_labels[key]
            component = gr.Dropdown(label=info.label, value=opts.data.get(key), elem_id=f"setting_{key}",
                                    **checkpoint_component_args())
            ui_common.create_refresh_button(component, sd_models.list_models, checkpoint_component_args,
                                            f"refresh_{key}")
            component_dict[key] = component


def add_functionality(demo):
    """After the tabs: the settings JSON, the hidden button, the page-load value refresh."""
    global text_settings, dummy_component
    text_settings = gr.Textbox(elem_id="settings_json", value=lambda: opts.dumpjson(), visible=False)
    dummy_component = gr.Textbox(visible=False, value="")
    button = gr.Button("Change checkpoint", elem_id="change_checkpoint", visible=False)
    if shared.flavour in ("forge", "neo"):
        from modules_forge import main_entry

        def button_set_checkpoint_change(model, dummy):
            return match_checkpoint_to_name(model), opts.dumpjson()

        button.click(fn=button_set_checkpoint_change,
                     inputs=[main_entry.ui_checkpoint, dummy_component],
                     outputs=[main_entry.ui_checkpoint, text_settings],
                     **_js("function(c, n){ var ckpt = desiredCheckpointName; desiredCheckpointName = null;"
                           " return [ckpt || c, null]; }"))
        return
    component = component_dict["sd_model_checkpoint"]
    component.change(fn=lambda value: run_settings_single(value, key="sd_model_checkpoint"),
                     inputs=[component], outputs=[component, text_settings], show_progress=False)
    button.click(fn=lambda value, _: run_settings_single(value, key="sd_model_checkpoint"),
                 inputs=[component, dummy_component], outputs=[component, text_settings],
                 **_js("function(v){ var res = desiredCheckpointName; desiredCheckpointName = '';"
                       " return [res || v, null]; }"))
    demo.load(fn=lambda: get_value_for_setting("sd_model_checkpoint"), inputs=[], outputs=[component], queue=False)
