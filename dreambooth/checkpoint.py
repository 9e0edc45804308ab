"""Single-file Stable Diffusion checkpoints (the WebUI's LDM layout) <-> diffusers components.

Loading uses diffusers' own single-file conversion, fully offline, with configs bundled under
``dreambooth/configs/`` and patched from the checkpoint's tensor shapes (so one code path loads a
real SD1.5 file and the tiny test model alike).

Exporting has no library function in diffusers, so it inverts diffusers' conversion exactly:
diffusers' LDM -> diffusers conversion is run on the *base* checkpoint's own state dict and every
converted tensor is traced back to the base tensor it came from (a strided view of it, or, where
diffusers copies - OpenCLIP's q/k/v split, the transposed ``text_projection`` - by running the
conversion once more on index-tagged tensors). Trained weights are then written into exactly those
elements; every other key of the base file is carried over untouched. A self-check reloads the
written file through diffusers before it is renamed into place.
"""
from __future__ import annotations

import argparse
import bisect
import datetime as _dt
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Mapping

import torch

from .tiny import Components

KINDS = ("sd1", "sd2", "sd2-v", "sdxl")
CONFIG_ROOT = Path(__file__).parent / "configs"
V2_V_YAML = CONFIG_ROOT / "v2-inference-v.yaml"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
READABLE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each text encoder lives in the LDM layout, per model kind.
TEXT_PREFIXES = {
    ("sd1", "text_encoder"): "cond_stage_model.transformer.",
    ("sd2", "text_encoder"): "cond_stage_model.model.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
}
# Prefixes of the model weights: cast to the export dtype. Anything else (noise-schedule buffers,
# unknown keys) is carried over byte for byte.
WEIGHT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.", "model_ema.")
COMPONENT_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")

KEY_UNET_IN = UNET_PREFIX + "input_blocks.0.0.weight"
KEY_VAE = VAE_PREFIX + "encoder.conv_in.weight"
KEY_SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
KEY_SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
KEY_SDXL_TEXT1 = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
KEY_SDXL_TEXT2 = "conditioner.embedders.1.model.token_embedding.weight"

ARCHITECTURES = {  # modelspec.architecture values (Stability's model spec, shown by the WebUI)
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
IMPLEMENTATIONS = {
    "sd1": "https://github.com/CompVis/stable-diffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sd2-v": "https://github.com/Stability-AI/stablediffusion",
    "sdxl": "https://github.com/Stability-AI/generative-models"}
RESOLUTIONS = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}


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

    @property
    def family(self) -> str:
        """The layout family: sd2-v shares sd2's layout."""
        return "sd2" if self.kind == "sd2-v" else self.kind

    @property
    def config_dir(self) -> Path:
        return CONFIG_ROOT / self.kind

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2") if self.kind == "sdxl" else ("text_encoder",)

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", "vae") + self.text_encoders


# --------------------------------------------------------------------------------------------
# Reading files


def file_hash(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of a file and the WebUI's short hash (its first 10 hex characters)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    full = digest.hexdigest()
    return {"sha256": full, "short": full[:10]}


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


def _torch_load(path: Path) -> dict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses anything that runs code
        # torch's own message advises loading with weights_only=False: never repeat that advice.
        found = re.search(r"GLOBAL ([\w.]+\.[\w]+)", str(exc))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} is a pickle that would run code when loaded{what}; it is refused for "
            "safety. Use a .safetensors version of the model.") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise _damaged(path, exc) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return obj


def read_state_dict(path: str | os.PathLike, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors/.ckpt file, in memory (the file is only read)."""
    path = Path(path)
    if fmt is None:
        _require_file(path)
    if _suffix(path, fmt) == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
            raise _damaged(path, exc) from exc
    state = _torch_load(path)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return _own_storage(tensors)


def read_shapes(path: str | os.PathLike, fmt: str | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape, reading only the header of a .safetensors file."""
    path = Path(path)
    if fmt is None:
        _require_file(path)
    if _suffix(path, fmt) != ".safetensors":
        return {k: tuple(v.shape) for k, v in read_state_dict(path, fmt).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        size = path.stat().st_size
    except Exception as exc:
        raise _damaged(path, exc) from exc
    # safe_open checks the header only; a file cut inside the data is caught by its size.
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + header_len + end:
        raise _damaged(path, EOFError(f"{size} bytes, header says {8 + header_len + end}"))
    return shapes


def export_size_estimate(base: str | os.PathLike, dtype: str) -> int | None:
    """About how many bytes the trained model written in ``dtype`` takes: from a .safetensors
    header (weights at the export dtype, other tensors as they are), else from the file or
    folder size. None when the base cannot be read."""
    base = Path(base)
    try:
        if base.is_dir():
            return sum(f.stat().st_size for f in base.rglob("*.safetensors")) or None
        if base.suffix.lower() != ".safetensors":
            return base.stat().st_size
        with open(base, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    except (OSError, ValueError):
        return None
    size = DTYPES[dtype].itemsize if dtype in DTYPES else 2
    total = 0
    for key, entry in header.items():
        if key == "__metadata__" or not isinstance(entry, dict):
            continue
        numel = math.prod(entry.get("shape") or [1])
        floating = str(entry.get("dtype", "")).startswith(("F", "BF"))
        stored = entry["data_offsets"][1] - entry["data_offsets"][0]
        total += numel * size if key.startswith(WEIGHT_PREFIXES) and floating else stored
    return total


def read_subset(path: str | os.PathLike, prefixes: tuple[str, ...], fmt: str | None = None
                ) -> dict[str, torch.Tensor]:
    """Only the tensors whose keys start with one of `prefixes`."""
    path = Path(path)
    if _suffix(path, fmt) != ".safetensors":
        return {k: v for k, v in read_state_dict(path, fmt).items() if k.startswith(prefixes)}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefixes)}
    except Exception as exc:
        raise _damaged(path, exc) from exc


def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give tensors that share storage (possible in pickles) their own, so tracing is unambiguous."""
    seen: set[int] = set()
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or tensor.storage_offset() != 0 or not tensor.is_contiguous():
            state[key] = tensor.clone()
        seen.add(state[key].untyped_storage().data_ptr())
    return state


# --------------------------------------------------------------------------------------------
# Detecting the model kind

LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".alpha", "hada_w", "lokr_w", "lora_te",
                "lora_unet")


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
                     prediction_type: str | None = None, yaml_path: Path | None = None) -> ModelKind:
    """Detect the kind from key names and shapes (no tensor data needed)."""
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
            "OpenCLIP, SDXL's two encoders): an unknown or unsupported architecture (SD3, Flux, "
            "ControlNet...). Supported: SD1.x, SD2.x, SDXL base.")
    prediction = prediction_type or _yaml_prediction(yaml_path)
    if prediction is None:
        # SD2.x 768 models are v-prediction but the weights do not say so: the WebUI convention
        # is the .yaml; without one, trust the usual "768"/"-v" in the file name.
        v_name = family == "sd2" and re.search(r"768|[-_]v\b|[-_]v[-_.]", name.lower())
        prediction = "v_prediction" if v_name else "epsilon"
    if prediction in ("v", "v-prediction"):
        prediction = "v_prediction"
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction!r}")
    kind = "sd2-v" if family == "sd2" and prediction == "v_prediction" else family
    has_ema = sum(k.startswith("model_ema.") for k in shapes) > 100
    return ModelKind(kind=kind, prediction_type=prediction, has_ema=has_ema,
                     has_vae=KEY_VAE in shapes)


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
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    prediction = prediction_type or sched.get("prediction_type", "epsilon")
    kind = "sd2-v" if family == "sd2" and prediction == "v_prediction" else family
    return ModelKind(kind=kind, prediction_type=prediction, source="diffusers")


def detect_kind(path_or_state_dict, *, prediction_type: str | None = None) -> ModelKind:
    """The kind of a single file, a diffusers folder or a state dict; refuses what cannot be trained."""
    if isinstance(path_or_state_dict, Mapping):
        shapes = {k: tuple(v.shape) for k, v in path_or_state_dict.items()
                  if isinstance(v, torch.Tensor)}
        return kind_from_shapes(shapes, "state dict", prediction_type=prediction_type)
    path = Path(path_or_state_dict)
    if path.is_dir():
        return _kind_from_folder(path, prediction_type)
    return kind_from_shapes(read_shapes(path), path.name, prediction_type=prediction_type,
                            yaml_path=path)


def _with_kind(found: ModelKind, kind: str | None) -> ModelKind:
    """Apply a --kind override (only between layouts that really are the same)."""
    if kind is None or kind == found.kind:
        return found
    if kind not in KINDS:
        raise CheckpointError(f"kind must be one of {KINDS}, not {kind!r}")
    family = "sd2" if kind == "sd2-v" else kind
    if family != found.family:
        raise CheckpointError(f"the checkpoint is {found.kind}; it cannot be read as {kind}")
    return replace(found, kind=kind,
                   prediction_type="v_prediction" if kind == "sd2-v" else "epsilon")


# --------------------------------------------------------------------------------------------
# Configs from shapes


def _count(shapes: Mapping, pattern: str) -> int:
    """How many distinct integers fill {} in keys matching the regex pattern."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def _norm_groups(channels: Iterable[int]) -> int:
    # Group counts are not stored in the weights: SD uses 32, small test models the largest
    # divisor of every width up to 32.
    return min(32, math.gcd(*channels))


def _heads(hidden: int) -> int:
    # CLIP/OpenCLIP heads are 64 wide; test models below 64-multiples use 8-wide heads.
    return hidden // 64 if hidden % 64 == 0 else max(1, hidden // 8)


def unet_config_from_shapes(shapes: Mapping, base: dict, family: str,
                            text2_projection: int | None = None) -> dict:
    p = UNET_PREFIX
    n_in = _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    levels = 1 + _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    per_block = (n_in - levels) // levels
    channels, attention, depth = [], [], []
    for level in range(levels):
        block = f"{p}input_blocks.{1 + level * (per_block + 1)}."
        channels.append(shapes[block + "0.out_layers.3.weight"][0])
        attention.append(block + "1.proj_in.weight" in shapes)
        depth.append(max(1, _count(shapes, re.escape(block) + r"1\.transformer_blocks\.(\d+)\.")))
    attn2 = next(v for k, v in shapes.items() if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in shapes.items() if k.startswith(p) and k.endswith(".proj_in.weight"))
    config = dict(base)
    config.update(
        in_channels=shapes[KEY_UNET_IN][1], out_channels=shapes[p + "out.2.weight"][0],
        block_out_channels=channels, layers_per_block=per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=attn2[1], use_linear_projection=len(proj_in) == 2,
        norm_num_groups=_norm_groups(channels))
    # SD1 uses 8 heads everywhere; SD2/SDXL 64-wide heads (diffusers names heads attention_head_dim).
    config["attention_head_dim"] = 8 if family == "sd1" else [max(1, c // 64) for c in channels]
    if family == "sdxl":
        config["transformer_layers_per_block"] = depth
        in_dim = shapes[p + "label_emb.0.0.weight"][1]
        config["projection_class_embeddings_input_dim"] = in_dim
        config["addition_time_embed_dim"] = (in_dim - (text2_projection or 1280)) // 6
    return config


def vae_config_from_shapes(shapes: Mapping, base: dict, prefix: str) -> dict:
    p = prefix
    levels = _count(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    channels = [shapes[f"{p}encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    config = dict(base)
    config.update(
        in_channels=shapes[p + "encoder.conv_in.weight"][1],
        out_channels=shapes[p + "decoder.conv_out.weight"][0],
        latent_channels=shapes[p + "post_quant_conv.weight"][0], block_out_channels=channels,
        layers_per_block=_count(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."),
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        norm_num_groups=_norm_groups(channels))
    return config


def text_config_from_shapes(shapes: Mapping, base: dict, prefix: str, openclip: bool) -> dict:
    config = dict(base)
    if openclip:
        tokens = shapes[prefix + "token_embedding.weight"]
        layers = _count(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        if prefix == "cond_stage_model.model." and f"{prefix}transformer.resblocks.23.ln_1.weight" in shapes:
            layers -= 1  # diffusers drops SD2's last layer (the WebUI uses the penultimate one)
        config.update(max_position_embeddings=shapes[prefix + "positional_embedding"][0],
                      intermediate_size=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0])
        if prefix + "text_projection" in shapes and "WithProjection" in base["architectures"][0]:
            config["projection_dim"] = shapes[prefix + "text_projection"][1]
    else:
        p = prefix + "text_model."
        tokens = shapes[p + "embeddings.token_embedding.weight"]
        layers = _count(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        config.update(max_position_embeddings=shapes[p + "embeddings.position_embedding.weight"][0],
                      intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0])
    config.update(vocab_size=tokens[0], hidden_size=tokens[1], num_hidden_layers=layers,
                  num_attention_heads=_heads(tokens[1]))
    return config


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def derive_configs(shapes: Mapping, kind: ModelKind, vae_shapes: Mapping | None = None) -> dict[str, dict]:
    """Diffusers configs of every component: the bundled ones, patched from the tensor shapes."""
    root = kind.config_dir
    family = kind.family
    text2_projection = None
    if family == "sdxl":
        text2_projection = shapes["conditioner.embedders.1.model.text_projection"][1]
    configs = {
        "unet": unet_config_from_shapes(shapes, _read_json(root / "unet" / "config.json"), family,
                                        text2_projection),
        "vae": vae_config_from_shapes(vae_shapes if vae_shapes is not None else shapes,
                                      _read_json(root / "vae" / "config.json"),
                                      _vae_prefix(vae_shapes if vae_shapes is not None else shapes)),
    }
    for name in kind.text_encoders:
        prefix = TEXT_PREFIXES[(family, name)]
        configs[name] = text_config_from_shapes(
            shapes, _read_json(root / name / "config.json"), prefix, prefix.endswith(".model."))
    return configs


def _vae_prefix(shapes: Mapping) -> str:
    for prefix in (VAE_PREFIX, "vae."):
        if prefix + "encoder.conv_in.weight" in shapes:
            return prefix
    return ""


def write_config_folder(configs: dict[str, dict], kind: ModelKind, folder: Path) -> Path:
    """A config-only diffusers folder (what `from_single_file(config=...)` reads), with tokenizers."""
    folder = Path(folder)
    shutil.copytree(kind.config_dir, folder, dirs_exist_ok=True)
    for name, config in configs.items():
        target = folder / name / "config.json"
        target.write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name).is_dir():
            source = _offline_tokenizer_dir(folder / name)
            for file in ("vocab.json", "merges.txt"):
                shutil.copyfile(source / file, folder / name / file)
    return folder


def config_folder(path: str | os.PathLike, dest: str | os.PathLike, *,
                  prediction_type: str | None = None) -> Path:
    """Write the config-only diffusers folder that loads the single file `path` (for tests/tools)."""
    path = Path(path)
    shapes = read_shapes(path)
    kind = kind_from_shapes(shapes, path.name, prediction_type=prediction_type, yaml_path=path)
    return write_config_folder(derive_configs(shapes, kind), kind, Path(dest))


# --------------------------------------------------------------------------------------------
# Tokenizers


def _pad_token(folder: Path) -> str:
    return _read_json(folder / "tokenizer_config.json").get("pad_token", "<|endoftext|>")


def _offline_tokenizer_dir(config_dir: Path) -> Path:
    from .tokenizer import offline_tokenizer_dir

    return offline_tokenizer_dir(_pad_token(config_dir))


def load_tokenizer(kind: ModelKind, name: str = "tokenizer", folder: Path | None = None):
    """A diffusers folder's own tokenizer, else the HF cache, else the one built offline."""
    from transformers import CLIPTokenizer

    if folder is not None and (folder / name).is_dir():
        try:
            return CLIPTokenizer.from_pretrained(str(folder / name))
        except Exception:  # e.g. only a tokenizer.json written by transformers 5.x
            pass
    config_dir = kind.config_dir / name
    pad = _pad_token(config_dir)
    if pad == "<|endoftext|>":  # the WebUI caches openai's tokenizer for SD1 and SDXL
        try:
            return CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14",
                                                 local_files_only=True)
        except Exception:  # not cached, or offline mode without it
            pass
    from .tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(pad_token=pad)


# --------------------------------------------------------------------------------------------
# Loading


def _config_dir_for(configs: dict[str, dict], kind: ModelKind, tmp: Path) -> str:
    """A folder holding only the model configs (tokenizers are loaded separately)."""
    shutil.copytree(kind.config_dir, tmp, dirs_exist_ok=True)
    for name, config in configs.items():
        (tmp / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(tmp)


def _no_meta(model: torch.nn.Module, name: str, source: str) -> torch.nn.Module:
    meta = [k for k, v in model.state_dict().items() if v.is_meta]
    if meta:
        raise CheckpointError(f"{source}: the {name} weights are incomplete; missing keys such as "
                              f"{meta[:5]} (a damaged or unsupported checkpoint)")
    return model.eval()


def _load_models(state: Mapping[str, torch.Tensor], kind: ModelKind, configs: dict[str, dict],
                 names: Iterable[str], *, use_ema: bool = False,
                 vae_state: Mapping | None = None, source: str = "checkpoint",
                 dtype: torch.dtype = torch.float32) -> dict:
    """diffusers' own single-file loaders, offline, per component."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    models = {}
    with tempfile.TemporaryDirectory(prefix="db-config-") as tmp:
        cfg = _config_dir_for(configs, kind, Path(tmp))
        for name in names:
            try:
                if name == "unet":
                    model = UNet2DConditionModel.from_single_file(
                        dict(state), config=cfg, subfolder="unet", local_files_only=True,
                        extract_ema=use_ema, torch_dtype=dtype)
                elif name == "vae":
                    model = AutoencoderKL.from_single_file(
                        dict(vae_state if vae_state is not None else state), config=cfg,
                        subfolder="vae", local_files_only=True, torch_dtype=dtype)
                else:
                    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                    model = create_diffusers_clip_model_from_ldm(
                        cls, dict(state), subfolder=name, config=cfg, local_files_only=True,
                        torch_dtype=dtype)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{source}: cannot load the {name} ({type(exc).__name__}: "
                                      f"{exc})") from exc
            models[name] = _no_meta(model, name, source)
    return models


def _scheduler(kind: ModelKind, folder: Path | None = None):
    from diffusers import DDPMScheduler

    root = folder if folder is not None and (folder / "scheduler").is_dir() else kind.config_dir
    config = _read_json(root / "scheduler" / "scheduler_config.json")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config, prediction_type=kind.prediction_type)


def _read_vae(vae_path: Path) -> dict[str, torch.Tensor]:
    state = read_state_dict(vae_path)
    if _vae_prefix(state) + "encoder.conv_in.weight" not in state:
        raise CheckpointError(f"{vae_path} is not a VAE (no encoder.conv_in.weight); pick a file "
                              "from models/VAE")
    return state


def load_components(path: str | os.PathLike, *, prediction_type: str | None = None,
                    use_ema: bool = False, vae_path: str | os.PathLike | None = None,
                    kind: str | None = None) -> tuple[Components, ModelKind]:
    """Load a single-file checkpoint or a diffusers folder into fp32 components, offline."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, prediction_type=prediction_type, vae_path=vae_path, kind=kind)
    state = read_state_dict(path)
    found = _with_kind(kind_from_shapes({k: tuple(v.shape) for k, v in state.items()}, path.name,
                                        prediction_type=prediction_type, yaml_path=path), kind)
    if use_ema and not found.has_ema:
        raise CheckpointError(f"{path.name} has no EMA weights (model_ema.*); load it without use_ema")
    vae_state = _read_vae(Path(vae_path)) if vae_path else None
    if vae_state is None and not found.has_vae:
        raise CheckpointError(f"{path.name} has no VAE weights; choose a VAE from models/VAE")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    vae_shapes = {k: tuple(v.shape) for k, v in vae_state.items()} if vae_state else None
    configs = derive_configs(shapes, found, vae_shapes)
    models = _load_models(state, found, configs, found.components, use_ema=use_ema,
                          vae_state=vae_state, source=path.name)
    del state
    return _assemble(models, found), found


def _assemble(models: dict, kind: ModelKind, folder: Path | None = None) -> Components:
    extra = {}
    if kind.kind == "sdxl":
        extra = dict(text_encoder_2=models["text_encoder_2"],
                     tokenizer_2=load_tokenizer(kind, "tokenizer_2", folder))
    return Components(unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"],
                      tokenizer=load_tokenizer(kind, "tokenizer", folder),
                      noise_scheduler=_scheduler(kind, folder), **extra)


def normalize_text_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x drops the `text_model.` prefix; put it back (the 4.x and WebUI layout)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in state.items()}


def _load_text_folder(cls, folder: Path) -> torch.nn.Module:
    """A text encoder from a diffusers folder, whichever transformers version saved it."""
    from safetensors.torch import load_file

    config = cls.config_class.from_pretrained(str(folder))
    model = cls(config)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{folder} holds no weights")
    state = {}
    for file in files:
        state.update(load_file(str(file)) if file.suffix == ".safetensors"
                     else torch.load(str(file), map_location="cpu", weights_only=True))
    expected = model.state_dict()
    state = {k: v for k, v in normalize_text_keys(state).items() if k in expected}
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"{folder}: missing text-encoder weights {missing[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def _load_folder(folder: Path, *, prediction_type: str | None, vae_path, kind: str | None
                 ) -> tuple[Components, ModelKind]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    found = _with_kind(_kind_from_folder(folder, prediction_type), kind)
    models = {"unet": UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").eval()}
    if vae_path:
        vae_state = _read_vae(Path(vae_path))
        configs = {"vae": vae_config_from_shapes(
            {k: tuple(v.shape) for k, v in vae_state.items()},
            _read_json(found.config_dir / "vae" / "config.json"), _vae_prefix(vae_state))}
        models.update(_load_models({}, found, configs, ["vae"], vae_state=vae_state,
                                   source=str(vae_path)))
    else:
        models["vae"] = AutoencoderKL.from_pretrained(str(folder), subfolder="vae").eval()
    for name in found.text_encoders:
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        models[name] = _load_text_folder(cls, folder / name)
    return _assemble(models, found, folder), found


# --------------------------------------------------------------------------------------------
# Tracing diffusers' conversion back to the LDM keys


@dataclass(frozen=True)
class Slot:
    """Where one diffusers tensor lives in the LDM state dict: a strided view, or flat indices."""

    key: str
    size: tuple[int, ...]
    stride: tuple[int, ...] = ()
    offset: int = 0
    index: torch.Tensor | None = None

    def write(self, state: dict[str, torch.Tensor], value: torch.Tensor) -> None:
        target = state[self.key]
        if self.index is None:
            target.as_strided(self.size, self.stride, self.offset).copy_(value)
        else:
            target.view(-1)[self.index] = value.reshape(-1).to(target.dtype)

    def read(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        target = state[self.key]
        if self.index is None:
            return target.as_strided(self.size, self.stride, self.offset)
        return target.reshape(-1)[self.index].reshape(self.size)


def _converter(name: str, kind: ModelKind, configs: dict[str, dict]
               ) -> tuple[Callable[[Mapping], dict], tuple[str, ...]]:
    """diffusers' LDM -> diffusers conversion of one component, and the LDM prefixes it reads."""
    from diffusers.loaders import single_file_utils as sfu

    family = kind.family
    if name == "unet":
        return (lambda sd: sfu.convert_ldm_unet_checkpoint(sd, configs["unet"])), (UNET_PREFIX,)
    if name == "vae":
        return (lambda sd: sfu.convert_ldm_vae_checkpoint(sd, configs["vae"])), (VAE_PREFIX,)
    prefix = TEXT_PREFIXES[(family, name)]
    if prefix.endswith(".transformer."):
        return (lambda sd: sfu.convert_ldm_clip_checkpoint(sd)), (prefix,)
    stub = SimpleNamespace(config=SimpleNamespace(projection_dim=configs[name]["hidden_size"]))
    return (lambda sd: sfu.convert_open_clip_checkpoint(stub, sd, prefix=prefix)), (prefix,)


def trace_slots(state: dict[str, torch.Tensor], convert: Callable[[Mapping], dict],
                prefixes: tuple[str, ...]) -> dict[str, Slot]:
    """For each tensor diffusers' conversion makes from `state`, the LDM elements it holds."""
    converted = convert(state)
    owners = {t.untyped_storage().data_ptr(): k for k, t in state.items()}
    slots: dict[str, Slot] = {}
    copied = []
    for dkey, tensor in converted.items():
        owner = owners.get(tensor.untyped_storage().data_ptr())
        if owner is not None and tensor.dtype == state[owner].dtype:
            slots[dkey] = Slot(owner, tuple(tensor.shape), tuple(tensor.stride()),
                               tensor.storage_offset())
        else:
            copied.append(dkey)
    if copied:  # diffusers copied these: find their elements with index-tagged inputs
        used = {s.key for s in slots.values()}
        candidates = [k for k in state if k.startswith(prefixes) and k not in used
                      and state[k].is_floating_point()]
        starts, tagged, start = [], dict(state), 0
        for key in candidates:
            starts.append(start)
            tagged[key] = torch.arange(start, start + state[key].numel(),
                                       dtype=torch.float64).reshape(state[key].shape)
            start += state[key].numel()
        retagged = convert(tagged)
        for dkey in copied:
            values = retagged[dkey].to(torch.float64).reshape(-1)
            pos = bisect.bisect_right(starts, float(values.min())) - 1 if values.numel() else -1
            key = candidates[pos] if pos >= 0 else None
            index = values.long() - starts[pos] if key is not None else None
            if key is None or index.max() >= state[key].numel() or index.min() < 0 \
                    or not torch.equal(values, values.round()):
                raise CheckpointError(f"cannot trace {dkey} back to the checkpoint layout")
            slots[dkey] = Slot(key, tuple(retagged[dkey].shape), index=index)
    return slots


def _trained_state(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return normalize_text_keys(state) if name.startswith("text_encoder") else state


def write_component(state: dict[str, torch.Tensor], slots: dict[str, Slot],
                    trained: Mapping[str, torch.Tensor], name: str) -> None:
    """Write a trained component's tensors into their LDM elements; refuse anything unmapped."""
    unmapped = [k for k in trained if k not in slots and not k.endswith("position_ids")]
    missing = [k for k in slots if k not in trained and not k.endswith("position_ids")]
    wrong = [k for k in trained if k in slots and tuple(trained[k].shape) != slots[k].size]
    if unmapped or missing or wrong:
        raise CheckpointError(
            f"the trained {name} does not match the base checkpoint: unmapped {unmapped[:5]}, "
            f"missing {missing[:5]}, wrong shapes {wrong[:5]}")
    for key, slot in slots.items():
        if key in trained:
            slot.write(state, trained[key])


# --------------------------------------------------------------------------------------------
# Writing


def _check_output(out: Path, base: Path | None, overwrite: bool) -> str:
    fmt = out.suffix.lower()
    if fmt not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{out}: the output must end in .safetensors or .ckpt")
    if base is not None and out.resolve() == base.resolve():
        raise CheckpointError(f"{out} is the base checkpoint itself; the base is never overwritten")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another name or allow overwriting")
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder")
    parent = out.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {out.name}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out.name}: the folder {parent} is not writable")
    return fmt


def _save(state: dict[str, torch.Tensor], tmp: Path, fmt: str, metadata: dict[str, str]) -> None:
    if fmt == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata=metadata)
    else:
        torch.save({"state_dict": state, "dreambooth_metadata": metadata}, str(tmp))


def _atomic_write(state: dict[str, torch.Tensor], out: Path, fmt: str, metadata: dict[str, str],
                  check: Callable[[Path, str], None], overwrite: bool) -> Path:
    """Write through the atomic-write helper (a hidden temporary beside ``out``), check the
    written file, then rename it into place; a failure removes the temporary (WriteError for a
    full disk or an unwritable folder).

    `state` is emptied once written, so that its memory is free for the check."""
    from .files import atomic_path

    needed = sum(t.numel() * t.element_size() for t in state.values()) + (1 << 20)
    with atomic_path(out, overwrite=overwrite, needed_bytes=needed) as tmp:
        _save(state, tmp, fmt, metadata)
        state.clear()
        check(tmp, fmt)
    return out


def _write_text_atomic(path: Path, text: str) -> None:
    from .files import write_text

    write_text(path, text, overwrite=True)


def _companion_yaml(base: Path | None, kind: ModelKind, out: Path) -> None:
    """The WebUI picks a model's config from a .yaml of the same name (needed for SD2 v models)."""
    source = base.with_suffix(".yaml") if base is not None else None
    if source is not None and source.is_file():
        _write_text_atomic(out.with_suffix(".yaml"), source.read_text(encoding="utf-8"))
    elif kind.kind == "sd2-v":
        _write_text_atomic(out.with_suffix(".yaml"), V2_V_YAML.read_text(encoding="utf-8"))


def build_metadata(kind: ModelKind, out: Path, *, base: Path | None = None, dtype: str = "fp16",
                   trained: Iterable[str] = (), extra: Mapping | None = None,
                   base_hash: Mapping[str, str] | None = None) -> dict[str, str]:
    """safetensors metadata (strings only): modelspec.* for the WebUI, dreambooth.* for us."""
    extra = dict(extra or {})
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    resolution = extra.get("resolution", RESOLUTIONS[kind.kind])
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[kind.kind],
        "modelspec.implementation": IMPLEMENTATIONS[kind.kind],
        "modelspec.title": str(extra.pop("title", out.stem)),
        "modelspec.date": now,
        "modelspec.prediction_type": "v" if kind.prediction_type == "v_prediction" else "epsilon",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "dreambooth.model_kind": kind.kind,
        "dreambooth.prediction_type": kind.prediction_type,
        "dreambooth.dtype": dtype,
        "dreambooth.date": now,
    }
    if trained:
        meta["dreambooth.trained"] = ",".join(trained)
    if base is not None:
        hashes = base_hash or file_hash(base)
        meta.update({"dreambooth.base_model": base.name, "dreambooth.base_hash": hashes["short"],
                     "dreambooth.base_sha256": hashes["sha256"]})
    concepts = extra.get("concepts")
    if concepts and "modelspec.description" not in extra:
        prompts = [c.get("instance_prompt", "") if isinstance(c, Mapping) else str(c)
                   for c in concepts]
        meta["modelspec.description"] = "DreamBooth: " + "; ".join(p for p in prompts if p)
    for key, value in extra.items():
        name = key if "." in key else f"dreambooth.{key}"
        meta[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return meta


def _compare(converted: Mapping[str, torch.Tensor], model: torch.nn.Module, name: str,
             dtype: torch.dtype) -> list[str]:
    """Keys whose value as diffusers reads it differs from the trained one cast to `dtype`."""
    wrong = []
    for key, value in _trained_state(name, model).items():
        if key.endswith("position_ids"):
            continue
        expected = value.to(dtype) if value.is_floating_point() else value
        got = converted.get(key)
        if got is None or tuple(got.shape) != tuple(expected.shape) or not torch.equal(
                got.to(expected.dtype), expected):
            wrong.append(f"{name}.{key}")
    return wrong


def _self_check(path: Path, fmt: str, base_shapes: Mapping | None, kind: ModelKind,
                components: Components, names: Iterable[str], dtype: torch.dtype) -> None:
    """Same keys and shapes as the base, same kind, and diffusers reloads the trained weights."""
    shapes = read_shapes(path, fmt)
    if base_shapes is not None:
        missing = sorted(set(base_shapes) - set(shapes))
        extra = sorted(set(shapes) - set(base_shapes))
        reshaped = sorted(k for k in set(shapes) & set(base_shapes) if shapes[k] != base_shapes[k])
        if missing or extra or reshaped:
            raise CheckpointError(f"self-check failed: missing keys {missing[:10]}, extra keys "
                                  f"{extra[:10]}, wrong shapes {reshaped[:10]}")
    again = kind_from_shapes(shapes, path.name, prediction_type=kind.prediction_type)
    if again.kind != kind.kind:
        raise CheckpointError(f"self-check failed: written file reads as {again.kind}, "
                              f"not {kind.kind}")
    configs = derive_configs(shapes, kind)
    wrong = []
    for name in names:  # one component at a time: the least memory
        # diffusers' own conversion, exactly what its from_single_file loader runs on the file
        convert, prefixes = _converter(name, kind, configs)
        converted = convert(read_subset(path, prefixes, fmt))
        wrong += _compare(converted, getattr(components, name), name, dtype)
        del converted
    if wrong:
        raise CheckpointError(f"self-check failed: {len(wrong)} tensors differ after reloading, "
                              f"e.g. {wrong[:10]}")


def _cast_weights(state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Model weights to the export dtype, as fresh tensors (never a view of a read file)."""
    for key in list(state):
        tensor = state[key]
        if key.startswith(WEIGHT_PREFIXES) and tensor.is_floating_point():
            state[key] = tensor.to(dtype, copy=True).contiguous()


def _names(trained: Iterable[str], kind: ModelKind) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(trained))
    bad = [n for n in names if n not in kind.components]
    if bad:
        raise CheckpointError(f"cannot export {bad}: a {kind.kind} model has {kind.components}")
    return names


def export_checkpoint(base_path: str | os.PathLike, components: Components,
                      out_path: str | os.PathLike, *,
                      trained: Iterable[str] = ("unet", "text_encoder"), dtype: str = "fp16",
                      metadata: Mapping | None = None, overwrite: bool = False,
                      use_ema_base: bool = False, prediction_type: str | None = None,
                      kind: str | None = None) -> Path:
    """Write trained components into the base checkpoint's own state dict, as a new file.

    Every key of the base is kept; the tensors of the `trained` components are replaced. Model
    weights are cast to `dtype`, other keys (schedule buffers, unknown keys) are copied as they
    are. With `use_ema_base`, the trained UNet is also written over the base's EMA copy so that no
    stale EMA weights remain. Raises CheckpointError and leaves nothing behind on any failure.
    """
    base, out = Path(base_path), Path(out_path)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {tuple(DTYPES)}, not {dtype!r}")
    _require_file(base)
    fmt = _check_output(out, base, overwrite)
    base_shapes = read_shapes(base)
    found = _with_kind(kind_from_shapes(base_shapes, base.name, prediction_type=prediction_type,
                                        yaml_path=base), kind)
    names = _names(trained, found)
    torch_dtype = DTYPES[dtype]
    base_hash = file_hash(base)
    state = read_state_dict(base)
    _cast_weights(state, torch_dtype)
    configs = derive_configs(base_shapes, found)
    for name in names:
        convert, prefixes = _converter(name, found, configs)
        slots = trace_slots(state, convert, prefixes)
        write_component(state, slots, _trained_state(name, getattr(components, name)), name)
    if use_ema_base and "unet" in names:
        _overwrite_ema(state)
    meta = build_metadata(found, out, base=base, dtype=dtype, trained=names, extra=metadata,
                          base_hash=base_hash)
    check = lambda tmp, f: _self_check(tmp, f, base_shapes, found, components, names, torch_dtype)
    _atomic_write(state, out, fmt, meta, check, overwrite)
    _companion_yaml(base, found, out)
    return out


def _overwrite_ema(state: dict[str, torch.Tensor]) -> None:
    # LDM names EMA copies by the live key without "model." and without dots.
    for key in [k for k in state if k.startswith(UNET_PREFIX)]:
        ema = "model_ema." + "".join(key.split(".")[1:])
        if ema in state and state[ema].shape == state[key].shape:
            state[ema] = state[key].to(state[ema].dtype, copy=True)


# --------------------------------------------------------------------------------------------
# New single files from components (no base file): diffusers -> LDM names


RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                 ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                 ("conv_shortcut", "skip_connection"))


def _rename(rest: str, pairs) -> str:
    for old, new in pairs:
        rest = rest.replace(old, new)
    return rest


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    fixed = dict(MAP["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(MAP["unet"]["addition_embed_type"])
    n = config["layers_per_block"] + 1
    up_has_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[UNET_PREFIX + fixed[key]] = value
            continue
        parts = key.split(".")
        kind_, rest = parts[0], ".".join(parts[4:])
        if kind_ == "down_blocks":
            block, sub, idx = int(parts[1]), parts[2], int(parts[3])
            if sub == "resnets":
                name = f"input_blocks.{1 + block * n + idx}.0.{_rename(rest, RESNET_TO_LDM)}"
            elif sub == "attentions":
                name = f"input_blocks.{1 + block * n + idx}.1.{rest}"
            else:  # downsamplers.0.conv.X
                name = f"input_blocks.{(block + 1) * n}.0.op.{parts[-1]}"
        elif kind_ == "mid_block":
            sub, idx, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            name = (f"middle_block.{2 * idx}.{_rename(rest, RESNET_TO_LDM)}" if sub == "resnets"
                    else f"middle_block.1.{rest}")
        elif kind_ == "up_blocks":
            block, sub, idx = int(parts[1]), parts[2], int(parts[3])
            if sub == "resnets":
                name = f"output_blocks.{block * n + idx}.0.{_rename(rest, RESNET_TO_LDM)}"
            elif sub == "attentions":
                name = f"output_blocks.{block * n + idx}.1.{rest}"
            else:  # upsamplers.0.conv.X sits after the attention, if the block has one
                name = (f"output_blocks.{block * n + n - 1}.{2 if up_has_attention[block] else 1}"
                        f".conv.{parts[-1]}")
        else:
            raise CheckpointError(f"unknown UNet key {key!r}")
        out[UNET_PREFIX + name] = value
    return out


VAE_ATTENTION_TO_LDM = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                        ("to_out.0", "proj_out"))


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    fixed = MAP["vae"]
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        if key in fixed:
            out[VAE_PREFIX + fixed[key]] = value
            continue
        parts = key.split(".")
        coder, block = parts[0], parts[1]
        if block == "mid_block":
            sub, idx, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if sub == "resnets":
                name = f"{coder}.mid.block_{idx + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                name = f"{coder}.mid.attn_1.{_rename(rest, VAE_ATTENTION_TO_LDM)}"
                if value.ndim == 2:  # LDM keeps the attention projections as 1x1 convolutions
                    value = value[:, :, None, None]
        else:
            level, sub, idx, rest = int(parts[2]), parts[3], parts[4], ".".join(parts[5:])
            ldm_level = level if coder == "encoder" else levels - 1 - level
            where = "down" if coder == "encoder" else "up"
            if sub == "resnets":
                name = (f"{coder}.{where}.{ldm_level}.block.{idx}."
                        f"{rest.replace('conv_shortcut', 'nin_shortcut')}")
            else:  # downsamplers.0.conv.X / upsamplers.0.conv.X
                sample = "downsample" if coder == "encoder" else "upsample"
                name = f"{coder}.{where}.{ldm_level}.{sample}.conv.{parts[-1]}"
        out[VAE_PREFIX + name] = value
    return out


OPENCLIP_TO_LDM = ((".self_attn.out_proj.", ".attn.out_proj."), (".layer_norm1.", ".ln_1."),
                   (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
                   (".mlp.fc2.", ".mlp.c_proj."))


def openclip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str, hidden: int
                    ) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAP

    fixed = MAP["openclip"]["layers"]
    out, qkv = {}, {}
    for key, value in normalize_text_keys(state).items():
        if key.endswith("position_ids"):
            continue
        if key in fixed:
            out[prefix + fixed[key]] = value.T.contiguous() if key == "text_projection.weight" \
                else value
            continue
        layer = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if layer is None:
            raise CheckpointError(f"unknown text-encoder key {key!r}")
        index, rest = layer.groups()
        qkv_match = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv_match:
            qkv.setdefault((index, qkv_match.group(2)), {})[qkv_match.group(1)] = value
            continue
        out[prefix + "transformer.resblocks." + index + _rename("." + rest, OPENCLIP_TO_LDM)] = value
    for (index, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    if prefix + "text_projection" not in out:  # SD2 stores one, unused: identity
        out[prefix + "text_projection"] = torch.eye(hidden)
    return out


def components_to_ldm(components: Components, kind: ModelKind,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The LDM state dict of a Components object, as new tensors (weights cast to `dtype`)."""
    family = kind.family
    state = {}
    state.update(unet_to_ldm(components.unet.state_dict(), components.unet.config))
    state.update(vae_to_ldm(components.vae.state_dict(), components.vae.config))
    for name in kind.text_encoders:
        model = getattr(components, name)
        prefix = TEXT_PREFIXES[(family, name)]
        if prefix.endswith(".model."):
            state.update(openclip_to_ldm(model.state_dict(), prefix, model.config.hidden_size))
        else:
            text = normalize_text_keys(model.state_dict())
            text.setdefault("text_model.embeddings.position_ids",
                            torch.arange(model.config.max_position_embeddings)[None])
            state.update({prefix + k: v for k, v in text.items()})
    return {k: (v.detach().to(dtype, copy=True) if v.is_floating_point() else v.detach().clone()
                ).contiguous() for k, v in state.items()}


def schedule_buffers(noise_scheduler) -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers an SD1.x/SD2.x single file carries (LDM's register_schedule,
    computed in float64 and stored as float32 as LDM does)."""
    betas = noise_scheduler.betas.to(torch.float64)
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - cumprod)
    buffers = {
        "betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - prev) * alphas.sqrt() / (1.0 - cumprod),
    }
    return {k: v.to(torch.float32).contiguous() for k, v in buffers.items()}


def save_single_file(components: Components, path: str | os.PathLike, *, kind: str = "sd1",
                     dtype: str = "fp32", metadata: Mapping | None = None,
                     overwrite: bool = False, base_name: str | None = None) -> Path:
    """Write components as a NEW single-file checkpoint in the original (LDM) layout, with the
    DDPM schedule buffers for SD1.x/SD2.x (``base_name``: the diffusers folder it came from, for
    the metadata)."""
    out = Path(path)
    if kind not in KINDS:
        raise CheckpointError(f"kind must be one of {KINDS}, not {kind!r}")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {tuple(DTYPES)}, not {dtype!r}")
    if (kind == "sdxl") != (getattr(components, "text_encoder_2", None) is not None):
        raise CheckpointError(f"these components do not make a {kind} model")
    fmt = _check_output(out, None, overwrite)
    found = ModelKind(kind=kind, prediction_type="v_prediction" if kind == "sd2-v" else
                      getattr(components.noise_scheduler.config, "prediction_type", "epsilon"))
    state = components_to_ldm(components, found, DTYPES[dtype])
    if found.family != "sdxl":
        state.update(schedule_buffers(components.noise_scheduler))
    meta = build_metadata(found, out, dtype=dtype, trained=found.components, extra=metadata)
    if base_name:
        meta["dreambooth.base_model"] = base_name
    check = lambda tmp, f: _self_check(tmp, f, None, found, components, found.components,
                                       DTYPES[dtype])
    _atomic_write(state, out, fmt, meta, check, overwrite)
    _companion_yaml(None, found, out)
    return out


def save_diffusers(components: Components, folder: str | os.PathLike, *, half: bool = False,
                   overwrite: bool = False) -> Path:
    """Save as a diffusers folder, written beside the target and renamed when complete."""
    from .files import atomic_path

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CheckpointError(f"{folder} already exists; choose another name or allow overwriting")
    if not folder.parent.is_dir():
        raise CheckpointError(f"cannot write {folder.name}: the folder {folder.parent} does not exist")
    with atomic_path(folder, overwrite=overwrite) as tmp:
        pipe = components.pipeline()
        if half:
            pipe.to(torch.float16)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------
# CLI


def convert_main(argv: list[str] | None = None) -> int:
    """python -m dreambooth convert IN OUT [--half] [--ema] [--kind KIND] [--vae VAE]"""
    parser = argparse.ArgumentParser(
        prog="python -m dreambooth convert",
        description="Convert a single-file checkpoint (.safetensors/.ckpt) to a diffusers folder, "
                    "a diffusers folder to a single file, or a single file to another single file.")
    parser.add_argument("input", help="a .safetensors/.ckpt file or a diffusers folder")
    parser.add_argument("output", help="a .safetensors/.ckpt file or a folder name")
    parser.add_argument("--half", action="store_true", help="write fp16 weights")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of the UNet")
    parser.add_argument("--kind", choices=KINDS, help="override the detected model kind")
    parser.add_argument("--vae", help="a separate VAE file to use instead of the built-in one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    from .files import EXIT_BAD_INPUT, EXIT_WRITE_FAILED, OutputExistsError, WriteError

    source, target = Path(args.input), Path(args.output)
    try:
        components, found = load_components(source, use_ema=args.ema, kind=args.kind,
                                             vae_path=args.vae)
        if target.suffix.lower() in SINGLE_FILE_SUFFIXES:
            dtype = "fp16" if args.half else "fp32"
            if source.is_file():
                export_checkpoint(source, components, target, trained=found.components,
                                  dtype=dtype, overwrite=args.overwrite, use_ema_base=args.ema,
                                  kind=found.kind)
            else:
                save_single_file(components, target, kind=found.kind, dtype=dtype,
                                 overwrite=args.overwrite)
        else:
            save_diffusers(components, target, half=args.half, overwrite=args.overwrite)
    except (CheckpointError, OutputExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    print(f"wrote {target} ({found.kind}, {found.prediction_type})")
    return 0
