"""The tab's poll: what a browser session is shown of the process's job, sent only when it
changed since that session's last poll (digests kept per session on the server), and the form a
page opened during a run is filled with."""
from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from dreambooth.app import service
from dreambooth.app.job import runner
from dreambooth.common.config import ConfigError, TrainingConfig
from dreambooth.common.run_types import RunPaths
from dreambooth.engine.training_log import tensorboard_problem
from dreambooth.host import Host
from dreambooth.tab.ui_render import (gallery_items, loss_plot_svg, message, progress_html,
                                      status_html, training_log_html)

LOG_TAIL = 8  # lines shown: exactly the log box's height, so the newest line is always visible


def saved_samples(host: Host, model_name: str) -> list[str]:
    """Samples an earlier run of this name left in its work folder (browsable when idle)."""
    try:
        folder = host.work_dir(model_name) / "samples"
    except ValueError:
        return []
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.glob("*.png"))][-32:]


@functools.lru_cache(maxsize=1)
def tensorboard_installed() -> bool:
    return tensorboard_problem() is None


def logs_dir(host: Host, snap: Any) -> Path | None:
    """The training log folder of the process's last training job (None: no training job yet)."""
    if not snap.job_id or snap.task != "training" or not snap.model_name:
        return None
    try:
        return RunPaths(host.work_dir(snap.model_name), host.output_dir()).logs_dir
    except ValueError:
        return None


def best_button_label(snap: Any) -> str:
    """The "Use the best step" button's label; empty (the button hidden) without a best file."""
    if not snap.best_path or snap.best_step is None:
        return ""
    return f"Use the best step ({snap.best_step}) in txt2img"


def _digest(value: Any) -> str:
    return hashlib.sha1(repr(value).encode()).hexdigest()


def poll(model_name: str, seen: str | dict | None, host: Host,
         built_models: list[str] | None = None) -> tuple:
    """One poll: (status, progress, plot, gallery, log, output path, training log folder, best
    step's file, its button, message, previous runs, base models, seen). ``built_models``: the base-model list the page
    was built with (a new page is sent the list only when the WebUI's has changed since).

    ``seen`` (JSON in a hidden textbox: a gr.State input makes gradio 4's client warn at every
    poll) is this browser session's record of what it last got: unchanged parts go back as
    ``gr.update()`` so the page does not redraw them every second. The message line shows how
    the last "Load in txt2img" stands, and is cleared when a job ends (its outcome is in the
    status line); the previous-runs list follows the work folder."""
    import gradio as gr

    if isinstance(seen, str):
        try:
            seen = json.loads(seen) if seen.strip() else {}
        except ValueError:
            seen = {}
    seen = dict(seen or {})
    first = not seen
    snap = runner().snapshot()
    samples = snap.samples or ([] if snap.running
                               else saved_samples(host, model_name or snap.model_name or ""))
    output = snap.output_path or ""
    # TensorBoard is asked about only once there is a log: that imports accelerate, seconds on
    # a cold start, which the first poll of a new page must not wait for.
    folder = logs_dir(host, snap)
    parts = {
        "status": status_html(snap),
        "progress": progress_html(snap),
        "plot": loss_plot_svg(snap.loss_history, snap.lr_history,
                              validation=snap.validation_history, best_step=snap.best_step),
        "gallery": gallery_items(samples),
        "log": "\n".join(snap.log[-LOG_TAIL:]),
        "output": output,
        "logs": training_log_html(folder, folder is not None and tensorboard_installed()),
        "best": snap.best_path or "",
        "best_button": best_button_label(snap),
    }
    out = []
    for key, value in parts.items():
        digest = _digest(value)
        if seen.get(key) == digest:
            out.append(gr.update())
        else:
            seen[key] = digest
            out.append(gallery_value(value) if key == "gallery" else
                       gr.update(value=value, visible=bool(value)) if key == "best_button"
                       else value)
    note = gr.update()
    ended = _digest((snap.job_id, snap.finished_at))
    if seen.get("ended") != ended:
        if not first and snap.finished_at:
            note = ""  # "Training started." and the like are over
        seen["ended"] = ended
    switch = _digest(snap.switch)
    if seen.get("switch") != switch:
        if snap.switch and not first:
            kind = {"failed": "error", "loading": "info"}.get(snap.switch["state"], "info")
            note = message(snap.switch["message"], kind)
        seen["switch"] = switch
    runs_update = gr.update()
    # The work folder gains a run when a job gets past its checks and changes when it ends: it
    # is listed again then (and at a session's first poll), not at every poll.
    moment = _digest((snap.job_id, snap.running))
    if seen.get("runs_at") != moment:
        seen["runs_at"] = moment
        runs = [r.name for r in service.list_runs(host)]
        if seen.get("runs") != _digest(runs):
            seen["runs"] = _digest(runs)
            runs_update = gr.update(choices=runs)
    # The base-model list follows the WebUI's: a file the WebUI hashes after the page was built
    # (the model it loads at start-up, when its hash was not cached) is titled "name [hash]"
    # in its own selector from then on, and so in ours.
    models_update = gr.update()
    models = [e.shown for e in host.list_checkpoints()]
    if "models" not in seen and built_models is not None:  # a new page has the built list
        seen["models"] = _digest(list(built_models))
    if seen.get("models") != _digest(models):
        seen["models"] = _digest(models)
        models_update = gr.update(choices=models)
    return (*out, note, runs_update, models_update, json.dumps(seen))


class PollSessions:
    """What each browser session last got from :func:`poll`, kept on the server by gradio's
    session id. The polled event then has no inputs at all: gradio 4's client warns in the
    browser console for every call of an event whose inputs it cannot match with the API's
    description (a gr.State, or any input in the WebUI's merged page), once a second otherwise."""

    def __init__(self, limit: int = 64):
        self.limit, self._seen, self._lock = limit, {}, threading.Lock()

    def get(self, session: str) -> str:
        with self._lock:
            return self._seen.get(session, "")

    def put(self, session: str, seen: str) -> None:
        with self._lock:
            self._seen.pop(session, None)
            self._seen[session] = seen
            while len(self._seen) > self.limit:  # the oldest sessions go first
                self._seen.pop(next(iter(self._seen)))


def restore_form(host: Host) -> TrainingConfig | None:
    """The config of the running job, else of this process's last job: what a page opened (or
    reloaded) while it runs shows in its form. None when this process ran none."""
    snap = runner().snapshot()
    if not snap.job_id or not snap.model_name or snap.task != "training":
        return None
    try:
        return service.run_config(host, snap.model_name)
    except (ConfigError, ValueError, OSError):
        return None


def gallery_value(items: list[tuple[str, str]]) -> list:
    """Gradio 4 serves only files under the working or temp folder (or allowed_paths): other
    samples go as pictures instead of paths."""
    import gradio as gr

    if int(gr.__version__.split(".")[0]) < 4:
        return items
    allowed = [Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve(), *ALLOWED_PATHS]
    result = []
    for path, caption in items:
        resolved = Path(path).resolve()
        if any(resolved == root or root in resolved.parents for root in allowed):
            result.append((str(path), caption))
        else:
            from PIL import Image

            with Image.open(path) as image:
                result.append((image.copy(), caption))
    return result


# folders gradio 4 may serve sample pictures from (the standalone app adds its run work folder)
ALLOWED_PATHS: list[Path] = []
