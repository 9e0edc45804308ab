"""``modules.shared``: cmd_opts, opts, state and the lazily loaded ``sd_model``."""
from __future__ import annotations

import os
import sys
import types

from modules import cmd_args, paths
from modules.options import OptionHTML, OptionInfo, Options, options_section  # noqa: F401  (re-exported like the real one)
from modules.shared_state import State

cmd_opts = cmd_args.parse()
flavour = os.environ.get("FAKE_WEBUI_FLAVOUR", "a1111")  # fake only: a1111, forge, neo, classic

data_path = paths.data_path
models_path = paths.models_path
config_filename = cmd_opts.ui_settings_file or os.path.join(data_path, "config.json")

options_templates: dict = {}
options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint", infotext="Model hash"),
    "sd_checkpoint_dropdown_use_short": OptionInfo(False, "Checkpoint dropdown: use filenames without paths"),
}))
options_templates.update(options_section(("training", "Training", "training"), {
    "unload_models_when_training": OptionInfo(False, "Move VAE and CLIP to RAM when training if possible"),
}))

options_templates.update(options_section(("interrogate", "Interrogate"), {
    "interrogate_keep_models_in_memory": OptionInfo(False, "Keep models in VRAM"),
    "deepbooru_use_spaces": OptionInfo(True, "deepbooru: use spaces in tags"),
}))

if flavour == "neo":  # Neo's UI preset and the checkpoint remembered for each
    options_templates.update(options_section(("presets", "Presets", "presets"), {
        "forge_preset": OptionInfo("sd", "UI preset"),
        **{f"forge_checkpoint_{p}": OptionInfo("", f"Checkpoint ({p})") for p in ("sd", "xl", "flux")},
    }))
opts = Options(options_templates, freeze_settings=cmd_opts.freeze_settings)
state = State()
interrogator = None  # the CLIP interrogator, made by initialize() (shared_init.py in the WebUI)


class Shared(types.ModuleType):
    """Reading ``shared.sd_model`` loads a model when none was ever loaded, as in the WebUI."""

    @property
    def sd_model(self):
        from modules import sd_models
        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models
        sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
