"""The API is the user's alone: other web pages, foreign host names (DNS rebinding), non-JSON
bodies ("simple" cross-site requests) and huge bodies are refused before anything happens."""
from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dreambooth.app import api
from dreambooth.app.job import runner
from dreambooth.host import StandaloneHost

P = api.PREFIX
LOCAL = "http://127.0.0.1:7860"


@pytest.fixture
def app(tmp_path):
    app = FastAPI()
    api.mount(app, host=StandaloneHost(tmp_path / "models"), credentials={},
              policy=api.RequestPolicy.from_settings({}))
    return app


def refused_without_side_effects(response, status: int) -> None:
    assert response.status_code == status, response.text
    assert not runner().running and runner().snapshot().phase in ("idle", "done", "cancelled", "failed")


@pytest.mark.parametrize("origin", ["https://evil.example", "http://127.0.0.1:9999", "null",
                                    "http://localhost.evil.example:7860", "file://"])
@pytest.mark.parametrize("method, route", [("post", "train"), ("post", "cancel"),
                                           ("get", "status"), ("get", "models")])
def test_other_pages_are_refused_on_every_route(app, origin, method, route):
    client = TestClient(app, base_url=LOCAL)
    kwargs = {"json": {"base_model": "x"}} if route == "train" else {}
    response = getattr(client, method)(f"{P}/{route}", headers={"Origin": origin}, **kwargs)
    refused_without_side_effects(response, 403)
    assert "other web pages" in response.json()["detail"]
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("host, origin", [
    ("127.0.0.1:7860", "http://127.0.0.1:7860"), ("localhost:7860", "http://localhost:7860"),
    ("[::1]:7860", "http://[::1]:7860"), ("192.168.1.20:7860", "http://192.168.1.20:7860"),
    ("localhost", "http://localhost:80"), ("127.0.0.1:7860", None)])
def test_the_apps_own_page_and_scripts_are_served(app, host, origin):
    headers = {"Host": host, **({"Origin": origin} if origin else {})}
    response = TestClient(app, base_url=LOCAL).get(f"{P}/status", headers=headers)
    assert response.status_code == 200 and response.json()["phase"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7860", "attacker.test",
                                  "localhost.evil.example", ""])
def test_foreign_host_names_are_refused_dns_rebinding(app, host):
    response = TestClient(app, base_url=LOCAL).get(f"{P}/status", headers={"Host": host})
    refused_without_side_effects(response, 403)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_simple_cross_site_bodies_are_never_read(app, content_type, tmp_path):
    body = json.dumps({"base_model": "x", "model_name": "y"}).encode()
    headers = {"content-type": content_type} if content_type else {}
    response = TestClient(app, base_url=LOCAL).post(f"{P}/train", content=body, headers=headers)
    refused_without_side_effects(response, 415)
    assert "application/json" in response.json()["detail"]
    if content_type:  # a form post to cancel is refused too
        cancel = TestClient(app, base_url=LOCAL).post(f"{P}/cancel", content=b"x=1",
                                                      headers={"content-type": content_type})
        refused_without_side_effects(cancel, 415)


def test_json_with_a_charset_is_fine_and_bad_json_is_a_field_error(app):
    client = TestClient(app, base_url=LOCAL)
    response = client.post(f"{P}/train", content=b'{"learning_rate": "x"}',
                           headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 422 and "learning_rate" in response.text
    for raw in (b"[" * 100_000, b"\xff\xfe", b"{nope"):
        bad = client.post(f"{P}/train", content=raw, headers={"content-type": "application/json"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "config"


def test_a_huge_body_is_refused_while_it_is_read(app):
    client = TestClient(app, base_url=LOCAL)
    big = b'{"sample_prompts": ["' + b"a" * (api.MAX_BODY_BYTES + 10) + b'"]}'
    refused_without_side_effects(client.post(f"{P}/train", content=big,
                                             headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the cap holds while streaming
        yield b'{"sample_prompts": ["'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"]}'

    response = client.post(f"{P}/train", content=chunks(), headers={"content-type": "application/json"})
    refused_without_side_effects(response, 413)


@pytest.mark.parametrize("body", [{"seed": 10 ** 400}, {"resolution": 100000},
                                  {"concepts_list": "/etc/passwd"}, {"model_name": "a\u0000b"},
                                  [{"instance_prompt": 1}], "just text", 12, None])
def test_hostile_configs_get_field_errors_never_500(app, body):
    response = TestClient(app, base_url=LOCAL).post(
        f"{P}/train", content=json.dumps(body), headers={"content-type": "application/json"})
    refused_without_side_effects(response, 422)
    assert response.json()["errors"] and all(e["field"] for e in response.json()["errors"])


def test_the_webuis_cors_options_extend_the_allowed_pages(make_fake_webui):
    make_fake_webui(args="--cors-allow-origins https://my.tools,http://127.0.0.1:3000 "
                         "--cors-allow-origins-regex https://.*\\.mine\\.example "
                         "--server-name studio.lan")
    app = FastAPI()
    api.on_app_started(None, app)
    client = TestClient(app, base_url=LOCAL)
    for origin in ("https://my.tools", "http://127.0.0.1:3000", "https://a.mine.example"):
        assert client.get(f"{P}/status", headers={"Origin": origin}).status_code == 200, origin
    assert client.get(f"{P}/status", headers={"Origin": "https://evil.example"}).status_code == 403
    on_lan = TestClient(app, base_url="http://studio.lan:7860")
    assert on_lan.get(f"{P}/status").status_code == 200  # --server-name is this app's name
    assert TestClient(app, base_url="http://my.tools").get(f"{P}/status").status_code == 200
    assert TestClient(app, base_url="http://other.lan").get(f"{P}/status").status_code == 403


def test_share_links_are_allowed_only_with_share(make_fake_webui, monkeypatch):
    make_fake_webui(args="--share")
    app = FastAPI()
    api.on_app_started(None, app)
    assert TestClient(app, base_url="https://abc123.gradio.live").get(f"{P}/status").status_code == 200
    monkeypatch.setenv(api.ALLOWED_HOSTS_ENV, "proxy.example")
    assert TestClient(app, base_url="https://proxy.example").get(f"{P}/status").status_code == 200


def test_the_standalone_app_drops_gradios_wildcard_cors():
    from fastapi.middleware.cors import CORSMiddleware

    app = FastAPI()
    app.add_middleware(CORSMiddleware, allow_origins=["*"])
    api.mount(app, host=None, credentials={}, policy=api.RequestPolicy())
    with_wildcard = TestClient(app, base_url=LOCAL).get(f"{P}/status", headers={"Origin": LOCAL})
    assert with_wildcard.headers.get("access-control-allow-origin") == "*"
    assert api.drop_wildcard_cors(app) is True
    plain = TestClient(app, base_url=LOCAL).get(f"{P}/status", headers={"Origin": LOCAL})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
