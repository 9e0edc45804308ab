"""diffusers -> LDM (original single-file) key names for components without a base file: the
UNet, the VAE, OpenCLIP's fused attention, and the DDPM schedule buffers SD1.x/2.x files carry."""
from __future__ import annotations

import re
from typing import Mapping

import torch

from dreambooth.models.checkpoint import TEXT_PREFIXES, normalize_text_keys
from dreambooth.models.components import Components
from dreambooth.models.detect import UNET_PREFIX, VAE_PREFIX, CheckpointError, ModelKind

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
