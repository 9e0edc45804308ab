"""Each WebUI of the family as a host (issue 26): AUTOMATIC1111 1.10, Forge 2.0, Forge Neo and
Forge Classic, through the fake WebUI's flavours (their differences read from their sources:
tests/fake_webui/README.md). What the extension does differently per host is asserted here:
which WebUI it is, the families offered, the checkpoint switch, unloading and the interrogators.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from dreambooth.app import preflight, service
from dreambooth.host import get_host
from dreambooth.models import tiny
from ui_fixtures import quick_config

NAMES = {"a1111": "AUTOMATIC1111", "forge": "Forge", "neo": "Forge Neo", "classic": "Forge Classic"}


@functools.lru_cache(maxsize=None)
def _tiny_file(kind: str, folder: str) -> Path:
    return tiny.save_checkpoint(Path(folder) / f"tiny-{kind}.safetensors", kind=kind)


@pytest.fixture(params=list(NAMES))
def any_webui(request, make_fake_webui):
    return make_fake_webui(flavour=request.param)


def test_the_host_knows_which_webui_it_is_in(any_webui):
    assert get_host().webui_name() == NAMES[any_webui.flavour]


@pytest.mark.parametrize("flavour", ["neo", "classic"])
def test_sd2_is_refused_where_the_webui_cannot_generate_with_it(make_fake_webui, tmp_path,
                                                                tmp_path_factory, flavour):
    """Neo and Classic removed SD2: a model trained from an SD2 base could not be used there,
    so the base is refused by field, before anything is written; SD1 and SDXL pass."""
    webui = make_fake_webui(flavour=flavour)
    cache = str(tmp_path_factory.getbasetemp() / "host-bases")
    Path(cache).mkdir(exist_ok=True)
    for kind in ("sd2", "sd1", "sdxl"):
        base = _tiny_file(kind, cache)
        _, errors = preflight.preflight(quick_config(tmp_path, base=str(base)), get_host())
        found = [e.message for e in errors if e.field == "base_model"]
        line = service.describe_model(get_host(), str(base))  # the tab's model line
        if kind == "sd2":
            assert found and f"{NAMES[flavour]} cannot generate with SD2" in found[0]
            assert "SD1, SDXL" in found[0] and "cannot be trained here" in line
        else:
            assert found == [] and "cannot be trained" not in line, (found, line)
    assert not (Path(webui.models_dir) / "dreambooth").exists()


def test_a1111_and_forge_still_train_sd2(make_fake_webui, tmp_path, tmp_path_factory):
    make_fake_webui(flavour="forge")
    cache = tmp_path_factory.getbasetemp() / "host-bases"
    cache.mkdir(exist_ok=True)
    _, errors = preflight.preflight(quick_config(tmp_path, base=str(_tiny_file("sd2", str(cache)))),
                                    get_host())
    assert not [e for e in errors if e.field == "base_model"]


@pytest.mark.parametrize("flavour", ["neo", "classic"])
def test_no_interrogators_and_our_captioners_offered(make_fake_webui, flavour):
    make_fake_webui(flavour=flavour)
    host = get_host()
    assert host.interrogators() == []
    from dreambooth.tab.ui_captions import interrogator_choices

    choices = interrogator_choices(host)
    assert choices and not {"blip", "clip", "deepbooru"} & set(choices)


def test_neo_switches_checkpoints_with_its_preset_argument(make_fake_webui):
    """Neo's checkpoint_change(ckpt_name, preset, ...) takes the UI preset as a required
    argument and remembers the checkpoint per preset; it loads at the next generation."""
    neo = make_fake_webui(flavour="neo")
    neo.add_checkpoint("a.safetensors")
    neo.add_checkpoint("b.safetensors")
    neo.shared.opts.set("forge_preset", "xl")
    host = get_host()
    assert host.loads_lazily() and host.load_checkpoint("b", wait_s=5) is True
    assert neo.shared.opts.data["sd_model_checkpoint"] == "b.safetensors"
    assert neo.shared.opts.data["forge_checkpoint_xl"] == "b.safetensors"
    assert neo.sd_models.model_data.loads == []


def test_neo_unloads_through_its_memory_manager(make_fake_webui):
    neo = make_fake_webui(flavour="neo")
    neo.add_checkpoint("a.safetensors")
    model = neo.shared.sd_model
    assert not hasattr(neo.sd_models, "send_model_to_trash")  # Neo removed it
    from backend import memory_management

    before = memory_management.unloads
    unloaded = get_host().unload_webui_model()
    assert unloaded is not None and memory_management.unloads == before + 1
    assert model.device == "cpu" and neo.sd_models.model_data.forge_hash == ""
    assert "at its next generation" in get_host().restore_webui_model(unloaded)


def test_classic_frees_the_weights_its_memory_manager_holds(make_fake_webui):
    """Classic's send_model_to_trash does nothing: the weights stay in ComfyUI's memory manager
    until unload_all_models(), which the extension now calls there."""
    classic = make_fake_webui(flavour="classic")
    classic.add_checkpoint("a.safetensors")
    model = classic.shared.sd_model
    from ldm_patched.modules import model_management

    assert model in model_management.current_loaded_models
    unloaded = get_host().unload_webui_model()
    assert model.device == "meta" and model_management.current_loaded_models == []
    assert "loaded the WebUI's model a.safetensors" in get_host().restore_webui_model(unloaded)
    assert classic.shared.sd_model.device == "cuda"


def test_neo_lists_checkpoints_of_its_extra_folders(make_fake_webui, tmp_path):
    extra = tmp_path / "more"
    extra.mkdir()
    neo = make_fake_webui(args=f"--ckpt-dirs {extra}", flavour="neo")
    neo.add_checkpoint("x.safetensors", folder=extra)
    host = get_host()
    assert [e.name for e in host.list_checkpoints()] == ["x.safetensors"]
    assert host.checkpoints_dir() == Path(neo.sd_models.model_path)  # ours go to the usual one


@pytest.mark.parametrize("flavour", ["neo", "classic"])
def test_our_settings_keep_their_training_heading(make_fake_webui, flavour):
    """Neither Neo nor Classic registers the "Training" category A1111 has."""
    make_fake_webui(flavour=flavour)
    from modules import options

    assert "training" not in options.categories.mapping
    get_host().register_settings()
    assert options.categories.mapping["training"].label == "Training"



def test_a_rectified_flow_sdxl_trains_in_neo_and_is_refused_where_it_would_sample_noise(
        any_webui, tmp_path, tmp_path_factory):
    """Neo samples an SDXL file with "rectified" in its path by rectified flow, and so trains
    it here; the other WebUIs would sample the result as an ordinary SDXL model (noise), so
    there the base is refused by field. A full run's name must keep "rectified" (Neo's rule
    reads the new file's path too); a LoRA rides on its base's name."""
    import shutil

    cache = tmp_path_factory.getbasetemp() / "host-bases"
    cache.mkdir(exist_ok=True)
    plain = _tiny_file("sdxl", str(cache))
    rectified = tmp_path / "RectifiedFlow" / "model.safetensors"
    rectified.parent.mkdir()
    shutil.copy(plain, rectified)
    neo = get_host().webui_name() == "Forge Neo"

    def errors(**overrides):
        _, found = preflight.preflight(quick_config(tmp_path, base=str(rectified), **overrides),
                                       get_host())
        return {e.field: e.message for e in found}

    named = errors(name="zwx-rectified")
    if neo:
        assert "base_model" not in named and "model_name" not in named, named
        assert "'rectified' in its name" in errors(name="zwx")["model_name"]
        assert "model_name" not in errors(name="zwx", training_method="lora")
    else:
        assert "rectified-flow SDXL" in named["base_model"] and "Forge Neo" in named["base_model"]
    # the same file under a plain name is an ordinary SDXL model everywhere
    _, found = preflight.preflight(quick_config(tmp_path, base=str(plain), name="zwx"), get_host())
    assert not [e for e in found if e.field in ("base_model", "model_name")]


@functools.lru_cache(maxsize=None)
def _tiny_flux_file(folder: str) -> Path:
    from dreambooth.models.flux_files import save_flux_file
    from dreambooth.models.tiny_flux import build_flux

    return save_flux_file(build_flux("dev"), Path(folder) / "tiny-flux.safetensors",
                          layout="all-in-one")


def test_flux_is_trained_where_the_webui_generates_with_it(any_webui, tmp_path,
                                                           tmp_path_factory):
    """Forge and Neo run Flux.1; A1111 and Classic cannot: there a Flux base is refused by field
    before anything is written, and the model line says so."""
    cache = tmp_path_factory.getbasetemp() / "host-bases"
    cache.mkdir(exist_ok=True)
    base = _tiny_flux_file(str(cache))
    flavour = any_webui.flavour
    config = quick_config(tmp_path, base=str(base), training_method="lora")
    _, errors = preflight.preflight(config, get_host())
    found = [e.message for e in errors if e.field == "base_model"]
    line = service.describe_model(get_host(), str(base))
    assert "Flux.1 dev" in line
    if flavour in ("a1111", "classic"):
        assert found and f"{NAMES[flavour]} cannot generate with Flux.1" in found[0]
        assert "cannot be trained here" in line
    else:
        assert found == [] and "cannot be trained" not in line, (found, line)
    assert not (Path(any_webui.models_dir) / "dreambooth").exists()
    # what Flux cannot honour is said by field at the same check
    _, errors = preflight.preflight(quick_config(tmp_path, base=str(base)), get_host())
    assert "training_method" in [e.field for e in errors]
