"""The fake WebUI's stand-in for the WebUI's built-in Lora extension: how A1111 1.10
(``extensions-builtin/Lora``) puts a LoRA file's tensors onto the single-file model it runs.

Written from the extension's documented behaviour (``networks.py``: the kohya -> compvis name
conversion, the module lookup of ``load_network`` and the weight patch of
``network_apply_weights``; ``network_lora.py``, ``network_hada.py``, ``network_lokr.py``;
``network.py``: ``calc_scale``, ``finalize_updown``, ``apply_weight_decompose``), not copied:

- the WebUI names every module of the loaded model by its path with ``.`` as ``_``: the UNet's
  inside ``sd_model.model`` (``diffusion_model_input_blocks_1_1_proj_in``), SD1/SD2's text
  encoder inside ``cond_stage_model.wrapped`` (``transformer_text_model_…``,
  ``model_transformer_resblocks_…``), SDXL's two inside ``conditioner.embedders[i].wrapped`` with
  ``i_`` in front (``0_transformer_text_model_…``, ``1_model_transformer_resblocks_…``). Here the
  names come from the checkpoint's keys, the module being the key without its last part;
- a file key ``<network name>.<part>`` is converted to such a name (diffusers' block numbers to
  LDM's; ResNet ``conv1/conv2/time_emb_proj/conv_shortcut`` to ``in_layers_2/out_layers_3/
  emb_layers_1/skip_connection``; OpenCLIP's ``mlp_c_fc/mlp_c_proj/attn``), then looked up; a
  ``…_[qkv]_proj`` name that is not a module goes to its fused attention (``…_attn``, OpenCLIP's
  ``in_proj_weight``); ``lora_unet_…`` falls back to ``diffusion_model_…`` as written and
  ``lora_te1_text_model…`` to ``0_transformer_text_model…`` then ``transformer_text_model…``.
  The WebUI logs a key it cannot place at debug level and drops it; this fake raises KeyError
  naming it, so a test sees every key the WebUI would lose;
- per layer: ``lora`` = up @ down (convolutions flattened, reshaped to the layer's shape), LoHa
  = (w1a @ w1b) * (w2a @ w2b), LoKr = kron(w1, w2) (each side whole or ``_a @ _b``); the scale
  is alpha / dim with dim = ``lora_down``'s (LoHa: ``hada_w1_b``'s; LoKr: ``lokr_w2_b``'s, else
  ``lokr_w1_b``'s) first dimension, 1 when alpha or dim is missing; ``finalize_updown`` scales
  first (d = scale * update), then applies DoRA when ``dora_scale`` is there (the update becomes
  (W + d) * dora_scale / ||W + d|| - W, the norm per input column, ``dora_scale`` shaped
  (1, in[, 1, 1])), then multiplies by the multiplier: the new weight is W + multiplier * update;
- OpenCLIP's fused attention (``nn.MultiheadAttention``) takes q, k, v into the thirds of
  ``in_proj_weight`` and out_proj into ``out_proj.weight``, and only when all four are in the
  file (with fewer the WebUI silently applies none of them: here, an error);
- the WebUI's rule puts an up block's upsampler after the attention only from the second up
  block on (SD1/SD2's first has no attention); SDXL's first up block has one, so the WebUI finds
  no module for ``lora_unet_up_blocks_0_upsamplers_0_conv`` and drops it (here: KeyError).

Forge 2.0 applies LoRAs through its own backend; that path is not modelled here.

Deviations, on purpose: the UNet block numbers use the checkpoint's layers per block (inferred
from its keys), where the WebUI hard-codes 3 LDM blocks per level — the same for every real
SD1/SD2/SDXL model (2 layers per block), needed for the tiny test models (1). Everything is
computed in float32 (the WebUI computes LoRA in ``devices.dtype``, often fp16) and the result
cast back to the checkpoint's dtype. Forms this extension never writes (Tucker ``lora_mid`` /
``hada_t1`` / ``lokr_t2``, ``bias``, ``scale``, IA3, OFT, GLoRA, norms) are refused, not modelled.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

# where the WebUI's module names start in a single file (sd_model.model, cond_stage_model.wrapped)
_ROOTS = ("model.", "cond_stage_model.")
_EMBEDDER = re.compile(r"conditioner\.embedders\.(\d+)\.(.+)")

_RESNET_PARTS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                 "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}
_FUSED = re.compile(r"(.*)_([qkv]_proj)$")

LORA_PARTS = {"lora_up.weight", "lora_down.weight"}
HADA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
LOKR_PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
COMMON_PARTS = {"alpha", "dora_scale"}


@dataclass(frozen=True)
class Layer:
    """One module of the loaded model as the WebUI names it."""

    name: str  # network_layer_name: "diffusion_model_input_blocks_1_1_proj_in"
    path: str  # its key prefix in the file: "model.diffusion_model.input_blocks.1.1.proj_in"
    params: frozenset  # its tensors there: {"weight", "bias"}, {"in_proj_weight", ...}

    @property
    def fused_attention(self) -> bool:
        """OpenCLIP's nn.MultiheadAttention (q, k, v in one ``in_proj_weight``)."""
        return "in_proj_weight" in self.params


def layer_mapping(ldm_state) -> dict[str, Layer]:
    """The WebUI's ``network_layer_mapping`` for a single file's keys: name -> Layer."""
    params: dict[tuple[str, str], set[str]] = {}
    for key in ldm_state:
        module, _, param = key.rpartition(".")
        named = None
        embedder = _EMBEDDER.match(module)
        if embedder:
            named = f"{embedder.group(1)}_{embedder.group(2)}"
        else:
            for root in _ROOTS:
                if module.startswith(root):
                    named = module[len(root):]
                    break
        if named is not None:
            params.setdefault((named.replace(".", "_"), module), set()).add(param)
    mapping = {}
    for (name, path), found in params.items():
        if name in mapping:
            raise AssertionError(f"two modules would share the WebUI name {name}")
        mapping[name] = Layer(name, path, frozenset(found))
    return mapping


def layers_per_block(ldm_state) -> int:
    """The UNet's ResNets per down level, from its LDM input blocks (2 in SD1/SD2/SDXL)."""
    blocks = {int(m.group(1)) for k in ldm_state
              if (m := re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.", k))}
    downsamplers = {int(m.group(1)) for k in ldm_state
                    if (m := re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.", k))}
    if not blocks:
        raise KeyError("the checkpoint has no model.diffusion_model.input_blocks")
    levels = len(downsamplers) + 1
    per_block, rest = divmod(max(blocks) - len(downsamplers), levels)
    if rest or per_block < 1:
        raise ValueError(f"cannot tell the layers per block from {max(blocks) + 1} input blocks")
    return per_block


def compvis_name(key: str, is_sd2: bool, per_block: int = 2) -> str:
    """The WebUI's ``convert_diffusers_name_to_compvis``: a kohya network name -> the name of a
    module of the loaded model (unchanged when no rule applies). ``per_block``: layers per block,
    2 being the WebUI's fixed assumption (3 LDM blocks per level)."""
    step = per_block + 1
    num = int
    if m := re.match(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m.group(1)}"
    if m := re.match(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m.group(1)}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{num(m.group(1)) * 2 - 2}{m.group(2)}"
    if m := re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        where, level, kind, index, rest = m.groups()
        rest = _RESNET_PARTS.get(rest, rest) if kind == "resnets" else rest
        block = num(level) * step + num(index) + (1 if where == "down" else 0)
        side = "input_blocks" if where == "down" else "output_blocks"
        return f"diffusion_model_{side}_{block}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, index, rest = m.groups()
        if kind == "resnets":
            rest = _RESNET_PARTS.get(rest, rest)
            return f"diffusion_model_middle_block_{num(index) * 2}_{rest}"
        return f"diffusion_model_middle_block_1_{rest}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{(num(m.group(1)) + 1) * step}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        level = num(m.group(1))
        # the WebUI assumes the first up level has no attention (true for SD1/SD2, not SDXL)
        after = 2 if level > 0 else 1
        return f"diffusion_model_output_blocks_{level * step + per_block}_{after}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            return f"model_transformer_resblocks_{m.group(1)}_{_openclip(m.group(2))}"
        return f"transformer_text_model_encoder_layers_{m.group(1)}_{m.group(2)}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"1_model_transformer_resblocks_{m.group(1)}_{_openclip(m.group(2))}"
    return key


def _openclip(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def find_layer(network_name: str, mapping: dict[str, Layer], *, is_sd2: bool,
               per_block: int = 2) -> tuple[str, Layer]:
    """``load_network``'s lookup of one network name: (the key the WebUI files its weights under,
    the module they change). KeyError where the WebUI finds nothing (it would drop the layer)."""
    key = compvis_name(network_name, is_sd2, per_block)
    layer = mapping.get(key)
    if layer is None and (fused := _FUSED.match(key)):
        layer = mapping.get(fused.group(1))
    if layer is None and "lora_unet" in network_name:
        key = network_name.replace("lora_unet", "diffusion_model")
        layer = mapping.get(key)
    elif layer is None and "lora_te1_text_model" in network_name:
        key = network_name.replace("lora_te1_text_model", "0_transformer_text_model")
        layer = mapping.get(key)
        if layer is None:
            key = network_name.replace("lora_te1_text_model", "transformer_text_model")
            layer = mapping.get(key)
    if layer is None:
        raise KeyError(f"the WebUI finds no layer for {network_name!r} (converted to {key!r}); "
                       "it would drop these weights")
    return key, layer


def group_file(tensors) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA file's tensors by network name: name -> {part: tensor} (the split at the first
    ``.``, as ``load_network`` makes it)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, dot, part = key.partition(".")
        if not dot:
            raise KeyError(f"{key!r} is not <network name>.<part>")
        grouped.setdefault(name, {})[part] = value
    return grouped


@dataclass
class Target:
    """Where one network name's update lands: a tensor of the single file, or rows of it."""

    network_name: str
    key: str  # the WebUI's key for it
    layer: Layer
    weights: dict
    ldm_key: str  # the tensor it changes
    rows: slice | None = None  # fused attention: the third of in_proj_weight


def targets(ldm_state, tensors, *, per_block: int | None = None) -> dict[str, Target]:
    """Every network name of a LoRA file -> the tensor of ``ldm_state`` the WebUI changes with it.
    KeyError for a name it cannot place; ValueError for a layer it would not change."""
    mapping = layer_mapping(ldm_state)
    is_sd2 = any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in ldm_state)
    per_block = layers_per_block(ldm_state) if per_block is None else per_block
    found: dict[str, Target] = {}
    by_key: dict[str, str] = {}
    for name, weights in group_file(tensors).items():
        key, layer = find_layer(name, mapping, is_sd2=is_sd2, per_block=per_block)
        if key in by_key:
            raise AssertionError(f"{name} and {by_key[key]} both land on the WebUI key {key}")
        by_key[key] = name
        found[name] = Target(name, key, layer, weights, f"{layer.path}.weight")
    # nn.MultiheadAttention: the WebUI patches it (in_proj_weight's thirds and out_proj.weight)
    # only with q, k, v and out_proj all present; its out_proj Linear is never called on its own
    fused: dict[str, dict[str, Target]] = {}
    for target in found.values():
        if target.layer.fused_attention:
            part = target.key[len(target.layer.name) + 1:]  # "q_proj" ...
            fused.setdefault(target.layer.name, {})[part] = target
        elif target.layer.name.endswith("_out_proj"):
            parent = mapping.get(target.layer.name[:-len("_out_proj")])
            if parent is not None and parent.fused_attention:
                fused.setdefault(parent.name, {})["out_proj"] = target
    for attention, parts in fused.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj", "out_proj"}:
            raise ValueError(f"{attention}: the WebUI applies a fused attention's LoRA only with "
                             f"q_proj, k_proj, v_proj and out_proj all present (has "
                             f"{sorted(parts)}); it would silently apply none of them")
        in_proj = f"{mapping[attention].path}.in_proj_weight"
        rows = ldm_state[in_proj].shape[0] // 3
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            parts[part].ldm_key = in_proj
            parts[part].rows = slice(i * rows, (i + 1) * rows)
    for target in found.values():
        if target.ldm_key not in ldm_state:
            raise ValueError(f"{target.network_name}: the WebUI layer {target.layer.name} has no "
                             "weight to change")
        if target.layer.path.endswith("embedding"):
            raise ValueError(f"{target.network_name}: lands on an embedding, which the WebUI's "
                             "LoRA module refuses")
        if target.rows is None and ldm_state[target.ldm_key].dim() not in (2, 4):
            raise ValueError(f"{target.network_name}: {target.ldm_key} is neither a Linear nor a "
                             "Conv2d weight (the norm modules are not modelled)")
    return found


def _product(a, b):
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def updown(weights: dict, weight: torch.Tensor) -> torch.Tensor:
    """The change one network name makes to ``weight`` at multiplier 1 (float32)."""
    parts = set(weights)
    unknown = parts - LORA_PARTS - HADA_PARTS - LOKR_PARTS - COMMON_PARTS
    if unknown:
        raise KeyError(f"parts the fake does not model: {sorted(unknown)}")
    w = {k: v.float() for k, v in weights.items()}
    base = weight.float()
    if LORA_PARTS <= parts:
        dim = w["lora_down.weight"].shape[0]
        delta = _product(w["lora_up.weight"], w["lora_down.weight"])
    elif HADA_PARTS <= parts:
        dim = w["hada_w1_b"].shape[0]
        delta = _product(w["hada_w1_a"], w["hada_w1_b"]) * _product(w["hada_w2_a"], w["hada_w2_b"])
    elif ("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts) and \
            ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts):
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else (
            w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2.contiguous())
    else:
        raise KeyError(f"no LoRA kind the WebUI knows takes the parts {sorted(parts)}")
    if delta.numel() != base.numel():
        raise ValueError(f"the update has {tuple(delta.shape)} values for a weight of "
                         f"{tuple(base.shape)}")
    delta = delta.reshape(base.shape)
    alpha = w["alpha"].item() if "alpha" in w else None
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    delta = delta * scale
    if "dora_scale" in w:
        merged = base + delta
        columns = merged.shape[1]
        norm = merged.transpose(0, 1).reshape(columns, -1).norm(dim=1)
        norm = norm.reshape(1, columns, *[1] * (merged.dim() - 2))
        if tuple(w["dora_scale"].shape) != tuple(norm.shape):
            raise ValueError(f"dora_scale {tuple(w['dora_scale'].shape)}: the WebUI normalises per "
                             f"input column and needs {tuple(norm.shape)} (a per-output "
                             "magnitude would broadcast into a wrong update)")
        delta = merged * (w["dora_scale"] / norm) - base
    return delta


def apply_lora(ldm_state, lora_path: str | os.PathLike, multiplier: float
               ) -> dict[str, torch.Tensor]:
    """The single file's weights with the LoRA applied as ``<lora:name:multiplier>`` does:
    a new dict (untouched tensors are the input's own objects; changed ones are new tensors in
    their dtype); ``ldm_state`` itself is not modified."""
    from safetensors.torch import load_file

    tensors = load_file(str(lora_path))
    out = dict(ldm_state)
    changes: dict[str, torch.Tensor] = {}
    for target in targets(ldm_state, tensors).values():
        weight = ldm_state[target.ldm_key]
        if target.rows is not None:
            delta = updown(target.weights, weight[target.rows])
            whole = changes.setdefault(target.ldm_key, torch.zeros(weight.shape))
            whole[target.rows] += delta
        else:
            changes[target.ldm_key] = updown(target.weights, weight)
    for key, delta in changes.items():
        weight = ldm_state[key]
        out[key] = (weight.float() + delta * multiplier).to(weight.dtype)
    return out
