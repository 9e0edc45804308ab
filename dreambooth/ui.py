"""The DreamBooth tab (gradio 3.41 and 4.40). PLACEHOLDER until the tab issue lands."""
from __future__ import annotations

from typing import Any

TAB_TITLE = "DreamBooth"
TAB_ELEM_ID = "dreambooth"


def create_tab() -> list[tuple[Any, str, str]]:
    """``on_ui_tabs`` callback: ``[(blocks, "DreamBooth", "dreambooth")]``, built outside any Blocks."""
    import gradio as gr  # only the UI needs gradio; importing the package must not

    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown("## DreamBooth\nThe training tab is coming soon.", elem_id="dreambooth_placeholder")
    return [(blocks, TAB_TITLE, TAB_ELEM_ID)]


def stop_timers() -> None:
    """``on_script_unloaded`` callback: stop UI polling before "Reload UI"; a running job keeps going."""
    return None


def standalone_main(argv: list[str]) -> int:
    print("python -m dreambooth ui: the standalone tab is not available yet.")
    return 1
