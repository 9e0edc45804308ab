"""The DreamBooth tab, for gradio 3.41 (AUTOMATIC1111 1.10) and 4.40 (Forge), and standalone.

Layout (like the WebUI's own tabs): settings on the left in three sub-tabs (Model, Concepts,
Parameters), actions and live output on the right. One builder per part, each with the wiring
of its own events: ``model_tab``, ``concepts_tab``, ``parameters_tab``, ``run_panel``; they share
the form (:class:`dreambooth.tab.form.TabForm`: every field's component, the state of imported
concepts, the message line). What the buttons do is :mod:`dreambooth.tab.actions`, plain
functions tested without a browser.

How progress reaches the page
-----------------------------
The state of a run lives in the process's job runner (``job.runner().snapshot()``), never in the
page: several browser tabs show the same run, and a reloaded page shows it again at its next poll.
``javascript/dreambooth.js`` clicks a hidden button (``#dreambooth_poll``) every second while the
tab is visible (every 4 s when idle). Its event is registered with ``queue=False``: it is a plain
HTTP request answered at once, never put in gradio's queue, so it does not wait behind a
generation or another long event, and it works the same on gradio 3.41 (which has no
``gr.Timer``) and 4.40. Each browser session keeps what it last received, so the gallery, plot
and log are only re-sent when they changed (no flicker).

Only the ``tab`` package imports gradio; the WebUI is reached only through ``host.py``.
"""
from __future__ import annotations

import dataclasses

import threading
from typing import Any

from dreambooth.app import service
from dreambooth.common.config import TrainingConfig
from dreambooth.host import Host
from dreambooth.tab import concepts_tab, model_tab, parameters_tab, run_panel
# The tab's functions, for the WebUI's script, the standalone app and the tests.
from dreambooth.tab.actions import (check_dataset_report, checkpoint_choices,  # noqa: F401
                                    estimate_html, export_concepts, extract_lora, extract_visible,
                                    identifier_html, load_output, model_name_note, poll,
                                    refresh_checkpoints, restore_form, resume_run, start_from_form,
                                    use_output)
from dreambooth.tab.form import (CONCEPT_SLOTS, NO_TEXT_ENCODER, TabForm,  # noqa: F401
                                 config_to_values, current_host, form_keys, form_to_config,
                                 label_updates, option_names)
from dreambooth.tab.ui_fields import GROUPS, MODEL_FIELDS, NOT_IN_FORM  # noqa: F401
from dreambooth.tab.ui_method import method_note, preset_values  # noqa: F401

__all__ = ["build_tab", "create_tab", "stop_timers", "TAB_TITLE", "TAB_ELEM_ID",
           "check_dataset_report", "checkpoint_choices", "estimate_html", "export_concepts",
           "extract_lora", "extract_visible", "identifier_html", "load_output", "model_name_note",
           "poll", "refresh_checkpoints", "restore_form", "resume_run", "start_from_form",
           "use_output", "CONCEPT_SLOTS", "config_to_values", "current_host", "form_keys",
           "form_to_config", "label_updates", "option_names", "GROUPS", "MODEL_FIELDS",
           "NOT_IN_FORM", "method_note", "preset_values"]
TAB_TITLE = "DreamBooth"
TAB_ELEM_ID = "dreambooth"
_TIMERS_STOPPED = threading.Event()


def starting_config() -> TrainingConfig:
    """A new form's settings: the defaults, but plain AdamW where bitsandbytes is not installed
    (Forge Neo leaves it out unless started with --bnb), since the default 8-bit AdamW would be
    refused there; the optimizer's info says why."""
    from dreambooth.app.card_presets import bitsandbytes_installed

    config = TrainingConfig()
    return config if bitsandbytes_installed() else dataclasses.replace(config, optimizer="adamw")


def build_tab(host: Host | None = None, initial: TrainingConfig | None = None) -> Any:
    """The tab's Blocks (not rendered anywhere yet)."""
    import gradio as gr

    host = host or current_host()
    start_values, start_extra = config_to_values(initial or starting_config(), host)
    # Building the CLIP tokenizer takes seconds: do it now, so the identifier check under the
    # first prompt typed answers at once.
    service.start_tokenizer_build()
    form = TabForm(host, start_values, start_extra)
    with gr.Blocks(analytics_enabled=False) as blocks:
        form.extra_state = gr.State(start_extra)
        with gr.Row(elem_id="dreambooth_main"):
            with gr.Column(scale=3, elem_id="dreambooth_settings"):
                # selected: gradio 4 warns "Attempted to select a non-interactive or hidden tab"
                # after each tab registers while a Tabs has no selection
                with gr.Tabs(elem_id="dreambooth_settings_tabs", selected="dreambooth_tab_model"):
                    model = model_tab.build(gr, form)
                    concepts = concepts_tab.build(gr, form)
                    parameters = parameters_tab.build(gr, form)
            with gr.Column(scale=2, elem_id="dreambooth_output_column"):
                panel = run_panel.build(gr, form)
        run_panel.wire_poll(gr, form, panel, model.previous)
        model_tab.wire(gr, form, model)
        concepts_tab.wire(gr, form, concepts)
        parameters_tab.wire(gr, form, parameters)
        run_panel.wire(gr, form, panel)
    blocks.dreambooth_components = form.comps  # for tests and for other scripts that want them
    return blocks


def create_tab() -> list[tuple[Any, str, str]]:
    """``on_ui_tabs`` callback: ``[(blocks, "DreamBooth", "dreambooth")]``, built outside any Blocks."""
    _TIMERS_STOPPED.clear()
    return [(build_tab(), TAB_TITLE, TAB_ELEM_ID)]


def stop_timers() -> None:
    """``on_script_unloaded`` callback ("Reload UI"). Polling lives in the page (a JS interval
    that dies with it) and the server keeps no timer, so nothing runs on; a running job is kept
    and the reloaded tab re-attaches to it at its first poll."""
    _TIMERS_STOPPED.set()
