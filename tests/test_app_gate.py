"""The standalone app (``python -m dreambooth ui``) is the user's alone on every route, gradio's
as well as ours: another web page (foreign ``Origin``, ``null`` Origin) or a DNS-rebinding
request (foreign ``Host``) is refused on the page, config, predict, queue (websocket on gradio 3,
SSE on 4), upload and file routes before anything runs; gradio's file routes serve only the
runs' samples and gradio's temp files, never the working folder or the models folder.

One real app (uvicorn on a free port) serves every test; a stand-in job runs meanwhile, so that
a hostile Cancel that got through would show."""
from __future__ import annotations

import base64
import json
import os
import socket
import time

import httpx
import pytest

from browser_fixtures import free_port
from conftest import write_safetensors
from dreambooth.tab import form, standalone, ui_poll
from dreambooth.common.config import TrainingConfig
from dreambooth.app.job import runner
from dreambooth.common.run_types import RunPaths, TrainResult

EVIL = "http://evil.example"


def stand_in_job(config, paths, reporter, **_) -> TrainResult:
    """Shows one sample and waits for a cancel (at most 2 minutes)."""
    reporter.samples([paths.samples_dir / "step-000010-0.png"])
    deadline = time.time() + 120
    while not reporter.should_stop() and time.time() < deadline:
        time.sleep(0.05)
    return TrainResult(output_path=None, steps=0, total_steps=0, seconds=0.0, cancelled=True)


def fn_index(demo, name: str) -> int:
    fns = demo.fns.items() if isinstance(demo.fns, dict) else enumerate(demo.fns)
    return next(i for i, f in fns if getattr(f.fn, "__name__", "") == name)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app started from ``home`` (the working folder) with models in ``home/models``."""
    from PIL import Image

    home = tmp_path_factory.mktemp("gate") / "home"
    models = home / "models"
    samples = models / "dreambooth" / "toy" / "samples"
    samples.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(samples / "step-000010-0.png")
    (samples / "leak.png").symlink_to(home / "notes.txt")
    (home / "notes.txt").write_text("a private note")
    (models / "dreambooth" / "toy" / "config.json").write_text("{}")
    write_safetensors(models / "Stable-diffusion" / "base.safetensors")
    write_safetensors(models / "Lora" / "mine.safetensors")
    cwd, allowed = os.getcwd(), list(ui_poll.ALLOWED_PATHS)
    os.chdir(home)  # gradio 3 serves its working folder: the app's must stay closed
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    port = free_port()
    demo, app, url = standalone.standalone_app(models, port, [])
    job = runner().start(TrainingConfig(model_name="toy"),
                         RunPaths(models / "dreambooth" / "toy", models / "Stable-diffusion"),
                         work=stand_in_job, validate=False)
    try:
        yield {"demo": demo, "url": url, "port": port, "home": home, "models": models,
               "samples": samples, "job": job}
    finally:
        runner().cancel()
        runner().wait(30)
        demo.close()
        os.chdir(cwd)
        ui_poll.ALLOWED_PATHS[:] = allowed  # what standalone_app set
        form.set_host(None)


def request(served, method: str, path: str, headers: dict, **kwargs) -> tuple[int, bytes]:
    """Status and body (a streaming answer's body is not waited for)."""
    host = {"Host": f"127.0.0.1:{served['port']}"}
    with httpx.Client(base_url=served["url"], timeout=10) as client:
        with client.stream(method, path, headers={**host, **headers}, **kwargs) as response:
            streaming = "event-stream" in response.headers.get("content-type", "")
            return response.status_code, b"" if streaming else response.read()


def websocket_handshake(served, path: str, headers: dict) -> str:
    """The status line a websocket handshake gets (as a browser would send it)."""
    lines = {"Host": f"127.0.0.1:{served['port']}", "Upgrade": "websocket",
             "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), **headers}
    raw = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=10) as sock:
        sock.sendall(raw.encode())
        return sock.recv(4096).split(b"\r\n")[0].decode()


def nothing_happened(served) -> None:
    """The stand-in job still runs, uncancelled; no job was started, nothing written."""
    snap = runner().snapshot()
    assert runner().running and snap.job_id == served["job"], snap
    assert not any("cancel" in line for line in snap.log), snap.log
    assert sorted(p.name for p in (served["models"] / "dreambooth").iterdir()) == ["toy"]
    assert sorted(p.name for p in (served["models"] / "Lora").iterdir()) == ["mine.safetensors"]


HOSTILE = {"foreign Origin": lambda port: {"Origin": EVIL},
           "null Origin": lambda port: {"Origin": "null"},
           "foreign Host": lambda port: {"Host": f"evil.example:{port}"},
           "rebinding Host, own Origin": lambda port: {"Host": f"evil.example:{port}",
                                                       "Origin": f"http://evil.example:{port}"}}


def hostile_routes(served) -> list[tuple[str, str, dict]]:
    """Every route of gradio 3.41 and 4.40 that matters, and ours: (method, path, arguments)."""
    demo, models, home = served["demo"], served["models"], served["home"]
    cancel = {"fn_index": fn_index(demo, "cancel_job"), "data": [], "session_hash": "evil"}
    queued = {"fn_index": fn_index(demo, "<lambda>"), "data": [], "session_hash": "evil"}
    checkpoint = models / "Stable-diffusion" / "base.safetensors"
    return [("GET", "/", {}), ("GET", "/config", {}), ("GET", "/info", {}),
            ("GET", "/file=notes.txt", {}), ("GET", f"/file={home / 'notes.txt'}", {}),
            ("GET", f"/file={checkpoint}", {}), ("GET", f"/file/{checkpoint}", {}),
            ("GET", f"/file={served['samples'] / 'step-000010-0.png'}", {}),
            ("POST", "/run/predict", {"json": cancel}), ("POST", "/api/predict", {"json": cancel}),
            ("POST", "/queue/join", {"json": queued}), ("GET", "/queue/data?session_hash=evil", {}),
            ("GET", "/queue/status", {}), ("GET", "/heartbeat/evil", {}),
            ("POST", "/upload", {"files": {"files": ("x.txt", b"dropped")}}),
            ("POST", "/reset", {"json": {"session_hash": "evil", "fn_index": 0}}),
            ("GET", "/dreambooth/v1/status", {}), ("POST", "/dreambooth/v1/cancel", {"json": {}})]


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_other_pages_and_host_names_are_refused_on_every_route(served, kind):
    headers = HOSTILE[kind](served["port"])
    answered = []
    for method, path, kwargs in hostile_routes(served):
        status, body = request(served, method, path, headers, **kwargs)
        if status != 403 or (b"are refused" not in body and b"not this app's" not in body):
            answered.append((method, path, status, body[:80]))
    assert not answered, answered
    nothing_happened(served)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_the_queue_websocket_is_refused_before_it_opens(served, kind):
    # gradio 3's queue (Train, Make class pictures ...) runs over this websocket
    status = websocket_handshake(served, "/queue/join", HOSTILE[kind](served["port"]))
    assert status.split()[1] == "403", status
    nothing_happened(served)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_apps_own_page_works(served, host):
    own = {"Host": f"{host}:{served['port']}", "Origin": f"http://{host}:{served['port']}"}
    for path in ("/", "/config", "/dreambooth/v1/status"):
        status, body = request(served, "GET", path, own)
        assert status == 200 and body, (path, body[:200])
    status, body = request(served, "POST", "/upload", own,  # "Import concepts_list.json"
                           files={"files": ("concepts_list.json", b"[]")})
    assert status == 200 and b"concepts_list.json" in body, body[:200]
    if served["demo"].config["version"].startswith("3."):
        assert websocket_handshake(served, "/queue/join", own).split()[1] == "101"
    nothing_happened(served)


def gallery_paths(value) -> list[str]:
    """The picture paths in a gallery value of gradio 3 ([{name}, caption]) or 4 ({image: {path}})."""
    if isinstance(value, dict):
        found = [v for k, v in value.items() if k in ("name", "path") and str(v).endswith(".png")]
        return found + [p for v in value.values() for p in gallery_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in gallery_paths(v)]
    return []


def test_samples_show_in_the_tab(served):
    """The page's poll gets the running job's sample; the picture it is told to load is served
    (gradio copies it to its temp folder), and so is the sample itself."""
    own = {"Origin": f"http://127.0.0.1:{served['port']}"}
    poll = {"fn_index": fn_index(served["demo"], "poll_page"), "data": [], "session_hash": "mine"}
    status, body = request(served, "POST", "/run/predict", own, json=poll)
    assert status == 200, body[:300]
    paths = gallery_paths(json.loads(body)["data"])
    assert paths, body[:600]
    sample = served["samples"] / "step-000010-0.png"
    for path in [*paths, str(sample)]:
        for route in ("/file=", "/file/"):
            status, picture = request(served, "GET", route + path, own)
            assert status == 200 and picture == sample.read_bytes(), (route, path, status)
    nothing_happened(served)


@pytest.mark.parametrize("what", ["cwd file", "relative cwd file", "checkpoint", "lora",
                                  "run config", "link out of samples", "dot-dot out of samples",
                                  "models folder", "working folder", "url"])
def test_files_outside_the_pictures_are_refused_even_to_the_app(served, what):
    models, home, samples = served["models"], served["home"], served["samples"]
    path = {"cwd file": str(home / "notes.txt"), "relative cwd file": "notes.txt",
            "checkpoint": str(models / "Stable-diffusion" / "base.safetensors"),
            "lora": str(models / "Lora" / "mine.safetensors"),
            "run config": str(models / "dreambooth" / "toy" / "config.json"),
            "link out of samples": str(samples / "leak.png"),
            "dot-dot out of samples": f"{samples}/%2e%2e/%2e%2e/%2e%2e/Stable-diffusion/base.safetensors",
            "models folder": str(models), "working folder": str(home), "url": "http://evil.example/x"}[what]
    for route in ("/file=", "/file/"):
        status, body = request(served, "GET", route + path, {})
        assert status == 403 and b"file not served" in body, (route, path, status, body[:100])
