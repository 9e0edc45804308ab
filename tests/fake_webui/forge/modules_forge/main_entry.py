"""Forge's ``modules_forge/main_entry.py``: switching checkpoints records the choice; loading is lazy."""
from __future__ import annotations

from modules import sd_models, shared

model_loading_parameters_refreshed = 0  # fake only: how many times the next load was re-planned


def refresh_model_loading_parameters():
    global model_loading_parameters_refreshed
    model_loading_parameters_refreshed += 1
    # The next read of shared.sd_model loads the newly chosen checkpoint.
    sd_models.model_data.was_loaded_at_least_once = False
    sd_models.model_data.sd_model = None


def _checkpoint_change(ckpt_name: str, save=True, refresh=True, preset=None):
    new_ckpt_info = sd_models.get_closet_checkpoint_match(ckpt_name)
    current_ckpt_info = sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint", ""))
    if new_ckpt_info == current_ckpt_info:
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    if preset is not None:  # Neo remembers the checkpoint per UI preset ("sd", "xl", "flux"...)
        shared.opts.set(f"forge_checkpoint_{preset}", ckpt_name)
    if save:
        shared.opts.save(shared.config_filename)
    if refresh:
        refresh_model_loading_parameters()
    return True


if shared.flavour == "neo":
    def checkpoint_change(ckpt_name: str, preset: str, save=True, refresh=True):
        """Neo: the UI preset is a required argument (it may be None)."""
        return _checkpoint_change(ckpt_name, save, refresh, preset)
else:
    def checkpoint_change(ckpt_name: str, save=True, refresh=True):
        return _checkpoint_change(ckpt_name, save, refresh)


# --- the top bar's checkpoint dropdown (used by tests/fake_webui/page.py) ----------------------
ui_checkpoint = None  # the gr.Dropdown, once make_checkpoint_manager_ui() ran


def refresh_models():
    """Rescan; the dropdown's choices: plain names ("sub/model.safetensors"), never hashes."""
    sd_models.list_models()
    return sd_models.checkpoint_tiles(shared.opts.sd_checkpoint_dropdown_use_short)


def gr_refresh_models():
    import gradio as gr

    return gr.update(choices=refresh_models())  # the value is left alone


def make_checkpoint_manager_ui():
    """As Forge builds it inside the quicksettings row: choices from the list at build time,
    refreshed at every page load and by its own 🔄 (``#forge_refresh_checkpoint``); no
    ``allow_custom_value``, no elem_id (only the ``model_selection`` class)."""
    global ui_checkpoint
    import gradio as gr
    from gradio.context import Context

    from modules import ui_common

    if shared.opts.sd_model_checkpoint in [None, "None", "none", ""]:
        if len(sd_models.checkpoints_list) == 0:
            sd_models.list_models()
        if len(sd_models.checkpoints_list) > 0:
            shared.opts.set("sd_model_checkpoint", next(iter(sd_models.checkpoints_list.values())).name)

    ui_checkpoint = gr.Dropdown(value=lambda: shared.opts.sd_model_checkpoint, label="Checkpoint",
                                elem_classes=["model_selection"], choices=refresh_models())
    refresh_button = ui_common.ToolButton(value=ui_common.refresh_symbol, elem_id="forge_refresh_checkpoint",
                                          tooltip="Refresh")
    refresh_button.click(fn=gr_refresh_models, inputs=[], outputs=[ui_checkpoint], show_progress=False, queue=False)
    Context.root_block.load(fn=gr_refresh_models, inputs=[], outputs=[ui_checkpoint], show_progress=False, queue=False)
    ui_checkpoint.change(checkpoint_change, inputs=[ui_checkpoint], show_progress=False)
    return ui_checkpoint
