"""The extension loads in the WebUI the way the WebUI loads it, from a folder of any name."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

EXTENSION_FILES = ("install.py", "metadata.ini", "style.css", "scripts", "dreambooth", "javascript")


@pytest.fixture
def fresh_dreambooth_modules():
    """Forget any `dreambooth` imported from the checkout, so the copy is the one imported."""
    saved = {k: v for k, v in sys.modules.items() if k == "dreambooth" or k.startswith("dreambooth.")}
    for k in saved:
        del sys.modules[k]
    yield
    for k in [k for k in sys.modules if k == "dreambooth" or k.startswith("dreambooth.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def install_extension(extensions_dir: Path, folder_name: str) -> Path:
    target = Path(extensions_dir) / folder_name
    target.mkdir(parents=True)
    for name in EXTENSION_FILES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, target / name)
    return target


@pytest.fixture
def loaded(fake_webui, fresh_dreambooth_modules):
    """The extension copied to extensions/<odd name>/ and its scripts loaded by the fake WebUI."""
    from modules import scripts
    ext = install_extension(Path(fake_webui.paths.extensions_dir), "sd webui-DB ext (copy)")
    path_before = list(sys.path)
    scripts.load_scripts()
    assert scripts.load_errors == []
    assert sys.path == path_before, "the extension folder is on sys.path only during the import"
    return fake_webui, ext


def test_script_imports_the_package_from_its_own_folder(loaded):
    _, ext = loaded
    import dreambooth
    assert Path(dreambooth.__file__).resolve().parent == (ext / "dreambooth").resolve()
    from modules import scripts
    (module,) = scripts.loaded_modules
    assert module.__name__ == "dreambooth_tab.py"  # the WebUI's bare file name, not a package path


def test_tab_registers_and_builds_as_in_the_webui(loaded):
    import gradio as gr
    webui, _ = loaded
    tabs = webui.script_callbacks.ui_tabs_callback()
    assert [(title, elem_id) for _, title, elem_id in tabs] == [("DreamBooth", "dreambooth")]
    blocks = tabs[0][0]
    assert isinstance(blocks, gr.Blocks)
    # rendered the way the WebUI renders extension tabs
    with gr.Blocks() as demo:
        with gr.Tabs():
            for interface, label, ifid in tabs:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    config = demo.get_config_file()
    assert any(c.get("props", {}).get("elem_id") == "tab_dreambooth" for c in config["components"])


def test_settings_section_and_defaults(loaded):
    webui, _ = loaded
    webui.script_callbacks.ui_settings_callback()
    opts = webui.shared.opts
    ours = {k: v for k, v in opts.data_labels.items() if v.section == ("dreambooth", "DreamBooth")}
    assert set(ours) == {"dreambooth_work_dir", "dreambooth_output_subdir", "dreambooth_unload_model",
                         "dreambooth_hold_generation"}
    assert all(v.category_id == "training" for v in ours.values())
    assert opts.dreambooth_unload_model is True and opts.dreambooth_hold_generation is True
    assert opts.dreambooth_work_dir == "" and opts.dreambooth_output_subdir == ""


def asgi_get(app, path: str) -> tuple[int, object]:
    """GET through the ASGI interface. starlette 0.27's TestClient breaks on httpx >= 0.28, which
    the forge lane has; this needs neither."""
    import asyncio
    import json

    sent: list = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:7860")], "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 7860)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_status_route_answers(loaded):
    from fastapi import FastAPI
    webui, _ = loaded
    app = FastAPI()
    webui.script_callbacks.app_started_callback(None, app)  # demo is None under --nowebui
    status, body = asgi_get(app, "/dreambooth/v1/status")
    assert status == 200 and body["phase"] == "idle" and body["running"] is False


def test_script_unloaded_callback_runs(loaded):
    webui, _ = loaded
    webui.script_callbacks.script_unloaded_callback()


def test_extension_files_are_in_place(loaded):
    _, ext = loaded
    assert "[Extension]" in (ext / "metadata.ini").read_text() and "Name = dreambooth" in (ext / "metadata.ini").read_text()
    assert "var(--body-text-color)" in (ext / "style.css").read_text()
    assert list((ext / "javascript").glob("*.js"))


def test_a_foreign_dreambooth_package_is_reported_clearly(fake_webui, fresh_dreambooth_modules, tmp_path):
    from modules import scripts
    other = tmp_path / "other_ext"
    (other / "dreambooth").mkdir(parents=True)
    (other / "dreambooth" / "__init__.py").write_text("")
    sys.path.insert(0, str(other))
    try:
        import dreambooth  # noqa: F401  (another extension got there first)
    finally:
        sys.path.remove(str(other))
    install_extension(Path(fake_webui.paths.extensions_dir), "dreambooth")
    scripts.load_scripts()
    ((_, error),) = scripts.load_errors
    assert isinstance(error, ImportError) and "disable the other extension" in str(error)
