"""A real browser against the fake WebUI's page (tests/fake_webui/page.py): after a training
finished, the tab's "Load in txt2img" makes the page's own checkpoint dropdown (Forge's
``ui_checkpoint``, A1111's ``#setting_sd_model_checkpoint``) show the new model, not a blank
field, and shows the txt2img tab. The dropdown got its choices when the page loaded, before the
new file existed; the page's script must refresh it before selecting."""
from __future__ import annotations

import importlib.metadata
import json
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from browser_fixtures import SHOTS, chromium, needs_chromium, served
from conftest import FAKE_WEBUI_DIR
from ui_fixtures import BASE_NAME, put_base_checkpoint, quick_config

GRADIO_MAJOR = int(importlib.metadata.version("gradio").split(".")[0])
# The text field of the checkpoint dropdown at the top of the page.
FIELD = {"forge": ".model_selection input", "a1111": "#setting_sd_model_checkpoint input",
         "neo": ".model_selection input", "classic": "#setting_sd_model_checkpoint input"}
# Each lane drives the page of its own WebUI (the Makefile says which lane this is; run by hand,
# the gradio version tells A1111 from Forge)
FLAVOURS = ["a1111", "forge", "neo", "classic"]
LANE = os.environ.get("DREAMBOOTH_LANE", "").strip()
THIS_FLAVOUR = LANE if LANE in FLAVOURS else ("forge" if GRADIO_MAJOR >= 4 else "a1111")
NEW_NAME = "browser-toy"

pytest.importorskip("playwright.sync_api")
pytestmark = needs_chromium


def skip_unless_this_lane_runs(flavour: str) -> None:
    if flavour != THIS_FLAVOUR:
        pytest.skip(f"the {flavour} page runs in the {flavour} lane (this one: {THIS_FLAVOUR})")


def get_json(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


@contextmanager
def fake_webui_page(tmp_path: Path, flavour: str):
    """The fake WebUI's page with the tiny base checkpoint in models/Stable-diffusion."""
    root = tmp_path / "webui"
    put_base_checkpoint(root / "models" / "Stable-diffusion")
    env = {"FAKE_WEBUI_ROOT": str(root), "FAKE_WEBUI_ARGS": "", "FAKE_WEBUI_FLAVOUR": flavour}
    log_path = tmp_path / "page.log"
    with served([str(FAKE_WEBUI_DIR / "page.py")], "fake/opts", log_path, env) as url:
        yield url, root, log_path


def start_training(url: str, body: dict) -> None:
    """POST /dreambooth/v1/train. (Forge rescans its checkpoint list at every page load, empty for
    a moment meanwhile: the base model's name still resolves to its file then.)"""
    request = urllib.request.Request(url + "dreambooth/v1/train", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        assert json.loads(urllib.request.urlopen(request, timeout=30).read())["job_id"]
    except urllib.error.HTTPError as refused:
        text = refused.read().decode("utf8", "replace")
        raise AssertionError(f"{refused.code} {text[:1000]} {get_json(url + 'fake/opts')}")


def field_value(page, flavour: str) -> str:
    return page.locator(FIELD[flavour]).first.input_value()


def wait_field(page, flavour: str, prefix: str, timeout_ms: int) -> None:
    page.wait_for_function(
        "([sel, prefix]) => { const e = document.querySelector(sel); return e && e.value.startsWith(prefix); }",
        arg=[FIELD[flavour], prefix], timeout=timeout_ms)


def listed_choices(page, flavour: str) -> list[str]:
    """Opens the dropdown as a user would and reads its list (neither gradio renders it closed)."""
    box = page.locator(FIELD[flavour]).first
    box.click()
    items = page.locator("ul.options li")
    items.first.wait_for(timeout=5_000)
    names = [t.strip().splitlines()[-1].strip() for t in items.all_inner_texts()]  # no "✓" line
    page.keyboard.press("Escape")
    box.blur()
    return names


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_load_in_txt2img_shows_the_new_checkpoint_in_the_webui_dropdown(tmp_path, flavour):
    skip_unless_this_lane_runs(flavour)
    with fake_webui_page(tmp_path, flavour) as (url, root, log_path), chromium() as browser:
        console: list[str] = []
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#dreambooth_load_txt2img", state="attached", timeout=60_000)
            page.wait_for_function("() => window.dreamboothPolling === true && "
                                   "typeof selectCheckpoint === 'function'", timeout=60_000)
            wait_field(page, flavour, BASE_NAME, 15_000)

            # A training finishes after the page loaded: its file is not among the page's choices.
            page.locator("#tabs button", has_text="DreamBooth").first.click()
            body = quick_config(tmp_path, base=BASE_NAME, name=NEW_NAME, steps=2).to_dict()
            body.pop("models_dir")
            start_training(url, body)
            try:
                page.wait_for_function(
                    "(name) => { const e = document.querySelector('#dreambooth_output textarea, "
                    "#dreambooth_output input'); return e && e.value.endsWith(name); }",
                    arg=f"{NEW_NAME}.safetensors", timeout=180_000)
            except Exception:
                status = get_json(url + "dreambooth/v1/status")
                raise AssertionError(f"no output: {status['phase']} {status['error']} {status['log'][-5:]}\n"
                                     + log_path.read_text()[-2000:])
            new_file = root / "models" / "Stable-diffusion" / f"{NEW_NAME}.safetensors"
            assert new_file.is_file()
            before = listed_choices(page, flavour)
            assert before and not any(n.startswith(NEW_NAME) for n in before), before

            page.click("#dreambooth_load_txt2img")
            page.wait_for_selector("#tab_txt2img", state="visible", timeout=20_000)
            # the tab's own message (in the now hidden DreamBooth tab): switched, no error
            message = page.locator("#dreambooth_message").first.text_content() or ""
            assert NEW_NAME in message and "fail" not in message.lower() \
                and "not in the checkpoint list" not in message, message
            try:
                wait_field(page, flavour, f"{NEW_NAME}.safetensors", 15_000)
            except Exception:
                page.screenshot(path=str(SHOTS / f"webui-{flavour}-blank.png"))
                raise AssertionError(f"the checkpoint dropdown shows {field_value(page, flavour)!r}; "
                                     f"console: {console[-10:]}")
            page.wait_for_timeout(1500)  # still there once every pending update has arrived
            shown = field_value(page, flavour)
            if flavour in ("forge", "neo"):
                assert shown == f"{NEW_NAME}.safetensors", shown  # Forge lists names, no hash
            else:
                assert shown.startswith(f"{NEW_NAME}.safetensors"), shown
            assert page.locator("#tab_txt2img").is_visible()
            assert not page.locator("#tab_dreambooth").is_visible()
            page.screenshot(path=str(SHOTS / f"webui-{flavour}-loaded.png"))

            # the page's list knows the new file, and the server switched to it
            after = listed_choices(page, flavour)
            assert any(n.startswith(f"{NEW_NAME}.safetensors") for n in after), after
            assert field_value(page, flavour).startswith(f"{NEW_NAME}.safetensors")
            opts = get_json(url + "fake/opts")
            if flavour in ("forge", "neo"):
                assert opts["sd_model_checkpoint"] == f"{NEW_NAME}.safetensors", opts
            else:
                assert opts["sd_model_checkpoint"].startswith(f"{NEW_NAME}.safetensors"), opts
                assert opts["loads"][-1].startswith(f"{NEW_NAME}.safetensors"), opts
        except BaseException:
            if "page" in locals():  # what the page showed when it failed
                page.screenshot(path=str(SHOTS / f"webui-{flavour}-failure.png"))
            raise


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_while_training_txt2img_says_why_it_waits_and_a_new_page_shows_the_form(tmp_path, flavour):
    """A long run holds generation: the txt2img tab shows a notice with the training's progress;
    a page opened meanwhile fills its form with the running job's settings; the polling adds no
    console warning (gradio 4 warns for every event whose inputs include a gr.State)."""
    skip_unless_this_lane_runs(flavour)
    with fake_webui_page(tmp_path, flavour) as (url, root, log_path), chromium() as browser:
        console: list[str] = []
        try:
            body = quick_config(tmp_path, base=BASE_NAME, name="long-run", steps=5000).to_dict()
            body.pop("models_dir")
            start_training(url, body)
            deadline = time.time() + 120
            while get_json(url + "dreambooth/v1/status")["phase"] != "training":
                assert time.time() < deadline, get_json(url + "dreambooth/v1/status")["log"][-5:]
                time.sleep(0.5)

            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#tab_txt2img", state="visible", timeout=60_000)
            notice = page.locator("#dreambooth_notice_txt2img")
            notice.wait_for(state="visible", timeout=20_000)
            text = notice.text_content() or ""
            assert "DreamBooth training holds generation" in text and "training" in text, text
            assert "/5000" in text, text

            page.locator("#tabs button", has_text="DreamBooth").first.click()
            page.wait_for_function(
                "() => { const e = document.querySelector('#dreambooth_model_name input, "
                "#dreambooth_model_name textarea'); return e && e.value === 'long-run'; }",
                timeout=20_000)
            page.wait_for_timeout(1500)  # the restore and the first polls have answered
            settled = len(console)
            page.wait_for_timeout(5000)  # five polls
            page.screenshot(path=str(SHOTS / f"webui-{flavour}-restored.png"))
            noisy = [line for line in console[settled:] if "Too many arguments" in line
                     or "non-interactive or hidden tab" in line]
            assert not noisy, noisy
        finally:
            request = urllib.request.Request(url + "dreambooth/v1/cancel", data=b"{}", method="POST",
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).read()
        deadline = time.time() + 60
        while get_json(url + "dreambooth/v1/status")["running"] and time.time() < deadline:
            time.sleep(0.5)


@pytest.mark.parametrize("flavour", ["forge", "neo"])
def test_a_page_visit_sends_no_event_gradio_4_warns_about(tmp_path, flavour):
    """Forge's console showed 55 "Too many arguments provided for the endpoint" per visit: gradio
    4.40's client logs it for every event sent with inputs. A visit (the page loading, our tabs
    looked at, a few polls) sends none of ours with inputs, so none of those lines are ours.
    (The "hidden tab" warnings: tests/test_ui.py, our Tabs name their first tab.)"""
    skip_unless_this_lane_runs(flavour)
    with fake_webui_page(tmp_path, flavour) as (url, root, log_path), chromium() as browser:
        console: list[str] = []
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#dreambooth_load_txt2img", state="attached", timeout=60_000)
        page.wait_for_function("() => window.dreamboothPolling === true", timeout=60_000)
        page.locator("#tabs button", has_text="DreamBooth").first.click()
        for name in ("Concepts", "Parameters", "Model"):  # each of our tabs, as a user looks
            page.locator("#dreambooth_settings_tabs button", has_text=name).first.click()
            page.wait_for_timeout(300)
        page.wait_for_timeout(4000)  # a few polls
        arguments = [line for line in console if "Too many arguments" in line]
        assert not arguments, arguments
