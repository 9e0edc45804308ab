"""The Concepts sub-tab: up to four concepts on screen (any number from an imported file), the
identifier check under each instance prompt, import and export of concepts_list.json, and the
captioning panel."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth.common.config import ConfigError, TrainingConfig, read_concepts_list
from dreambooth.tab import ui_captions
from dreambooth.tab.actions import export_concepts, identifier_html
from dreambooth.tab.form import (CONCEPT_SLOTS, TabForm, config_to_values, extra_note, form_keys,
                                 form_to_config, values_of)
from dreambooth.tab.ui_fields import CONCEPT_FIELDS, CONCEPT_LAYOUT
from dreambooth.tab.ui_render import message
from dreambooth.tab.widgets import HIDDEN, component


@dataclass
class ConceptsTab:
    ident_boxes: list[Any]
    concepts_file: Any
    concepts_out: Any
    export_btn: Any
    caption_panel: Any


def build(gr, form: TabForm) -> ConceptsTab:
    start, comps = form.start_values, form.comps
    info_of = {name: (label, info) for name, label, info in CONCEPT_FIELDS}
    with gr.Tab("Concepts", id="dreambooth_tab_concepts", elem_id="dreambooth_tab_concepts"):
        ident_boxes = []
        for i in range(CONCEPT_SLOTS):
            with gr.Accordion(f"Concept {i + 1}", open=i == 0, elem_id=f"dreambooth_concept_{i}"):
                for row in CONCEPT_LAYOUT:
                    with gr.Row():
                        for name in row:
                            key = f"concepts.{i}.{name}"
                            comps[key] = component(gr, key, *info_of[name], start[key])
                    if "instance_prompt" in row:
                        ident_boxes.append(gr.HTML(
                            identifier_html(start[f"concepts.{i}.instance_prompt"],
                                            start[f"concepts.{i}.class_prompt"]),
                            elem_id=f"dreambooth_ident_{i}"))
        form.extra_note = gr.HTML(extra_note(form.start_extra), elem_id="dreambooth_extra_note")
        with gr.Row():
            concepts_file = gr.File(label="Import concepts_list.json (JSON or the seed's Python "
                                    "list)", file_types=[".json", ".txt", ".py"],
                                    elem_id="dreambooth_import_concepts")
            concepts_out = gr.File(label="Exported concepts_list.json", interactive=False,
                                   elem_id="dreambooth_concepts_out")
        export_btn = gr.Button("Export concepts_list.json", elem_id="dreambooth_export_concepts")
        caption_panel = ui_captions.build_panel(gr, form.host)
    return ConceptsTab(ident_boxes, concepts_file, concepts_out, export_btn, caption_panel)


def wire(gr, form: TabForm, tab: ConceptsTab) -> None:
    comps = form.comps
    for i in range(CONCEPT_SLOTS):
        prompts = [comps[f"concepts.{i}.instance_prompt"], comps[f"concepts.{i}.class_prompt"]]
        for trigger in prompts:
            trigger.change(identifier_html, inputs=prompts, outputs=[tab.ident_boxes[i]],
                           queue=False, show_progress=HIDDEN)

    def on_import(file):
        if file is None:
            return form.unchanged(gr, 3)
        path = getattr(file, "name", file)
        try:
            concepts = read_concepts_list(path)
        except (ConfigError, OSError, ValueError, SyntaxError) as exc:
            return form.unchanged(gr, 2) + [message(f"cannot read {Path(path).name}: {exc}",
                                                    "error")]
        values, extra = config_to_values(TrainingConfig(concepts=concepts))
        updates = [gr.update(value=values[k]) if k.startswith("concepts.") else gr.update()
                   for k in form_keys()]
        return updates + [extra, extra_note(extra), message(f"Imported {len(concepts)} concept(s).")]

    tab.concepts_file.upload(on_import, inputs=[tab.concepts_file],
                             outputs=form.fields + [form.extra_state, form.extra_note,
                                                    form.action_msg])
    tab.export_btn.click(lambda *args: export_concepts(*values_of(args)), inputs=form.inputs,
                         outputs=[tab.concepts_out])
    ui_captions.wire(tab.caption_panel, form.inputs, lambda a: form_to_config(*values_of(a))[0],
                     [form.action_msg], form.host)
