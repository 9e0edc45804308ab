"""The tab's live parts as HTML: the status line, the progress bar (count, detail, speed, ETA),
the loss/learning-rate curve, the gallery's captions. Pure functions of a job snapshot (no
gradio), so the tab, the tests and any other front end draw the same thing."""
from __future__ import annotations

import html
from pathlib import Path

from dreambooth.engine.eta import speed_text

PHASE_TEXT = {"idle": "Idle", "loading": "Loading the model", "class_images": "Making class pictures",
              "caching": "Caching latents", "training": "Training",
              "sampling": "Making sample pictures", "saving": "Saving the checkpoint",
              "downloading": "Downloading the captioner", "captioning": "Captioning pictures",
              "extracting": "Extracting a LoRA",
              "done": "Done", "cancelled": "Cancelled",
              "failed": "Failed"}


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def status_html(snap) -> str:
    phase = snap.phase
    bits = [f"<span class='dreambooth-phase dreambooth-phase-{phase}'>"
            f"{html.escape(PHASE_TEXT.get(phase, phase))}</span>"]
    if snap.model_name:
        bits.append(f"<span>{html.escape(snap.model_name)}</span>")
    if snap.loss is not None:
        bits.append(f"<span>loss {snap.loss:.4f}</span>")
    if snap.lr is not None:
        bits.append(f"<span>lr {snap.lr:.2e}</span>")
    if snap.peak_gpu_mb is not None:
        bits.append(f"<span>peak GPU {snap.peak_gpu_mb / 1024:.2f} GB</span>")
    else:
        bits.append("<span>peak GPU –</span>")
    if snap.error:
        bits.append(f"<span class='dreambooth-error-text'>{html.escape(snap.error)}</span>")
    return (f"<div id='dreambooth_status_line' class='dreambooth-status' "
            f"data-phase='{phase}' data-running='{1 if snap.running else 0}' "
            f"data-step='{snap.step}'>{' · '.join(bits)}</div>")


def progress_html(snap) -> str:
    total = max(int(snap.total or 0), 0)
    step = max(min(int(snap.step or 0), total), 0) if total else 0
    fraction = step / total if total else (1.0 if snap.phase == "done" else 0.0)
    # a finished caption job still counts pictures (its phase is "done" like training's)
    counted = "captioning" if getattr(snap, "task", "") == "captioning" else snap.phase
    unit = {"class_images": "class pictures", "caching": "pictures cached",
            "captioning": "pictures captioned"}.get(counted, "steps")
    text = f"{step} / {total} {unit}" if total else PHASE_TEXT.get(snap.phase, snap.phase)
    if snap.running and snap.detail:
        text += f" · {snap.detail}"
    if snap.it_per_s:
        text += f" · {speed_text(snap.it_per_s)}"
    if snap.running and snap.eta_seconds is not None:
        text += f" · ETA {_clock(snap.eta_seconds)}"
    elif snap.started_at and snap.finished_at:
        text += f" · took {_clock(snap.finished_at - snap.started_at)}"
    return (f"<div class='dreambooth-progress' data-step='{step}' data-total='{total}'>"
            f"<div class='dreambooth-progress-bar dreambooth-bar-{snap.phase}' "
            f"style='width:{fraction * 100:.1f}%'></div>"
            f"<div class='dreambooth-progress-text'>{html.escape(text)}</div></div>")


def thin(points: list, limit: int = 300) -> list:
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    return [points[int(i * stride)] for i in range(limit)] + [points[-1]]


def smoothed(points: list) -> list[tuple[int, float]]:
    """(step, value) points as their exponential moving average (0.85 of the last, as the
    loss curves show it)."""
    out, ema = [], None
    for step, value in points:
        ema = value if ema is None else 0.85 * ema + 0.15 * value
        out.append((step, ema))
    return out


def loss_plot_svg(loss_history: list, lr_history: list, width: int = 480, height: int = 170,
                  validation: list = (), best_step: int | None = None) -> str:
    """The loss curve (raw, and smoothed) with the learning rate on its own scale, as inline SVG:
    no plotting library (gradio 3.41's LinePlot needs altair, Forge's lane lacks it), a fixed
    size (no layout jump), colours from the theme's variables. ``validation``: (step, loss) of
    the held-out pictures, drawn on the loss's scale with ``best_step`` marked."""
    left, right, top, bottom = 44, 8, 10, 22
    inner_w, inner_h = width - left - right, height - top - bottom
    parts = [f"<svg class='dreambooth-plot' viewBox='0 0 {width} {height}' "
             f"preserveAspectRatio='none' role='img' aria-label='loss curve'>",
             f"<rect x='{left}' y='{top}' width='{inner_w}' height='{inner_h}' "
             f"class='dreambooth-plot-frame'/>"]
    points = [(int(s), float(v)) for s, v in loss_history if v is not None and v == v]
    if not points:
        parts.append(f"<text x='{width / 2}' y='{height / 2}' text-anchor='middle' "
                     f"class='dreambooth-plot-label'>the loss curve appears with the first steps"
                     f"</text></svg>")
        return "".join(parts)
    points = thin(points)
    scored = [(int(s), float(v)) for s, v in validation if v is not None and v == v]
    steps = [s for s, _ in points + scored]
    values = [v for _, v in points + scored]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(step: float, value: float, low: float, high: float) -> str:
        x = left + (step - x0) / (x1 - x0) * inner_w
        y = top + (1 - (value - low) / (high - low)) * inner_h
        return f"{x:.1f},{y:.1f}"

    raw = " ".join(xy(s, v, lo, hi) for s, v in points)
    smooth = [xy(s, v, lo, hi) for s, v in smoothed(points)]
    parts.append(f"<polyline class='dreambooth-plot-raw' points='{raw}'/>")
    parts.append(f"<polyline class='dreambooth-plot-loss' points='{' '.join(smooth)}'/>")
    lrs = [(int(s), float(v)) for s, v in lr_history if v is not None]
    if lrs:
        lrs = thin(lrs)
        lr_lo, lr_hi = 0.0, max(v for _, v in lrs) or 1.0
        parts.append("<polyline class='dreambooth-plot-lr' points='"
                     + " ".join(xy(s, v, lr_lo, lr_hi * 1.05) for s, v in lrs) + "'/>")
    if scored:
        parts += _validation_parts(scored, best_step, lambda s, v: xy(s, v, lo, hi), top,
                                   inner_h, left + inner_w / 2)
    parts.append(f"<text x='{left - 4}' y='{top + 9}' text-anchor='end' "
                 f"class='dreambooth-plot-label'>{hi:.3g}</text>")
    parts.append(f"<text x='{left - 4}' y='{top + inner_h}' text-anchor='end' "
                 f"class='dreambooth-plot-label'>{lo:.3g}</text>")
    parts.append(f"<text x='{left}' y='{height - 6}' class='dreambooth-plot-label'>step {x0}</text>")
    parts.append(f"<text x='{left + inner_w}' y='{height - 6}' text-anchor='end' "
                 f"class='dreambooth-plot-label'>step {x1}</text>")
    parts.append(f"<text x='{left + inner_w / 2}' y='{height - 6}' text-anchor='middle' "
                 f"class='dreambooth-plot-label'>loss (smoothed) · raw · "
                 + ("<tspan class='dreambooth-plot-val-label'>validation</tspan> · "
                    if scored else "")
                 + "<tspan class='dreambooth-plot-lr-label'>lr</tspan></text>")
    parts.append("</svg>")
    return "".join(parts)


def _validation_parts(scored: list, best_step: int | None, xy, top: float,
                      inner_h: float, middle: float = 240) -> list[str]:
    """The validation curve with a dot per score, and the best step's line and label."""
    parts = ["<polyline class='dreambooth-plot-val' points='"
             + " ".join(xy(s, v) for s, v in scored) + "'/>"]
    for step, value in scored:
        x, y = xy(step, value).split(",")
        parts.append(f"<circle class='dreambooth-plot-val-dot' cx='{x}' cy='{y}' r='3' "
                     f"data-step='{step}'><title>step {step}: validation {value:.5g}"
                     f"</title></circle>")
    best = next(((s, v) for s, v in scored if s == best_step), None)
    if best is not None:
        x = float(xy(*best).split(",")[0])
        parts.append(f"<line class='dreambooth-plot-best' x1='{x:.1f}' x2='{x:.1f}' y1='{top}' "
                     f"y2='{top + inner_h}' data-step='{best[0]}'/>")
        side = (x + 3, "start") if x < middle else (x - 3, "end")  # inside the frame
        parts.append(f"<text x='{side[0]:.1f}' y='{top + 20}' text-anchor='{side[1]}' "
                     f"class='dreambooth-plot-label dreambooth-plot-best-label'>"
                     f"best: step {best[0]}</text>")
    return parts


def gallery_items(paths: list[str]) -> list[tuple[str, str]]:
    """Gallery entries (newest first) with the step as caption."""
    items = []
    for path in reversed(paths[-32:]):
        stem = Path(path).stem  # step-000040-0
        parts = stem.split("-")
        caption = f"step {int(parts[1])}" if stem.startswith("step-") and parts[1].isdigit() else stem
        items.append((str(path), caption))
    return items


def training_log_html(logs_dir: Path | None, tensorboard: bool) -> str:
    """Where the run's training log is (RunPaths.logs_dir): train.jsonl always, TensorBoard's
    files when it is installed — and the command that opens them."""
    if logs_dir is None:
        return "<div class='dreambooth-note' id='dreambooth_training_log'></div>"
    where = html.escape(str(logs_dir))
    how = (f"open with TensorBoard: <code>tensorboard --logdir \"{where}\"</code>" if tensorboard
           else "TensorBoard files too once <code>tensorboard</code> is installed")
    return (f"<div class='dreambooth-note' id='dreambooth_training_log'>Training log: "
            f"<code>{where}</code> (train.jsonl; {how})</div>")


def message(text: str, kind: str = "info") -> str:
    return f"<div class='dreambooth-message dreambooth-{kind}'>{html.escape(text)}</div>"
