"""dreambooth.host: the host adapter, against the fake WebUI and standalone."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import write_safetensors
from dreambooth import host as webui
from dreambooth.host import (CheckpointEntry, StandaloneHost, WebUIHost, get_host,
                             sanitize_model_name)


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    """Runs fn in a daemon thread; the dict gets 'result' or 'error' when it ends."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# --- checkpoints ----------------------------------------------------------------------------------

def test_list_follows_the_title_change_and_old_titles_still_resolve(fake_webui):
    fake_webui.add_checkpoint("base.safetensors")
    host = get_host()
    assert isinstance(host, WebUIHost) and host.is_webui
    (before,) = host.list_checkpoints()
    assert before.title == "base.safetensors" and before.hash is None
    assert before.filename == str(fake_webui.checkpoints_dir / "base.safetensors")

    fake_webui.sd_models.get_closet_checkpoint_match("base").calculate_shorthash()

    (after,) = host.list_checkpoints()
    assert after.title == f"base.safetensors [{after.hash}]" and len(after.hash) == 10
    assert host.resolve_checkpoint(before.title) == after  # the title the dropdown showed earlier
    assert host.resolve_checkpoint("base") == after
    assert host.resolve_checkpoint("nothing-like-it") is None


def test_refresh_finds_a_new_checkpoint(fake_webui):
    host = get_host()
    assert host.list_checkpoints() == []
    write_safetensors(host.output_dir() / "trained.safetensors")
    host.refresh_checkpoints()
    assert [e.name for e in host.list_checkpoints()] == ["trained.safetensors"]


# --- switching the WebUI's checkpoint -------------------------------------------------------------

def test_load_checkpoint_switches_and_persists(fake_webui):
    fake_webui.add_checkpoint("a.safetensors")
    fake_webui.add_checkpoint("b.safetensors")
    host = get_host()
    assert host.load_checkpoint("b.safetensors", wait_s=10) is True
    assert fake_webui.sd_models.model_data.sd_model.sd_checkpoint_info.name == "b.safetensors"
    saved = json.loads(Path(fake_webui.shared.config_filename).read_text())
    assert saved["sd_model_checkpoint"].startswith("b.safetensors")
    with pytest.raises(ValueError, match="not found"):
        host.load_checkpoint("missing.safetensors")


def test_a_failed_load_is_reported_not_hidden(fake_webui, monkeypatch):
    fake_webui.add_checkpoint("a.safetensors")
    fake_webui.add_checkpoint("broken.safetensors")

    def fail(*args, **kwargs):
        raise RuntimeError("size mismatch")

    monkeypatch.setattr(fake_webui.sd_models, "reload_model_weights", fail)
    with pytest.raises(RuntimeError, match="did not switch to broken.safetensors"):
        get_host().load_checkpoint("broken", wait_s=10)


def test_load_checkpoint_from_a_thread_holding_queue_lock_does_not_deadlock(fake_webui):
    """Like "Load in txt2img" clicked from a handler wrapped by wrap_gradio_gpu_call."""
    fake_webui.add_checkpoint("a.safetensors")
    fake_webui.add_checkpoint("b.safetensors")
    host, lock = get_host(), fake_webui.call_queue.queue_lock

    def handler():
        with lock:
            return host.load_checkpoint("b.safetensors", wait_s=0.3)

    t, out = in_thread(handler)
    t.join(10)
    assert not t.is_alive(), "load_checkpoint hung under queue_lock"
    assert out == {"result": False}  # not done yet: it was waiting for the lock ...
    deadline = time.monotonic() + 10
    while fake_webui.sd_models.model_data.sd_model is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # ... and completed by itself once the handler released it
    assert fake_webui.sd_models.model_data.sd_model.sd_checkpoint_info.name == "b.safetensors"


def test_load_checkpoint_waits_for_a_running_generation_then_completes(fake_webui):
    fake_webui.add_checkpoint("a.safetensors")
    host, lock = get_host(), fake_webui.call_queue.queue_lock
    lock.acquire()  # another thread generating
    try:
        t, out = in_thread(host.load_checkpoint, "a.safetensors", 5.0)
        time.sleep(0.3)
        assert t.is_alive() and fake_webui.sd_models.model_data.loads == []
    finally:
        lock.release()
    t.join(10)
    assert out == {"result": True} and len(fake_webui.sd_models.model_data.loads) == 1


def test_forge_switches_lazily_through_checkpoint_change(fake_forge):
    fake_forge.add_checkpoint("a.safetensors")
    fake_forge.add_checkpoint("b.safetensors")
    host = get_host()
    with fake_forge.call_queue.queue_lock:
        assert host.load_checkpoint("b", wait_s=5) is True
    assert fake_forge.sd_models.model_data.loads == []  # Forge loads at the next generation
    assert fake_forge.shared.opts.sd_model_checkpoint == "b.safetensors"
    assert fake_forge.shared.sd_model.sd_checkpoint_info.name == "b.safetensors"


# --- freeing the GPU, holding generation ---------------------------------------------------------

def test_unload_never_loads_a_model_just_to_unload_it(fake_webui):
    fake_webui.add_checkpoint("a.safetensors")
    host = get_host()
    assert host.unload_webui_model() is None
    assert host.restore_webui_model(None) is None
    assert fake_webui.sd_models.model_data.loads == []


def test_unload_frees_the_loaded_model_and_restore_loads_it_again(fake_webui):
    fake_webui.add_checkpoint("a.safetensors")
    host = get_host()
    model = fake_webui.shared.sd_model
    assert model.device == "cuda"
    unloaded = host.unload_webui_model()
    assert unloaded.title == model.sd_checkpoint_info.title and model.device == "meta"
    data = fake_webui.sd_models.model_data
    assert data.sd_model is None and data.loaded_sd_models == []
    assert "loaded the WebUI's model a.safetensors" in host.restore_webui_model(unloaded)
    assert data.sd_model is not model and data.sd_model.device == "cuda"
    assert len(data.loads) == 2


def test_unload_respects_the_setting(fake_webui):
    fake_webui.add_checkpoint("a.safetensors")
    webui.register_settings()
    fake_webui.shared.opts.set("dreambooth_unload_model", False)
    model = fake_webui.shared.sd_model
    assert get_host().unload_webui_model() is None and model.device == "cuda"


def test_adding_a_checkpoint_never_empties_the_list(fake_webui, tmp_path):
    fake_webui.add_checkpoint("a.safetensors")
    before = dict(fake_webui.sd_models.checkpoints_list)
    new = write_safetensors(fake_webui.checkpoints_dir / "sub" / "new.safetensors")
    fake_webui.sd_models.scan_delay = 5  # a rescan would be caught by the time limit below
    started = time.time()
    get_host().add_checkpoints([new, new])
    assert time.time() - started < 2
    titles = list(fake_webui.sd_models.checkpoints_list)
    assert titles == list(before) + ["sub/new.safetensors"]
    assert get_host().resolve_checkpoint("new").filename == str(new)


def test_training_holds_generation_and_generation_runs_after(fake_webui):
    fake_webui.add_checkpoint("a.safetensors")
    fake_webui.shared.sd_model  # noqa: B018  (a model is loaded, as after a generation)
    host, call_queue = get_host(), fake_webui.call_queue
    txt2img = call_queue.wrap_gradio_gpu_call(lambda: ("image", "<p>ok</p>"))
    generated = threading.Event()

    def job():
        with host.hold_generation() as held:
            assert held is True
            assert host.unload_webui_model() is not None  # inside the hold: no second acquire
            host.set_webui_progress("DreamBooth", 5, 10, "step 5/10")
            state = fake_webui.shared.state
            assert (state.job_no, state.job_count, state.textinfo) == (5, 10, "step 5/10")
            t, _ = in_thread(lambda: (txt2img(), generated.set()))
            assert not generated.wait(0.3), "txt2img must wait while training holds the queue"
            return t

    t_job, out = in_thread(job)
    t_job.join(10)
    assert not t_job.is_alive() and "error" not in out, out
    assert generated.wait(10), "txt2img runs once training ends"
    assert fake_webui.shared.state.job == ""


def test_hold_waits_for_a_running_generation_and_says_so(fake_webui):
    host, lock = get_host(), fake_webui.call_queue.queue_lock
    waited, entered, finish = threading.Event(), threading.Event(), threading.Event()

    def job():
        with host.hold_generation(on_wait=waited.set) as held:
            entered.set()
            finish.wait(10)
            return held

    lock.acquire()  # a generation is running
    t, out = in_thread(job)
    assert waited.wait(5) and not entered.wait(0.2)
    lock.release()
    assert entered.wait(5)
    assert not lock.acquire(blocking=False)  # now training holds it
    finish.set()
    t.join(5)
    assert out == {"result": True} and lock.acquire(blocking=False)
    lock.release()


def test_hold_is_off_when_the_setting_says_so(fake_webui):
    webui.register_settings()
    fake_webui.shared.opts.set("dreambooth_hold_generation", False)
    host, lock = get_host(), fake_webui.call_queue.queue_lock
    with host.hold_generation() as held:
        assert held is False
        assert lock.acquire(blocking=False)  # generation may run alongside
        lock.release()
        host.set_webui_progress("DreamBooth", 1, 2, "x")  # the bar stays the generation's
        assert fake_webui.shared.state.textinfo is None


# --- folders ------------------------------------------------------------------------------------

def test_folders_follow_the_webui(make_fake_webui, tmp_path):
    webui_ = make_fake_webui(args=f"--models-dir {tmp_path / 'm'} --ckpt-dir {tmp_path / 'ck'}")
    host = get_host()
    assert host.models_dir() == tmp_path / "m"
    assert host.checkpoints_dir() == tmp_path / "ck"
    assert host.vae_dir() == tmp_path / "m" / "VAE"
    assert host.work_dir("My Model") == tmp_path / "m" / "dreambooth" / "My Model"
    webui.register_settings()
    webui_.shared.opts.set("dreambooth_output_subdir", "dreambooth/people")
    assert host.output_dir() == tmp_path / "ck" / "dreambooth" / "people"
    webui_.shared.opts.set("dreambooth_output_subdir", "../outside")
    with pytest.raises(ValueError):
        host.output_dir()
    webui_.shared.opts.set("dreambooth_work_dir", str(tmp_path / "work"))
    assert host.work_dir("x") == tmp_path / "work" / "x"


def test_default_folders(fake_webui):
    host = get_host()
    models = fake_webui.root / "models"
    assert host.models_dir() == models
    assert host.checkpoints_dir() == host.output_dir() == models / "Stable-diffusion"
    with pytest.raises(ValueError):
        host.work_dir("../../etc")


def test_uninitialised_webui_gives_a_standalone_host(fake_webui, tmp_path):
    fake_webui.shared.opts = None
    host = get_host(tmp_path)
    assert isinstance(host, StandaloneHost) and host.models_dir() == tmp_path


# --- standalone ---------------------------------------------------------------------------------

def test_standalone_lists_and_resolves_checkpoints(tmp_path):
    sd = tmp_path / "Stable-diffusion"
    write_safetensors(sd / "b.safetensors")
    write_safetensors(sd / "sub" / "a.safetensors")
    (sd / "notes.txt").write_text("x")
    write_safetensors(sd / "x.vae.safetensors")
    host = StandaloneHost(tmp_path)
    assert not host.is_webui
    entries = host.list_checkpoints()
    assert [e.title for e in entries] == ["b.safetensors", "sub/a.safetensors"]
    assert entries[0] == CheckpointEntry("b.safetensors", str((sd / "b.safetensors").resolve()), "b.safetensors", None)
    assert host.resolve_checkpoint("a").name == "sub/a.safetensors"
    assert host.resolve_checkpoint("b.safetensors [0123456789]").name == "b.safetensors"  # a WebUI title
    assert host.resolve_checkpoint("zzz") is None
    assert host.work_dir("run") == tmp_path / "dreambooth" / "run"
    assert host.unload_webui_model() is None and host.load_checkpoint("b") is False
    with host.hold_generation() as held:
        assert held is False


def test_standalone_without_any_webui(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_MODELS_DIR", str(tmp_path))
    host = get_host()
    assert isinstance(host, StandaloneHost) and host.checkpoints_dir() == tmp_path / "Stable-diffusion"
    assert StandaloneHost(tmp_path).list_checkpoints() == []


# --- names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("my model", "my model"), ("  spaced  ", "spaced"), ("a:b*c?", "a_b_c_"), ("dots...", "dots"), ("v1..2", "v1..2"),
    ("CON", "_CON"), ("ünïcode 猫", "ünïcode 猫"),
])
def test_sanitize_keeps_good_names(name, expected):
    assert sanitize_model_name(name) == expected


@pytest.mark.parametrize("name", ["", "   ", ".", "..", "../x", "a/b", "a\\b", "/etc/passwd", "C:\\x", "x/..", "...", "x" * 200])
def test_sanitize_refuses_names_that_escape_or_are_empty(name):
    with pytest.raises(ValueError):
        sanitize_model_name(name)


@pytest.mark.parametrize("kind", ["blip", "clip"])
def test_an_interrogator_offline_says_which_file_it_needs_and_where(fake_webui, kind):
    """A1111 offline: its model download fails, load_models returns no file, and the WebUI's
    IndexError reached the user as "IndexError: list index out of range"."""
    from PIL import Image

    fake_webui.shared.interrogator.offline = True
    with pytest.raises(webui.InterrogatorError) as caught:
        get_host().interrogate(kind, Image.new("RGB", (16, 16), (200, 30, 30)))
    message = str(caught.value)
    assert "model_base_caption_capfilt_large.pth" in message
    assert str(Path(fake_webui.shared.models_path) / "BLIP") in message
    assert "no internet" in message and "https://" in message
    fake_webui.shared.interrogator.offline = False
    assert get_host().interrogate(kind, Image.new("RGB", (16, 16), (200, 30, 30)))
