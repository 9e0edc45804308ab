"""Captions for the user's pictures, from the WebUI's interrogators (the fake WebUI's, which
caption a picture by its mean colour): only pictures without a caption, overwrite, prefix, the
interrogator's choice, progress and cancel through the job runner, the WebUI's interrogators
refused where there is none (ours offered instead), the tab's panel and the CLI. Both lanes:
A1111 and Forge. Our own captioners: test_captioners.py."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.data import captions
from dreambooth.app import cli, service
from dreambooth.tab import ui, ui_captions
from dreambooth.common.config import Concept, TrainingConfig
from dreambooth.app.job import JobRunner
from dreambooth.host import StandaloneHost, get_host

COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 200)}


@pytest.fixture(params=["a1111", "forge"])
def webui(request, make_fake_webui):
    return make_fake_webui(flavour=request.param)


def draw(folder: Path, names=("red", "green", "blue")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (32, 24), COLOURS[name]).save(folder / f"{name}.png")
    return folder


def config_for(*folders: Path, prompt: str = "photo of ohwx toy, [filewords]", **options
               ) -> TrainingConfig:
    return TrainingConfig(concepts=[Concept(instance_data_dir=str(f), instance_prompt=prompt)
                                    for f in folders], **options)


def run(config: TrainingConfig, **options):
    """A caption job through a runner of its own, to its end."""
    jobs = JobRunner()
    service.start_captions(config, get_host(), jobs, **options)
    return jobs.wait(60)


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def test_only_pictures_without_a_caption_get_one(webui, tmp_path):
    pics = draw(tmp_path / "pics")
    (pics / "green.txt").write_text("my own words", encoding="utf-8")
    snap = run(config_for(pics), interrogator="blip")
    assert snap.phase == "done" and snap.task == "captioning", snap.log
    assert text(pics / "red.txt") == "a picture of red"
    assert text(pics / "blue.txt") == "a picture of blue"
    assert text(pics / "green.txt") == "my own words"  # the user's caption is kept
    assert any("2 caption(s) written, 1 existing caption(s) kept" in line for line in snap.log)
    assert (snap.step, snap.total) == (2, 2)
    # every picture has a caption now: a second run has nothing to do, and says so
    with pytest.raises(captions.CaptionError, match="nothing to caption.*overwrite"):
        run(config_for(pics), interrogator="blip")


def test_overwrite_replaces_existing_captions(webui, tmp_path):
    pics = draw(tmp_path / "pics")
    (pics / "green.txt").write_text("my own words", encoding="utf-8")
    snap = run(config_for(pics), interrogator="blip", overwrite=True)
    assert snap.phase == "done", snap.log
    assert text(pics / "green.txt") == "a picture of green"
    assert not temporaries(pics)


def test_the_caption_extension_of_the_config_is_used(fake_webui, tmp_path):
    pics = draw(tmp_path / "pics", ["red"])
    (pics / "red.txt").write_text("not a caption file here", encoding="utf-8")
    snap = run(config_for(pics, caption_extension=".caption"), interrogator="blip")
    assert snap.phase == "done", snap.log
    assert text(pics / "red.caption") == "a picture of red"
    assert text(pics / "red.txt") == "not a caption file here"


def test_a_prefix_is_prepended_and_instance_takes_each_concepts_prompt(webui, tmp_path):
    dogs, cats = draw(tmp_path / "dogs", ["red"]), draw(tmp_path / "cats", ["blue"])
    snap = run(config_for(dogs), interrogator="blip", prefix="ohwx dog,")
    assert snap.phase == "done", snap.log
    assert text(dogs / "red.txt") == "ohwx dog, a picture of red"

    config = TrainingConfig(concepts=[
        Concept(instance_data_dir=str(dogs), instance_prompt="photo of ohwx dog, [filewords]"),
        Concept(instance_data_dir=str(cats), instance_prompt="zwx cat")])
    run(config, interrogator="blip", prefix="[instance]", overwrite=True)
    assert text(dogs / "red.txt") == "photo of ohwx dog, a picture of red"
    assert text(cats / "blue.txt") == "zwx cat, a picture of blue"


def test_compose_joins_prefix_and_caption_on_one_line():
    assert captions.compose("", "a dog\non a couch") == "a dog, on a couch"
    assert captions.compose("ohwx dog", "a dog") == "ohwx dog, a dog"
    assert captions.compose("ohwx dog, ", "a dog") == "ohwx dog, a dog"
    assert captions.compose("ohwx dog,", "") == "ohwx dog"
    assert captions.resolve_prefix("[instance], ", "a [filewords] photo of ohwx") == "a photo of ohwx, "


def test_the_interrogator_choice_changes_the_text(webui, tmp_path):
    pics = draw(tmp_path / "pics", ["red"])
    host = get_host()
    assert ui_captions.interrogator_choices(host)[-3:] == ["blip", "clip", "deepbooru"]
    expected = {"blip": "a picture of red",
                "clip": "a picture of red, flat colour, dark, hex c81e1e",  # as Interrogate CLIP
                "deepbooru": "red theme, simple background, hex c81e1e"}
    for kind, caption in expected.items():
        snap = run(config_for(pics), interrogator=kind, overwrite=True)
        assert snap.phase == "done", snap.log
        assert text(pics / "red.txt") == caption, kind
    # each picture was interrogated holding the WebUI's generation lock, and only then
    calls = webui.shared.interrogator.calls
    from modules import deepbooru

    assert calls and deepbooru.model.calls
    assert all(held for _, held in calls + deepbooru.model.calls)
    lock = webui.call_queue.queue_lock
    assert lock.acquire(blocking=False)
    lock.release()
    if webui.flavour == "forge":  # Forge's memory manager placed the models
        from backend import memory_management

        assert memory_management.loaded_for_interrogation
    else:  # A1111: the models went back to the CPU (its "Keep models in VRAM" is off)
        assert webui.shared.interrogator.device == {"blip": "cpu", "clip": "cpu"}
        assert deepbooru.model.device == "cpu"


def test_an_unreadable_picture_is_skipped_with_its_name(fake_webui, tmp_path):
    pics = draw(tmp_path / "pics", ["red"])
    (pics / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    snap = run(config_for(pics), interrogator="deepbooru")
    assert snap.phase == "done", snap.log
    assert any("warning: skipped broken.png" in line for line in snap.log), snap.log
    assert any("1 unreadable picture(s) skipped" in line for line in snap.log)
    assert text(pics / "red.txt").startswith("red theme") and not (pics / "broken.txt").exists()


def test_a_failing_interrogator_stops_the_run_with_its_reason(fake_webui, tmp_path):
    pics = draw(tmp_path / "pics")
    fake_webui.shared.interrogator.fail = True  # it prints the error and returns "...<error>"
    snap = run(config_for(pics), interrogator="clip")
    assert snap.phase == "failed" and "clip interrogator failed" in snap.error
    assert not list(pics.glob("*.txt"))  # never a caption with "<error>" in it


def test_progress_is_reported_and_cancel_stops_after_the_current_picture(webui, tmp_path,
                                                                          monkeypatch):
    from modules import deepbooru

    pics = draw(tmp_path / "pics")  # blue, green, red (in name order)
    inside, go_on = threading.Event(), threading.Event()
    real = deepbooru.model.tag_multi
    seen: list = []

    def slow(image, force_disable_ranks=False):
        seen.append(image)
        if len(seen) == 2:  # the second picture: the test looks and cancels meanwhile
            inside.set()
            go_on.wait(20)
        return real(image)

    monkeypatch.setattr(deepbooru.model, "tag_multi", slow)
    jobs = JobRunner()
    service.start_captions(config_for(pics), get_host(), jobs, interrogator="deepbooru")
    assert inside.wait(20)
    snap = jobs.snapshot()
    assert snap.running and snap.phase == "captioning" and (snap.step, snap.total) == (1, 3)
    assert "blue.png" in snap.detail
    # the generation lock is held for the picture being captioned only
    assert webui.call_queue.queue_lock._lock.locked()
    assert jobs.cancel()
    go_on.set()
    final = jobs.wait(30)
    assert final.phase == "cancelled" and final.step == 2, final.log
    assert any("cancelled with 1 picture(s) left" in line for line in final.log)
    # the pictures done so far have whole captions, the rest none, nothing half-written
    assert text(pics / "blue.txt").startswith("blue theme")
    assert text(pics / "green.txt") == "green theme, simple background, hex 1ea03c"
    assert not (pics / "red.txt").exists() and not temporaries(pics)
    assert not webui.call_queue.queue_lock._lock.locked()


def test_a_caption_job_shares_the_one_job_slot_with_training(fake_webui, tmp_path, monkeypatch):
    from dreambooth.app.job import JobBusy
    from modules import deepbooru

    pics = draw(tmp_path / "pics")
    go_on = threading.Event()
    real = deepbooru.model.tag_multi
    monkeypatch.setattr(deepbooru.model, "tag_multi",
                        lambda image, force_disable_ranks=False: (go_on.wait(20), real(image))[1])
    jobs = JobRunner()
    service.start_captions(config_for(pics), get_host(), jobs, interrogator="deepbooru")
    try:
        with pytest.raises(JobBusy, match="a captioning job is already running"):
            service.start_captions(config_for(pics), get_host(), jobs, interrogator="blip",
                                   overwrite=True)
    finally:
        go_on.set()
        jobs.wait(30)


def test_without_the_webui_its_interrogators_are_refused_and_ours_offered(tmp_path):
    pics = draw(tmp_path / "pics")
    host = StandaloneHost(tmp_path / "models")
    assert host.interrogators() == []
    with pytest.raises(captions.CaptionError, match="WebUI's interrogators.*ours instead: blip-base"):
        service.start_captions(config_for(pics), host, JobRunner(), interrogator="blip")
    assert "dreambooth-error" not in ui_captions.panel_note(host)
    assert "blip" not in ui_captions.interrogator_choices(host)
    answer = ui_captions.start_from_form(lambda: config_for(pics), "deepbooru", "", False,
                                         host=host)
    assert "no WebUI interrogator here" in answer and "dreambooth-error" in answer
    assert not list(pics.glob("*.txt"))


def test_cli_without_the_webui_refuses_its_interrogators_with_exit_2(tmp_path):
    pics = draw(tmp_path / "pics")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DREAMBOOTH_MODELS_DIR": str(tmp_path / "models")}
    done = subprocess.run([sys.executable, "-m", "dreambooth", "caption", str(pics),
                           "--interrogator", "blip"], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent, env=env)
    assert done.returncode == 2, done.stderr
    assert "WebUI" in done.stderr and "blip-base" in done.stderr
    assert "Traceback" not in done.stderr
    # without a choice it takes our BLIP, which is not downloaded, and offline cannot be
    done = subprocess.run([sys.executable, "-m", "dreambooth", "caption", str(pics)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent, env=env)
    assert done.returncode == 2, done.stderr
    assert "blip-base" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    assert str(tmp_path / "models" / "captioners" / "blip-image-captioning-base") in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(pics.glob("*.txt"))


def test_cli_captions_inside_the_webuis_process(webui, tmp_path, capsys):
    pics = draw(tmp_path / "pics", ["red", "blue"])
    (pics / "blue.txt").write_text("mine", encoding="utf-8")
    assert cli.caption_main([str(pics), "--interrogator", "deepbooru", "--prefix", "ohwx toy,",
                             "--quiet"]) == 0
    assert text(pics / "red.txt") == "ohwx toy, red theme, simple background, hex c81e1e"
    assert text(pics / "blue.txt") == "mine"
    assert "1 caption(s) written, 1 existing caption(s) kept" in capsys.readouterr().out

    config = config_for(pics, prompt="photo of zwx toy", caption_extension=".caption")
    config.save(tmp_path / "config.json")
    assert cli.caption_main(["--config", str(tmp_path / "config.json"), "--prefix", "[instance]",
                             "--quiet"]) == 0
    assert text(pics / "blue.caption") == "photo of zwx toy, a picture of blue"

    assert cli.caption_main([str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err
    webui.shared.interrogator.fail = True
    assert cli.caption_main([str(pics), "--interrogator", "clip", "--overwrite", "--quiet"]) == 1
    assert "clip interrogator failed" in capsys.readouterr().err


def _click(blocks, elem_id: str, *args):
    """Run the function wired to the button with ``elem_id`` (as gradio would on a click)."""
    config = blocks.get_config_file()
    button = next(c["id"] for c in config["components"]
                  if c.get("props", {}).get("elem_id") == elem_id)
    for index, dep in enumerate(config["dependencies"]):
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dep["targets"]]
        if button in targets:
            fns = blocks.fns
            block_fn = fns[dep.get("id", index)] if isinstance(fns, dict) else fns[index]
            return dep, block_fn.fn(*args)
    raise AssertionError(f"nothing wired to #{elem_id}")


def test_the_tab_captions_the_forms_folders_and_polls_the_job(webui, tmp_path, idle_runner):
    pics = draw(tmp_path / "pics")
    (blocks, _, _), = ui.create_tab()
    ids = {c.get("props", {}).get("elem_id") for c in blocks.get_config_file()["components"]}
    assert {"dreambooth_caption", "dreambooth_caption_interrogator", "dreambooth_caption_prefix",
            "dreambooth_caption_overwrite"} <= ids
    host = ui.current_host()
    values, extra = ui.config_to_values(config_for(pics, prompt="photo of ohwx toy"), host)
    form = [values[k] for k in ui.form_keys()] + [extra]
    tagger = [0.35, 0.85, False, True, True, "", 0]  # the tagger's fields (hidden for clip)
    dep, answer = _click(blocks, "dreambooth_caption", *form, "clip", "[instance]", False, *tagger)
    assert dep["queue"] is False and "Captioning" in answer, answer
    snap = idle_runner.wait(60)
    assert snap.phase == "done", snap.log
    assert text(pics / "red.txt") == "photo of ohwx toy, a picture of red, flat colour, dark, hex c81e1e"
    status, progress, *_ = ui.poll("", {})
    assert "data-phase='done'" in status and "3 / 3 pictures captioned" in progress
    assert ui.restore_form(host) is None  # a caption job leaves a new page's form alone
    # clicked again: every picture has a caption now, and the tab says so
    _, answer = _click(blocks, "dreambooth_caption", *form, "blip", "", False, *tagger)
    assert "nothing to caption" in answer
