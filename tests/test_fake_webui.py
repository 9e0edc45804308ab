"""The fake WebUI behaves as WEBUI_API.md says the real one does (so tests built on it mean something)."""
from __future__ import annotations

import importlib
import threading
from pathlib import Path

import pytest


def _run_in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_title_changes_when_hash_computed_and_lookup_still_finds_it(fake_webui):
    sd_models = fake_webui.sd_models
    fake_webui.add_checkpoint("sub/model.safetensors")
    (info,) = sd_models.checkpoints_list.values()
    assert info.title == "sub/model.safetensors" and info.shorthash is None and info.sha256 is None
    assert info.is_safetensors and info.metadata["name"] == "sub/model.safetensors"
    assert info.model_name == "sub_model"

    shorthash = info.calculate_shorthash()

    assert len(shorthash) == 10 and info.sha256.startswith(shorthash)
    assert info.title == f"sub/model.safetensors [{shorthash}]"
    assert list(sd_models.checkpoints_list) == [info.title]
    assert sd_models.checkpoint_tiles() == [info.title]
    assert sd_models.checkpoint_tiles(use_short=True) == [f"model [{shorthash}]"]
    # the old title, the name and the new title all still resolve
    for text in ("sub/model.safetensors", info.title, "model", shorthash):
        assert sd_models.get_closet_checkpoint_match(text) is info
    # a rescan keeps the hashed title (the real one caches hashes in cache.json)
    sd_models.list_models()
    assert sd_models.checkpoint_tiles() == [info.title]


def test_get_closet_checkpoint_match_strips_a_stale_hash(fake_webui):
    fake_webui.add_checkpoint("a.safetensors")
    assert fake_webui.sd_models.get_closet_checkpoint_match("a.safetensors [0123456789]").name == "a.safetensors"
    assert fake_webui.sd_models.get_closet_checkpoint_match("missing") is None
    assert fake_webui.sd_models.get_closet_checkpoint_match("") is None


def test_list_models_rescans_models_and_ckpt_dir(make_fake_webui, tmp_path):
    extra = tmp_path / "extra ckpts"
    webui = make_fake_webui(args=f'--ckpt-dir "{extra}"')
    assert webui.sd_models.checkpoint_tiles() == []
    webui.add_checkpoint("b.safetensors")
    webui.add_checkpoint("c.ckpt", folder=extra)
    webui.add_checkpoint("vae.vae.safetensors")  # VAEs next to checkpoints are not checkpoints
    assert sorted(webui.sd_models.checkpoint_tiles()) == ["b.safetensors", "c.ckpt"]
    info = webui.sd_models.get_closet_checkpoint_match("c.ckpt")
    assert info.filename == str(extra / "c.ckpt") and not info.is_safetensors


def test_models_dir_and_data_dir_move_the_folders(make_fake_webui, tmp_path):
    webui = make_fake_webui(args=f"--data-dir {tmp_path / 'data'} --models-dir {tmp_path / 'm'}")
    assert webui.paths.data_path == str(tmp_path / "data")
    assert webui.paths.models_path == str(tmp_path / "m")
    assert webui.sd_models.model_path == str(tmp_path / "m" / "Stable-diffusion")
    assert webui.shared.config_filename == str(tmp_path / "data" / "config.json")


def test_queue_lock_is_not_reentrant(fake_webui):
    lock = fake_webui.call_queue.queue_lock
    second = threading.Event()

    def take_twice():
        lock.acquire()
        lock.acquire()  # hangs: the real FIFOLock has no owner and no timeout
        second.set()

    t = _run_in_thread(take_twice)
    assert not second.wait(0.5), "re-taking queue_lock must hang, as in the WebUI"
    lock.release()  # any thread may release it; this hands it to the stuck acquire
    assert second.wait(5)
    lock.release()
    t.join(5)
    assert lock.acquire(blocking=False)
    lock.release()


def test_queue_lock_is_first_in_first_out(fake_webui):
    lock = fake_webui.call_queue.queue_lock
    order: list = []
    lock.acquire()
    threads = []
    for i in range(3):
        def waiter(i=i):
            with lock:
                order.append(i)
        threads.append(_run_in_thread(waiter))
        while len(lock._pending_threads) < i + 1:  # queue them in a known order
            threading.Event().wait(0.01)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2]


def test_setting_checkpoint_loads_synchronously_and_deadlocks_under_queue_lock(fake_webui):
    shared, sd_models = fake_webui.shared, fake_webui.sd_models
    fake_webui.add_checkpoint("one.safetensors")
    fake_webui.add_checkpoint("two.safetensors")

    assert shared.opts.set("sd_model_checkpoint", "two.safetensors") is True
    # loaded before set() returned, and A1111 hashed it while loading: the title changed
    info = sd_models.get_closet_checkpoint_match("two.safetensors")
    assert sd_models.model_data.loads == [info.title] and info.shorthash
    assert shared.sd_model.sd_checkpoint_info is info

    done = threading.Event()

    def set_under_lock():
        fake_webui.call_queue.queue_lock.acquire()  # as a handler wrapped by wrap_gradio_gpu_call
        shared.opts.set("sd_model_checkpoint", "one.safetensors")
        done.set()

    t = _run_in_thread(set_under_lock)
    assert not done.wait(0.5), "opts.set('sd_model_checkpoint') under queue_lock must deadlock"
    # free the stuck thread so that nothing is left behind: drop its outer hold for it
    fake_webui.call_queue.queue_lock.release()
    assert done.wait(5)
    t.join(5)
    assert sd_models.model_data.sd_model.sd_checkpoint_info.name == "one.safetensors"


def test_sd_model_loads_lazily_and_unload_on_a1111_loads_first(fake_webui):
    sd_models = fake_webui.sd_models
    fake_webui.add_checkpoint("one.safetensors")
    assert sd_models.model_data.loads == []
    sd_models.unload_model_weights()  # A1111 1.10.1 reads shared.sd_model here
    assert len(sd_models.model_data.loads) == 1
    assert sd_models.model_data.sd_model.device == "cpu"


def test_forge_flavour_switches_lazily_and_lists_names(fake_forge):
    sd_models, shared = fake_forge.sd_models, fake_forge.shared
    fake_forge.add_checkpoint("one.safetensors")
    fake_forge.add_checkpoint("two.safetensors")
    sd_models.get_closet_checkpoint_match("two").calculate_shorthash()
    assert sorted(sd_models.checkpoint_tiles()) == ["one.safetensors", "two.safetensors"]
    main_entry = importlib.import_module("modules_forge.main_entry")
    with fake_forge.call_queue.queue_lock:  # no deadlock on Forge: nothing loads here
        assert main_entry.checkpoint_change("two.safetensors") is True
    assert sd_models.model_data.loads == []
    assert shared.sd_model.sd_checkpoint_info.name == "two.safetensors"
    assert Path(shared.config_filename).is_file()
    sd_models.unload_model_weights()
    assert len(sd_models.model_data.loads) == 1 and shared.sd_model.device == "cpu"


def test_forge_module_is_absent_on_a1111(fake_webui):
    with pytest.raises(ImportError):
        importlib.import_module("modules_forge.main_entry")


def test_options_add_set_save(fake_webui, tmp_path):
    shared = fake_webui.shared
    shared.opts.add_option("x_flag", shared.OptionInfo(True, "A flag", section=("x", "X")).info("why"))
    assert shared.opts.x_flag is True and shared.opts.data["x_flag"] is True
    assert shared.opts.data_labels["x_flag"].section == ("x", "X")
    assert shared.opts.set("x_flag", False) is True and shared.opts.x_flag is False
    assert shared.opts.set("x_flag", False) is False  # unchanged
    with pytest.raises(KeyError):
        shared.opts.set("unknown", 1)
    shared.opts.save(str(tmp_path / "c.json"))
    assert '"x_flag": false' in (tmp_path / "c.json").read_text()


def test_callbacks_fire_as_the_webui_fires_them(fake_webui):
    cb = fake_webui.script_callbacks
    seen: list = []
    cb.on_ui_tabs(lambda: [("blocks", "Title", "elem")])
    cb.on_ui_settings(lambda: seen.append("settings"))
    cb.on_app_started(lambda demo, app: seen.append(("app", demo, app)))
    cb.on_script_unloaded(lambda: seen.append("unloaded"))
    cb.on_model_loaded(lambda m: seen.append(("model", m.sd_checkpoint_info.name)))
    assert cb.ui_tabs_callback() == [("blocks", "Title", "elem")]
    cb.ui_settings_callback()
    cb.app_started_callback(None, "app")
    cb.script_unloaded_callback()
    fake_webui.add_checkpoint("m.safetensors")
    fake_webui.shared.sd_model  # noqa: B018  (reading it loads, which fires on_model_loaded)
    assert seen == ["settings", ("app", None, "app"), "unloaded", ("model", "m.safetensors")]


def test_wrap_gradio_gpu_call_runs_under_queue_lock_and_appends_html(fake_webui):
    lock = fake_webui.call_queue.queue_lock

    def job(x):
        assert not lock.acquire(blocking=False)
        assert fake_webui.shared.state.job == "(unknown)"
        return x, "<p>done</p>"

    out = fake_webui.call_queue.wrap_gradio_gpu_call(job)(1)
    assert out[0] == 1 and out[1].startswith("<p>done</p>") and "Time taken" in out[1]
    assert lock.acquire(blocking=False)
    lock.release()


def test_state_drives_progress(fake_webui):
    state = fake_webui.shared.state
    state.begin(job="train")
    state.job_count, state.job_no, state.textinfo = 10, 3, "step 3"
    state.assign_current_image("img")
    assert (state.job, state.current_image, state.id_live_preview) == ("train", "img", 1)
    state.end()
    assert state.job == "" and state.job_count == 0


def test_ui_components_build_in_blocks(fake_webui):
    import gradio as gr
    from modules import ui_common, ui_components

    refreshed: list = []
    with gr.Blocks() as demo:
        with ui_components.FormRow():
            dd = gr.Dropdown(choices=["a"], label="Model")
            button = ui_common.create_refresh_button(dd, lambda: refreshed.append(1), lambda: {"choices": ["a", "b"]}, "refresh_x")
        with ui_components.FormColumn(), ui_components.FormGroup():
            ui_components.ToolButton(value="x")
        with ui_components.InputAccordion(False, label="More") as acc:
            gr.Textbox()
    assert isinstance(demo, gr.Blocks) and acc.accordion_id.startswith("input-accordion")
    assert "tool" in button.elem_classes and button.tooltip == "Model: refresh"
    button.fake_refresh()
    assert refreshed == [1] and dd.choices in (["a", "b"], [("a", "a"), ("b", "b")])


def test_scripts_basedir_is_the_webui_root_outside_loading(fake_webui):
    from modules import scripts
    assert scripts.basedir() == str(fake_webui.root)


def test_launch_run_pip_records_and_fails_like_pip(fake_webui, monkeypatch, tmp_path, capsys):
    import launch
    constraints = tmp_path / "c.txt"
    constraints.write_text("torch==2.1.2\n")
    launch.run_pip(f'install "ftfy" -c "{constraints}"', "ftfy")
    assert launch.pip_calls[-1]["constraints"] == "torch==2.1.2\n"
    assert "Installing ftfy" in capsys.readouterr().out
    assert launch.is_installed("pytest") and not launch.is_installed("surely_not_a_package_xyz")
    monkeypatch.setenv("FAKE_WEBUI_PIP_FAIL", "network")
    with pytest.raises(RuntimeError, match="No matching distribution found for ftfy"):
        launch.run_pip("install ftfy", "ftfy")
    launch.args.skip_install = True
    assert launch.run_pip("install ftfy", "ftfy") is None
