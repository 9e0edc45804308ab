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


def checkpoint_change(ckpt_name: str, save=True, refresh=True):
    new_ckpt_info = sd_models.get_closet_checkpoint_match(ckpt_name)
    current_ckpt_info = sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint", ""))
    if new_ckpt_info == current_ckpt_info:
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    if save:
        shared.opts.save(shared.config_filename)
    if refresh:
        refresh_model_loading_parameters()
    return True
