"""The glue both front ends use: checks before a job starts, hosted runs, refresh, reading runs."""
from __future__ import annotations

import dataclasses
import time

import pytest

from dreambooth.app import service
from dreambooth.common.config import ConfigError
from dreambooth.app.job import JobRunner
from dreambooth.host import StandaloneHost

from ui_fixtures import BASE_NAME, put_base_checkpoint, quick_config


@pytest.fixture
def host(tmp_path):
    host = StandaloneHost(tmp_path / "models")
    put_base_checkpoint(host.checkpoints_dir())
    return host


def fields(exc: ConfigError) -> set[str]:
    return {e.field for e in exc.errors}


def test_every_problem_is_named_before_a_thread_starts(tmp_path, host):
    config = quick_config(tmp_path, base="no-such-model", name="../escape", learning_rate=0)
    config.concepts[0].instance_data_dir = str(tmp_path / "missing")
    runner = JobRunner()
    with pytest.raises(ConfigError) as caught:
        service.start_training(config, host, runner)
    assert {"base_model", "model_name", "learning_rate",
            "concepts[0].instance_data_dir"} <= fields(caught.value)
    assert not runner.running and runner.snapshot().phase == "idle"


def test_an_existing_output_is_refused_unless_overwrite(tmp_path, host):
    (host.output_dir() / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError) as caught:
        service.prepare(quick_config(tmp_path, BASE_NAME, name="taken"), host)
    assert fields(caught.value) == {"model_name"}
    service.prepare(quick_config(tmp_path, BASE_NAME, name="taken", overwrite=True), host)


def test_a_run_resolves_the_title_writes_the_model_and_is_listed(tmp_path, host):
    runner = JobRunner()
    service.start_training(quick_config(tmp_path, BASE_NAME, steps=3), host, runner)
    snap = runner.wait(240)
    assert snap.phase == "done", snap.log
    assert snap.output_path.endswith("my-toy.safetensors")
    assert "my-toy.safetensors" in [e.title for e in host.list_checkpoints()]
    saved = service.run_config(host, "my-toy")
    assert saved.base_model == str(host.checkpoints_dir() / BASE_NAME)  # the file, not the title
    assert [r.name for r in service.list_runs(host)] == ["my-toy"]
    entry = service.checkpoint_for_file(host, snap.output_path)
    assert entry is not None and entry.title == "my-toy.safetensors"


def test_step_estimate_follows_the_rule_of_thumb(tmp_path, host):
    config = quick_config(tmp_path, BASE_NAME, steps=0)
    assert service.step_estimate(config).startswith("300 steps (3 pictures × 100")
    assert service.step_estimate(dataclasses.replace(config, max_train_steps=50)).startswith("50 steps")


def test_model_kind_is_described(host):
    assert service.describe_model(host, BASE_NAME) == (
        f"{BASE_NAME}: SD 1.x, epsilon prediction (metadata); trains at 512 px unless you set a "
        "resolution")
    assert "not found" in service.describe_model(host, "nothing-here")


def test_class_pictures_run_in_the_background_and_cancel_keeps_what_was_made(tmp_path, host):
    from dreambooth.data import list_pictures

    runner = JobRunner()
    folder = tmp_path / "class"
    config = quick_config(tmp_path, BASE_NAME, with_prior_preservation=True, num_class_images=2,
                          class_sample_steps=1, class_batch_size=1)
    config.concepts[0].class_data_dir = str(folder)
    config.concepts[0].class_prompt = "photo of a toy"
    service.start_class_pictures(config, host, runner)
    snap = runner.wait(120)
    assert snap.phase == "done" and snap.output_path is None, snap.log
    assert len(list_pictures(folder)) == 2 and (snap.step, snap.total) == (2, 2)

    more = dataclasses.replace(config, num_class_images=400)
    service.start_class_pictures(more, host, runner)
    deadline = time.time() + 60
    while runner.snapshot().step < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert runner.cancel()
    snap = runner.wait(60)
    made = len(list_pictures(folder))
    assert snap.phase == "cancelled" and 2 < made < 400  # what was made stays
