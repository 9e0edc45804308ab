"""A real browser against the fake WebUI's page (tests/fake_webui/page.py) with a LoRA run: the
Training method shows the LoRA options only when chosen, and after a LoRA job finished, "Use in
txt2img" puts ``<lora:NAME:1>`` into the txt2img prompt — once, however often it is clicked —,
refreshes the Lora cards and shows the txt2img tab, leaving the active checkpoint alone."""
from __future__ import annotations

import importlib.metadata
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser_fixtures import SHOTS, chromium, needs_chromium, served
from conftest import FAKE_WEBUI_DIR
from test_browser_webui import FLAVOURS, skip_unless_this_lane_runs
from ui_fixtures import BASE_NAME, put_base_checkpoint, quick_config

GRADIO_MAJOR = int(importlib.metadata.version("gradio").split(".")[0])
NAME = "browser-lora"
TAG = f"<lora:{NAME}:1>"
PROMPT = "#txt2img_prompt textarea"

pytest.importorskip("playwright.sync_api")
pytestmark = needs_chromium


def get_json(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def start_training(url: str, body: dict) -> None:
    request = urllib.request.Request(url + "dreambooth/v1/train", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        assert json.loads(urllib.request.urlopen(request, timeout=30).read())["job_id"]
    except urllib.error.HTTPError as refused:
        raise AssertionError(f"{refused.code} {refused.read().decode('utf8', 'replace')[:1000]}")


def visible(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id}").first.is_visible()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_use_in_txt2img_puts_the_lora_tag_into_the_prompt_once(tmp_path: Path, flavour):
    skip_unless_this_lane_runs(flavour)
    root = tmp_path / "webui"
    put_base_checkpoint(root / "models" / "Stable-diffusion")
    env = {"FAKE_WEBUI_ROOT": str(root), "FAKE_WEBUI_ARGS": "", "FAKE_WEBUI_FLAVOUR": flavour}
    log_path = tmp_path / "page.log"
    with served([str(FAKE_WEBUI_DIR / "page.py")], "fake/opts", log_path, env) as url, \
            chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        console: list[str] = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#dreambooth_load_txt2img", state="attached", timeout=60_000)
        page.wait_for_function("() => window.dreamboothPolling === true && "
                               "typeof dreamboothUseLora === 'function'", timeout=60_000)
        page.locator("#tabs button", has_text="DreamBooth").first.click()
        page.locator("#dreambooth_settings_tabs button", has_text="Parameters").first.click()
        page.wait_for_selector("#dreambooth_training_method", state="visible", timeout=10_000)
        assert not visible(page, "dreambooth_lora_rank")  # full: no LoRA option
        page.locator("#dreambooth_group_advanced .label-wrap").first.click()  # open Advanced
        page.wait_for_selector("#dreambooth_export_format", state="visible", timeout=10_000)
        page.locator("#dreambooth_training_method input").first.click()
        page.locator("ul.options li", has_text="lora").first.click()
        page.wait_for_selector("#dreambooth_lora_rank", state="visible", timeout=10_000)
        assert visible(page, "dreambooth_dora") and not visible(page, "dreambooth_lora_conv_rank")
        assert not visible(page, "dreambooth_lokr_factor")
        assert not visible(page, "dreambooth_export_format")
        page.wait_for_selector("#dreambooth_method_note:has-text('Lora folder')", timeout=10_000)

        body = quick_config(tmp_path, base=BASE_NAME, name=NAME, steps=2, sample_steps=0,
                            training_method="lora", lora_rank=4, lora_alpha=2.0).to_dict()
        body.pop("models_dir")
        before = get_json(url + "fake/opts")
        start_training(url, body)
        try:
            page.wait_for_function(
                "(name) => { const e = document.querySelector('#dreambooth_output textarea, "
                "#dreambooth_output input'); return e && e.value.endsWith(name); }",
                arg=f"Lora/{NAME}.safetensors", timeout=120_000)
        except Exception:
            status = get_json(url + "dreambooth/v1/status")
            raise AssertionError(f"no output: {status['phase']} {status['error']} "
                                 f"{status['log'][-5:]}\n" + log_path.read_text()[-2000:])
        assert not visible(page, "dreambooth_extract")  # a LoRA is no full run to extract from

        prompt = page.locator(PROMPT).first
        page.evaluate("""(sel) => { const box = document.querySelector(sel);
            box.value = 'photo of zwx dog'; box.dispatchEvent(new Event('input', {bubbles: true})); }""",
                      PROMPT)
        page.click("#dreambooth_load_txt2img")
        page.wait_for_selector("#tab_txt2img", state="visible", timeout=20_000)
        page.wait_for_function("([sel, tag]) => document.querySelector(sel).value.includes(tag)",
                               arg=[PROMPT, TAG], timeout=15_000)
        page.wait_for_selector(f"#txt2img_lora_cards_html [data-name='{NAME}']", state="attached",
                               timeout=15_000)  # the Lora cards were refreshed by their button
        page.screenshot(path=str(SHOTS / f"lora-{flavour}-txt2img.png"))

        # a second click: the prompt keeps one tag
        page.locator("#tabs button", has_text="DreamBooth").first.click()
        page.click("#dreambooth_load_txt2img")
        page.wait_for_selector("#tab_txt2img", state="visible", timeout=20_000)
        page.wait_for_timeout(1500)  # the second answer and its script have run
        assert prompt.input_value() == f"photo of zwx dog {TAG}", (prompt.input_value(), console)

        # what the page shows is what the WebUI gets when Generate is pressed
        page.click("#txt2img_generate")
        page.wait_for_selector("#txt2img_prompt_received", state="attached", timeout=15_000)
        assert page.locator("#txt2img_prompt_received").first.text_content() == \
            f"photo of zwx dog {TAG}"

        after = get_json(url + "fake/opts")
        assert NAME in after["loras"] and after["lora_rescans"] >= before["lora_rescans"] + 2
        # a LoRA is not a checkpoint: nothing was switched or loaded
        assert after["sd_model_checkpoint"] == before["sd_model_checkpoint"]
        assert not any(NAME in load for load in after["loads"])
        assert not any("error" in line.lower() for line in console if "DreamBooth" in line), console
