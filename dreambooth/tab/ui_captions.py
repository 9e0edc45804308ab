"""The tab's "Caption pictures" panel: the WebUI's interrogators write caption files for the
instance pictures that have none (``captions.py`` does the work, as a job of the process's
runner: the tab's poll shows its progress and the tab's Cancel stops it, as for training).

``ui.py`` builds the panel inside its Concepts tab and wires its button with
:func:`wire`; the action itself (:func:`start_from_form`) is a plain function, tested without a
browser.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable

from dreambooth.app import service
from dreambooth.app.job import JobBusy
from dreambooth.common.config import ConfigError, TrainingConfig
from dreambooth.data.captions import DEFAULT_INTERROGATOR, INSTANCE, INTERROGATORS, CaptionError
from dreambooth.host import Host
from dreambooth.tab.ui_render import message

NEEDS_WEBUI = ("Captioning uses the WebUI's interrogators (BLIP/CLIP, DeepBooru): it works in "
               "the DreamBooth tab inside AUTOMATIC1111 or Forge, not in this standalone app.")


@dataclass
class CaptionPanel:
    interrogator: Any
    prefix: Any
    overwrite: Any
    button: Any
    note: Any

    @property
    def inputs(self) -> list[Any]:
        return [self.interrogator, self.prefix, self.overwrite]


def interrogator_choices(host: Host) -> list[str]:
    """This WebUI's interrogators, ours in the order of INTERROGATORS (BLIP first)."""
    available = set(host.interrogators())
    return [name for name in INTERROGATORS if name in available]


def panel_note(host: Host) -> str:
    choices = interrogator_choices(host)
    if not choices:
        return f"<div class='dreambooth-note dreambooth-error-text'>{html.escape(NEEDS_WEBUI)}</div>"
    lines = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(INTERROGATORS[n])}</li>"
                    for n in choices)
    return (f"<div class='dreambooth-note'>Writes a caption file (the caption extension under "
            f"Parameters › Pictures &amp; captions) beside each instance picture that has none; "
            f"existing captions are kept unless you tick Overwrite.<ul>{lines}</ul></div>")


def build_panel(gr: Any, host: Host) -> CaptionPanel:
    """The panel's components, in the Blocks context the caller is in."""
    choices = interrogator_choices(host)
    with gr.Accordion("Caption pictures", open=False, elem_id="dreambooth_captions"):
        note = gr.HTML(panel_note(host), elem_id="dreambooth_caption_note")
        with gr.Row():
            interrogator = gr.Dropdown(
                choices=choices, value=(DEFAULT_INTERROGATOR if DEFAULT_INTERROGATOR in choices
                                        else (choices[0] if choices else None)),
                label="Interrogator", elem_id="dreambooth_caption_interrogator",
                info="the WebUI's own; it downloads its model the first time",
                interactive=bool(choices))
            prefix = gr.Textbox("", label="Start every caption with",
                                elem_id="dreambooth_caption_prefix",
                                placeholder=f"e.g. ohwx dog,   or {INSTANCE}",
                                info=f"{INSTANCE} = each concept's instance prompt "
                                     "(without [filewords]); empty: the caption alone")
        with gr.Row():
            overwrite = gr.Checkbox(False, label="Overwrite existing captions",
                                    elem_id="dreambooth_caption_overwrite",
                                    info="off: a picture's caption file is never replaced")
            button = gr.Button("Caption pictures", elem_id="dreambooth_caption",
                               interactive=bool(choices))
    return CaptionPanel(interrogator, prefix, overwrite, button, note)


def start_from_form(make_config: Callable[[], TrainingConfig], interrogator: str | None,
                    prefix: str | None, overwrite: bool | None, host: Host) -> str:
    """The button: start captioning the form's instance folders; a message for the tab."""
    try:
        config = make_config()
    except ConfigError as exc:
        return message("; ".join(str(e) for e in exc.errors), "error")
    try:
        service.start_captions(config, host, interrogator=str(interrogator or DEFAULT_INTERROGATOR),
                               prefix=str(prefix or ""), overwrite=bool(overwrite))
    except (CaptionError, JobBusy) as exc:
        return message(str(exc), "error")
    return message("Captioning… (Cancel stops after the current picture; the captions written "
                   "so far stay)")


def wire(panel: CaptionPanel, form_inputs: list[Any], to_config: Callable[[tuple], TrainingConfig],
         outputs: list[Any], host: Host) -> None:
    """The button reads the form (for the concepts' folders and prompts, the caption extension,
    subfolders, background) and the panel's own fields; its message goes to ``outputs``."""
    count = len(form_inputs)

    def on_caption(*args: Any) -> str:
        return start_from_form(lambda: to_config(args[:count]), *args[count:], host=host)

    panel.button.click(on_caption, inputs=form_inputs + panel.inputs, outputs=outputs, queue=False)
