"""The tab's "Caption pictures" panel: our captioners (WD tagger v3, BLIP; they need no WebUI),
and the WebUI's interrogators where the host has them, write caption files for the instance
pictures that have none (``captions.py`` does the work, as a job of the process's runner: the
tab's poll shows its progress and the tab's Cancel stops it, as for training).

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
from dreambooth.data import captions
from dreambooth.data.captioners import CAPTIONERS, TaggerOptions, is_tagger
from dreambooth.data.captions import INSTANCE, CaptionError
from dreambooth.host import Host
from dreambooth.tab.ui_render import message

TAGGER_DEFAULTS = TaggerOptions()


@dataclass
class CaptionPanel:
    interrogator: Any  # the captioner dropdown (ours and the WebUI's)
    prefix: Any
    overwrite: Any
    button: Any
    note: Any
    tagger_box: Any = None  # the tagger's options, shown when a tagger is chosen
    tagger_fields: tuple = ()  # in TaggerOptions' order (see tagger_from_form)
    gr: Any = None

    @property
    def inputs(self) -> list[Any]:
        return [self.interrogator, self.prefix, self.overwrite, *self.tagger_fields]


def interrogator_choices(host: Host) -> list[str]:
    """Our captioners always, then this WebUI's interrogators (BLIP first)."""
    return captions.choices(host.interrogators())


def panel_note(host: Host) -> str:
    webui = [n for n in captions.INTERROGATORS if n in set(host.interrogators())]
    lines = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(captions.describe(n))}</li>"
                    for n in list(CAPTIONERS) + webui)
    folder = html.escape(str(captions.models_root(host)))
    where = ("" if webui else "<br>There are no WebUI interrogators here (blip, clip, deepbooru): "
             "ours need no WebUI.")
    return (f"<div class='dreambooth-note'>Writes a caption file (the caption extension under "
            f"Parameters › Pictures &amp; captions) beside each instance picture that has none; "
            f"existing captions are kept unless you tick Overwrite. Our captioners download "
            f"their model the first time into <code>{folder}</code> (one folder per model; "
            f"offline, put its files there by hand).{where}<ul>{lines}</ul></div>")


def tagger_from_form(general: Any = None, character: Any = None, rating: Any = None,
                     characters: Any = None, underscores: Any = None, exclude: Any = None,
                     max_tags: Any = None) -> TaggerOptions:
    """The panel's tagger fields as TaggerOptions (a field left empty keeps its default)."""
    d = TAGGER_DEFAULTS

    def pick(value: Any, default: Any, kind: Callable[[Any], Any]) -> Any:
        return default if value is None or value == "" else kind(value)

    return TaggerOptions(
        general_threshold=pick(general, d.general_threshold, float),
        character_threshold=pick(character, d.character_threshold, float),
        include_rating=pick(rating, d.include_rating, bool),
        include_characters=pick(characters, d.include_characters, bool),
        underscores_to_spaces=pick(underscores, d.underscores_to_spaces, bool),
        exclude=TaggerOptions.parse_exclude(exclude),
        max_tags=pick(max_tags, d.max_tags, lambda v: int(float(v))))


def build_panel(gr: Any, host: Host) -> CaptionPanel:
    """The panel's components, in the Blocks context the caller is in."""
    choices = interrogator_choices(host)
    chosen = captions.default_captioner(host.interrogators())
    d = TAGGER_DEFAULTS
    with gr.Accordion("Caption pictures", open=False, elem_id="dreambooth_captions"):
        note = gr.HTML(panel_note(host), elem_id="dreambooth_caption_note")
        with gr.Row():
            interrogator = gr.Dropdown(
                choices=choices, value=chosen, label="Captioner",
                elem_id="dreambooth_caption_interrogator",
                info="ours (blip-*, wd-*-tagger-v3) download their model the first time; "
                     "blip / clip / deepbooru are the WebUI's own")
            prefix = gr.Textbox("", label="Start every caption with",
                                elem_id="dreambooth_caption_prefix",
                                placeholder=f"e.g. ohwx dog,   or {INSTANCE}",
                                info=f"{INSTANCE} = each concept's instance prompt "
                                     "(without [filewords]); empty: the caption alone")
        with gr.Group(visible=is_tagger(chosen), elem_id="dreambooth_caption_tagger") as box:
            with gr.Row():
                general = gr.Slider(0.0, 1.0, value=d.general_threshold, step=0.01,
                                    label="General tags threshold",
                                    elem_id="dreambooth_caption_general_threshold",
                                    info="a tag is written above this confidence; lower: more tags")
                character = gr.Slider(0.0, 1.0, value=d.character_threshold, step=0.01,
                                      label="Character tags threshold",
                                      elem_id="dreambooth_caption_character_threshold",
                                      info="for tags naming a known character")
                max_tags = gr.Number(d.max_tags, label="Max tags", precision=0,
                                     elem_id="dreambooth_caption_max_tags",
                                     info="the most confident first; 0: no limit")
            with gr.Row():
                rating = gr.Checkbox(d.include_rating, label="Include the rating tag",
                                     elem_id="dreambooth_caption_rating",
                                     info="general / sensitive / questionable / explicit")
                characters = gr.Checkbox(d.include_characters, label="Include character tags",
                                         elem_id="dreambooth_caption_characters")
                underscores = gr.Checkbox(d.underscores_to_spaces,
                                          label="Underscores to spaces",
                                          elem_id="dreambooth_caption_underscores",
                                          info="long_hair -> long hair (kaomoji like ^_^ kept)")
            exclude = gr.Textbox("", label="Tags to leave out", elem_id="dreambooth_caption_exclude",
                                 placeholder="e.g. 1girl, solo, simple background",
                                 info="comma-separated; the tag your identifier stands for "
                                      "is a good one to leave out")
        with gr.Row():
            overwrite = gr.Checkbox(False, label="Overwrite existing captions",
                                    elem_id="dreambooth_caption_overwrite",
                                    info="off: a picture's caption file is never replaced")
            button = gr.Button("Caption pictures", elem_id="dreambooth_caption")
    fields = (general, character, rating, characters, underscores, exclude, max_tags)
    return CaptionPanel(interrogator, prefix, overwrite, button, note, box, fields, gr)


def start_from_form(make_config: Callable[[], TrainingConfig], captioner: str | None,
                    prefix: str | None, overwrite: bool | None, *tagger_values: Any,
                    host: Host) -> str:
    """The button: start captioning the form's instance folders; a message for the tab.
    ``tagger_values`` are the tagger's fields in :func:`tagger_from_form`'s order."""
    try:
        config = make_config()
    except ConfigError as exc:
        return message("; ".join(str(e) for e in exc.errors), "error")
    try:
        tagger = tagger_from_form(*tagger_values)
        service.start_captions(config, host, captioner=str(captioner or "") or None,
                               prefix=str(prefix or ""), overwrite=bool(overwrite),
                               tagger=tagger)
    except (CaptionError, JobBusy) as exc:
        return message(str(exc), "error")
    except (TypeError, ValueError) as exc:  # a field that is not a number
        return message(f"tagger options: {exc}", "error")
    return message("Captioning… (Cancel stops after the current picture; the captions written "
                   "so far stay)")


def wire(panel: CaptionPanel, form_inputs: list[Any], to_config: Callable[[tuple], TrainingConfig],
         outputs: list[Any], host: Host) -> None:
    """The button reads the form (for the concepts' folders and prompts, the caption extension,
    subfolders, background) and the panel's own fields; its message goes to ``outputs``. The
    tagger's options show only while a tagger is chosen."""
    count = len(form_inputs)

    def on_caption(*args: Any) -> str:
        return start_from_form(lambda: to_config(args[:count]), *args[count:], host=host)

    panel.button.click(on_caption, inputs=form_inputs + panel.inputs, outputs=outputs, queue=False)
    if panel.tagger_box is not None and panel.gr is not None:
        gr = panel.gr
        panel.interrogator.change(lambda name: gr.update(visible=is_tagger(name)),
                                  inputs=[panel.interrogator], outputs=[panel.tagger_box],
                                  queue=False)
