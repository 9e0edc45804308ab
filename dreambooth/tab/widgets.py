"""gradio widgets as the WebUI's own forms make them, on gradio 3.41 and 4.40."""
from __future__ import annotations

from typing import Any

from dreambooth.host import tool_button_class
from dreambooth.tab.ui_fields import CHOICES

# No spinner over small live-updating parts (gradio 3.41 and 4.x both take "hidden").
HIDDEN = "hidden"


def _gradio4(gr) -> bool:
    return int(gr.__version__.split(".")[0]) >= 4


def js(gr, code: str) -> dict[str, str]:
    """gradio 3 calls it ``_js``, gradio 4 ``js`` (Forge shims ``_js`` too; plain 4.40 does not)."""
    return {"js": code} if _gradio4(gr) else {"_js": code}


def tool_button(gr, value: str, elem_id: str, tooltip: str):
    cls = tool_button_class()
    if cls is not None:
        try:
            return cls(value=value, elem_id=elem_id, tooltip=tooltip)
        except TypeError:
            return cls(value=value, elem_id=elem_id)
    return gr.Button(value=value, elem_id=elem_id, elem_classes=["tool", "dreambooth-tool"],
                     scale=0, min_width=40)


def component(gr, key: str, label: str, info: str, value: Any, visible: bool = True):
    elem_id = "dreambooth_" + key.replace(".", "_")
    common = dict(label=label, elem_id=elem_id)
    if not visible:
        common["visible"] = False
    if info:
        common["info"] = info
    name = key.split(".")[-1]
    if name in CHOICES:
        return gr.Dropdown(choices=list(CHOICES[name]), value=value, **common)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, **common)
    if isinstance(value, int) or name == "num_class_images":
        return gr.Number(value=value or 0, precision=0, **common)
    if isinstance(value, float):
        return gr.Number(value=value, **common)
    if isinstance(value, list):
        return gr.Textbox(value="\n".join(value), lines=3, **common)
    return gr.Textbox(value=value, **common)
