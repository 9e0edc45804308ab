"""Single-file Stable Diffusion checkpoints (the WebUI's LDM layout): reading tensors and
loading them into diffusers components.

What a checkpoint *is* (its kind, prediction type, zero terminal SNR) is decided in
:mod:`dreambooth.models.detect`; its names are re-exported here so ``checkpoint.detect_kind`` and
``from .checkpoint import ModelKind`` keep working. Loading uses diffusers' own single-file
conversion, fully offline, with configs bundled under ``dreambooth/configs/`` and patched from the
checkpoint's tensor shapes (so one code path loads a real SD1.5 file and the tiny test model
alike). Writing lives in :mod:`dreambooth.models.export`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from dreambooth.models.components import Components
# Detection moved to .detect; these names stay importable from here for existing callers.
from dreambooth.models.detect import (CONFIG_ROOT, KEY_SD1_TEXT, KEY_SD2_TEXT,  # noqa: F401
                                      KEY_SDXL_TEXT1, KEY_SDXL_TEXT2, KEY_UNET_IN, KEY_V_PRED,
                                      KEY_VAE, KEY_ZTSNR, KINDS, LORA_MARKERS, READABLE_SUFFIXES,
                                      UNET_PREFIX, VAE_PREFIX, CheckpointError, ModelKind, _damaged,
                                      _kind_from_folder, _refuse_non_checkpoint, _refused_pickle,
                                      _require_file, _suffix, _torch_load, _with_kind,
                                      _yaml_prediction, describe, detect_kind, kind_from_shapes,
                                      read_metadata, read_safetensors_header, read_shapes)

V2_V_YAML = CONFIG_ROOT / "v2-inference-v.yaml"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

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

ARCHITECTURES = {  # modelspec.architecture values (Stability's model spec, shown by the WebUI)
    "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
    "flux-dev": "flux-1-dev", "flux-schnell": "flux-1-schnell"}
IMPLEMENTATIONS = {
    "sd1": "https://github.com/CompVis/stable-diffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sd2-v": "https://github.com/Stability-AI/stablediffusion",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "flux-dev": "https://github.com/black-forest-labs/flux",
    "flux-schnell": "https://github.com/black-forest-labs/flux"}
RESOLUTIONS = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024, "flux-dev": 1024,
               "flux-schnell": 1024}


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
        header = read_safetensors_header(base)  # bounded: never allocates a claimed length
    except (OSError, ValueError):  # CheckpointError too: the base check names the file
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
    kind = kind_from_shapes(shapes, path.name, prediction_type=prediction_type, yaml_path=path,
                            metadata=read_metadata(path))
    return write_config_folder(derive_configs(shapes, kind), kind, Path(dest))


# --------------------------------------------------------------------------------------------
# Tokenizers


def _pad_token(folder: Path) -> str:
    return _read_json(folder / "tokenizer_config.json").get("pad_token", "<|endoftext|>")


def _offline_tokenizer_dir(config_dir: Path) -> Path:
    from dreambooth.models.tokenizer import offline_tokenizer_dir

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
    from dreambooth.models.tokenizer import load_clip_tokenizer

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
                    kind: str | None = None, clip_path: str | os.PathLike | None = None,
                    t5_path: str | os.PathLike | None = None) -> tuple[Components, ModelKind]:
    """Load a single-file checkpoint or a diffusers folder into fp32 components, offline
    (``clip_path``, ``t5_path``: a Flux file's text encoders, when separate)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, prediction_type=prediction_type, vae_path=vae_path, kind=kind)
    if _suffix(path) == ".safetensors":  # a Flux file is told from its header, never read whole
        found = detect_kind(path)
        if found.family == "flux":
            from dreambooth.models.flux_files import load_flux

            return load_flux(path, vae_path=vae_path, clip_path=clip_path,
                             t5_path=t5_path), found
    state = read_state_dict(path)
    # the header's metadata too: a file may say it is v-prediction only there (kohya, modelspec)
    found = _with_kind(kind_from_shapes({k: tuple(v.shape) for k, v in state.items()}, path.name,
                                        prediction_type=prediction_type, yaml_path=path,
                                        metadata=read_metadata(path)), kind)
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
                     else _torch_load(file))
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
