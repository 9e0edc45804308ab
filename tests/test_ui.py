"""The tab in the (fake) WebUI: it builds on the lane's gradio, lists the WebUI's checkpoints,
starts a run whose result joins the WebUI's list, and loads it in txt2img without deadlock."""
from __future__ import annotations

import dataclasses
import threading
import time


from dreambooth.app import service
from dreambooth.tab import ui
from dreambooth.common.config import Concept, TrainingConfig

from ui_fixtures import BASE_NAME, put_base_checkpoint, quick_config


def choices_of(dropdown) -> list[str]:
    # gradio 3.41 keeps plain strings, 4.x (name, value) pairs
    return [c[1] if isinstance(c, (tuple, list)) else c for c in dropdown.choices]


def built_tab():
    (blocks, title, elem_id), = ui.create_tab()
    assert (title, elem_id) == ("DreamBooth", "dreambooth")
    return blocks, blocks.dreambooth_components


def test_every_training_option_has_a_field_with_info(fake_webui):
    blocks, comps = built_tab()
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    in_form = set(ui.option_names()) | set(ui.MODEL_FIELDS)
    assert names - in_form == set(ui.NOT_IN_FORM)
    for name in ui.option_names():
        assert comps[name].label, name
    with_info = [n for _, _, items in ui.GROUPS for n, _, info in items if info]
    assert len(with_info) >= len(ui.option_names()) - 8
    config = blocks.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    for i in range(ui.CONCEPT_SLOTS):
        assert f"dreambooth_concepts_{i}_instance_prompt" in ids
    assert {"dreambooth_train", "dreambooth_cancel", "dreambooth_check", "dreambooth_make_class",
            "dreambooth_resume", "dreambooth_load_txt2img", "dreambooth_open_folder",
            "dreambooth_loss_plot", "dreambooth_gallery", "dreambooth_progress"} <= ids


def test_polling_never_waits_in_gradios_queue_nor_for_generation(fake_webui, idle_runner):
    blocks, _ = built_tab()
    config = blocks.get_config_file()
    poll_id = next(c["id"] for c in config["components"]
                   if c.get("props", {}).get("elem_id") == "dreambooth_poll")

    def targets(dep):
        return [t[0] if isinstance(t, (list, tuple)) else t for t in dep["targets"]]

    (dep,) = [d for d in config["dependencies"] if poll_id in targets(d)]
    assert dep["queue"] is False
    # a generation holds the WebUI's lock: a poll still answers at once
    with fake_webui.call_queue.queue_lock:
        started = time.time()
        out = ui.poll("", {})
        assert time.time() - started < 2
    assert f"data-phase='{idle_runner.snapshot().phase}'" in out[0]
    again = ui.poll("", out[-1])  # nothing changed: nothing is re-sent
    assert all(isinstance(part, dict) for part in again[:-1])


def test_model_dropdown_lists_the_webuis_checkpoints_and_follows_a_title_change(fake_webui):
    fake_webui.add_checkpoint("a.safetensors")
    fake_webui.add_checkpoint("sub/b.safetensors")
    _, comps = built_tab()
    assert choices_of(comps["base_model"]) == ["a.safetensors", "sub/b.safetensors"]
    # the WebUI hashes a file when it first loads it: its title gains " [hash]"
    info = fake_webui.sd_models.checkpoints_list["a.safetensors"]
    info.calculate_shorthash()
    choices, value = ui.refresh_checkpoints("a.safetensors")
    assert value == info.title and value.startswith("a.safetensors [")
    assert value in choices and "a.safetensors" not in choices
    # a title remembered from before the hash still finds the file
    assert service.resolve_base_model("a.safetensors", ui.current_host()).name == "a.safetensors"


def test_the_poll_gives_the_model_list_the_hash_the_webui_added_after_the_page_was_built(
        fake_webui, idle_runner):
    """A1111 hashes the model it loads at start-up when its hash was not cached, after the
    page was built: its own selector then shows "name [hash]", and ours did not."""
    fake_webui.add_checkpoint("a.safetensors")
    _, comps = built_tab()
    built = choices_of(comps["base_model"])
    first = ui.poll("", {}, built)  # a new page has the list it was built with: not re-sent
    assert "choices" not in first[-2]
    seen = first[-1]
    assert "choices" not in ui.poll("", seen)[-2]  # unchanged: nothing re-sent
    info = fake_webui.sd_models.checkpoints_list["a.safetensors"]
    info.calculate_shorthash()
    update = ui.poll("", seen)[-2]
    assert update["choices"] in ([info.title], [(info.title, info.title)])
    assert info.title.startswith("a.safetensors [")


def test_train_shows_errors_next_to_the_fields(fake_webui, tmp_path, idle_runner):
    import gradio as gr

    values, extra = ui.config_to_values(TrainingConfig(
        base_model="", model_name="../x", learning_rate=-1,
        concepts=[Concept(), Concept(instance_data_dir=str(tmp_path / "nope"),
                                     instance_prompt="photo of ohwx dog")]))
    values["concepts.0.instance_data_dir"] = ""
    text, errors, rows = ui.start_from_form(values, extra)
    assert "Fix these first" in text and "Learning rate" in text and "Concept 2" in text
    labels = dict(zip(ui.form_keys(), ui.label_updates(gr, errors, rows)))
    assert "⚠" in labels["learning_rate"]["label"]
    assert "⚠" in labels["model_name"]["label"]
    assert "⚠" in labels["base_model"]["label"]
    assert "⚠" in labels["concepts.1.instance_data_dir"]["label"]  # row 2, though config's [0]
    assert labels["resolution"]["label"] == "Resolution"
    assert not idle_runner.running


def test_concepts_round_trip_through_the_form_and_the_export(tmp_path, fake_webui):
    concepts = [Concept(instance_data_dir=f"/p/{i}", instance_prompt=f"photo of ohwx{i} dog",
                        class_prompt="photo of a dog", class_data_dir=f"/c/{i}")
                for i in range(6)]  # more than the four rows
    values, extra = ui.config_to_values(TrainingConfig(concepts=concepts, base_model="m",
                                                       model_name="n"))
    assert len(extra) == 2
    config, rows = ui.form_to_config(values, extra)
    assert config.concepts == concepts and rows == [0, 1, 2, 3, -1, -1]
    exported = ui.export_concepts(values, extra)
    from dreambooth.common.config import read_concepts_list
    assert read_concepts_list(exported) == concepts


def test_identifier_check_is_shown_live(fake_webui):
    poor = ui.identifier_html("photo of sks dog", "photo of a dog")
    assert "dreambooth-ident-poor" in poor and "rifle" in poor
    assert "dreambooth-ident-good" in ui.identifier_html("photo of ohwx dog", "photo of a dog")


def test_a_run_lands_in_the_webuis_list_and_loads_in_txt2img_without_deadlock(
        fake_webui, tmp_path, idle_runner):
    put_base_checkpoint(fake_webui.checkpoints_dir)
    fake_webui.sd_models.list_models()
    host = ui.current_host()
    assert host.is_webui
    config = quick_config(tmp_path, base=BASE_NAME, name="my-toy", steps=3,
                          sample_every_n_steps=3)
    values, extra = ui.config_to_values(config, host)
    text, errors, _ = ui.start_from_form(values, extra)
    assert not errors, text
    snap = idle_runner.wait(240)
    assert snap.phase == "done", snap.log
    assert fake_webui.shared.state.begun >= 1  # generation was held, the WebUI's bar was used
    titles = list(fake_webui.sd_models.checkpoints_list)
    assert "my-toy.safetensors" in titles  # refreshed without pressing 🔄

    # a page opened now (or reloaded) shows the finished run from the runner, not from the page
    (status, progress, plot, gallery, log, output, logs, best, best_button, note, runs, models,
     seen) = ui.poll("my-toy", {})
    assert runs["choices"] == ["my-toy"]  # the previous-runs list follows the work folder
    assert "data-phase='done'" in status and "3 / 3 steps" in progress
    assert output.endswith("my-toy.safetensors") and gallery and "<polyline" in plot
    # beside the result: where the training log is, and how to open it
    logs_dir = host.work_dir("my-toy") / "logs"
    assert f"Training log: <code>{logs_dir}</code>" in logs and "train.jsonl" in logs

    # a generation holds the lock: the button answers quickly and the switch happens afterwards
    lock = fake_webui.call_queue.queue_lock
    result: dict = {}
    lock.acquire()
    try:
        clicker = threading.Thread(target=lambda: result.update(out=ui.load_output(output)))
        clicker.start()
        clicker.join(15)
        assert not clicker.is_alive(), "Load in txt2img hung while the WebUI was busy"
        title, text = result["out"]
        assert title == "my-toy.safetensors"
        assert "loading my-toy.safetensors in txt2img" in text and "waits for the WebUI" in text
        assert idle_runner.snapshot().switch["state"] == "loading"
    finally:
        lock.release()
    loads = fake_webui.sd_models.model_data.loads
    deadline = time.time() + 15
    while time.time() < deadline and not loads:
        time.sleep(0.1)
    assert loads and loads[-1].startswith("my-toy.safetensors")  # loaded once the lock was free
    while time.time() < deadline and idle_runner.snapshot().switch["state"] == "loading":
        time.sleep(0.05)
    note = ui.poll("my-toy", seen)[9]  # the tab's message follows the switch
    assert "my-toy.safetensors is active in txt2img" in note
    assert str(fake_webui.shared.opts.data["sd_model_checkpoint"]).startswith("my-toy.safetensors")


def test_the_training_log_folder_is_shown_with_how_to_open_it(tmp_path):
    from dreambooth.app.job import Progress
    from dreambooth.tab.ui_poll import logs_dir
    from dreambooth.tab.ui_render import training_log_html
    from dreambooth.host import StandaloneHost

    host = StandaloneHost(tmp_path / "models")
    snap = Progress(job_id=3, model_name="my-toy", phase="training")
    folder = logs_dir(host, snap)
    assert folder == host.work_dir("my-toy") / "logs"  # RunPaths.logs_dir: the trainer writes there
    with_tb = training_log_html(folder, tensorboard=True)
    assert f'tensorboard --logdir "{folder}"' in with_tb and "train.jsonl" in with_tb
    without = training_log_html(folder, tensorboard=False)
    assert "--logdir" not in without and "once <code>tensorboard</code> is installed" in without
    # nothing to show before a training job, nor for a caption job (it has no run folder)
    assert logs_dir(host, Progress()) is None
    assert logs_dir(host, Progress(job_id=4, task="captioning", phase="done")) is None
    assert "Training log" not in training_log_html(None, tensorboard=True)


def test_load_in_txt2img_on_forge_records_the_choice(fake_forge, tmp_path):
    path = put_base_checkpoint(fake_forge.checkpoints_dir, "trained.safetensors")
    fake_forge.sd_models.list_models()
    title, text = ui.load_output(str(path))
    assert title == "trained.safetensors" and "Forge loads it at the next generation" in text
    assert fake_forge.shared.opts.data["sd_model_checkpoint"] == "trained.safetensors"


def test_resume_continues_a_cancelled_run_from_its_resume_point(tmp_path, idle_runner):
    from dreambooth.host import StandaloneHost

    host = StandaloneHost(tmp_path / "models")
    put_base_checkpoint(host.checkpoints_dir())
    job = service.start_training(quick_config(tmp_path, BASE_NAME, name="long", steps=400,
                                              save_on_cancel=False), host)
    deadline = time.time() + 120
    while time.time() < deadline:
        snap = idle_runner.snapshot()
        if snap.job_id == job and snap.phase == "training" and snap.step >= 3:
            break
        time.sleep(0.05)
    idle_runner.cancel()
    stopped = idle_runner.wait(60)
    assert stopped.phase == "cancelled"
    assert [r.name for r in service.resumable_runs(host)] == ["long"]
    assert "no resume points" in ui.resume_run("nothing", host)

    assert "Resuming long" in ui.resume_run("long", host)
    deadline = time.time() + 120
    while time.time() < deadline:  # "resumed from" is logged just before training reports
        snap = idle_runner.snapshot()
        if snap.phase in ("training", "saving", "done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert any(f"(step {stopped.step})" in line for line in snap.log), snap.log
    assert snap.phase == "training" and snap.step >= stopped.step


def test_every_tabs_of_ours_names_its_first_tab_as_selected(fake_webui):
    """Forge's console showed "Attempted to select a non-interactive or hidden tab" for every
    tab registering in a gr.Tabs without a selection (gradio 4's Tabs.svelte reads an unset
    `selected` as undefined and tries it each time a tab registers). Ours name their first tab,
    so the check finds it as soon as it registers: gradio's one warning at creation, no more."""
    blocks, _ = built_tab()
    config = blocks.get_config_file()
    by_id = {c["id"]: c for c in config["components"]}

    def nodes(node: dict):
        yield node
        for child in node.get("children", []):
            yield from nodes(child)

    tab_sets = [n for n in nodes(config["layout"]) if by_id.get(n["id"], {}).get("type") == "tabs"]
    assert tab_sets
    for tab_set in tab_sets:
        first_tab = by_id[tab_set["children"][0]["id"]]["props"].get("id")
        selected = by_id[tab_set["id"]]["props"].get("selected")
        assert selected is not None and selected == first_tab, (selected, first_tab)
