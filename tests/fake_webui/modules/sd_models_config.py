"""``modules/sd_models_config.py``: which model config a checkpoint loads with, from its keys.

As A1111 1.10.1: a ``.yaml`` of the same name beside the file wins (``find_checkpoint_config``),
else ``guess_model_config_from_state_dict`` looks at a few keys: the second SDXL text encoder
(``conditioner.embedders.1.model.ln_final.weight``) means SDXL (``sd_xl_v.yaml`` when the file has
the ``v_pred`` marker key, the inpainting config with 9 UNet input channels), OpenCLIP's
``cond_stage_model.model.*`` with width 1024 means SD2.x, and anything else falls back to SD1.x
(``v1-inference.yaml``). The fake's "state dict" maps each key to its shape (read from the file's
header, no weights), so ``sd.get(key)`` and ``shape[1]`` read as in the real code. The real one
tells SD2 v models without a ``v_pred`` key by running its UNet once; the fake cannot, and says
``v2-inference.yaml`` (the extension writes a ``.yaml`` beside its SD2-v files, read first).
"""
from __future__ import annotations

import json
import os
import re
import struct

config_default = "v1-inference.yaml"
config_sd2 = "v2-inference.yaml"
config_sd2v = "v2-inference-v.yaml"
config_sd2_inpainting = "v2-inpainting-inference.yaml"
config_sdxl = "sd_xl_base.yaml"
config_sdxlv = "sd_xl_v.yaml"
config_sdxl_refiner = "sd_xl_refiner.yaml"
config_sdxl_inpainting = "sd_xl_inpaint.yaml"
config_inpainting = "v1-inpainting-inference.yaml"
config_instruct_pix2pix = "instruct-pix2pix.yaml"

SDXL_CONFIGS = (config_sdxl, config_sdxlv, config_sdxl_refiner, config_sdxl_inpainting)
SD2_CONFIGS = (config_sd2, config_sd2v, config_sd2_inpainting)
V_CONFIGS = (config_sd2v, config_sdxlv)


def read_state_dict_shapes(filename) -> dict:
    """fake only: key -> shape of a checkpoint, without its weights (a ``.safetensors`` header;
    a ``.ckpt`` through ``torch.load(weights_only=True)``). An unreadable file gives ``{}``, which
    loads as SD1.x (the real WebUI raises there; the fake's tests write files of one tensor)."""
    try:
        if str(filename).lower().endswith(".safetensors"):
            with open(filename, "rb") as file:
                length = struct.unpack("<Q", file.read(8))[0]
                header = json.loads(file.read(length))
            return {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__"}
        import torch

        data = torch.load(filename, map_location="cpu", weights_only=True)
        data = data.get("state_dict", data) if isinstance(data, dict) else {}
        return {k: list(getattr(v, "shape", [])) for k, v in data.items()}
    except Exception:
        return {}


def guess_model_config_from_state_dict(sd, filename):
    sd2_cond_proj_weight = sd.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", None)
    diffusion_model_input = sd.get("model.diffusion_model.input_blocks.0.0.weight", None)

    if sd.get("conditioner.embedders.1.model.ln_final.weight", None) is not None:
        if diffusion_model_input is not None and diffusion_model_input[1] == 9:
            return config_sdxl_inpainting
        elif "v_pred" in sd:
            return config_sdxlv
        else:
            return config_sdxl
    if sd.get("conditioner.embedders.0.model.ln_final.weight", None) is not None:
        return config_sdxl_refiner

    if sd2_cond_proj_weight is not None and sd2_cond_proj_weight[1] == 1024:
        if diffusion_model_input is not None and diffusion_model_input[1] == 9:
            return config_sd2_inpainting
        elif "v_pred" in sd:
            return config_sd2v
        else:
            return config_sd2

    if diffusion_model_input is not None:
        if diffusion_model_input[1] == 9:
            return config_inpainting
        if diffusion_model_input[1] == 8:
            return config_instruct_pix2pix

    return config_default


def find_checkpoint_config_near_filename(info):
    if info is None:
        return None
    config = f"{os.path.splitext(info.filename)[0]}.yaml"
    if os.path.exists(config):
        return config
    return None


def find_checkpoint_config(state_dict, info):
    if info is None:
        return guess_model_config_from_state_dict(state_dict, "")
    config = find_checkpoint_config_near_filename(info)
    if config is not None:
        return config
    return guess_model_config_from_state_dict(state_dict, info.filename)


def model_family(config: str) -> str:
    """fake only: "sdxl", "sd2" or "sd1" for a config, as instantiating it decides in the real
    WebUI (SDXL's DiffusionEngine has a ``conditioner``, SD2 an OpenCLIP ``cond_stage_model``).
    A ``.yaml`` beside the file is read for the same markers."""
    name = os.path.basename(config)
    if name in SDXL_CONFIGS:
        return "sdxl"
    if name in SD2_CONFIGS:
        return "sd2"
    if os.path.isfile(config):
        with open(config, encoding="utf-8", errors="replace") as file:
            text = file.read()
        if "conditioner_config" in text:
            return "sdxl"
        if "FrozenOpenCLIPEmbedder" in text:
            return "sd2"
    return "sd1"


def parameterization(config: str) -> str:
    """fake only: "v" or "eps", what the loaded model's ``parameterization`` says."""
    if os.path.basename(config) in V_CONFIGS:
        return "v"
    if os.path.isfile(config):
        with open(config, encoding="utf-8", errors="replace") as file:
            text = file.read()
        # ldm (SD1/2) configs say "parameterization: v", sgm (SDXL) ones use VScaling
        if re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", text, re.M) or "VScaling" in text:
            return "v"
    return "eps"
