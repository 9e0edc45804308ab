"""The tab and LoRA training, in the (fake) WebUI: the Training method shows only the options
that apply, the LoRA presets set the method, the memory estimate follows the method, "Use in
txt2img" on a LoRA gives its ``<lora:NAME:1>`` tag with the WebUI's Lora list rescanned (and a
checkpoint as before), and "Extract LoRA" on a full run is a job of the runner."""
from __future__ import annotations

import html
import sys

import pytest

from dreambooth.models import families
from dreambooth.app import service
from dreambooth.tab import ui
from dreambooth.app.presets import PRESETS
from dreambooth.common.config import TRAINING_METHODS, TrainingConfig
from dreambooth.host import StandaloneHost

from ui_fixtures import BASE_NAME, handlers, put_base_checkpoint, quick_config


@pytest.fixture
def lora_extension(fake_webui):
    """The WebUI's built-in Lora extension loaded: its ``networks`` module imported by its bare
    name (tests/fake_webui/networks.py), as the extension's scripts do; gone afterwards."""
    sys.modules.pop("networks", None)
    import networks

    yield networks
    sys.modules.pop("networks", None)


def built_tab(initial: TrainingConfig | None = None):
    blocks = ui.build_tab(ui.current_host(), initial)
    return blocks, blocks.dreambooth_components


def choices_of(dropdown) -> list[str]:
    return [c[1] if isinstance(c, (tuple, list)) else c for c in dropdown.choices]


def props_of(blocks) -> dict[str, dict]:
    """Each component's props as the page gets them, by elem_id."""
    return {c.get("props", {}).get("elem_id"): c.get("props", {})
            for c in blocks.get_config_file()["components"]}


def choices_of_props(props: dict) -> list[str]:
    return [c[1] if isinstance(c, (tuple, list)) else c for c in props["choices"]]


def wait_done(job_runner, timeout: float = 240):
    snap = job_runner.wait(timeout)
    assert snap.phase == "done", (snap.phase, snap.error, snap.log[-8:])
    return snap


# ---------------------------------------------------------------------------------------------
# The form
# ---------------------------------------------------------------------------------------------
def test_the_training_method_shows_only_the_options_that_apply(fake_webui):
    blocks, comps = built_tab()
    assert choices_of(comps["training_method"]) == list(TRAINING_METHODS)
    assert comps["training_method"].value == "full"
    # a full run: no LoRA option on screen, the saved format is there
    for name in ("lora_rank", "lora_alpha", "lora_layers", "lora_conv_rank", "lora_conv_alpha",
                 "lora_dropout", "dora", "lokr_factor"):
        assert comps[name].visible is False, name
    assert comps["export_format"].visible is not False and comps["use_ema"].visible is not False

    expected = {  # option -> the methods it is shown for
        "lora_rank": {"lora", "locon", "loha", "lokr"}, "lora_alpha": {"lora", "locon", "loha", "lokr"},
        "lora_layers": {"lora", "locon", "loha", "lokr"}, "lora_dropout": {"lora", "locon", "loha", "lokr"},
        "lora_conv_rank": {"locon", "loha", "lokr"}, "lora_conv_alpha": {"locon", "loha", "lokr"},
        "dora": {"lora", "locon"}, "lokr_factor": {"lokr"}, "export_format": {"full"},
    }
    (on_method, outputs), = [h for h in handlers(blocks, "dreambooth_training_method", "change")
                             if "dreambooth_method_note" in h[1]]
    for method in TRAINING_METHODS:
        shown = dict(zip(outputs, on_method(method, 1e-6 if method == "full" else 1e-4)))
        for name, methods in expected.items():
            assert shown[f"dreambooth_{name}"]["visible"] is (method in methods), (method, name)
        # what does not depend on the method is not touched (EMA works on the adapter too)
        assert "dreambooth_use_ema" not in shown and "dreambooth_train_text_encoder" not in shown
        lr_info = shown["dreambooth_learning_rate"]["info"]
        assert ("1e-4" in lr_info) is (method != "full"), lr_info
        note = shown["dreambooth_method_note"]
        assert ("Lora folder" in note) is (method != "full") and "⚠" not in note
    # a learning rate of the other kind of run is flagged
    assert "⚠" in ui.method_note("lora", 1e-6) and "⚠" in ui.method_note("full", 1e-4)
    assert "⚠" not in ui.method_note("full", 1e-6)

    # a tab opened on a LoCon run shows its options at once; what the form says is the run
    blocks, comps = built_tab(TrainingConfig(training_method="locon", lora_rank=8))
    assert comps["lora_conv_rank"].visible is not False and comps["lokr_factor"].visible is False
    assert comps["export_format"].visible is False and comps["lora_rank"].value == 8
    values, extra = ui.config_to_values(TrainingConfig(base_model="m", model_name="n"))
    values.update(training_method="lokr", lora_rank=12, lora_alpha=6.0, lora_conv_rank=4,
                  lokr_factor=8, lora_layers="attention", lora_dropout=0.1)
    config, _ = ui.form_to_config(values, extra)
    assert (config.training_method, config.lora_rank, config.lora_alpha, config.lora_conv_rank,
            config.lokr_factor, config.lora_layers, config.lora_dropout) == \
        ("lokr", 12, 6.0, 4, 8, "attention", 0.1)


def test_the_presets_list_the_lora_variants_and_set_the_method(fake_webui):
    blocks, _ = built_tab()
    preset = props_of(blocks)["dreambooth_preset"]
    assert {"person-lora", "object-lora", "style-lora"} <= set(choices_of_props(preset))
    (apply, outputs), = handlers(blocks, "dreambooth_apply_preset", "click")

    def applied(name):
        return {elem[len("dreambooth_"):]: update.get("value")
                for elem, update in zip(outputs, apply(name)) if "value" in update}

    person_lora = applied("person-lora")
    assert person_lora["training_method"] == "lora" and person_lora["learning_rate"] == 1e-4
    assert person_lora["lora_rank"] == PRESETS["person-lora"]["lora_rank"]
    assert applied("style-lora")["training_method"] == "locon"
    # a full preset after a LoRA one is a full run again, with the full run's rates
    person = applied("person")
    assert person["training_method"] == "full" and person["learning_rate"] == 1e-6
    assert person["text_encoder_lr"] == 0.0 and person["lora_rank"] == TrainingConfig().lora_rank
    for name in PRESETS:  # each preset's own values, the others' changes undone
        values = ui.preset_values(name)
        assert {k: values[k] for k in PRESETS[name]} == PRESETS[name]
        assert values["training_method"] == PRESETS[name].get("training_method", "full")


def test_the_name_note_says_where_a_lora_is_written(fake_webui):
    host = ui.current_host()
    assert str(host.output_dir() / "zwx.safetensors") in ui.model_name_note("zwx", host=host)
    note = ui.model_name_note("zwx", host=host, method="lora")
    assert str(host.lora_dir() / "zwx.safetensors") in note
    (host.lora_dir()).mkdir(parents=True, exist_ok=True)
    (host.lora_dir() / "zwx.safetensors").write_bytes(b"x")
    assert "this file exists" in ui.model_name_note("zwx", host=host, method="locon")
    assert "this file exists" not in ui.model_name_note("zwx", host=host)


# ---------------------------------------------------------------------------------------------
# The memory estimate
# ---------------------------------------------------------------------------------------------
def test_the_memory_estimate_follows_the_method():
    common = dict(optimizer="adamw8bit", gradient_checkpointing=True, mixed_precision="fp16",
                  pictures=1)
    for kind, size in (("sd1", 512), ("sdxl", 1024)):
        family = families.for_kind(kind)

        def gb(method="lora", rank=32, text_encoder=False, **extra):
            return family.memory_estimate(**{
                **common, "train_text_encoder": text_encoder, "resolution": size,
                "method": method, "rank": rank, **extra})["total"]

        full = gb("full")
        assert gb() < full / 1.8  # the frozen base needs no gradients, no optimizer state
        assert gb(rank=8) < gb(rank=32) < gb(rank=128)
        assert gb(text_encoder=True) > gb()
        assert gb("locon", conv_rank=16) > gb("locon", conv_rank=0)
        assert gb(gradient_checkpointing=False) > gb()
        assert gb(optimizer="adamw") > gb()
        assert gb(pictures=4) > gb()
        assert gb(mixed_precision="no") > gb()
        assert gb(resolution=size // 2) < gb()
        assert gb(cache_text_embeddings=False) > gb()  # the frozen encoders stay on the GPU
        assert gb(base_weights_8bit=True) < gb()  # the base's linear layers in one byte
        assert gb("full", fused_backward=True) < full  # no full set of gradients
        assert gb("full", trained_precision="bf16") < full
        assert gb("full", optimizer="adafactor") < full

    # the tab's figure (service.memory_figure_gb) gets the method from the config
    base = dict(base_model="", model_name="x", mixed_precision="fp16", optimizer="adamw8bit")
    full, family = service.memory_figure_gb(TrainingConfig(**base))
    lora, _ = service.memory_figure_gb(TrainingConfig(**base, training_method="lora"))
    assert family.name == "sd1" and lora["total"] < full["total"]
    # LoRA's conv rank does not count (it trains none); LoCon's does
    assert service.memory_figure_gb(TrainingConfig(**base, training_method="lora",
                                                   lora_conv_rank=64))[0] == lora
    assert service.memory_figure_gb(TrainingConfig(**base, training_method="locon",
                                                   lora_conv_rank=64))[0]["total"] > lora["total"]
    # the line names the categories
    line = service.memory_estimate(TrainingConfig(**base))
    assert "trained weights" in line and "optimizer state" in line and "GB" in line


# ---------------------------------------------------------------------------------------------
# The WebUI's Lora list
# ---------------------------------------------------------------------------------------------
def test_refreshing_the_lora_list_is_a_no_op_without_the_lora_extension(tmp_path, fake_webui,
                                                                         monkeypatch):
    assert StandaloneHost(tmp_path / "models").refresh_loras() is False
    host = ui.current_host()
    monkeypatch.delitem(sys.modules, "networks", raising=False)
    assert host.is_webui and host.refresh_loras() is False  # the extension is disabled

    import networks

    try:
        before = len(networks.calls)
        (host.lora_dir() / "new.safetensors").write_bytes(b"x")
        assert host.refresh_loras() is True
        assert len(networks.calls) == before + 1 and "new" in networks.available_networks

        def broken():
            raise RuntimeError("the Lora extension broke")

        monkeypatch.setattr(networks, "list_available_networks", broken)
        assert host.refresh_loras() is False  # reported, never raised
    finally:
        sys.modules.pop("networks", None)


# ---------------------------------------------------------------------------------------------
# Use in txt2img
# ---------------------------------------------------------------------------------------------
def test_a_lora_run_is_used_in_txt2img_by_its_tag(fake_webui, lora_extension, tmp_path,
                                                  idle_runner):
    put_base_checkpoint(fake_webui.checkpoints_dir)
    fake_webui.sd_models.list_models()
    host = ui.current_host()
    config = quick_config(tmp_path, base=BASE_NAME, name="zwx-lora", steps=2,
                          training_method="lora", lora_rank=4, lora_alpha=2.0, sample_steps=0)
    values, extra = ui.config_to_values(config, host)
    text, errors, _ = ui.start_from_form(values, extra)
    assert not errors, text
    wait_done(idle_runner)
    output = ui.poll("zwx-lora", {})[5]
    assert output == str(host.lora_dir() / "zwx-lora.safetensors")
    assert "zwx-lora.safetensors" not in fake_webui.sd_models.checkpoints_list  # not a checkpoint
    assert not ui.extract_visible(output, host)  # a LoRA is no full run to extract from
    # the job rescanned the WebUI's Lora list before it handed the lock back
    assert "zwx-lora" in lora_extension.calls[-1]["names"]

    rescans = len(lora_extension.calls)
    title, tag, note = ui.use_output(output, host)
    note = html.unescape(note)
    assert (title, tag) == ("", "<lora:zwx-lora:1>")
    assert "<lora:zwx-lora:1>" in note and "dreambooth-error" not in note
    assert len(lora_extension.calls) == rescans + 1  # the WebUI's Lora list knows the file
    assert "zwx-lora" in lora_extension.available_networks
    assert not any(load.startswith("zwx-lora") for load in fake_webui.sd_models.model_data.loads)

    # without the Lora extension the tag is still given, and the message says why it may fail
    sys.modules.pop("networks", None)
    title, tag, note = ui.use_output(output, host)
    assert tag == "<lora:zwx-lora:1>" and "Lora extension enabled" in note

    # standalone: no txt2img, the message gives the tag to use
    standalone = StandaloneHost(fake_webui.models_dir)
    title, tag, note = ui.use_output(output, standalone)
    note = html.unescape(note)
    assert (title, tag) == ("", "") and "<lora:zwx-lora:1>" in note


def test_the_validation_curve_and_the_best_step_are_shown_and_its_file_is_used_by_its_button(
        fake_webui, lora_extension, tmp_path, idle_runner):
    """Issue 28: the tab draws the validation loss over the training loss with the best step
    marked, and a button puts the best step's file (keep_best) into txt2img."""
    import json

    put_base_checkpoint(fake_webui.checkpoints_dir)
    fake_webui.sd_models.list_models()
    host = ui.current_host()
    config = quick_config(tmp_path, base=BASE_NAME, name="zwx-val", steps=4,
                          training_method="lora", lora_rank=4, lora_alpha=2.0, sample_steps=0,
                          learning_rate=1e-2, validation_split=0.3, validate_every_n_steps=1,
                          keep_best=True)
    values, extra = ui.config_to_values(config, host)
    text, errors, _ = ui.start_from_form(values, extra)
    assert not errors, text
    wait_done(idle_runner)
    records = [json.loads(line) for line in
               (host.work_dir("zwx-val") / "logs" / "train.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["validation_loss"] for r in records if r.get("event") == "validation"}
    best = min(scores, key=scores.get)
    (_, _, plot, _, _, output, _, best_path, best_button, *_) = ui.poll("zwx-val", {})
    assert plot.count("dreambooth-plot-val-dot") == len(scores) == 4
    assert "class='dreambooth-plot-best' " in plot and f"best: step {best}" in plot
    assert best_path == str(host.lora_dir() / "zwx-val_best.safetensors")
    assert best_button["visible"] and f"({best})" in best_button["value"]
    title, tag, _ = ui.use_output(best_path, host)
    assert (title, tag) == ("", "<lora:zwx-val_best:1>")
    title, tag, _ = ui.use_output(output, host)  # the final file keeps its own button
    assert tag == "<lora:zwx-val:1>"


def test_a_checkpoint_is_still_loaded_in_txt2img(fake_forge):
    path = put_base_checkpoint(fake_forge.checkpoints_dir, "trained.safetensors")
    fake_forge.sd_models.list_models()
    title, tag, note = ui.use_output(str(path))
    assert (title, tag) == ("trained.safetensors", "")
    assert "Forge loads it at the next generation" in note
    assert ui.extract_visible(str(path))


# ---------------------------------------------------------------------------------------------
# Extract LoRA
# ---------------------------------------------------------------------------------------------
def test_extract_lora_from_a_finished_full_run(fake_webui, lora_extension, tmp_path,
                                               idle_runner):
    from dreambooth.models.adapters.file import read_lora

    put_base_checkpoint(fake_webui.checkpoints_dir)
    fake_webui.sd_models.list_models()
    host = ui.current_host()
    blocks, comps = built_tab()
    config = quick_config(tmp_path, base=BASE_NAME, name="zwx-full", steps=2, learning_rate=1e-3,
                          sample_steps=0)
    values, extra = ui.config_to_values(config, host)
    assert not ui.start_from_form(values, extra)[1]
    wait_done(idle_runner)
    output = ui.poll("zwx-full", {})[5]
    assert output == str(host.output_dir() / "zwx-full.safetensors")
    # the panel is shown for a full run's checkpoint (the output box's change event)
    (show, outputs), = handlers(blocks, "dreambooth_output", "change")
    assert outputs == ["dreambooth_extract"] and show(output)["visible"] is True
    assert show("")["visible"] is False
    props = props_of(blocks)
    assert props["dreambooth_extract_rank"]["value"] == 32
    assert props["dreambooth_extract_conv_rank"]["value"] == 0

    (extract, _), = handlers(blocks, "dreambooth_extract_lora", "click")
    note = extract(output, 4, 2, False)
    target = host.lora_dir() / "zwx-full-lora.safetensors"
    assert "Extracting a LoRA (rank 4, conv rank 2)" in note and str(target) in note
    assert "already running" in ui.extract_lora(output, 4, 0, False, host)  # one job at a time
    snap = wait_done(idle_runner)
    assert snap.task == "extracting" and snap.output_path == str(target)
    assert any("the rank keeps" in line for line in snap.log), snap.log
    assert any("unet:" in line for line in snap.log)
    tensors, metadata = read_lora(target)
    assert any(k.endswith(".lora_up.weight") for k in tensors)
    assert metadata["ss_network_dim"] == "4" and "zwx-full" in metadata["ss_training_comment"]
    assert "zwx-full-lora" in lora_extension.available_networks  # listed when written

    # the tab shows the extraction like any job, and "Use in txt2img" now adds its tag
    status, progress, *_ = ui.poll("zwx-full", {})
    assert "data-phase='done'" in status and "zwx-full" in status
    assert ui.use_output(snap.output_path, host)[1] == "<lora:zwx-full-lora:1>"

    # an existing file is kept unless Overwrite is ticked; bad input is named
    before = target.stat().st_mtime_ns
    assert "exists: tick Overwrite" in ui.extract_lora(output, 4, 0, False, host)
    assert "whole numbers" in ui.extract_lora(output, 4.5, 0, False, host)
    assert "rank must be a whole number from 1" in ui.extract_lora(output, 0, 0, True, host)
    for wrong in (target, tmp_path / "x.safetensors"):  # a LoRA; a file elsewhere
        assert "needs a full run's checkpoint" in html.unescape(
            ui.extract_lora(str(wrong), 4, 0, True, host))
    assert target.stat().st_mtime_ns == before
    assert "Extracting" in ui.extract_lora(output, 4, 0, True, host)
    wait_done(idle_runner)
    assert target.stat().st_mtime_ns != before


def test_extract_lora_finds_the_base_of_an_intermediate_save(fake_webui, tmp_path):
    """A cancelled run's <name>_<step> file: its run is <name>; without a run, the base the
    file's metadata names."""
    host = ui.current_host()
    base = put_base_checkpoint(fake_webui.checkpoints_dir)
    fake_webui.sd_models.list_models()
    work = host.work_dir("zwx")
    work.mkdir(parents=True)
    TrainingConfig(base_model=str(base), model_name="zwx").save(work / "config.json")
    saved = put_base_checkpoint(host.output_dir(), "zwx_40.safetensors")
    assert service.extraction_base(host, saved) == base
    assert service.extraction_target(host, saved) == host.lora_dir() / "zwx_40-lora.safetensors"
    lonely = put_base_checkpoint(host.output_dir(), "other.safetensors")
    assert service.extraction_base(host, lonely) is None  # the tiny base names no base
    assert "base model of other.safetensors is not found" in ui.extract_lora(str(lonely), 4, 0,
                                                                              False, host)


@pytest.mark.parametrize("method, lr, warned", [
    ("loha", 1e-3, True), ("loha", 1e-4, False), ("lora", 1e-3, False), ("lora", 5e-3, True),
    ("locon", 1e-4, False), ("lokr", 1e-6, True), ("full", 1e-6, False), ("full", 1e-4, True)])
def test_the_learning_rate_is_judged_per_method(method, lr, warned):
    """LoHa at 1e-3 (ten times its preset) gave NaN generations in A1111: warned, by the tab
    and in the run's log (the config's warnings), while LoRA at 1e-3 is fine."""
    assert ("⚠" in ui.method_note(method, lr)) == warned
    config = TrainingConfig(training_method=method, learning_rate=lr)
    assert any("learning rate" in note for note in config.warnings()) == warned
    if method == "loha" and warned:
        assert "NaN" in ui.method_note(method, lr)


def test_no_preset_sets_a_text_encoder_rate_for_a_frozen_text_encoder():
    """object-lora set a text-encoder lr with the text encoder off: a setting with no effect."""
    for name in PRESETS:
        values = ui.preset_values(name)
        inert = not values["train_text_encoder"] and (values.get("text_encoder_lr")
                                                      or values.get("text_encoder_2_lr"))
        assert not inert, name
    frozen = TrainingConfig(train_text_encoder=False, text_encoder_lr=5e-5)
    assert any("does nothing" in note for note in frozen.warnings())
