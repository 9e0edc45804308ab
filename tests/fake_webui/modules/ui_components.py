"""``modules/ui_components.py``: the WebUI's form helpers, on gradio 3.41 (A1111) and 4.40 (Forge)."""
from __future__ import annotations

import functools

import gradio as gr

_GRADIO4 = int(gr.__version__.split(".")[0]) >= 4


class FormComponent:
    def get_expected_parent(self):
        return gr.components.Form


gr.Dropdown.get_expected_parent = FormComponent.get_expected_parent


class ToolButton(FormComponent, gr.Button):
    """Small button with single emoji as text, fits inside gradio forms"""

    @functools.wraps(gr.Button.__init__)  # as the real one: gradio 4 reads the signature
    def __init__(self, *args, **kwargs):
        classes = kwargs.pop("elem_classes", [])
        # The WebUI patches gradio to accept tooltip=; plain gradio does not know it.
        self.tooltip = kwargs.pop("tooltip", None)
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

    def get_block_name(self):
        return "button"


class FormRow(FormComponent, gr.Row):
    """Same as gr.Row but fits inside gradio forms"""

    def get_block_name(self):
        return "row"


class FormColumn(FormComponent, gr.Column):
    """Same as gr.Column but fits inside gradio forms"""

    def get_block_name(self):
        return "column"


class FormGroup(FormComponent, gr.Group):
    """Same as gr.Group but fits inside gradio forms"""

    def get_block_name(self):
        return "group"


class InputAccordion(gr.Checkbox):
    """A gr.Accordion that can be used as an input - returns True if open, False if closed."""

    global_index = 0

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id")
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordion.global_index}"
            InputAccordion.global_index += 1
        kwargs_checkbox = {**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False}
        super().__init__(value, **kwargs_checkbox)
        js = 'function(checked){ inputAccordionChecked("' + self.accordion_id + '", checked); }'
        # Forge shims _js= into js=; gradio 4 itself only knows js=.
        self.change(fn=None, inputs=[self], **({"js": js} if _GRADIO4 else {"_js": js}))
        kwargs_accordion = {
            **kwargs,
            "elem_id": self.accordion_id,
            "label": kwargs.get("label", "Accordion"),
            "elem_classes": ["input-accordion"],
            "open": value,
        }
        kwargs_accordion.pop("info", None)
        self.accordion = gr.Accordion(**kwargs_accordion)

    def extra(self):
        return gr.Column(elem_id=self.accordion_id + "-extra", elem_classes="input-accordion-extra", min_width=0)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"
