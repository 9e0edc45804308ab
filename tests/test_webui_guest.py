"""A good guest in the WebUI process: a generation queued behind training runs afterwards (the
checkpoint list never empties), the WebUI's own model is unloaded for real and comes back, memory
goes back to the operating system, and the exported file says what it is."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dreambooth.app import service
from dreambooth.app.job import JobRunner
from dreambooth.host import StandaloneHost, get_host

from conftest import REPO_ROOT
from ui_fixtures import BASE_NAME, put_base_checkpoint, quick_config

MIB = 1 << 20


def webui_with_a_loaded_model(make_fake_webui, flavour: str):
    """A fake WebUI (A1111 or Forge) with the tiny base as its active, loaded checkpoint."""
    webui = make_fake_webui(flavour=flavour)
    if flavour == "forge":
        sys.path.insert(0, str(Path(__file__).parent / "fake_webui" / "forge"))
    put_base_checkpoint(webui.checkpoints_dir)
    webui.sd_models.list_models()
    title = webui.sd_models.get_closet_checkpoint_match(BASE_NAME).title
    webui.shared.opts.set("sd_model_checkpoint", title)
    from modules import txt2img

    txt2img.txt2img("task(warm)", "a first picture")  # the model is loaded, as after any use
    model = webui.sd_models.model_data.sd_model
    assert model is not None and model.device == "cuda"
    return webui, model


def wait_for_phase(runner: JobRunner, phase: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while runner.snapshot().phase != phase:
        assert runner.running and time.time() < deadline, runner.snapshot().log
        time.sleep(0.02)


@pytest.mark.parametrize("flavour", ["a1111", "forge"])
def test_a_generation_queued_behind_training_runs_after_it(make_fake_webui, tmp_path, flavour):
    webui, first_model = webui_with_a_loaded_model(make_fake_webui, flavour)
    from modules import progress, txt2img

    # The real list_models() walks the folders between emptying the list and refilling it.
    webui.sd_models.scan_delay = 0.3
    smallest = [len(webui.sd_models.checkpoints_list)]
    watching = threading.Event()
    watching.set()

    def watch_list() -> None:
        while watching.is_set():
            smallest[0] = min(smallest[0], len(webui.sd_models.checkpoints_list))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch_list, daemon=True)
    watcher.start()
    runner = JobRunner()
    service.start_training(quick_config(tmp_path, BASE_NAME, steps=6), get_host(), runner)
    wait_for_phase(runner, "training")
    assert runner.snapshot().holds_generation
    placeholder = webui.sd_models.model_data.sd_model  # the WebUI's model is gone meanwhile
    if flavour == "forge":
        assert isinstance(placeholder, webui.sd_models.FakeInitialModel)
    else:
        assert placeholder is None and webui.sd_models.model_data.loaded_sd_models == []
    outcome: list = []
    queued = threading.Thread(target=lambda: outcome.append(
        txt2img.txt2img_request("task(queued)", "a cat")))
    queued.start()
    time.sleep(0.2)
    assert progress.progressapi("task(queued)")["textinfo"] == "In queue: 1/1"
    snap = runner.wait(240)
    queued.join(60)
    watching.clear()
    watcher.join()
    assert snap.phase == "done", snap.log
    assert not snap.holds_generation
    assert outcome and "error" not in outcome[0][-1], outcome
    assert outcome[0][0].startswith("a cat by tiny-base.safetensors")
    assert smallest[0] > 0, "the WebUI's checkpoint list was empty during the run"
    assert webui.sd_models.get_closet_checkpoint_match("my-toy.safetensors") is not None
    # The WebUI's model was unloaded for real while training (A1111: its weights went to the
    # meta device; Forge: unloaded and forgotten), and it is back for the generation.
    if flavour == "a1111":
        assert first_model.device == "meta"
    else:
        from backend import memory_management

        assert memory_management.unloads >= 1 and first_model.device == "cpu"
    assert webui.sd_models.model_data.sd_model is not first_model
    assert any("unloaded the WebUI's model (" in line for line in snap.log)
    assert webui.sd_models.model_data.sd_model.device == "cuda"
    assert webui.sd_models.model_data.loads[-1].startswith("tiny-base.safetensors")


@pytest.mark.parametrize("flavour", ["a1111", "forge"])
def test_the_webui_model_is_unloaded_only_when_the_setting_says_so(make_fake_webui, tmp_path,
                                                                   flavour):
    from dreambooth.host import register_settings

    webui, model = webui_with_a_loaded_model(make_fake_webui, flavour)
    register_settings()
    webui.shared.opts.set("dreambooth_unload_model", False)
    runner = JobRunner()
    service.start_training(quick_config(tmp_path, BASE_NAME, steps=2), get_host(), runner)
    snap = runner.wait(240)
    assert snap.phase == "done", snap.log
    assert model.device == "cuda" and webui.sd_models.model_data.sd_model is model
    assert not any("unloaded the WebUI's model" in line for line in snap.log)


def test_a1111_loads_its_model_again_before_the_lock_is_released(make_fake_webui, tmp_path):
    webui, model = webui_with_a_loaded_model(make_fake_webui, "a1111")
    loads = len(webui.sd_models.model_data.loads)
    runner = JobRunner()
    service.start_training(quick_config(tmp_path, BASE_NAME, steps=2), get_host(), runner)
    snap = runner.wait(240)
    assert snap.phase == "done", snap.log
    assert len(webui.sd_models.model_data.loads) == loads + 1  # loaded once more, at the end
    assert webui.sd_models.model_data.loaded_sd_models == [webui.sd_models.model_data.sd_model]
    assert any("loaded the WebUI's model tiny-base.safetensors" in line for line in snap.log)


def test_the_exported_file_says_how_it_was_trained(tmp_path):
    from safetensors import safe_open

    models = tmp_path / "models"
    base = put_base_checkpoint(models / "Stable-diffusion")
    host, runner = StandaloneHost(models), JobRunner()
    config = quick_config(tmp_path, BASE_NAME, steps=2, name="meta-toy", learning_rate=2e-4)
    service.start_training(config, host, runner)
    snap = runner.wait(240)
    assert snap.phase == "done", snap.log
    with safe_open(snap.output_path, framework="pt") as handle:
        meta = handle.metadata()
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.description"] == "DreamBooth: photo of ohwx toy"
    assert meta["modelspec.title"] == "meta-toy"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["dreambooth.steps"] == "2" and meta["ss_steps"] == "2"
    assert json.loads(meta["dreambooth.concepts"])[0]["instance_prompt"] == "photo of ohwx toy"
    sha256 = hashlib.sha256(base.read_bytes()).hexdigest()
    assert meta["dreambooth.base_sha256"] == meta["ss_new_sd_model_hash"] == sha256
    assert meta["ss_sd_model_name"] == BASE_NAME and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_learning_rate"] == "0.0002" and meta["ss_num_train_images"] == "3"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_v_parameterization"] == "False"
    assert json.loads(meta["dreambooth.config"])["learning_rate"] == 2e-4


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_memory_goes_back_after_a_run_and_the_export_needs_one_tensor(tmp_path):
    """Measured in a process of its own (tests/memory_child.py) on the 'small' model (~67 MB):
    after a second run the process is within half the model's size of where it was before it;
    the run's peak is what the trained weights, their gradients and AdamW's two states need
    plus the export's budget; the export's own memory (RssAnon) stays under 1.2 x the file."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "memory_child.py"),
                           str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print("memory figures (KiB):", figures)
    base = figures["base_bytes"]
    kib = 1024
    assert (figures["after_kib"] - figures["before_kib"]) * kib < 0.5 * base, figures
    budget = 16 * figures["trained_params"] + 1.2 * base + 64 * MIB
    assert (figures["peak_kib"] - figures["before_kib"]) * kib < budget, figures
    export_own = (figures["export_anon_peak_kib"] - figures["export_anon_before_kib"]) * kib
    assert export_own < 1.2 * base, figures


@pytest.mark.parametrize("flavour", ["a1111", "forge"])
def test_the_base_model_list_shows_what_the_webuis_own_selector_shows(make_fake_webui, flavour):
    from dreambooth.tab import ui
    from dreambooth.common.config import TrainingConfig

    webui = make_fake_webui(flavour=flavour)
    path = put_base_checkpoint(webui.checkpoints_dir)
    webui.sd_models.list_models()
    info = webui.sd_models.get_closet_checkpoint_match(BASE_NAME)
    info.calculate_shorthash()  # the file was hashed (a first load): A1111's title gains it
    assert info.title == f"{BASE_NAME} [{info.shorthash}]"
    expected = webui.sd_models.checkpoint_tiles()  # Forge: names; A1111: titles
    assert expected == ([BASE_NAME] if flavour == "forge" else [info.title])
    host = get_host()
    assert ui.checkpoint_choices(host) == expected
    values, _ = ui.config_to_values(TrainingConfig(base_model=str(path)), host)
    assert values["base_model"] == expected[0]
    assert ui.refresh_checkpoints(BASE_NAME, host) == (expected, expected[0])


def test_a_checkpoint_name_resolves_while_the_webui_rescans_its_list(make_fake_webui, tmp_path):
    """Forge rescans (empties, then refills) its list at every page load: a start request that
    names the base model meanwhile still finds the file; nothing outside the folder is taken."""
    webui = make_fake_webui(flavour="forge")
    path = put_base_checkpoint(webui.checkpoints_dir)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    webui.sd_models.list_models()
    webui.sd_models.checkpoints_list.clear()  # the middle of a rescan
    webui.sd_models.checkpoint_aliases.clear()
    host = get_host()
    assert service.resolve_base_model(BASE_NAME, host) == path
    assert service.resolve_base_model(f"{BASE_NAME} [0123456789]", host) == path
    assert service.resolve_base_model("../../outside.safetensors", host) is None
    assert service.resolve_base_model("missing.safetensors", host) is None
