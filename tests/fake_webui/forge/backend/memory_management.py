"""Forge's ``backend/memory_management.py``: models on the GPU are tracked and unloaded together."""
from __future__ import annotations

unloads = 0  # fake only: how many times unload_all_models() ran


def unload_all_models():
    """Forge moves every loaded model to its offload device (the CPU)."""
    global unloads
    unloads += 1
    from modules import sd_models

    for model in sd_models.model_data.loaded_sd_models:
        if model.device != "meta":
            model.to("cpu")
    # Forge forgets them (its current_loaded_models list is emptied); the fake keeps them here
    sd_models.model_data.loaded_sd_models.clear()


def soft_empty_cache(force=False):
    return None


loaded_for_interrogation: list = []  # fake only: what load_models_gpu() was given


def load_models_gpu(models, memory_required=0):
    """Forge puts the given models (ModelPatchers) on the GPU, moving others out if needed."""
    loaded_for_interrogation.extend(models)
