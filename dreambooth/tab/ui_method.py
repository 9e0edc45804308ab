"""The tab's training-method parts: which options each method shows (and with which help),
the line under the method, and what a preset sets. Plain data: ui.py turns it into gradio
updates."""
from __future__ import annotations

import html
from typing import Any

from dreambooth.app.presets import preset_values as config_preset_values
from dreambooth.common.config import learning_rate_advice
from dreambooth.tab.ui_fields import (ADAPTERS, APPLIES, CHOICES, GROUPS, METHOD_INFO, applies,
                                      info_for)

_OPTIONS = [name for _, _, items in GROUPS for name, _, _ in items]
# The form's options whose visibility or help depends on the training method.
METHOD_KEYS = list(dict.fromkeys(k for k in (list(APPLIES) + list(METHOD_INFO)) if k in _OPTIONS))


def _default_info(name: str) -> str:
    return next(i for _, _, items in GROUPS for n, _, i in items if n == name)


def method_view(method: str) -> dict[str, dict[str, Any]]:
    """What the form shows of each method-dependent option for ``method``: ``visible`` and,
    where it changes, ``info`` (plain data: the tab turns it into gradio updates)."""
    method = method if method in CHOICES["training_method"] else "full"
    view: dict[str, dict[str, Any]] = {}
    for key in METHOD_KEYS:
        view[key] = {"visible": applies(key, method)}
        if key in METHOD_INFO:
            view[key]["info"] = info_for(key, method, _default_info(key))
    return view


def method_note(method: str, learning_rate: Any = None) -> str:
    """The line under the method: what the run writes and how it is used; a warning when the
    learning rate is one of the other kind of run (1e-6 LoRA learns nothing, 1e-4 full burns)."""
    try:
        lr = float(learning_rate) if learning_rate not in (None, "") else None
    except (TypeError, ValueError):
        lr = None
    warning = ""
    if method in ADAPTERS:
        text = (f"{method}: the base model stays as it is; the run writes a small file to the "
                "Lora folder (always .safetensors), used with <lora:name:1> in a prompt. "
                "EMA, the text encoder and its learning rate apply to the adapter.")
        advice = learning_rate_advice(method, lr) if lr is not None else None
        warning = f"⚠ {advice}." if advice else ""
        from dreambooth.models.adapters import lycoris

        missing = lycoris.unavailable()
        if missing:  # said here, before Train, not by a traceback
            warning = f"⚠ {missing}"
    else:
        text = ("full: every weight of the UNet (and the text encoder when ticked) trains; the "
                "run writes a whole checkpoint.")
        advice = learning_rate_advice("full", lr) if lr is not None else None
        warning = f"⚠ {advice}." if advice else ""
    warn = f" <span class='dreambooth-warning-text'>{html.escape(warning)}</span>" if warning else ""
    return (f"<div class='dreambooth-note' id='dreambooth_method_note_text'>{html.escape(text)}"
            f"{warn}</div>")


def preset_values(name: str) -> dict[str, Any]:
    """What applying preset ``name`` sets (presets.preset_values: every option another preset
    changes goes back to its default, so "person" after "person-lora" is a full run again)."""
    return config_preset_values(name)
