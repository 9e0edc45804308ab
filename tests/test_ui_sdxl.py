"""The tab on an SDXL base, in the (fake) WebUI: the SDXL options are in the form, the line under
the model picker says SDXL (and v-prediction / zero terminal SNR when the file says so) and the
size that resolution 0 trains at, a run from the tab finishes, joins the WebUI's list, and "Load
in txt2img" makes the WebUI load it as an SDXL model (the config A1111 picks from its keys)."""
from __future__ import annotations

import dataclasses
import html
import time

import pytest

from dreambooth.models import families
from dreambooth.app import service
from dreambooth.tab import ui
from dreambooth.common.config import TrainingConfig
from dreambooth.app.job import runner

from browser_fixtures import SHOTS, chromium, needs_chromium, served
from conftest import FAKE_WEBUI_DIR
from ui_fixtures import (BASE_NAME, SDXL_NAME, handlers, put_base_checkpoint,
                         put_sdxl_checkpoint, quick_config)

VPRED_NAME = "noob-vpred.safetensors"


@pytest.fixture
def bases(fake_webui):
    """The fake WebUI's checkpoint folder with the tiny SD1 base, the tiny SDXL base and a
    v-prediction / zero-terminal-SNR SDXL (marker keys), listed."""
    folder = fake_webui.checkpoints_dir
    put_base_checkpoint(folder)
    put_sdxl_checkpoint(folder)
    put_sdxl_checkpoint(folder, VPRED_NAME, v_pred_ztsnr=True)
    fake_webui.sd_models.list_models()
    return fake_webui


def choices_of(dropdown) -> list[str]:
    return [c[1] if isinstance(c, (tuple, list)) else c for c in dropdown.choices]


def built_tab():
    (blocks, _, _), = ui.create_tab()
    return blocks, blocks.dreambooth_components


def pick_base(blocks, title: str) -> dict[str, object]:
    """What the page shows after choosing ``title`` in the model picker: {elem_id: value}."""
    (fn, outputs), = [h for h in handlers(blocks, "dreambooth_base_model", "change")
                      if "dreambooth_model_kind" in h[1]]
    return dict(zip(outputs, fn(title)))


def test_the_sdxl_options_are_in_the_form_and_reach_the_run(fake_webui):
    blocks, comps = built_tab()
    assert comps["text_encoder_2_lr"].label == "Text encoder 2 LR (SDXL)"
    assert comps["text_encoder_2_stop"].label == "Text encoder 2 stop (SDXL; 0 = keep frozen)"
    assert comps["zero_terminal_snr"].label.startswith("Zero terminal SNR")
    assert comps["vae_fp16_safe"].label == "VAE is fp16-safe"
    assert "fp32" in comps["vae_fp16_safe"].info
    assert "adafactor" in choices_of(comps["optimizer"])
    assert comps["resolution"].value == 0
    assert "0 = the model's own" in comps["resolution"].info and "1024 SDXL" in comps["resolution"].info
    # what is typed in the form is what the run gets
    values, extra = ui.config_to_values(TrainingConfig(base_model="m", model_name="n"))
    values.update(zero_terminal_snr=True, vae_fp16_safe=True, text_encoder_2_lr=2e-6,
                  text_encoder_2_stop=0, optimizer="adafactor", train_text_encoder=True)
    config, _ = ui.form_to_config(values, extra)
    assert (config.zero_terminal_snr, config.vae_fp16_safe, config.text_encoder_2_lr,
            config.text_encoder_2_stop, config.optimizer) == (True, True, 2e-6, 0, "adafactor")
    assert config.text_encoder_stop_step(100, index=1) == 0  # the second encoder stays frozen
    assert config.text_encoder_stop_step(100, index=0) == 100


def test_the_model_line_says_sdxl_and_what_resolution_0_trains_at(bases):
    blocks, comps = built_tab()
    assert choices_of(comps["base_model"]) == [VPRED_NAME, BASE_NAME, SDXL_NAME]

    shown = pick_base(blocks, SDXL_NAME)
    line = shown["dreambooth_model_kind"]
    assert line.startswith(f"{SDXL_NAME}: SDXL") and "trains at 1024 px" in line
    assert "v-prediction" not in line and "zero terminal SNR" not in line
    # the Resolution field (Parameters tab) says it too
    assert "the chosen model: 1024 px" in shown["dreambooth_resolution"]["info"]

    line = pick_base(blocks, VPRED_NAME)["dreambooth_model_kind"]
    assert "SDXL, v-prediction (file keys), zero terminal SNR" in line and "1024 px" in line

    shown = pick_base(blocks, BASE_NAME)
    assert "SDXL" not in shown["dreambooth_model_kind"]
    assert "trains at 512 px" in shown["dreambooth_model_kind"]
    assert "the chosen model: 512 px" in shown["dreambooth_resolution"]["info"]

    shown = pick_base(blocks, "")  # nothing chosen: no line, the plain help
    assert shown["dreambooth_model_kind"] == ""
    assert "chosen model" not in shown["dreambooth_resolution"]["info"]


def test_a_tab_opened_on_an_sdxl_run_shows_the_line_at_once(bases):
    path = bases.checkpoints_dir / SDXL_NAME
    blocks = ui.build_tab(ui.current_host(), TrainingConfig(base_model=str(path)))
    config = blocks.get_config_file()
    props = {c.get("props", {}).get("elem_id"): c.get("props", {}) for c in config["components"]}
    assert props["dreambooth_base_model"]["value"] == SDXL_NAME  # the file shown by its title
    assert "SDXL" in props["dreambooth_model_kind"]["value"]
    assert "the chosen model: 1024 px" in props["dreambooth_resolution"]["info"]


def test_resolution_0_from_the_form_trains_at_the_models_own_size(bases, tmp_path):
    host = ui.current_host()
    sizes = {}
    for base in (SDXL_NAME, VPRED_NAME, BASE_NAME):
        values, extra = ui.config_to_values(
            quick_config(tmp_path, base=base, name="x", resolution=0), host)
        assert values["resolution"] == 0
        config, _ = ui.form_to_config(values, extra)
        resolved, errors = service.preflight(config, host)
        assert not errors, errors
        sizes[base] = resolved.resolution
    assert sizes == {SDXL_NAME: 1024, VPRED_NAME: 1024, BASE_NAME: 512}
    # a size typed in the form is kept
    values, extra = ui.config_to_values(quick_config(tmp_path, base=SDXL_NAME, name="x"), host)
    assert service.preflight(ui.form_to_config(values, extra)[0], host)[0].resolution == 64


def test_the_estimate_follows_the_chosen_models_family(bases, tmp_path, monkeypatch):
    # the memory figure (GPU only) is the base family's: record which family it is given
    from dreambooth.app import estimates

    monkeypatch.setattr(estimates, "memory_estimate",
                        lambda config: f"family {(families.base_family(config) or ['?'])[0].title}")
    host = ui.current_host()
    values, extra = ui.config_to_values(quick_config(tmp_path, base=SDXL_NAME), host)
    assert "family SDXL" in ui.estimate_html(values, extra, host)
    values["base_model"] = BASE_NAME
    assert "family SD 1.x" in ui.estimate_html(values, extra, host)
    blocks, _ = built_tab()
    assert any("dreambooth_estimate" in outputs
               for _, outputs in handlers(blocks, "dreambooth_base_model", "change"))


def wait_for_load(fake, title_start: str, seconds: float = 20):
    loads = fake.sd_models.model_data.loads
    deadline = time.time() + seconds
    while time.time() < deadline and not (loads and loads[-1].startswith(title_start)):
        time.sleep(0.05)
    assert loads and loads[-1].startswith(title_start), loads
    while time.time() < deadline and runner().snapshot().switch.get("state") == "loading":
        time.sleep(0.05)


@pytest.mark.parametrize("base,config_file,parameterization,ztsnr", [
    (SDXL_NAME, "sd_xl_base.yaml", "eps", False),
    (VPRED_NAME, "sd_xl_v.yaml", "v", True),
])
def test_a_run_on_an_sdxl_base_loads_in_txt2img_as_sdxl(bases, tmp_path, idle_runner, base,
                                                         config_file, parameterization, ztsnr):
    host = ui.current_host()
    name = "my-xl"
    values, extra = ui.config_to_values(quick_config(tmp_path, base=base, name=name, steps=2,
                                                     resolution=64), host)
    text, errors, _ = ui.start_from_form(values, extra)
    assert not errors, text
    snap = idle_runner.wait(300)
    assert snap.phase == "done", snap.log
    assert f"{name}.safetensors" in bases.sd_models.checkpoints_list  # refreshed, no 🔄 needed
    (status, progress, plot, gallery, log, output, logs, best, best_button, note, runs, models,
     seen) = ui.poll(name, {})
    assert "2 / 2 steps" in progress
    assert output.endswith(f"{name}.safetensors")
    # the result is an SDXL model too, as the model line says when it is picked as a base
    line = service.describe_model(host, f"{name}.safetensors")
    assert "SDXL" in line and ("v-prediction" in line) == (parameterization == "v")

    title, note = ui.load_output(output)
    assert title.startswith(f"{name}.safetensors")
    wait_for_load(bases, f"{name}.safetensors")
    assert "is active in txt2img" in ui.poll(name, seen)[9]  # the tab's message follows
    model = bases.shared.sd_model
    assert model.sd_checkpoint_info.name == f"{name}.safetensors"
    assert model.is_sdxl and not model.is_sd1 and not model.is_sd2
    assert model.used_config == config_file
    assert model.parameterization == parameterization and model.ztsnr is ztsnr


def test_forge_loads_an_sdxl_file_as_sdxl_at_the_next_generation(fake_forge):
    put_sdxl_checkpoint(fake_forge.checkpoints_dir, "trained.safetensors")
    put_base_checkpoint(fake_forge.checkpoints_dir, "sd1.safetensors")
    fake_forge.sd_models.list_models()
    title, text = ui.load_output(str(fake_forge.checkpoints_dir / "trained.safetensors"))
    assert title == "trained.safetensors" and "next generation" in text
    model = fake_forge.shared.sd_model  # what the next generation reads: loaded now
    assert model.sd_checkpoint_info.name == "trained.safetensors"
    assert model.is_sdxl and model.used_config is None


def test_the_fake_webui_tells_sd1_and_a_yaml_beside_the_file(fake_webui):
    """The fake's loader itself: the tiny SD1 base loads as SD1.x, a file of one tensor falls
    back to SD1.x, and a .yaml beside a checkpoint wins over its keys (as in A1111)."""
    put_base_checkpoint(fake_webui.checkpoints_dir)
    sdxl = put_sdxl_checkpoint(fake_webui.checkpoints_dir, "with-yaml.safetensors")
    sdxl.with_suffix(".yaml").write_text(
        "model:\n  params:\n    parameterization: \"v\"\n    cond_stage_config:\n"
        "      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n")
    fake_webui.add_checkpoint("one-tensor.safetensors")
    load = fake_webui.sd_models.load_model
    info = fake_webui.sd_models.get_closet_checkpoint_match
    model = load(info(BASE_NAME))
    assert model.is_sd1 and not model.is_sdxl and model.used_config == "v1-inference.yaml"
    assert model.parameterization == "eps" and not model.ztsnr
    model = load(info("one-tensor.safetensors"))
    assert model.is_sd1 and model.used_config == "v1-inference.yaml"
    model = load(info("with-yaml.safetensors"))
    assert model.used_config == str(sdxl.with_suffix(".yaml"))
    assert model.is_sd2 and not model.is_sdxl and model.parameterization == "v"


@needs_chromium
def test_in_the_page_picking_the_sdxl_base_shows_sdxl_and_1024(tmp_path):
    """A real browser on the fake WebUI's page (this lane's gradio): choosing the SDXL base in
    the Model tab's picker shows the line under it, and the Resolution field's help says 1024."""
    import importlib.metadata

    pytest.importorskip("playwright.sync_api")
    flavour = "forge" if int(importlib.metadata.version("gradio").split(".")[0]) >= 4 else "a1111"
    root = tmp_path / "webui"
    put_base_checkpoint(root / "models" / "Stable-diffusion")
    put_sdxl_checkpoint(root / "models" / "Stable-diffusion")
    env = {"FAKE_WEBUI_ROOT": str(root), "FAKE_WEBUI_ARGS": "", "FAKE_WEBUI_FLAVOUR": flavour}
    log_path = tmp_path / "page.log"
    with served([str(FAKE_WEBUI_DIR / "page.py")], "fake/opts", log_path, env) as url, \
            chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#dreambooth_base_model", state="attached", timeout=60_000)
            page.locator("#tabs button", has_text="DreamBooth").first.click()
            page.locator("#dreambooth_base_model input").first.click()
            page.locator("ul.options li", has_text=SDXL_NAME).first.click()
            page.wait_for_function(
                "() => (document.querySelector('#dreambooth_model_kind') || {}).textContent"
                "?.includes('SDXL')", timeout=20_000)
            line = page.locator("#dreambooth_model_kind").first.text_content()
            assert f"{SDXL_NAME}: SDXL" in line and "trains at 1024 px" in line, line
            page.locator("#dreambooth_settings_tabs button", has_text="Parameters").first.click()
            field = page.locator("#dreambooth_resolution").first
            field.wait_for(state="visible", timeout=10_000)
            page.wait_for_function(
                "() => document.querySelector('#dreambooth_resolution').textContent"
                ".includes('the chosen model: 1024 px')", timeout=10_000)
            assert field.locator("input").first.input_value() == "0"
            page.screenshot(path=str(SHOTS / f"sdxl-resolution-{flavour}.png"))
        except BaseException:
            page.screenshot(path=str(SHOTS / f"sdxl-model-line-{flavour}-failure.png"))
            raise


def test_fit_to_card_uses_the_chosen_models_family(bases, tmp_path):
    """Pressed with a WebUI title in the form (before the model line appeared), it estimated
    with SD1 sizes."""
    from dreambooth.app.estimates import card_preset

    host = ui.current_host()
    values, extra = ui.config_to_values(quick_config(tmp_path, base=SDXL_NAME, name="x",
                                                     optimizer="adamw8bit"), host)
    values["resolution"] = 0  # the model's own: 1024 for SDXL
    blocks, _ = built_tab()
    (fit, outputs), = handlers(blocks, "dreambooth_apply_card", "click")
    note = fit("12gb", *[values[k] for k in ui.form_keys()], extra)[-1]
    resolved = dataclasses.replace(ui.form_to_config(values, extra)[0],
                                   base_model=str(service.resolve_base_model(SDXL_NAME, host)))
    sdxl_line = card_preset("12gb", resolved).line()
    title_only = card_preset("12gb", ui.form_to_config(values, extra)[0]).line()  # SD1's sizes
    assert sdxl_line != title_only and html.escape(sdxl_line) in note


def test_a_flux_base_shows_its_text_encoder_choices_and_they_reach_the_run(bases):
    """Forge's way: a transformer-only Flux file needs CLIP-L and T5-XXL from models/text_encoder;
    the Model tab shows those two pickers for a Flux base only, listing that folder."""
    from dreambooth.models.flux_files import save_flux_file, save_flux_parts
    from dreambooth.models.tiny_flux import build_flux

    flux = build_flux("dev")
    save_flux_file(flux, bases.checkpoints_dir / "flux1-dev.safetensors", layout="transformer")
    save_flux_parts(flux, bases.checkpoints_dir.parent / "text_encoder")
    bases.sd_models.list_models()
    blocks, comps = built_tab()
    assert "clip_l.safetensors" in choices_of(comps["clip_l_path"])
    assert "t5xxl.safetensors" in choices_of(comps["t5xxl_path"])
    shown = pick_base(blocks, "flux1-dev.safetensors")
    assert "Flux.1 dev" in shown["dreambooth_model_kind"]
    assert "holds only the transformer" in shown["dreambooth_model_kind"]
    assert shown["dreambooth_text_encoders"]["visible"] is True
    sdxl = pick_base(blocks, SDXL_NAME)
    assert sdxl["dreambooth_text_encoders"]["visible"] is False
    # the Flux-only options follow the base model too (hidden at the start: an SD base)
    from dreambooth.tab.ui_fields import FLUX_ONLY

    for name in FLUX_ONLY + ("flux_timestep_sampling",):
        assert shown[f"dreambooth_{name}"]["visible"] is True, name
        assert sdxl[f"dreambooth_{name}"]["visible"] is False, name
        assert comps[name].visible is False, name
    values, extra = ui.config_to_values(TrainingConfig(base_model="m", model_name="n"))
    assert values["clip_l_path"] == values["t5xxl_path"] == ui.NO_TEXT_ENCODER
    values.update(clip_l_path="clip_l.safetensors", t5xxl_path="t5xxl.safetensors")
    config, _ = ui.form_to_config(values, extra)
    assert (config.clip_l_path, config.t5xxl_path) == ("clip_l.safetensors", "t5xxl.safetensors")


def test_a_flow_sdxl_base_shows_its_flow_options_and_they_reach_the_run(bases):
    """(The test's name keeps "rectified" out of its folder's path, which Neo's rule reads.)
    An SDXL file with "rectified" in its name (Forge Neo's rule) trains by rectified flow:
    the model line says so, the flow options (noise levels, shift) are shown for it and not for
    a plain SDXL base, the Flux-only ones stay hidden, and the shift typed reaches the run."""
    put_sdxl_checkpoint(bases.checkpoints_dir, "noob-rectified.safetensors")
    bases.sd_models.list_models()
    blocks, comps = built_tab()
    assert "flow" in choices_of(comps["prediction_type"])
    shown = pick_base(blocks, "noob-rectified.safetensors")
    plain = pick_base(blocks, SDXL_NAME)
    assert "rectified flow ('rectified' in its path" in shown["dreambooth_model_kind"]
    for name in ("flow_shift", "flux_timestep_sampling"):
        assert shown[f"dreambooth_{name}"]["visible"] is True, name
        assert plain[f"dreambooth_{name}"]["visible"] is False, name
    for name in ("flux_guidance", "t5_max_length", "blocks_to_swap"):
        assert shown[f"dreambooth_{name}"]["visible"] is False, name
    values, extra = ui.config_to_values(TrainingConfig(base_model="noob-rectified.safetensors",
                                                       model_name="n"))
    values.update(flow_shift=5, prediction_type="flow")
    config, _ = ui.form_to_config(values, extra)
    assert (config.flow_shift, config.prediction_type) == (5, "flow")
