"""Model-kind detection (dreambooth.models.detect): v-prediction and zero-terminal-SNR markers in keys,
safetensors metadata and diffusers scheduler configs, where the prediction type came from, and
the one-line description the Model tab shows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import components, make_base, perturb  # noqa: I001
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth.models import checkpoint as ck
from dreambooth.models import detect
from dreambooth.models import export as ex
from dreambooth.models import tiny
from dreambooth.models.detect import ModelKind, describe, detect_kind

# NoobAI-style marker tensors: empty, only their names matter.
MARKERS = {"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("detect-bases")
    return {kind: make_base(folder, kind) for kind in ("sd1", "sd2", "sdxl")}


def rewrite(source: Path, target: Path, *, extra: dict | None = None,
            metadata: dict | None = None, keep_metadata: bool = True) -> Path:
    """A copy of `source` with extra tensors and/or other metadata (as a tool re-saving it would)."""
    state = load_file(str(source))
    state.update(extra or {})
    meta = {}
    if keep_metadata:
        with safe_open(str(source), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
    meta.update(metadata or {})
    save_file(state, str(target), metadata=meta or None)
    return target


@pytest.fixture(scope="module")
def noob(bases, tmp_path_factory) -> Path:
    """A tiny SDXL single file with the v_pred/ztsnr marker keys. Its metadata still says
    "epsilon" (what our own export wrote): the marker keys must beat it."""
    folder = tmp_path_factory.mktemp("noob")
    return rewrite(bases["sdxl"], folder / "noob-vpred.safetensors", extra=MARKERS)


# ---------------------------------------------------------------------------------------------
# Marker keys


def test_marker_keys_make_sdxl_v_prediction_with_zero_terminal_snr(noob):
    found = detect_kind(noob)
    assert (found.kind, found.prediction_type, found.zero_terminal_snr) == (
        "sdxl", "v_prediction", True)
    assert found.prediction_source == "file keys"
    assert describe(found) == "SDXL, v-prediction (file keys), zero terminal SNR"


def test_the_plain_base_stays_epsilon(bases):
    found = detect_kind(bases["sdxl"])
    assert (found.prediction_type, found.zero_terminal_snr) == ("epsilon", False)
    assert found.prediction_source == "metadata"  # our export writes modelspec.prediction_type


def test_explicit_choice_beats_the_marker_keys(noob):
    found = detect_kind(noob, prediction_type="epsilon")
    assert (found.kind, found.prediction_type, found.prediction_source) == (
        "sdxl", "epsilon", "your choice")
    assert found.zero_terminal_snr  # the choice is about the prediction type only
    assert describe(found) == "SDXL, epsilon prediction (your choice), zero terminal SNR"


def test_v_pred_key_in_sd2_file_gives_sd2_v(bases, tmp_path):
    # No .yaml and a name without "768": only the key says v.
    path = rewrite(bases["sd2"], tmp_path / "model.safetensors", extra={"v_pred": torch.zeros(0)})
    found = detect_kind(path)
    assert (found.kind, found.prediction_source, found.zero_terminal_snr) == (
        "sd2-v", "file keys", False)


def test_markers_in_a_ckpt_go_through_the_safe_loader(bases, tmp_path):
    state = load_file(str(bases["sdxl"]))
    state.update(MARKERS)
    path = tmp_path / "noob.ckpt"
    torch.save({"state_dict": state}, str(path))
    found = detect_kind(path)
    assert (found.kind, found.prediction_type, found.zero_terminal_snr) == (
        "sdxl", "v_prediction", True)


def test_state_dict_with_markers(bases):
    state = load_file(str(bases["sdxl"]))
    state.update(MARKERS)
    found = ck.detect_kind(state)  # still reachable through checkpoint
    assert (found.prediction_type, found.prediction_source, found.zero_terminal_snr) == (
        "v_prediction", "file keys", True)


# ---------------------------------------------------------------------------------------------
# safetensors metadata


def test_modelspec_metadata_says_v_and_kohya_says_zero_terminal_snr(bases, tmp_path):
    path = rewrite(bases["sdxl"], tmp_path / "meta.safetensors",
                   metadata={"modelspec.prediction_type": "v", "ss_zero_terminal_snr": "True"})
    found = detect_kind(path)
    assert (found.kind, found.prediction_type, found.prediction_source, found.zero_terminal_snr) \
        == ("sdxl", "v_prediction", "metadata", True)
    assert describe(found) == "SDXL, v-prediction (metadata), zero terminal SNR"


@pytest.mark.parametrize("metadata, expected", [
    ({"modelspec.prediction_type": "v_prediction"}, ("v_prediction", "metadata", False)),
    ({"ss_v_parameterization": "True"}, ("v_prediction", "metadata", False)),
    ({"ss_zero_terminal_snr": "False"}, ("epsilon", "default", False)),
    # not a known value, and not a known key: no evidence, said so as "default"
    ({"modelspec.prediction_type": "flow"}, ("epsilon", "default", False)),
    ({"zero_terminal_snr": "True", "v_parameterization": "True"}, ("epsilon", "default", False)),
])
def test_metadata_keys_and_values(bases, metadata, expected):
    shapes = ck.read_shapes(bases["sdxl"])
    found = detect.kind_from_shapes(shapes, "x.safetensors", metadata=metadata)
    assert (found.prediction_type, found.prediction_source, found.zero_terminal_snr) == expected


def test_metadata_v_reaches_the_loaded_scheduler(bases, tmp_path):
    """Training must use what the file says: the loaded noise scheduler predicts v."""
    path = rewrite(bases["sd1"], tmp_path / "meta-v.safetensors",
                   metadata={"modelspec.prediction_type": "v"})
    loaded, found = ck.load_components(path)
    assert found.prediction_source == "metadata"
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"


def test_metadata_epsilon_does_not_override_a_yaml_or_a_768_name(bases, tmp_path):
    # Tools write "epsilon" whenever nobody said otherwise; the user's .yaml and the SD2 768
    # naming convention are stronger statements.
    path = rewrite(bases["sd2"], tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "epsilon"
    assert detect_kind(path).prediction_source == "metadata"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    found = detect_kind(path)
    assert (found.kind, found.prediction_source) == ("sd2-v", ".yaml")
    named = rewrite(bases["sd2"], tmp_path / "sd21-768.safetensors")
    found = detect_kind(named)
    assert (found.kind, found.prediction_source) == ("sd2-v", "file name")


def test_metadata_v_beats_the_yaml_and_keys_beat_metadata(bases, tmp_path):
    path = rewrite(bases["sd2"], tmp_path / "model.safetensors",
                   metadata={"modelspec.prediction_type": "v"})
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert (detect_kind(path).kind, detect_kind(path).prediction_source) == ("sd2-v", "metadata")
    shapes = dict(ck.read_shapes(bases["sdxl"]), v_pred=(0,))
    found = detect.kind_from_shapes(shapes, "x", metadata={"modelspec.prediction_type": "epsilon"})
    assert (found.prediction_type, found.prediction_source) == ("v_prediction", "file keys")


def test_kind_override_is_your_choice(bases):
    found = detect._with_kind(detect_kind(bases["sd2"]), "sd2-v")
    assert (found.kind, found.prediction_type, found.prediction_source) == (
        "sd2-v", "v_prediction", "your choice")


# ---------------------------------------------------------------------------------------------
# Diffusers folders


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory) -> Path:
    return tiny.save_diffusers_folder(components("sd1"), tmp_path_factory.mktemp("diff") / "m")


def _with_scheduler(folder: Path, target: Path, **changes) -> Path:
    """A config-only copy of the folder (detection reads configs, not weights)."""
    for name in ("unet", "text_encoder"):
        (target / name).mkdir(parents=True)
        (target / name / "config.json").write_text((folder / name / "config.json").read_text())
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (target / "scheduler").mkdir()
    (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return target


def test_diffusers_scheduler_config_says_v_and_zero_snr(diffusers_folder, tmp_path):
    folder = _with_scheduler(diffusers_folder, tmp_path / "v", prediction_type="v_prediction",
                             rescale_betas_zero_snr=True)
    found = detect_kind(folder)
    assert (found.kind, found.source, found.prediction_type, found.zero_terminal_snr) == (
        "sd1", "diffusers", "v_prediction", True)
    assert found.prediction_source == "scheduler config"
    assert describe(found) == "SD 1.x, v-prediction (scheduler config), zero terminal SNR"
    chosen = detect_kind(folder, prediction_type="epsilon")
    assert (chosen.prediction_type, chosen.prediction_source) == ("epsilon", "your choice")


def test_diffusers_folder_without_prediction_type_is_default_epsilon(diffusers_folder, tmp_path):
    saved = detect_kind(diffusers_folder)
    assert (saved.prediction_type, saved.prediction_source, saved.zero_terminal_snr) == (
        "epsilon", "scheduler config", False)
    bare = detect_kind(_with_scheduler(diffusers_folder, tmp_path / "bare", prediction_type=None,
                                       rescale_betas_zero_snr=None))
    assert (bare.prediction_type, bare.prediction_source) == ("epsilon", "default")


def test_diffusers_folder_with_unknown_prediction_type_is_refused(diffusers_folder, tmp_path):
    folder = _with_scheduler(diffusers_folder, tmp_path / "sample", prediction_type="sample")
    with pytest.raises(detect.CheckpointError, match="prediction_type"):
        detect_kind(folder)


# ---------------------------------------------------------------------------------------------
# describe()


def test_describe_sd1_without_metadata_says_default(bases, tmp_path):
    bare = rewrite(bases["sd1"], tmp_path / "bare.safetensors", keep_metadata=False)
    assert describe(detect_kind(bare)) == "SD 1.x, epsilon prediction (default)"


def test_describe_names_ema_and_missing_vae():
    kind = ModelKind(kind="sd2-v", prediction_type="v_prediction", has_ema=True, has_vae=False,
                     prediction_source=".yaml")
    assert describe(kind) == ("SD 2.x (768, v), v-prediction (.yaml), has EMA weights, "
                              "no VAE inside: choose one")
    # a kind made in code (not detected) has no source to show
    assert describe(ModelKind(kind="sdxl")) == "SDXL, epsilon prediction"


# ---------------------------------------------------------------------------------------------
# The export keeps the markers


def test_export_keeps_marker_keys_and_says_v_in_metadata(noob, tmp_path):
    trained, found = ck.load_components(noob)
    assert trained.noise_scheduler.config.prediction_type == "v_prediction"
    perturb(trained.unet)
    out = ex.export_checkpoint(noob, trained, tmp_path / "trained.safetensors", trained=("unet",))
    written = load_file(str(out))
    for key, marker in MARKERS.items():
        assert key in written
        assert written[key].dtype == marker.dtype and tuple(written[key].shape) == (0,)
    again = detect_kind(out)
    assert (again.kind, again.prediction_type, again.zero_terminal_snr, again.prediction_source) \
        == ("sdxl", "v_prediction", True, "file keys")
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["modelspec.prediction_type"] == "v"  # what the WebUI's metadata viewer shows
    assert meta["ss_v_parameterization"] == "True"
    # and the export really holds the trained UNet, not the base's
    base = load_file(str(noob))
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(written[key].float(), base[key].float())


# ---------------------------------------------------------------------------------------------
# The split itself


def test_detect_does_not_import_checkpoint():
    import subprocess
    import sys

    code = ("import sys, dreambooth.models.detect; "
            "sys.exit(1 if 'dreambooth.models.checkpoint' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                          timeout=120).returncode == 0


def test_checkpoint_reexports_detection_names():
    for name in ("ModelKind", "KINDS", "CheckpointError", "LORA_MARKERS", "KEY_UNET_IN",
                 "kind_from_shapes", "detect_kind", "read_shapes", "_with_kind",
                 "_kind_from_folder", "_yaml_prediction", "_refuse_non_checkpoint", "_require_file"):
        assert getattr(ck, name) is getattr(detect, name), name
