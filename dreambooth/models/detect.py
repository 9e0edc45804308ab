"""What a checkpoint is: its model kind (SD1.x, SD2.x, SD2.x-v, SDXL), prediction type, zero
terminal SNR, and whether it holds EMA weights and a VAE, read from key names, tensor shapes,
safetensors metadata and the files beside it, never from the tensor data.

The product rule for the prediction type is "detect what the file says; never guess silently":
every answer carries :attr:`ModelKind.prediction_source`, and :func:`describe` shows it. Reading
the weights and loading them into diffusers components lives in :mod:`dreambooth.models.checkpoint`
(which re-exports every name here, so ``checkpoint.detect_kind`` keeps working); this module
never imports it, so detection stays cheap to import and free of import cycles.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping

import torch

KINDS = ("sd1", "sd2", "sd2-v", "sdxl")
FLUX_KINDS = ("flux-dev", "flux-schnell")  # read and trained (LoRA), never written whole
CONFIG_ROOT = Path(__file__).parent / "configs"
READABLE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")  # flow: rectified-flow SDXL

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

KEY_UNET_IN = UNET_PREFIX + "input_blocks.0.0.weight"
KEY_VAE = VAE_PREFIX + "encoder.conv_in.weight"
KEY_SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
KEY_SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
KEY_SDXL_TEXT1 = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
KEY_SDXL_TEXT2 = "conditioner.embedders.1.model.token_embedding.weight"
# Marker keys (usually empty tensors) that NoobAI-style SDXL files carry; ComfyUI and Forge read
# the same two names. Only their presence matters.
KEY_V_PRED = "v_pred"
KEY_ZTSNR = "ztsnr"

# safetensors metadata that states the prediction type / zero terminal SNR. Only these exact
# keys count: Stability's model spec and the keys kohya's sd-scripts write.
META_PREDICTION = "modelspec.prediction_type"  # "v" or "epsilon" (some tools: "v_prediction")
META_V_PARAM = "ss_v_parameterization"  # "True" / "False"
META_ZTSNR = "ss_zero_terminal_snr"  # "True" / "False"

LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".alpha", "hada_w", "lokr_w", "lora_te",
                "lora_unet")

# Where the prediction type came from (ModelKind.prediction_source), strongest first.
SOURCE_CHOICE = "your choice"
SOURCE_KEYS = "file keys"
SOURCE_METADATA = "metadata"
SOURCE_YAML = ".yaml"
SOURCE_NAME = "file name"
SOURCE_SCHEDULER = "scheduler config"  # a diffusers folder's scheduler/scheduler_config.json
SOURCE_DEFAULT = "default"
SOURCE_RECTIFIED = "'rectified' in its path, as Forge Neo reads it"


def is_rectified_name(path: str | os.PathLike) -> bool:
    """Forge Neo's rule (backend/loader.py): an SDXL file with "rectified" anywhere in its path
    is sampled by rectified flow (velocity noise - x0 at the float timestep 1000·sigma)."""
    return "rectified" in str(path).lower()

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sd2-v": "SD 2.x (768, v)", "sdxl": "SDXL",
                "flux-dev": "Flux.1 dev", "flux-schnell": "Flux.1 schnell"}


class CheckpointError(ValueError):
    """A checkpoint cannot be read, trained or written; the message says which file and what to do."""


@dataclass(frozen=True)
class ModelKind:
    """What a checkpoint is: one of KINDS, its prediction type and what it holds."""

    kind: str
    prediction_type: str = "epsilon"
    inpainting: bool = False
    has_ema: bool = False
    has_vae: bool = True
    source: str = "single_file"  # or "diffusers"
    # New fields last, so positional construction elsewhere keeps its meaning.
    zero_terminal_snr: bool = False
    # One of the SOURCE_* strings; "" for a kind made in code rather than detected (e.g. the
    # export of in-memory components), which describe() then shows without a source.
    prediction_source: str = ""
    # The parts a Flux file lacks ("clip_l", "t5xxl", "vae"): a transformer-only file.
    missing_parts: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """The layout family: sd2-v shares sd2's layout, Flux's variants one."""
        if self.kind in FLUX_KINDS:
            return "flux"
        return "sd2" if self.kind == "sd2-v" else self.kind

    @property
    def config_dir(self) -> Path:
        return CONFIG_ROOT / self.kind

    @property
    def text_encoders(self) -> tuple[str, ...]:
        if self.kind == "sdxl" or self.kind in FLUX_KINDS:
            return ("text_encoder", "text_encoder_2")
        return ("text_encoder",)

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", "vae") + self.text_encoders


def describe(kind: ModelKind) -> str:
    """The one line the Model tab shows about a base model (without the file name), e.g.
    "SDXL, v-prediction (file keys), zero terminal SNR, has EMA weights"."""
    if kind.kind in FLUX_KINDS:
        line = f"{FAMILY_NAMES[kind.kind]}, flow matching (LoRA)"
        if kind.missing_parts:
            line += (f"; holds only the transformer: choose {', '.join(kind.missing_parts)} "
                     "(models/text_encoder, models/VAE)")
        return line
    prediction = {"v_prediction": "v-prediction", "flow": "rectified flow"}.get(
        kind.prediction_type, f"{kind.prediction_type} prediction")
    if kind.prediction_source:
        prediction += f" ({kind.prediction_source})"
    parts = [FAMILY_NAMES.get(kind.kind, kind.kind), prediction]
    if kind.zero_terminal_snr:
        parts.append("zero terminal SNR")
    if kind.inpainting:
        parts.append("inpainting")
    if kind.has_ema:
        parts.append("has EMA weights")
    if not kind.has_vae:
        parts.append("no VAE inside: choose one")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Reading what detection needs: key names, shapes, metadata (never tensor data of .safetensors)


def _suffix(path: Path, fmt: str | None = None) -> str:
    return fmt or path.suffix.lower()


def _require_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Check the path, or refresh the checkpoint list.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a single-file checkpoint")
    if path.suffix.lower() not in READABLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported file type {path.suffix!r}; use a .safetensors or .ckpt checkpoint")


def _damaged(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is damaged or incomplete ({type(exc).__name__}: {exc}). If it was downloaded, "
        "download it again; a half-written or truncated file cannot be used.")


def _refused_pickle(exc: BaseException) -> bool:
    """torch's safe loader (weights_only=True) refuses a pickle that asks for code with an
    UnpicklingError (recognised by name: the extension never imports the pickle module)."""
    return any(cls.__name__ == "UnpicklingError" for cls in type(exc).__mro__)


def _torch_load(path: Path) -> dict:
    """A .ckpt/.pt/.bin state dict through torch's safe loader only (tensors and plain
    containers; anything that would run code is refused)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if _refused_pickle(exc):
            # Name what the file asks for; torch's own message suggests turning the safe
            # loader off, which is never repeated to the user.
            found = re.search(r"GLOBAL ([\w.]+\.[\w]+)", str(exc))
            what = f" (it asks for {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} is a pickle that would run code when loaded{what}; it is refused for "
                "safety. Use a .safetensors version of the model.") from exc
        if isinstance(exc, (RuntimeError, EOFError, OSError, ValueError)):
            raise _damaged(path, exc) from exc
        raise
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit: a larger claim is not a header


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a .safetensors file. Its claimed length is checked against the file's
    size and safetensors' limit before anything is read, so a file that claims an absurd header
    is refused, never allocated; CheckpointError names the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8:
                raise CheckpointError(f"{path} is empty or too short ({size} bytes) to be a "
                                      ".safetensors file")
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise _damaged(path, ValueError(f"its header claims {length} bytes, the file "
                                                f"holds {size}"))
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise _damaged(path, exc) from exc
    except (ValueError, RecursionError) as exc:  # not JSON, or nested beyond reason
        if isinstance(exc, CheckpointError):
            raise
        raise _damaged(path, ValueError(f"its header is not JSON ({exc})")) from exc
    if not isinstance(header, dict):
        raise _damaged(path, ValueError("its header is not a JSON object"))
    return header


def _header_length(path: Path) -> int:
    with open(path, "rb") as handle:
        return int.from_bytes(handle.read(8), "little")


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape and the metadata of a .safetensors file, from its header only."""
    from safetensors import safe_open

    header = read_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            metadata = dict(handle.metadata() or {})
        size = path.stat().st_size
    except Exception as exc:
        raise _damaged(path, exc) from exc
    # safe_open checks the header only; a file cut inside the data is caught by its size.
    header_len = _header_length(path)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + header_len + end:
        raise _damaged(path, EOFError(f"{size} bytes, header says {8 + header_len + end}"))
    return shapes, metadata


def _read_layout(path: Path, fmt: str | None = None
                 ) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and metadata of any readable file (.ckpt and friends have no metadata, and go
    through the safe torch loader: tensors only, never code)."""
    if fmt is None:
        _require_file(path)
    if _suffix(path, fmt) == ".safetensors":
        return _read_safetensors_header(path)
    state = _torch_load(path)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def read_shapes(path: str | os.PathLike, fmt: str | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape, reading only the header of a .safetensors file."""
    return _read_layout(Path(path), fmt)[0]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of a file (header only); {} for other formats."""
    return _read_layout(Path(path))[1] if Path(path).suffix.lower() == ".safetensors" else {}


# --------------------------------------------------------------------------------------------
# Detecting the model kind


def _yaml_prediction(path: Path | None) -> str | None:
    """The WebUI convention: a .yaml next to the checkpoint names its config (v-param or not)."""
    if path is None:
        return None
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    text = yaml_path.read_text(encoding="utf-8", errors="replace")
    return "v_prediction" if re.search(r"parameterization:\s*[\"']?v[\"']?\s*(#.*)?$", text, re.M) \
        else "epsilon"


def _metadata_prediction(metadata: Mapping[str, str] | None) -> str | None:
    """What the safetensors metadata says about the prediction type, or None."""
    if not metadata:
        return None
    spec = str(metadata.get(META_PREDICTION, "")).strip().lower()
    kohya = str(metadata.get(META_V_PARAM, "")).strip().lower()
    # Any explicit v wins: no tool writes "v" unless someone asked for it.
    if spec in ("v", "v_prediction") or kohya == "true":
        return "v_prediction"
    if spec == "epsilon" or kohya == "false":
        return "epsilon"
    return None  # absent, or a value we do not know ("flow", "sample"...): not evidence


def _metadata_ztsnr(metadata: Mapping[str, str] | None) -> bool:
    return bool(metadata) and str(metadata.get(META_ZTSNR, "")).strip().lower() == "true"


def _normalised_prediction(prediction: str) -> str:
    if prediction in ("v", "v-prediction"):
        prediction = "v_prediction"
    if prediction not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction_type must be 'epsilon', 'v_prediction' or 'flow', "
                              f"not {prediction!r}")
    return prediction


def _file_prediction(family: str, keys: Iterable[str], name: str, yaml_path: Path | None,
                     metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(prediction type, source) of a single file, the strongest statement first."""
    if family == "sdxl" and is_rectified_name(yaml_path or name):
        return "flow", SOURCE_RECTIFIED  # before v_pred: Neo's flow predictor replaces the schedule
    if KEY_V_PRED in keys:
        return "v_prediction", SOURCE_KEYS
    said = _metadata_prediction(metadata)
    if said == "v_prediction":
        return said, SOURCE_METADATA
    from_yaml = _yaml_prediction(yaml_path)
    if from_yaml is not None:
        return from_yaml, SOURCE_YAML
    # SD2.x 768 models are v-prediction but the weights do not say so: the WebUI convention
    # is the .yaml; without one, trust the usual "768"/"-v" in the file name.
    if family == "sd2" and re.search(r"768|[-_]v\b|[-_]v[-_.]", name.lower()):
        return "v_prediction", SOURCE_NAME
    # "epsilon" in metadata comes after the .yaml and the name: tools (kohya, our own export)
    # write it whenever nobody said otherwise, so it is weaker than a .yaml the user placed or
    # a "768-v" name. It is still what the file says, so it beats the bare default.
    if said == "epsilon":
        return said, SOURCE_METADATA
    return "epsilon", SOURCE_DEFAULT


def _refuse_non_checkpoint(keys: Iterable[str], name: str) -> None:
    keys = list(keys)
    if not keys:
        raise CheckpointError(f"{name} holds no tensors; it is not a Stable Diffusion checkpoint")
    if any(marker in key for key in keys for marker in LORA_MARKERS):
        raise CheckpointError(
            f"{name} is a LoRA/LyCORIS file, not a full model. Pick a full checkpoint from "
            "models/Stable-diffusion as the base model; LoRA files go in models/Lora.")
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in keys) and len(keys) < 5:
        raise CheckpointError(
            f"{name} is a textual-inversion embedding, not a full model; pick a checkpoint from "
            "models/Stable-diffusion as the base model.")
    if KEY_UNET_IN not in keys:
        if "encoder.conv_in.weight" in keys or "decoder.conv_in.weight" in keys:
            raise CheckpointError(
                f"{name} is a VAE on its own. Pick it as the VAE, and a full checkpoint as the base.")
        if any(k.startswith(("down_blocks.", "unet.", "transformer_blocks.")) for k in keys):
            raise CheckpointError(
                f"{name} is in diffusers layout, not a WebUI single-file checkpoint; point at the "
                "diffusers folder instead, or convert it with `python -m dreambooth convert`.")
        raise CheckpointError(
            f"{name} is not a Stable Diffusion checkpoint (no UNet weights "
            f"'{UNET_PREFIX}*'). Supported: SD1.x, SD2.x, SDXL base single files.")


def kind_from_shapes(shapes: Mapping[str, tuple[int, ...]], name: str = "checkpoint", *,
                     prediction_type: str | None = None, yaml_path: Path | None = None,
                     metadata: Mapping[str, str] | None = None) -> ModelKind:
    """Detect the kind from key names and shapes (no tensor data needed).

    The prediction type comes from, in order: ``prediction_type`` (the user's choice), the
    ``v_pred`` marker key, ``metadata`` saying v, the ``.yaml`` beside ``yaml_path``, an SD2
    file name with 768/-v, ``metadata`` saying epsilon, else epsilon by default. Zero terminal
    SNR: the ``ztsnr`` key or ``ss_zero_terminal_snr`` in the metadata. A Flux.1 transformer
    (:mod:`dreambooth.models.flux_files`) is a flux-dev or flux-schnell kind.
    """
    from dreambooth.models.flux_detect import flux_file_of  # header-only, imports nothing of ours

    flux = flux_file_of(shapes)
    if flux is not None:
        return ModelKind(kind=flux.variant, prediction_type="flow", has_vae="vae" not in
                         flux.missing, prediction_source=SOURCE_KEYS,
                         missing_parts=flux.missing)
    _refuse_non_checkpoint(shapes.keys(), name)
    in_channels = shapes[KEY_UNET_IN][1]
    if in_channels == 9:
        raise CheckpointError(
            f"{name} is an inpainting model (9-channel UNet input); DreamBooth training needs the "
            "normal (non-inpainting) version of the model.")
    if in_channels != 4:
        raise CheckpointError(
            f"{name} has a {in_channels}-channel UNet input (depth, instruct-pix2pix or similar); "
            "only text-to-image models with 4 latent channels can be trained.")
    if KEY_SDXL_TEXT1 in shapes and KEY_SDXL_TEXT2 in shapes:
        family = "sdxl"
    elif any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
        raise CheckpointError(f"{name} is an SDXL refiner; train the SDXL base model instead.")
    elif KEY_SD2_TEXT in shapes:
        family = "sd2"
    elif KEY_SD1_TEXT in shapes:
        family = "sd1"
    else:
        raise CheckpointError(
            f"{name} has a UNet but no text encoder this extension knows (SD1.x CLIP, SD2.x "
            "OpenCLIP, SDXL's two encoders): an unknown or unsupported architecture (SD3, "
            "ControlNet...). Supported: SD1.x, SD2.x, SDXL base, Flux.1 dev and schnell.")
    if prediction_type:
        prediction, source = _normalised_prediction(prediction_type), SOURCE_CHOICE
    else:
        prediction, source = _file_prediction(family, shapes.keys(), name, yaml_path, metadata)
    kind = "sd2-v" if family == "sd2" and prediction == "v_prediction" else family
    has_ema = sum(k.startswith("model_ema.") for k in shapes) > 100
    return ModelKind(kind=kind, prediction_type=prediction, has_ema=has_ema,
                     has_vae=KEY_VAE in shapes, prediction_source=source,
                     zero_terminal_snr=KEY_ZTSNR in shapes or _metadata_ztsnr(metadata))


def _kind_from_folder(folder: Path, prediction_type: str | None) -> ModelKind:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        text = json.loads((folder / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} is not a diffusers model folder ({exc})") from exc
    if unet.get("in_channels", 4) != 4:
        raise CheckpointError(f"{folder}: {unet['in_channels']}-channel UNet (inpainting or "
                              "similar); only 4-channel text-to-image models can be trained")
    if unet.get("addition_embed_type") == "text_time":
        family = "sdxl"
    elif text.get("hidden_act") == "gelu":
        family = "sd2"
    else:
        family = "sd1"
    sched_file = folder / "scheduler" / "scheduler_config.json"
    try:
        sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{sched_file} cannot be read ({exc})") from exc
    if prediction_type:
        prediction, source = _normalised_prediction(prediction_type), SOURCE_CHOICE
    elif sched.get("prediction_type"):
        prediction, source = _normalised_prediction(sched["prediction_type"]), SOURCE_SCHEDULER
    else:
        prediction, source = "epsilon", SOURCE_DEFAULT
    kind = "sd2-v" if family == "sd2" and prediction == "v_prediction" else family
    return ModelKind(kind=kind, prediction_type=prediction, source="diffusers",
                     prediction_source=source,
                     zero_terminal_snr=sched.get("rescale_betas_zero_snr") is True)


def detect_kind(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], *,
                prediction_type: str | None = None,
                metadata: Mapping[str, str] | None = None) -> ModelKind:
    """The kind of a single file, a diffusers folder or a state dict; refuses what cannot be
    trained. A .safetensors file's own metadata is read from its header; ``metadata`` is for a
    state dict (whose file is not at hand) and, for a file, replaces what the header says."""
    if isinstance(path_or_state_dict, Mapping):
        shapes = {k: tuple(v.shape) for k, v in path_or_state_dict.items()
                  if isinstance(v, torch.Tensor)}
        return kind_from_shapes(shapes, "state dict", prediction_type=prediction_type,
                                metadata=metadata)
    path = Path(path_or_state_dict)
    if path.is_dir():
        return _kind_from_folder(path, prediction_type)
    shapes, own = _read_layout(path)
    return kind_from_shapes(shapes, path.name, prediction_type=prediction_type, yaml_path=path,
                            metadata=own if metadata is None else metadata)


def _with_kind(found: ModelKind, kind: str | None) -> ModelKind:
    """Apply a --kind override (only between layouts that really are the same)."""
    if kind is None or kind == found.kind:
        return found
    if kind not in KINDS:
        raise CheckpointError(f"kind must be one of {KINDS}, not {kind!r}")
    family = "sd2" if kind == "sd2-v" else kind
    if family != found.family:
        raise CheckpointError(f"the checkpoint is {found.kind}; it cannot be read as {kind}")
    return replace(found, kind=kind, prediction_type="v_prediction" if kind == "sd2-v" else "epsilon",
                   prediction_source=SOURCE_CHOICE)


@functools.lru_cache(maxsize=32)
def _kind_of_file(path: str, size: int, mtime_ns: int, prediction_type: str | None) -> ModelKind:
    return detect_kind(path, prediction_type=prediction_type)


def detect_kind_cached(path: str | os.PathLike, *, prediction_type: str | None = None
                       ) -> ModelKind:
    """:func:`detect_kind` of a file, remembered while the file is unchanged (size and mtime):
    the checks before a run, the resolution and the model line ask about the same base, and a
    .ckpt is read whole each time otherwise. Folders are read each time."""
    path = Path(path)
    if not path.is_file():
        return detect_kind(path, prediction_type=prediction_type)
    stat = path.stat()
    return _kind_of_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns, prediction_type)
