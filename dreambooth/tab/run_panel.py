"""The right column: the actions (Train, Cancel, Check dataset, Generate class pictures), the live
output (status, progress, loss plot, samples, log), the output file with Use in txt2img, Open
folder and Extract LoRA, and the dataset report."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dreambooth.app import service
from dreambooth.app.job import runner
from dreambooth.tab.actions import (cancel_job, check_dataset_report, checkpoint_choices,
                                    extract_lora, extract_visible,
                                    poll, restore_form, start_from_form, use_output)
from dreambooth.tab.form import TabForm, label_updates, values_of
from dreambooth.tab.ui_poll import LOG_TAIL, PollSessions, best_button_label
from dreambooth.tab.ui_render import loss_plot_svg, message, progress_html, status_html
from dreambooth.tab.widgets import HIDDEN, js

EXTRACT_NOTE = ("<div class='dreambooth-note'>A LoRA file from this full run: the difference "
                "between its checkpoint and the base model, cut to the rank by SVD, written to "
                "the Lora folder as <code>&lt;name&gt;-lora.safetensors</code>; the log shows how "
                "much of the difference the rank keeps.</div>")


@dataclass
class RunPanel:
    train: Any
    cancel: Any
    check: Any
    make_class: Any
    # status, progress, plot, gallery, log, output, training log, best file, its button (polled)
    live: list[Any]
    output: Any
    load_btn: Any
    open_btn: Any
    load_title: Any
    lora_tag: Any
    extract_box: Any
    extract_inputs: list[Any]  # rank, conv rank, overwrite
    extract_btn: Any
    report: Any
    poll_btn: Any
    restore_btn: Any
    best_output: Any  # the best validation step's file (keep_best), hidden
    best_btn: Any  # "Use the best step (N) in txt2img", shown when there is one


def _live_output(gr) -> list[Any]:
    snap = runner().snapshot()
    status = gr.HTML(status_html(snap), elem_id="dreambooth_status")
    progress = gr.HTML(progress_html(snap), elem_id="dreambooth_progress")
    plot = gr.HTML(loss_plot_svg(snap.loss_history, snap.lr_history,
                                 validation=snap.validation_history, best_step=snap.best_step),
                   elem_id="dreambooth_loss_plot")
    gallery = gr.Gallery(value=None, label="Samples", elem_id="dreambooth_gallery", columns=4,
                         height=220, object_fit="contain", preview=False)
    log = gr.Textbox("", label="Log", lines=LOG_TAIL, max_lines=LOG_TAIL, interactive=False,
                     elem_id="dreambooth_log")
    return [status, progress, plot, gallery, log]


def _extract_box(gr, host, output_path: str) -> tuple[Any, list[Any], Any]:
    with gr.Accordion("Extract LoRA", open=False, elem_id="dreambooth_extract",
                      visible=extract_visible(output_path, host)) as box:
        gr.HTML(EXTRACT_NOTE, elem_id="dreambooth_extract_note")
        with gr.Row():
            rank = gr.Number(value=service.EXTRACT_RANK, precision=0, label="Rank",
                             elem_id="dreambooth_extract_rank",
                             info="32 keeps most of a DreamBooth run; more keeps more, the file "
                                  "grows")
            conv = gr.Number(value=service.EXTRACT_CONV_RANK, precision=0, label="Conv rank",
                             elem_id="dreambooth_extract_conv_rank",
                             info="the ResNet convolutions too (LoCon); 0 = none")
        with gr.Row():
            overwrite = gr.Checkbox(False, label="Overwrite an existing file",
                                    elem_id="dreambooth_extract_overwrite")
            button = gr.Button("Extract LoRA", elem_id="dreambooth_extract_lora")
    return box, [rank, conv, overwrite], button


def build(gr, form: TabForm) -> RunPanel:
    with gr.Row(elem_id="dreambooth_actions"):
        train = gr.Button("Train", variant="primary", elem_id="dreambooth_train")
        cancel = gr.Button("Cancel", variant="stop", elem_id="dreambooth_cancel")
    with gr.Row():
        check = gr.Button("Check dataset", elem_id="dreambooth_check")
        make_class = gr.Button("Generate class pictures", elem_id="dreambooth_make_class")
    form.action_msg = gr.HTML("", elem_id="dreambooth_message")
    live = _live_output(gr)
    with gr.Row(elem_id="dreambooth_output_row"):
        output = gr.Textbox("", label="Output file", interactive=False,
                            elem_id="dreambooth_output", scale=3)
    training_log = gr.HTML("", elem_id="dreambooth_training_log_box")
    with gr.Row():
        load_btn = gr.Button("Use in txt2img", elem_id="dreambooth_load_txt2img")
        label = best_button_label(runner().snapshot())
        best_btn = gr.Button(label or "Use the best step in txt2img", visible=bool(label),
                             elem_id="dreambooth_load_best")
        open_btn = gr.Button("\U0001f4c2 Open folder", elem_id="dreambooth_open_folder")
    load_title = gr.Textbox("", visible=False, elem_id="dreambooth_load_title")
    lora_tag = gr.Textbox("", visible=False, elem_id="dreambooth_lora_tag")
    best_output = gr.Textbox(runner().snapshot().best_path or "", visible=False,
                             elem_id="dreambooth_best_output")
    extract_box, extract_inputs, extract_btn = _extract_box(
        gr, form.host, runner().snapshot().output_path or "")
    report = gr.Textbox("", label="Dataset check", lines=6, max_lines=24, interactive=False,
                        elem_id="dreambooth_report")
    poll_btn = gr.Button("poll", elem_id="dreambooth_poll", elem_classes=["dreambooth-hidden"])
    restore_btn = gr.Button("restore", elem_id="dreambooth_restore",
                            elem_classes=["dreambooth-hidden"])
    return RunPanel(train, cancel, check, make_class,
                    live + [output, training_log, best_output, best_btn], output, load_btn,
                    open_btn, load_title, lora_tag, extract_box, extract_inputs, extract_btn,
                    report, poll_btn, restore_btn, best_output, best_btn)


def wire_poll(gr, form: TabForm, panel: RunPanel, previous: Any) -> None:
    """Live output: the page's script clicks #dreambooth_poll; queue=False never waits in
    gradio's queue. Each browser session gets only what changed since its last poll."""
    sessions = PollSessions()
    built_models = checkpoint_choices(form.host)  # what the page's model list is built with

    def poll_page(request):
        session = str(getattr(request, "session_hash", None) or "")
        *parts, seen = poll("", sessions.get(session), built_models)
        sessions.put(session, seen)
        return parts

    # gradio injects the request by this annotation (a real class: this module's
    # annotations are strings, and gradio is imported by the caller, not at the top)
    poll_page.__annotations__ = {"request": gr.Request}
    panel.poll_btn.click(poll_page, inputs=None,
                         outputs=panel.live + [form.action_msg, previous, form.comps["base_model"]],
                         queue=False, show_progress=HIDDEN)


def wire(gr, form: TabForm, panel: RunPanel) -> None:
    host, fields = form.host, form.fields

    def start(what: str):
        def handler(*args):
            values, extra = values_of(args)
            text, errors, row_of = start_from_form(values, extra, host=host, what=what)
            # a new action clears what the last one left on screen (the dataset report)
            return ["", text] + label_updates(gr, errors, row_of)
        return handler

    panel.train.click(start("train"), inputs=form.inputs,
                      outputs=[panel.report, form.action_msg] + fields, queue=False)
    panel.make_class.click(start("class_pictures"), inputs=form.inputs,
                           outputs=[panel.report, form.action_msg] + fields, queue=False)
    panel.cancel.click(cancel_job, outputs=[form.action_msg], queue=False)
    panel.check.click(lambda *args: (check_dataset_report(*values_of(args), host), ""),
                      inputs=form.inputs, outputs=[panel.report, form.action_msg])

    def on_restore():
        config = restore_form(host)
        return form.unchanged(gr, 2) if config is None else form.fill(gr, config)

    # clicked once by the page's script when the tab is first shown (a reload, a 2nd tab)
    panel.restore_btn.click(on_restore, outputs=fields + [form.extra_state, form.extra_note],
                            queue=False, show_progress=HIDDEN)
    # a checkpoint: the WebUI loads it, the page selects it; a LoRA: the page adds its tag
    # to the txt2img prompt (the WebUI's Lora list rescanned first)
    # the best validation step's file (keep_best) the same way, by its own button
    for button, path_box in ((panel.load_btn, panel.output), (panel.best_btn, panel.best_output)):
        button.click(lambda path: use_output(path, host), inputs=[path_box],
                     outputs=[panel.load_title, panel.lora_tag, form.action_msg]).then(
            None, inputs=[panel.load_title, panel.lora_tag], outputs=None,
            **js(gr, "(title, tag) => { if (tag) { dreamboothUseLora(tag); } "
                     "else { dreamboothLoadInTxt2img(title); } return []; }"))
    # Extract LoRA: on a full run's checkpoint only, as a job of the runner
    panel.output.change(lambda path: gr.update(visible=extract_visible(path, host)),
                        inputs=[panel.output], outputs=[panel.extract_box], queue=False,
                        show_progress=HIDDEN)
    panel.extract_btn.click(lambda path, rank, conv, over: extract_lora(path, rank, conv, over,
                                                                        host),
                            inputs=[panel.output] + panel.extract_inputs,
                            outputs=[form.action_msg], queue=False)
    panel.open_btn.click(lambda path: message(service.open_folder(path or host.output_dir())),
                         inputs=[panel.output], outputs=[form.action_msg], queue=False)
