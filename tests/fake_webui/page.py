"""The fake WebUI's page, served for browser tests: ``python tests/fake_webui/page.py --port N``.

Configured by the same environment variables as the ``make_fake_webui`` fixture
(``FAKE_WEBUI_ROOT``, ``FAKE_WEBUI_ARGS``, ``FAKE_WEBUI_FLAVOUR``; see README.md). It starts the
way the WebUI does (initialize, load the extension's script, settings callbacks), then builds a
page laid out like the WebUI's: the quicksettings row with the checkpoint dropdown (A1111's
``#setting_sd_model_checkpoint`` or Forge's ``main_entry.ui_checkpoint``) and its 🔄, the tabs
``#tabs`` (txt2img first, with its prompt and the Lora cards' hidden refresh button, then the
extensions' tabs: DreamBooth), the hidden ``#change_checkpoint`` button, and the page's JavaScript put into every page as the WebUI does (gradio's
``TemplateResponse`` patched to add ``<script>`` tags before ``</head>``): the WebUI globals the
extension uses (``gradioApp``, ``selectCheckpoint``, ``switch_to_txt2img``) and every
``javascript/*.js`` of the extension. After launch the ``on_app_started`` callbacks run (the
extension's API routes), and a fake-only ``GET /fake/opts`` tells tests the server's state.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent

# The WebUI's globals from javascript/ui.js and script.js that extensions call (same bodies).
WEBUI_JS = r"""
function gradioApp() {
    const elems = document.getElementsByTagName('gradio-app');
    const elem = elems.length == 0 ? document : elems[0];
    if (elem !== document) {
        elem.getElementById = function(id) {
            return document.getElementById(id);
        };
    }
    return elem.shadowRoot ? elem.shadowRoot : elem;
}

function switch_to_txt2img() {
    gradioApp().querySelector('#tabs').querySelectorAll('button')[0].click();
    return Array.from(arguments);
}

var desiredCheckpointName = null;
function selectCheckpoint(name) {
    desiredCheckpointName = name;
    gradioApp().getElementById('change_checkpoint').click();
}
"""


# The WebUI's style.css rule for its small emoji buttons (ToolButton), so the top bar looks alike.
WEBUI_CSS = """
button.tool { max-width: 2.2em; min-width: 2.2em !important; height: 2.4em; align-self: end;
              line-height: 1em; border-radius: 0.5em; }
"""


def _setup_paths() -> None:
    flavour = os.environ.get("FAKE_WEBUI_FLAVOUR")
    extra = {"forge": [HERE / "forge"], "neo": [HERE / "forge"], "classic": [HERE / "classic"]}
    for path in extra.get(flavour, []) + [HERE, REPO_ROOT]:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def load_extension_script() -> None:
    """As ``modules.scripts.load_scripts``: the extension folder on sys.path only meanwhile."""
    from modules import script_loading, scripts

    saved = list(sys.path)
    try:
        sys.path = [str(REPO_ROOT)] + sys.path
        scripts.current_basedir = str(REPO_ROOT)
        scripts.loaded_modules.append(script_loading.load_module(str(REPO_ROOT / "scripts" / "dreambooth_tab.py")))
    finally:
        sys.path = saved
        scripts.current_basedir = scripts.paths.script_path


def load_lora_extension() -> None:
    """The built-in Lora extension (``extensions-builtin/Lora``, Forge ``sd_forge_lora``): its
    scripts import ``networks`` by that bare name, which lists the Lora folder once."""
    import networks  # noqa: F401  (tests/fake_webui/networks.py)


def install_javascript() -> None:
    """``modules/ui_gradio_extensions.py`` ``reload_javascript()``: scripts into every page."""
    import gradio.routes

    scripts = [WEBUI_JS] + [p.read_text(encoding="utf-8") for p in sorted((REPO_ROOT / "javascript").glob("*.js"))]
    head = "".join(f'<script type="text/javascript">\n{code}\n</script>\n' for code in scripts)
    css = f"<style>\n{WEBUI_CSS}\n{(REPO_ROOT / 'style.css').read_text(encoding='utf-8')}\n</style>"
    original = gradio.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{head}</head>".encode("utf8"))
        res.body = res.body.replace(b"</body>", f"{css}</body>".encode("utf8"))
        res.init_headers()
        return res

    gradio.routes.templates.TemplateResponse = template_response


def create_ui():
    import gradio as gr

    from modules import script_callbacks, ui_settings

    import networks

    def lora_cards() -> str:
        return "".join(f"<div class='card' data-name='{name}'>{name}</div>"
                       for name in networks.available_networks)

    def refresh_lora_cards() -> str:  # ui_extra_networks.py: every page's refresh(), new HTML
        networks.list_available_networks()
        return lora_cards()

    def generate(prompt: str) -> str:  # fake only: says what prompt the server received
        import html

        return f"<p id='txt2img_prompt_received'>{html.escape(prompt or '')}</p>"

    with gr.Blocks(analytics_enabled=False) as txt2img_interface:
        prompt = gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=2)
        generate_button = gr.Button("Generate", elem_id="txt2img_generate", variant="primary")
        received = gr.HTML("", elem_id="txt2img_html_info")
        generate_button.click(generate, inputs=[prompt], outputs=[received])
        # the extra networks' Lora page: its cards and the hidden refresh button that the
        # page's 🔄 clicks (A1111 1.10 and Forge: <tabname>_<page>_extra_refresh_internal)
        cards = gr.HTML(lora_cards(), elem_id="txt2img_lora_cards_html")
        gr.Button("Refresh", elem_id="txt2img_lora_extra_refresh_internal", visible=False).click(
            refresh_lora_cards, inputs=[], outputs=[cards])
    interfaces = [(txt2img_interface, "txt2img", "txt2img")]
    interfaces += script_callbacks.ui_tabs_callback()

    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
        ui_settings.add_quicksettings()
        with gr.Tabs(elem_id="tabs"):
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
        ui_settings.add_functionality(demo)
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    _setup_paths()

    import gradio as gr

    import modules.initialize
    from modules import script_callbacks, sd_models, shared

    modules.initialize.initialize()
    if shared.flavour not in ("forge", "neo") and sd_models.checkpoints_list:
        # A1111 loads the checkpoint at start-up (hashing it: the title gets " [hash]") and
        # records its title; Forge only records the name, in make_checkpoint_manager_ui().
        model = sd_models.model_data.get_sd_model()
        if model is not None:
            shared.opts.data["sd_model_checkpoint"] = model.sd_checkpoint_info.title
    load_lora_extension()
    load_extension_script()
    script_callbacks.ui_settings_callback()
    install_javascript()
    demo = create_ui()
    if int(gr.__version__.split(".")[0]) >= 4:
        demo.queue(64)  # as Forge calls it
    else:
        demo.queue(concurrency_count=64)  # as A1111 does
    app, url, _ = demo.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True,
                              quiet=True, show_api=False)
    # as webui.py: gradio's wildcard CORS goes (the stack is rebuilt at the next request)
    app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ != "CORSMiddleware"]
    app.middleware_stack = None

    def fake_opts():
        from fastapi.responses import JSONResponse

        import networks

        return JSONResponse({"flavour": shared.flavour,
                             "sd_model_checkpoint": shared.opts.data.get("sd_model_checkpoint"),
                             "checkpoints": list(sd_models.checkpoints_list),
                             "loads": list(sd_models.model_data.loads),
                             "loras": list(networks.available_networks),
                             "lora_rescans": len(networks.calls)})

    app.add_api_route("/fake/opts", fake_opts, methods=["GET"])
    script_callbacks.app_started_callback(demo, app)
    print(f"fake WebUI ({shared.flavour}, gradio {gr.__version__}): {url}", flush=True)

    from dreambooth.tab.standalone import serve_until_stopped

    serve_until_stopped(demo, wait_s=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
