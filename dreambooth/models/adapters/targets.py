"""Which layers of a model an adapter trains, by their diffusers module names.

The names are the ones kohya's sd-scripts derive its keys from (``lora_unet_`` + the module path
with ``.`` as ``_``), and the WebUI's built-in Lora extension maps exactly these back onto the
single-file checkpoint: attention (``to_q/k/v/out.0``, CLIP's ``q/k/v/out_proj`` — all four, which
OpenCLIP's fused attention needs), feed-forward and the transformer's in/out projections, and for
LoCon the ResNet blocks (3x3 convolutions at the conv rank, their 1x1 shortcut and time embedding at
the linear rank) with the down/up samplers.
"""
from __future__ import annotations

import re

import torch

# The text encoders' kohya prefixes: one encoder is "lora_te", SDXL's two are "lora_te1/2".
UNET_PREFIX = "lora_unet"

_UNET_ATTENTION = re.compile(
    r"(^|\.)attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_UNET_MLP = re.compile(
    r"(^|\.)attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))$")
_UNET_CONV = re.compile(
    r"(^|\.)(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(downsamplers|upsamplers)\.0\.conv)$")
_TEXT_ATTENTION = re.compile(r"(^|\.)self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TEXT_MLP = re.compile(r"(^|\.)mlp\.(fc1|fc2)$")


def prefixes(encoder_names: list[str]) -> dict[str, str]:
    """The kohya prefix of each component: ``unet`` and the text encoders in prompt order."""
    names = {"unet": UNET_PREFIX}
    if len(encoder_names) == 1:
        names[encoder_names[0]] = "lora_te"
    else:
        names.update({name: f"lora_te{i}" for i, name in enumerate(encoder_names, 1)})
    return names


def target_modules(model: torch.nn.Module, component: str, layers: str, convs: bool) -> list[str]:
    """The module paths inside ``model`` an adapter wraps (only Linear and Conv2d layers).

    ``layers``: "attention" or "attention_mlp"; ``convs``: also the ResNet convolutions (UNet).
    Flux's transformer: the layers kohya's fused names can hold (:mod:`..flux_layout`)."""
    if component == "unet" and type(model).__name__ == "FluxTransformer2DModel":
        from dreambooth.models.flux_layout import flux_target_modules

        return flux_target_modules(model, layers)
    if component == "unet":
        rules = [_UNET_ATTENTION] + ([_UNET_MLP] if layers == "attention_mlp" else [])
        rules += [_UNET_CONV] if convs else []
    else:
        rules = [_TEXT_ATTENTION] + ([_TEXT_MLP] if layers == "attention_mlp" else [])
    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(rule.search(name) for rule in rules) and not _unplaceable(model, name)]


def largest_useful_rank(model: torch.nn.Module, names: list[str]) -> int:
    """The highest rank that still adds anything on these layers: a rank-r update of a layer
    with n inputs or outputs holds at most rank min(n, r), so above the widest layer's smaller
    side the matrices only grow."""
    modules = dict(model.named_modules())
    sides = []
    for name in names:
        weight = modules[name].weight
        sides.append(min(weight.shape[0], weight[0].numel()))  # out, in (x kernel for convs)
    return max(sides, default=0)


def _unplaceable(model: torch.nn.Module, name: str) -> bool:
    """A layer the WebUI's Lora extension cannot find in the single file, so never trained:
    its name rule puts the first up block's upsampler after a ResNet (``output_blocks_2_1``),
    true for SD1.x/2.x but not SDXL, whose first up block has attentions (``output_blocks_2_2``)."""
    if name != "up_blocks.0.upsamplers.0.conv":
        return False
    first_up = getattr(model, "up_blocks", [None])[0]
    return getattr(first_up, "attentions", None) is not None


def kohya_name(prefix: str, module_path: str) -> str:
    """``lora_unet`` + ``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_...``."""
    return f"{prefix}_{module_path.replace('.', '_')}"
