"""A real browser (Debian's Chromium, driven by Playwright) against the standalone app serving the
tab with the tiny model: fill a concept, Train, watch progress, the loss curve and a sample
appear; Cancel a second run. Screenshots go to artifacts/screenshots/."""
from __future__ import annotations

import json
import time
import urllib.request

import pytest

from browser_fixtures import ARGS, CHROMIUM, SHOTS, needs_chromium, served
from ui_fixtures import BASE_NAME, pictures, put_base_checkpoint

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = needs_chromium


@pytest.fixture
def server(tmp_path):
    """``python -m dreambooth ui`` on a free port with the tiny base model; stopped afterwards."""
    models = tmp_path / "models"
    put_base_checkpoint(models / "Stable-diffusion")
    pictures(tmp_path / "pics", count=3)
    config = {"base_model": BASE_NAME, "model_name": "browser-toy", "resolution": 64,
              "with_prior_preservation": False, "max_train_steps": 120, "learning_rate": 1e-4,
              "optimizer": "adamw", "mixed_precision": "no", "gradient_checkpointing": False,
              "checkpoint_every_n_steps": 0, "sample_every_n_steps": 40, "sample_steps": 2,
              # issue 28: one of the three pictures held out, scored every 20 steps
              "validation_split": 0.34, "validate_every_n_steps": 20, "keep_best": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with served(["-m", "dreambooth", "ui", "--models-dir", str(models),
                 "--config", str(tmp_path / "config.json")], "dreambooth/v1/status",
                tmp_path / "server.log") as url:
        yield url, tmp_path


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def open_tab(page, name: str) -> None:
    page.locator("#dreambooth_settings_tabs button", has_text=name).first.click()


def phase(page) -> str:
    return page.get_attribute("#dreambooth_status_line", "data-phase") or ""


def wait_phase(page, wanted: tuple[str, ...], timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = phase(page)
        if current in wanted:
            return current
        time.sleep(0.25)
    raise AssertionError(f"phase {phase(page)!r}, wanted {wanted}: "
                         + page.inner_text("#dreambooth_log"))


def test_train_progress_samples_and_cancel_in_a_real_browser(server):
    url, root = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            seen: list[str] = []  # what the page sent and heard, written out on a failure
            page.on("request", lambda r: seen.append(f"{r.url} {(r.post_data or '')[:120]}")
                    if "run/" in r.url or "queue" in r.url else None)
            page.on("response", lambda r: seen.append(f"{r.status} {r.url}")
                    if "run/" in r.url or "queue" in r.url else None)
            page.on("console", lambda m: seen.append("console " + m.text))
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#dreambooth_train", timeout=60_000)
            # the page's script runs once gradio has mounted the app and wired its events
            page.wait_for_function("() => window.dreamboothPolling === true", timeout=60_000)
            wait_phase(page, ("idle",), 15)

            open_tab(page, "Concepts")
            field(page, "dreambooth_concepts_0_instance_data_dir").fill(str(root / "pics"))
            # Both prompts trigger the identifier check; two checks sent within a few ms (a
            # program filling fields, not a person typing) may answer in either order, so let
            # the first one answer before the second is sent.
            field(page, "dreambooth_concepts_0_class_prompt").fill("photo of a toy")
            page.wait_for_timeout(1000)
            field(page, "dreambooth_concepts_0_instance_prompt").fill("photo of ohwx toy")
            try:
                page.wait_for_selector("#dreambooth_ident_0 .dreambooth-ident-good", timeout=60_000)
            except Exception:
                (SHOTS / "browser-debug.txt").write_text("\n".join(seen))
                page.screenshot(path=str(SHOTS / "ident-failure.png"))
                raise AssertionError(f"identifier check: {page.inner_text('#dreambooth_ident_0')!r}; "
                                     f"requests in {SHOTS / 'browser-debug.txt'}")
            page.screenshot(path=str(SHOTS / "01-concept.png"))

            page.click("#dreambooth_train")
            # watch the bar until the run is done: it must show at least two step counts
            steps: set[int] = set()
            shot = False
            deadline = time.time() + 120
            while time.time() < deadline:
                current = phase(page)
                step = int(page.get_attribute("#dreambooth_progress .dreambooth-progress",
                                              "data-step") or 0)
                if current in ("training", "saving", "done"):
                    steps.add(step)
                if current == "training" and step and not shot:
                    page.screenshot(path=str(SHOTS / "02-training.png"))
                    shot = True
                if current in ("done", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            assert phase(page) == "done", page.inner_text("#dreambooth_log")
            assert len(steps) >= 2 and max(steps) == 120, f"the progress bar did not move: {steps}"
            page.wait_for_selector("#dreambooth_gallery img", timeout=15_000)
            assert page.locator("#dreambooth_loss_plot polyline").count() >= 2
            assert "120 / 120 steps" in page.inner_text("#dreambooth_progress")
            output = field(page, "dreambooth_output")
            page.wait_for_function(
                "() => { const e = document.querySelector('#dreambooth_output textarea, "
                "#dreambooth_output input'); return e && e.value.endsWith('browser-toy.safetensors'); }",
                timeout=15_000)
            assert output.input_value().endswith("browser-toy.safetensors")
            # the validation curve over the training loss, its best step marked, and the
            # best step's file one click from txt2img
            assert page.locator("#dreambooth_loss_plot .dreambooth-plot-val-dot").count() == 6
            best = page.get_attribute("#dreambooth_loss_plot .dreambooth-plot-best", "data-step")
            assert best and page.locator("#dreambooth_load_best").is_visible()
            assert f"({best})" in page.inner_text("#dreambooth_load_best")
            page.screenshot(path=str(SHOTS / "03-done.png"), full_page=True)
            page.locator("#dreambooth_loss_plot").first.screenshot(path=str(SHOTS / "03-curve.png"))

            # a second, long run: Cancel stops it
            open_tab(page, "Model")
            field(page, "dreambooth_model_name").fill("browser-toy-2")
            open_tab(page, "Parameters")
            field(page, "dreambooth_max_train_steps").fill("5000")
            page.click("#dreambooth_train")
            wait_phase(page, ("training",), 60)
            page.click("#dreambooth_cancel")
            page.wait_for_selector("#dreambooth_message:has-text('Cancel requested')", timeout=10_000)
            wait_phase(page, ("cancelled",), 60)
            assert "5000 steps" in page.inner_text("#dreambooth_progress")
            page.screenshot(path=str(SHOTS / "04-cancelled.png"))
        finally:
            browser.close()


def test_a_hostile_web_page_cannot_drive_the_api(server):
    """A page on another site, open in the same browser, posts a training job and a cancel the
    way a "simple" cross-site request can (text/plain, no preflight): nothing starts."""
    url, root = server
    evil = "http://evil.example/"
    body = json.dumps({"base_model": BASE_NAME, "model_name": "evil", "resolution": 64,
                       "with_prior_preservation": False, "max_train_steps": 5,
                       "concepts": [{"instance_data_dir": str(root / "pics"),
                                     "instance_prompt": "photo of ohwx toy"}]})
    script = f"""async () => {{
        const results = [];
        for (const [path, type] of [["train", "text/plain"], ["train", "application/json"],
                                    ["cancel", "text/plain"]]) {{
            try {{
                const r = await fetch({json.dumps(url)} + "dreambooth/v1/" + path,
                                      {{method: "POST", mode: "no-cors", body: {json.dumps(body)},
                                        headers: {{"Content-Type": type}}}});
                results.push(path + " " + r.type);
            }} catch (e) {{ results.push(path + " blocked " + e); }}
        }}
        try {{
            const r = await fetch({json.dumps(url)} + "dreambooth/v1/status");
            results.push("read " + (await r.text()).slice(0, 40));
        }} catch (e) {{ results.push("read blocked"); }}
        return results;
    }}"""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.route(evil, lambda route: route.fulfill(
                status=200, content_type="text/html", body="<html><body>cute cats</body></html>"))
            page.goto(evil)
            results = page.evaluate(script)
        finally:
            browser.close()
    assert "read blocked" in results, results  # the page cannot read the status either
    status = json.loads(urllib.request.urlopen(url + "dreambooth/v1/status", timeout=5).read())
    assert status["phase"] == "idle" and status["job_id"] == 0, (results, status)
    assert not (root / "models" / "dreambooth" / "evil").exists()
    request = urllib.request.Request(url + "dreambooth/v1/status",
                                     headers={"Origin": "https://evil.example"})
    try:
        urllib.request.urlopen(request, timeout=5)
        raise AssertionError("a foreign Origin was answered")
    except urllib.error.HTTPError as refused:
        assert refused.code == 403 and "access-control-allow-origin" not in {
            k.lower() for k in refused.headers}
