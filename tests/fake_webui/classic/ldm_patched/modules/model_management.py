"""Forge Classic's ``ldm_patched/modules/model_management.py`` (ComfyUI's memory manager): the
loaded model's weights stay referenced in ``current_loaded_models`` until
``unload_all_models()``; Classic's ``send_model_to_trash`` does nothing, so this is the only way
to let them go."""
from __future__ import annotations

current_loaded_models: list = []
unloads = 0  # fake only: how many times unload_all_models() ran


def load_models_gpu(models, memory_required=0):
    for model in models:
        if model not in current_loaded_models:
            current_loaded_models.insert(0, model)


def unload_all_models():
    global unloads
    unloads += 1
    for model in current_loaded_models:
        model.to("meta")  # the fake's way of saying "its memory is freed"
    current_loaded_models.clear()


def soft_empty_cache(force=False):
    return None
