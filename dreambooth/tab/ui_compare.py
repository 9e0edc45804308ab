"""Compare runs (under the Model tab's previous runs): the loss and validation curves of two or
more runs on one plot, and their sample pictures at the steps they share, side by side.

Samples are made with fixed seeds (``sample_seed + prompt index``): the same step and prompt
index in two runs is the same seed and prompt, so the gallery shows them in a row (one column
per run) and leaves out the steps not every run has.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from dreambooth.app.run_history import (RunCurves, common_prompt_indices, common_sample_steps,
                                        read_curves, sample_steps)
from dreambooth.host import Host
from dreambooth.tab.actions import run_choices
from dreambooth.tab.ui_poll import gallery_value
from dreambooth.tab.ui_render import message, smoothed, thin

# One colour per run (inline, so no stylesheet rule is needed): Tailwind's 500 shades, readable
# on the WebUI's light and dark themes alike; more runs than colours reuse them in order.
PALETTE = ("#f97316", "#3b82f6", "#22c55e", "#a855f7", "#ef4444", "#14b8a6", "#eab308", "#ec4899")
FEWER_THAN_TWO = "Choose two or more runs to compare."
EMPTY_TEXT = "the chosen runs have no logged steps yet"


def run_colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _legend(curves: list[RunCurves], width: int, left: int) -> tuple[list[str], int]:
    """The legend's SVG text (a swatch and the name of each run, with its best step), laid out in
    rows above the frame; and the height the rows take."""
    parts, x, row, char_w, row_h = [], float(left), 0, 5.2, 13
    for index, run in enumerate(curves):
        text = run.name + (f" (best: step {run.best_step})" if run.best_step is not None else "")
        text += "" if not run.empty else " (no steps)"
        item_w = 22 + len(text) * char_w
        if x > left and x + item_w > width:  # wrap to the next row
            x, row = float(left), row + 1
        y = 10 + row * row_h
        colour = run_colour(index)
        parts.append(f"<g class='dreambooth-compare-legend' data-run='{html.escape(run.name)}'>"
                     f"<line x1='{x:.1f}' x2='{x + 16:.1f}' y1='{y - 3}' y2='{y - 3}' "
                     f"style='stroke:{colour};stroke-width:2'/>"
                     f"<text x='{x + 20:.1f}' y='{y}' class='dreambooth-plot-label'>"
                     f"{html.escape(text)}</text></g>")
        x += item_w + 10
    return parts, (row + 1) * row_h


def compare_plot_svg(curves: list[RunCurves], width: int = 480, height: int = 170) -> str:
    """The runs' smoothed training loss (solid) and validation loss (dashed) on one shared scale
    as inline SVG, one colour per run, each run's best validation step marked, a legend naming
    the runs; the frame and labels of the live loss plot (``ui_render.loss_plot_svg``)."""
    legend, legend_h = _legend(curves, width, 8)
    left, right, top, bottom = 44, 8, 6 + legend_h, 22
    inner_w, inner_h = width - left - right, height - top - bottom
    parts = [f"<svg class='dreambooth-plot dreambooth-compare-plot' viewBox='0 0 {width} "
             f"{height}' preserveAspectRatio='none' role='img' aria-label='loss curves of runs'>",
             *legend,
             f"<rect x='{left}' y='{top}' width='{inner_w}' height='{inner_h}' "
             f"class='dreambooth-plot-frame'/>"]
    # smoothed over every step, then thinned: a long run smooths as a short one
    lines = [(thin(smoothed(run.loss)), thin(run.validation)) for run in curves]
    every = [point for loss, scored in lines for point in loss + scored]
    if not every:
        parts.append(f"<text x='{left + inner_w / 2}' y='{top + inner_h / 2}' "
                     f"text-anchor='middle' class='dreambooth-plot-label'>{EMPTY_TEXT}</text>"
                     f"</svg>")
        return "".join(parts)
    steps, values = [s for s, _ in every], [v for _, v in every]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x0) / (x1 - x0) * inner_w,
                top + (1 - (value - lo) / (hi - lo)) * inner_h)

    def polyline(points: list, kind: str, name: str, style: str) -> str:
        coords = " ".join("%.1f,%.1f" % xy(s, v) for s, v in points)
        return (f"<polyline class='dreambooth-compare-{kind}' data-run='{name}' "
                f"points='{coords}' style='fill:none;{style}'/>")

    for index, (run, (loss, scored)) in enumerate(zip(curves, lines)):
        name, colour = html.escape(run.name), run_colour(index)
        if loss:
            parts.append(polyline(loss, "loss", name, f"stroke:{colour};stroke-width:2"))
        if scored:
            parts.append(polyline(scored, "val", name,
                                  f"stroke:{colour};stroke-width:1.5;stroke-dasharray:5 3"))
        parts += _best_marker(run, colour, xy, top, inner_h)
    parts += _axis_labels(left, top, inner_w, inner_h, height, lo, hi, x0, x1)
    parts.append("</svg>")
    return "".join(parts)


def _best_marker(run: RunCurves, colour: str, xy, top: float, inner_h: float) -> list[str]:
    """A thin line of the run's colour at its best validation step, and a dot on the curve."""
    best = next(((s, v) for s, v in run.validation if s == run.best_step), None)
    if best is None:
        return []
    x, y = xy(*best)
    name = html.escape(run.name)
    return [f"<line class='dreambooth-compare-best' data-run='{name}' data-step='{best[0]}' "
            f"x1='{x:.1f}' x2='{x:.1f}' y1='{top}' y2='{top + inner_h}' "
            f"style='stroke:{colour};stroke-width:1;stroke-dasharray:2 2'/>",
            f"<circle class='dreambooth-compare-best-dot' data-run='{name}' cx='{x:.1f}' "
            f"cy='{y:.1f}' r='3' style='fill:{colour}'><title>{name}: best step {best[0]}, "
            f"validation {best[1]:.5g}</title></circle>"]


def _axis_labels(left: float, top: float, inner_w: float, inner_h: float, height: int,
                 lo: float, hi: float, x0: int, x1: int) -> list[str]:
    return [f"<text x='{left - 4}' y='{top + 9}' text-anchor='end' "
            f"class='dreambooth-plot-label'>{hi:.3g}</text>",
            f"<text x='{left - 4}' y='{top + inner_h}' text-anchor='end' "
            f"class='dreambooth-plot-label'>{lo:.3g}</text>",
            f"<text x='{left}' y='{height - 6}' class='dreambooth-plot-label'>step {x0}</text>",
            f"<text x='{left + inner_w}' y='{height - 6}' text-anchor='end' "
            f"class='dreambooth-plot-label'>step {x1}</text>",
            f"<text x='{left + inner_w / 2}' y='{height - 6}' text-anchor='middle' "
            f"class='dreambooth-plot-label'>loss (smoothed) · - - validation</text>"]


def compare_samples(runs: list[str], host: Host) -> list[tuple[str, str]]:
    """Gallery items (path, "run · step N · prompt k") of the runs' samples at the steps and
    prompt indices all of them have: by step, then prompt index, then the runs' order, so a row
    of ``len(runs)`` columns shows one seed and prompt across the runs."""
    samples = []
    for name in runs:
        try:
            samples.append(sample_steps(host.work_dir(name)))
        except ValueError:  # a name that would leave the work folder: it has no samples
            samples.append({})
    items = []
    for step in common_sample_steps(samples):
        for index in common_prompt_indices(samples, step):
            items += [(str(run[step][index]), f"{name} · step {step} · prompt {index}")
                      for name, run in zip(runs, samples)]
    return items


def run_curves(runs: list[str], host: Host) -> list[RunCurves]:
    """Each named run's curves (empty ones for a name that is not a work folder)."""
    curves = []
    for name in runs:
        try:
            curves.append(read_curves(host.work_dir(name), name))
        except ValueError:
            curves.append(RunCurves(name))
    return curves


def chosen_runs(runs: list[str] | None) -> list[str]:
    """Each chosen run once, in the order chosen."""
    return [r for r in dict.fromkeys(runs or []) if r]


def compare(runs: list[str] | None, host: Host) -> tuple[str, list[tuple[str, str]]]:
    """The Compare button: (the plot or a message, the gallery items)."""
    runs = chosen_runs(runs)
    if len(runs) < 2:
        return message(FEWER_THAN_TWO, "warning"), []
    return compare_plot_svg(run_curves(runs, host)), compare_samples(runs, host)


@dataclass
class CompareBox:
    runs: Any  # the multiselect of work folders
    button: Any
    plot: Any
    gallery: Any


def build(gr, host: Host) -> CompareBox:
    """The closed "Compare runs" accordion, in the Blocks context the caller is in."""
    with gr.Accordion("Compare runs", open=False, elem_id="dreambooth_compare"):
        with gr.Row():
            runs = gr.Dropdown(multiselect=True, choices=run_choices(host), value=[],
                               label="Runs to compare", elem_id="dreambooth_compare_runs",
                               info="their loss and validation curves on one plot, and their "
                                    "samples at the same steps and seeds side by side")
            button = gr.Button("Compare", elem_id="dreambooth_compare_button", scale=0,
                               min_width=100)
        plot = gr.HTML("", elem_id="dreambooth_compare_plot")
        gallery = gr.Gallery(value=None, label="Samples at the same steps and seeds",
                             elem_id="dreambooth_compare_gallery", columns=2, height=360,
                             object_fit="contain", preview=False)
    return CompareBox(runs, button, plot, gallery)


def refreshed_runs(gr, host: Host, chosen: list[str] | None) -> Any:
    """The multiselect's update after the runs list was refreshed: the runs still there stay
    chosen (a deleted one would be refused as a value not among the choices)."""
    choices = run_choices(host)
    return gr.update(choices=choices, value=[r for r in chosen or [] if r in choices])


def wire(gr, box: CompareBox, host: Host) -> None:
    def on_compare(runs):
        plot, items = compare(runs, host)
        return plot, gr.update(value=gallery_value(items), columns=max(len(chosen_runs(runs)), 2))

    box.button.click(on_compare, inputs=[box.runs], outputs=[box.plot, box.gallery],
                     queue=False)
