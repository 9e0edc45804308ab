"""The HTTP routes with FastAPI's test client: start, status, cancel, refusals, validation, auth."""
from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dreambooth.app import api
from dreambooth.app.job import runner
from dreambooth.host import StandaloneHost

from ui_fixtures import BASE_NAME, put_base_checkpoint, quick_config

P = api.PREFIX
LOCAL = "http://127.0.0.1:7860"


@pytest.fixture
def host(tmp_path):
    host = StandaloneHost(tmp_path / "models")
    put_base_checkpoint(host.checkpoints_dir())
    return host


@pytest.fixture
def client(host):
    app = FastAPI()
    api.mount(app, host=host, credentials={})
    yield TestClient(app, base_url=LOCAL)
    runner().cancel()
    runner().wait(120)


def body(tmp_path, **overrides) -> dict:
    config = quick_config(tmp_path, base=BASE_NAME, **overrides).to_dict()
    config.pop("models_dir")
    return config


def wait_for(client, phases, timeout=120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get(f"{P}/status").json()
        if status["phase"] in phases:
            return status
        time.sleep(0.2)
    raise AssertionError(f"phase never reached {phases}: {status['phase']} {status['log'][-5:]}")


def test_start_status_second_start_refused_cancel(client, tmp_path):
    started = client.post(f"{P}/train", json=body(tmp_path, name="api-run", steps=2000))
    assert started.status_code == 200, started.text
    job_id = started.json()["job_id"]
    status = wait_for(client, ("training",))
    assert status["job_id"] == job_id and status["running"] and status["total"] == 2000

    again = client.post(f"{P}/train", json=body(tmp_path, name="other"))
    assert again.status_code == 409 and "already running" in again.json()["detail"]

    cancelled = client.post(f"{P}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["cancelled"] is True
    final = wait_for(client, ("cancelled",))
    assert not final["running"] and final["step"] < 2000
    assert client.post(f"{P}/cancel").json()["cancelled"] is False


def test_a_finished_run_is_listed_by_models(client, tmp_path):
    assert client.post(f"{P}/train", json=body(tmp_path, name="listed", steps=2)).status_code == 200
    status = wait_for(client, ("done", "failed"))
    assert status["phase"] == "done", status["log"][-10:]
    models = client.get(f"{P}/models").json()
    titles = [c["title"] for c in models["checkpoints"]]
    assert titles == ["listed.safetensors", BASE_NAME]
    assert [r["name"] for r in models["runs"]] == ["listed"]


def test_the_api_trains_a_lora_into_the_lora_folder(client, host, tmp_path):
    bad = client.post(f"{P}/train", json=body(tmp_path, name="api-lora", training_method="lorax"))
    assert bad.status_code == 422 and "training_method" in bad.text
    started = client.post(f"{P}/train", json=body(tmp_path, name="api-lora", steps=2,
                                                  training_method="lora", lora_rank=4))
    assert started.status_code == 200, started.text
    status = wait_for(client, ("done", "failed"))
    assert status["phase"] == "done", status["log"][-10:]
    assert (host.lora_dir() / "api-lora.safetensors").is_file()
    assert not (host.checkpoints_dir() / "api-lora.safetensors").exists()


def test_bad_config_is_rejected_with_field_errors(client, tmp_path):
    bad = body(tmp_path, learning_rate=-1.0, resolution=65)
    bad["optimiser"] = "adamw"  # misspelt
    response = client.post(f"{P}/train", json=bad)
    assert response.status_code == 422
    fields = {e["field"]: e["message"] for e in response.json()["errors"]}
    assert "optimiser" in fields and "unknown option" in fields["optimiser"]
    bad.pop("optimiser")
    fields = {e["field"] for e in client.post(f"{P}/train", json=bad).json()["errors"]}
    assert fields == {"learning_rate", "resolution"}
    wrong_type = client.post(f"{P}/train", json={**body(tmp_path), "max_train_steps": "many"})
    assert wrong_type.status_code == 422
    json_type = {"content-type": "application/json"}
    assert client.post(f"{P}/train", content=b"not json", headers=json_type).status_code == 422
    assert runner().snapshot().phase in ("idle", "done", "cancelled", "failed")


def tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_one_response_names_every_wrong_field(client, host, tmp_path):
    """An unknown key and a mistyped value no longer hide the range and folder checks."""
    bad = body(tmp_path, resolution=100_000)  # out of range
    bad["optimiser"] = "adamw"  # unknown (misspelt)
    bad["max_train_steps"] = "many"  # mistyped
    bad["concepts"][0]["instance_data_dir"] = str(tmp_path / "no-such-folder")
    before = tree(tmp_path)
    job_before = runner().snapshot().job_id
    response = client.post(f"{P}/train", json=bad)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == "invalid training config"
    errors = response.json()["errors"]
    fields = {e["field"]: e["message"] for e in errors}
    assert set(fields) == {"optimiser", "max_train_steps", "resolution",
                           "concepts[0].instance_data_dir"}, errors
    assert "unknown option" in fields["optimiser"]
    assert "expected a whole number" in fields["max_train_steps"]
    assert "must be in [0, 4096]" in fields["resolution"]
    assert "no-such-folder is not a folder" in fields["concepts[0].instance_data_dir"]
    assert len(errors) == len({(e["field"], e["message"]) for e in errors})  # each once
    assert not runner().running and runner().snapshot().job_id == job_before  # nothing started
    assert tree(tmp_path) == before  # nothing written (work folder, outputs, class pictures)


def test_a_field_that_fails_to_parse_is_not_reported_again_by_the_checks(client, tmp_path):
    bad = body(tmp_path)
    bad["base_model"] = 5  # parsed: no; the partial config's empty base_model is not news
    bad["concepts"].append("not an object")  # concepts[1]; concepts[0] keeps its index
    bad["concepts"].append({"instance_data_dir": str(tmp_path / "gone"), "instance_prompt": 3})
    bad["learning_rate"] = 0  # parsed, out of range: still reported
    errors = client.post(f"{P}/train", json=bad).json()["errors"]
    fields = [e["field"] for e in errors]
    assert sorted(fields) == sorted(["base_model", "concepts[1]", "concepts[2].instance_prompt",
                                     "concepts[2].instance_data_dir", "learning_rate"]), errors
    assert "expected text" in errors[fields.index("base_model")]["message"]
    assert "is not a folder" in errors[fields.index("concepts[2].instance_data_dir")]["message"]
    assert not runner().running


def test_a_foreign_models_dir_is_listed_with_the_other_errors(client, tmp_path):
    bad = {**body(tmp_path, learning_rate=-1.0), "models_dir": "/tmp/elsewhere", "typo": 1}
    errors = client.post(f"{P}/train", json=bad).json()["errors"]
    assert [e["field"] for e in errors] == ["models_dir", "typo", "learning_rate"], errors
    for not_an_object in (b"3", b'"text"', b"null"):  # just that: no checks of a default config
        response = client.post(f"{P}/train", content=not_an_object,
                               headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert [e["field"] for e in response.json()["errors"]] == ["config"]


@pytest.mark.parametrize("name", ["../../escape", "..", "a/b", "..\\up", "  "])
def test_traversal_in_the_model_name_is_rejected(client, tmp_path, host, name):
    response = client.post(f"{P}/train", json=body(tmp_path, name=name))
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["model_name"]
    assert not runner().running


def test_outputs_cannot_be_sent_outside_the_models_folder(client, tmp_path):
    response = client.post(f"{P}/train", json={**body(tmp_path), "models_dir": "/tmp/elsewhere"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "models_dir"


def test_the_webuis_api_auth_is_enforced(make_fake_webui):
    make_fake_webui(args="--api --api-auth alice:s3cret,bob:hunter2")
    app = FastAPI()
    api.on_app_started(None, app)  # --nowebui passes no demo
    client = TestClient(app, base_url=LOCAL)
    for method, route in (("get", "status"), ("post", "cancel"), ("get", "models"),
                          ("post", "train")):
        response = getattr(client, method)(f"{P}/{route}")
        assert response.status_code == 401, route
        assert response.headers["www-authenticate"] == "Basic"
    assert client.get(f"{P}/status", auth=("alice", "wrong")).status_code == 401
    assert client.get(f"{P}/status", auth=("bob", "hunter2")).status_code == 200
    assert client.get(f"{P}/status", auth=("alice", "s3cret")).json()["phase"]


def test_no_auth_without_api_auth(fake_webui):
    app = FastAPI()
    api.on_app_started(None, app)
    api.on_app_started(None, app)  # a second call (Reload UI) adds nothing
    assert [r.path for r in app.routes].count(f"{P}/status") == 1
    assert TestClient(app, base_url=LOCAL).get(f"{P}/status").status_code == 200
