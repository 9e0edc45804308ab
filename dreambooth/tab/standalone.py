"""The tab without the WebUI: ``python -m dreambooth ui`` serves it on 127.0.0.1 in a page laid
out like the WebUI's, every route behind :class:`dreambooth.app.api.AppGate`."""
from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any

from dreambooth.app.job import runner
from dreambooth.common.config import ConfigError, TrainingConfig
from dreambooth.host import Host, StandaloneHost
from dreambooth.tab import ui_poll
from dreambooth.tab.form import set_host
from dreambooth.tab.ui import TAB_ELEM_ID, TAB_TITLE, build_tab
from dreambooth.tab.widgets import js

REPO_ROOT = Path(__file__).resolve().parents[2]


def standalone_blocks(host: Host, initial: TrainingConfig | None = None) -> Any:
    """The tab inside a page laid out like the WebUI's (same element ids), with our CSS and JS."""
    import gradio as gr

    set_host(host)
    css = (REPO_ROOT / "style.css").read_text(encoding="utf-8")
    script = (REPO_ROOT / "javascript" / "dreambooth.js").read_text(encoding="utf-8")
    tab = build_tab(host, initial)
    with gr.Blocks(css=css, title="DreamBooth", analytics_enabled=False) as demo:
        with gr.Tabs(elem_id="tabs", selected=TAB_ELEM_ID):  # no gradio 4 "hidden tab" warnings
            with gr.TabItem(TAB_TITLE, id=TAB_ELEM_ID, elem_id=f"tab_{TAB_ELEM_ID}"):
                tab.render()
        # The WebUI injects javascript/*.js into its page; standalone, gradio runs it on load.
        demo.load(None, inputs=None, outputs=None, **js(gr, "() => {\n" + script + "\n}"))
    return demo


def standalone_main(argv: list[str]) -> int:
    """``python -m dreambooth ui [--models-dir DIR] [--port N] [--config FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m dreambooth ui",
                                     description="Serve the DreamBooth tab without the WebUI, on "
                                                 "127.0.0.1.")
    parser.add_argument("--models-dir", default=os.environ.get("DREAMBOOTH_MODELS_DIR", "models"),
                        help="models folder laid out like the WebUI's (Stable-diffusion/, VAE/); "
                             "default ./models")
    parser.add_argument("--port", type=int, default=7861, help="port on 127.0.0.1 (default 7861)")
    parser.add_argument("--config", help="a TrainingConfig JSON to fill the form with")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="another web page allowed to use the API, e.g. "
                             "http://127.0.0.1:3000 (repeatable; default: none but this app)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    models = Path(args.models_dir).expanduser().resolve()
    initial = None
    if args.config:
        try:
            initial = TrainingConfig.load(args.config)
        except ConfigError as exc:
            print(exc)
            return 2
    demo, _, url = standalone_app(models, args.port, args.allow_origin, initial)
    print(f"DreamBooth: serving {url} (models: {models}); Ctrl+C stops", flush=True)

    serve_until_stopped(demo)
    return 0


def standalone_app(models: Path, port: int, allow_origin: list[str] = (),
                   initial: TrainingConfig | None = None) -> tuple[Any, Any, str]:
    """The standalone app serving on 127.0.0.1:``port`` (gradio's thread): (demo, app, URL).
    Every route, gradio's too, is behind ``api.AppGate``: other pages and host names are refused,
    and gradio's file routes serve only the runs' samples and its own temp files."""
    from dreambooth.app import api
    from dreambooth.app.service import sweep_leftovers

    (models / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    host = StandaloneHost(models)
    sweep_leftovers(host)
    work = host.work_root()
    ui_poll.ALLOWED_PATHS[:] = [work]  # gradio 4 takes samples there by path (it copies them)
    demo = standalone_blocks(host, initial)
    demo.queue()
    policy, files = api.RequestPolicy.from_settings({"origins": allow_origin}), api.FileRule(work)
    app, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                              allowed_paths=[str(work)], quiet=True, show_api=False,
                              app_kwargs={"middleware": [api.app_gate(policy, files)]})
    api.drop_wildcard_cors(app)
    api.mount(app, host=host, credentials={}, policy=policy)
    api.guard_app(app, policy, files)  # outermost, now that gradio added its own middleware
    return demo, app, url


def serve_until_stopped(demo: Any, wait_s: float = 60) -> None:
    """Block until Ctrl+C or SIGTERM; then cancel a running job (it stops at a step boundary and
    saves, if set to), and close the server."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        if runner().cancel():
            runner().wait(wait_s)
        demo.close()
