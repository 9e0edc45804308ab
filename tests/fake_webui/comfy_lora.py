"""The fake WebUI's stand-in for the LoRA loaders of lllyasviel's Forge and of Forge Neo: how
they put a LoRA file onto the model they loaded from a single file. Both use ComfyUI's rules
(Forge a 2024 copy of them, Neo a copy of ComfyUI v0.3.77's); this module is written from those
sources, not copied (commits in ``README.md``):

- Forge: ``backend/patcher/lora.py`` (``merge_lora_to_weight``, ``weight_decompose``, the
  ``LoraLoader``), ``packages_3rdparty/comfyui_lora_collection/lora.py`` (``load_lora``,
  ``model_lora_keys_unet``, ``model_lora_keys_clip``), its ``utils.py`` (``unet_to_diffusers``,
  ``transformers_convert``) and ``extensions-builtin/sd_forge_lora/networks.py``
  (``load_lora_for_models``);
- Neo: ``modules_forge/packages/comfy/lora.py``, ``backend/patcher/lora.py``,
  ``extensions-builtin/sd_forge_lora/networks.py``, ``modules_forge/packages/huggingface_guess``
  (``detection.py``, ``model_list.py``), and ComfyUI's ``comfy/weight_adapter`` (``base.py``,
  ``lora.py``, ``loha.py``, ``lokr.py``), which Neo vendors.

The rules, as both hosts have them:

- **The loaded model** (``loaded_model``): the UNet keeps the LDM layout under
  ``diffusion_model.``; the text encoders are ``transformers`` CLIP models: SD1's and SDXL's
  CLIP ViT-L under ``clip_l.transformer.text_model.…``, SDXL's OpenCLIP bigG converted to the
  same layout under ``clip_g.transformer.…`` (``ln_1``/``ln_2``/``mlp.c_fc``/``mlp.c_proj``/
  ``attn.out_proj`` renamed, ``attn.in_proj_weight`` cut into separate ``q_proj``/``k_proj``/
  ``v_proj`` weights, ``text_projection`` transposed);
- **The key map** (``unet_key_map``, ``clip_key_map``): from the loaded model's own weight names
  (``lora_unet_`` + the LDM path with ``_``; the bare path), and from the diffusers names of a
  UNet layout *detected from the weights* (levels, ResNets per level, transformer depth of every
  input block, output block and the middle: ``unet_layout``): ``lora_unet_``/``lycoris_`` + the
  diffusers path with ``_``, the diffusers dotted path with ``.processor.to_…``. Text encoders:
  for each of 32 layers the six modules ``mlp.fc1/fc2``, ``self_attn.q/k/v/out_proj``:
  ``lora_te_`` and ``lora_te1_`` -> CLIP-L (or CLIP-H), ``lora_te2_`` -> bigG when a CLIP-L is
  there (else ``lora_te_``), plus the diffusers ``text_encoder(_2).text_model…`` names;
- **Loading** (``load_lora``): for every name of the map, ``<name>.alpha`` and
  ``<name>.dora_scale``, then LoRA (``lora_up.weight``/``lora_down.weight``, or the diffusers
  spellings), LoHa (``hada_w1_a``…), LoKr (``lokr_w1`` or ``lokr_w1_a``/``_b``, ``lokr_w2`` or
  ``lokr_w2_a``/``_b``); file keys no name takes are "unmatched" (``unloaded`` here);
- **The patch** (``merge``), in float32 then cast back to the weight's dtype: LoRA d = up @ down
  (flattened), scale alpha / down's rank; LoHa d = (w1a @ w1b) * (w2a @ w2b), scale alpha /
  w1b's rank; LoKr d = kron(w1, w2) (w1 gets two trailing 1-dims when w2 is 4-D), scale alpha /
  rank, the rank being w2_b's when w2 is factored, else w1_b's, and scale 1 when neither is (or
  without alpha); d is reshaped to the weight. Without DoRA: W + (strength * scale) * d. With
  ``dora_scale`` (``weight_decompose``): W' = (W + scale * d) * dora_scale / (||W + scale * d||
  + eps), the norm per input column when dora_scale's first dimension differs from the weight's
  (our files: (1, in[, 1, 1])), else per output row *of W itself* (ComfyUI's own choice); then
  W + strength * (W' - W), or W' exactly at strength 1. eps is float32's machine epsilon.

Where Forge and Neo differ (``host=``):

- giving up on a whole file: Forge when more than 12 file keys are unmatched ("LoRA version
  mismatch", nothing applied); Neo when more than half of them are;
- giving up on the UNet's or the text encoders' part: Forge when more than 12 mapped names have
  no weight in the loaded model; Neo when more than a quarter have;
- the key map: Neo adds ``text_encoders.<weight path>`` for every text-encoder weight; Forge
  adds ``lora_te1_text_projection``/``lora_te2_text_projection`` (OneTrainer); neither matters
  for our files;
- an update whose size does not fit the weight: Forge pads the weight or the update (Flux
  tools), Neo logs an error and leaves the weight; here both raise, since for our files either
  is a lost update.

Deliberate differences: errors instead of the hosts' log lines (a shape that does not fit, a
Tucker/GLoRA/OFT/diff/norm form this fake does not model); a fresh key map per call (both hosts
pass a shared mutable default ``key_map={}``, so names of an earlier model stay in the map);
the SD2 (OpenCLIP-H) and refiner text encoders are not modelled.

Flux (``loaded_flux_model``, ``flux_unet_key_map``; the same files, plus ComfyUI's
``model_detection.py`` as vendored by both): the transformer keeps BFL's layout under
``diffusion_model.`` (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``…), CLIP-L is
``clip_l.transformer.…``, T5 ``t5xxl.transformer.…``. The key map is the generic one from the
model's own weights (so kohya's ``lora_unet_double_blocks_0_img_attn_qkv`` is the whole fused
weight), no ``lora_unet_`` + diffusers names (``unet_to_diffusers`` returns nothing for Flux),
and ``flux_to_diffusers``' diffusers forms (``transformer.<path>``, ``lycoris_<path_>``,
``lora_transformer_<path_>``) whose q/k/v/proj_mlp targets are rows of the fused weight
(``Slice``: ComfyUI's ``(key, (dim, start, size))``, hidden_size fixed at 3072 by the hosts'
detection) and whose final AdaLN target swaps the update's halves; Neo adds
``…single_blocks.N.linear1_qkv``. T5: ``lora_te3_`` (and ``lora_te2_``: Forge always, Neo when
CLIP-L is the only CLIP). The BFL "control" LoRA form (``img_in.lora_A.weight``) is not modelled.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

HOSTS = ("forge", "neo")
UNET = "diffusion_model."

# ---------------------------------------------------------------------------------------------
# The loaded model: a single file's tensors under the names the host's modules give them
# ---------------------------------------------------------------------------------------------

_OPENCLIP_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                     "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.([a-z_]+)$")


def loaded_model(ldm_state) -> dict[str, torch.Tensor]:
    """The UNet and text-encoder tensors of a single file (SD1 or SDXL) as the host's model
    holds them: the names its LoRA key map is built from and its patches are applied to. Values
    are the input's tensors (the bigG q/k/v thirds are views of ``in_proj_weight``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in ldm_state.items():
        if key.startswith("model." + UNET):
            out[key[len("model."):]] = value
        elif key.startswith("cond_stage_model.transformer."):  # SD1: CLIP ViT-L
            rest = key[len("cond_stage_model.transformer."):]
            if not rest.startswith("text_model."):
                rest = "text_model." + rest  # old files: no text_model level
            out["clip_l.transformer." + rest] = value
        elif key.startswith("conditioner.embedders.0.transformer.text_model."):  # SDXL: ViT-L
            out["clip_l." + key[len("conditioner.embedders.0."):]] = value
        elif key.startswith("conditioner.embedders.1.model."):  # SDXL: OpenCLIP bigG
            out.update(_openclip_as_transformers(key[len("conditioner.embedders.1.model."):],
                                                 value, "clip_g.transformer."))
        elif key.startswith(("cond_stage_model.model.", "conditioner.embedders.0.model.")):
            raise NotImplementedError("SD2's and the refiner's OpenCLIP are not modelled")
    return out


def _openclip_as_transformers(rest: str, value: torch.Tensor, prefix: str
                              ) -> dict[str, torch.Tensor]:
    """One OpenCLIP tensor in the ``transformers`` CLIP layout the hosts convert it to (their
    ``clip_text_transformers_convert``): ``in_proj`` cut into q, k, v thirds (views)."""
    text = prefix + "text_model."
    simple = {"positional_embedding": "embeddings.position_embedding.weight",
              "token_embedding.weight": "embeddings.token_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight",
              "ln_final.bias": "final_layer_norm.bias"}
    if rest in simple:
        return {text + simple[rest]: value}
    if rest == "text_projection":  # stored for x @ P; the Linear wants P^T
        return {prefix + "text_projection.weight": value.transpose(0, 1).contiguous()}
    found = _RESBLOCK.match(rest)
    if not found:
        return {}  # logit_scale and the like: not part of the loaded text model
    layer, module, param = found.groups()
    where = f"{text}encoder.layers.{layer}."
    if module == "attn" and param in ("in_proj_weight", "in_proj_bias"):
        third = value.shape[0] // 3
        kind = param[len("in_proj_"):]
        return {f"{where}self_attn.{p}_proj.{kind}": value[i * third:(i + 1) * third]
                for i, p in enumerate("qkv")}
    if module in _OPENCLIP_RENAMES and param in ("weight", "bias"):
        return {f"{where}{_OPENCLIP_RENAMES[module]}.{param}": value}
    raise KeyError(f"unexpected OpenCLIP tensor {rest!r}")


# ---------------------------------------------------------------------------------------------
# (a) The key map: LoRA names -> weight names of the loaded model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnetLayout:
    """What the host's detection reads off the UNet's weights (and ``unet_to_diffusers`` uses)."""

    num_res_blocks: tuple[int, ...]  # ResNets per level
    transformer_depth: tuple[int, ...]  # per input ResNet block, in order
    transformer_depth_output: tuple[int, ...]  # per output block, in order
    transformer_depth_middle: int  # 0: no middle attention


def _count(keys: list[str], pattern: str) -> int:
    """How many of ``pattern.format(0)``, ``pattern.format(1)``, ... start some key."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in keys):
        n += 1
    return n


def unet_layout(state) -> UnetLayout:
    """The UNet's layout from its LDM weights, as the hosts' ``detect_unet_config`` finds it:
    a level ends at a downsampler (``input_blocks.N.0.op``); each block's depth is the number of
    ``N.1.transformer_blocks.T``."""
    keys = [k[len(UNET):] for k in state if k.startswith(UNET)]
    if "input_blocks.0.0.weight" not in keys:
        raise KeyError("the loaded model has no diffusion_model.input_blocks.0.0.weight")

    def depth(block: str) -> int:
        return _count(keys, block + "1.transformer_blocks.{}.")

    per_level, res_blocks, depths = 0, [], []
    for n in range(1, _count(keys, "input_blocks.{}.")):
        block = f"input_blocks.{n}."
        if any(k.startswith(block + "0.op.") for k in keys):
            res_blocks.append(per_level)
            per_level = 0
        elif any(k.startswith(block + "0.in_layers.") for k in keys):
            per_level += 1
            depths.append(depth(block))
    res_blocks.append(per_level)
    outputs = tuple(depth(f"output_blocks.{n}.") for n in range(_count(keys, "output_blocks.{}.")))
    middle = depth("middle_block.") if any(k.startswith("middle_block.1.proj_in.")
                                           for k in keys) else 0
    return UnetLayout(tuple(res_blocks), tuple(depths), outputs, middle)


_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_ATTENTION = ("proj_in", "proj_out", "norm")
_TRANSFORMER = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v",
                "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ff.net.0.proj", "ff.net.2")
_BASIC = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
          "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def diffusers_unet_modules(layout: UnetLayout) -> dict[str, str]:
    """Diffusers module path -> LDM module path for every module with a weight the layout
    implies (``unet_to_diffusers``; mapped whether or not the model has it, e.g. a shortcut)."""
    out: dict[str, str] = {}

    def attention(src: str, dst: str, depth: int) -> None:
        if depth <= 0:
            return
        out.update({f"{src}.{p}": f"{dst}.{p}" for p in _ATTENTION})
        out.update({f"{src}.transformer_blocks.{t}.{p}": f"{dst}.transformer_blocks.{t}.{p}"
                    for t in range(depth) for p in _TRANSFORMER})

    depths = list(layout.transformer_depth)
    for level, count in enumerate(layout.num_res_blocks):
        block = 1 + (count + 1) * level
        for i in range(count):
            out.update({f"down_blocks.{level}.resnets.{i}.{d}": f"input_blocks.{block}.0.{l}"
                        for d, l in _RESNET.items()})
            attention(f"down_blocks.{level}.attentions.{i}", f"input_blocks.{block}.1",
                      depths.pop(0))
            block += 1
        out[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
    attention("mid_block.attentions.0", "middle_block.1", layout.transformer_depth_middle)
    for i, block in enumerate((0, 2)):
        out.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{block}.{l}"
                    for d, l in _RESNET.items()})
    outputs = list(layout.transformer_depth_output)
    block = 0
    for level, count in enumerate(reversed(layout.num_res_blocks)):
        for i in range(count + 1):
            out.update({f"up_blocks.{level}.resnets.{i}.{d}": f"output_blocks.{block}.0.{l}"
                        for d, l in _RESNET.items()})
            depth = outputs.pop(0)
            attention(f"up_blocks.{level}.attentions.{i}", f"output_blocks.{block}.1", depth)
            if i == count:  # the upsampler comes after the block's attention, if it has one
                out[f"up_blocks.{level}.upsamplers.0.conv"] = \
                    f"output_blocks.{block}.{2 if depth > 0 else 1}.conv"
            block += 1
    out.update(_BASIC)
    return out


def generic_unet_names(state) -> dict[str, str]:
    """The names every model gets from its own weights: ``lora_unet_`` + the path with ``_``,
    and the bare path (the "generic" format); other tensors under their own key."""
    key_map: dict[str, str] = {}
    for key in state:
        if key.startswith(UNET):
            if key.endswith(".weight"):
                path = key[len(UNET):-len(".weight")]
                key_map["lora_unet_" + path.replace(".", "_")] = key
                key_map[key[:-len(".weight")]] = key  # the generic format: the bare path
            else:
                key_map[key] = key
    return key_map


def unet_key_map(state) -> dict[str, str]:
    """``model_lora_keys_unet`` for SD1/SDXL: every LoRA name -> the loaded model's weight."""
    key_map = generic_unet_names(state)
    for diffusers, ldm in diffusers_unet_modules(unet_layout(state)).items():
        target = f"{UNET}{ldm}.weight"
        flat = diffusers.replace(".", "_")
        key_map["lora_unet_" + flat] = target
        key_map["lycoris_" + flat] = target  # SimpleTuner
        dotted = diffusers.replace(".to_", ".processor.to_")
        if dotted.endswith(".to_out.0"):
            dotted = dotted[:-len(".0")]
        key_map[dotted] = key_map["unet." + dotted] = target  # diffusers' own LoRA names
    return key_map


_CLIP_MODULES = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2",
                 "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def clip_key_map(state, host: str) -> dict[str, str]:
    """``model_lora_keys_clip`` for the CLIP encoders: every LoRA name -> the weight."""
    _check_host(host)
    key_map: dict[str, str] = {}
    if host == "neo":  # the generic format: text_encoders.<weight path>
        key_map.update({f"text_encoders.{k[:-len('.weight')]}": k for k in state
                        if k.endswith(".weight") and not k.startswith(UNET)})
    clip_l = False
    for layer in range(32):
        for module, flat in _CLIP_MODULES.items():
            kohya = f"text_model_encoder_layers_{layer}_{flat}"
            diffusers = f"text_model.encoder.layers.{layer}.{module}"
            for encoder in ("clip_h", "clip_l"):
                key = f"{encoder}.transformer.text_model.encoder.layers.{layer}.{module}.weight"
                if key in state:
                    key_map["lora_te_" + kohya] = key_map["lora_te1_" + kohya] = key
                    key_map["text_encoder." + diffusers] = key
                    clip_l = clip_l or encoder == "clip_l"
            key = f"clip_g.transformer.text_model.encoder.layers.{layer}.{module}.weight"
            if key in state and clip_l:  # SDXL base: the second encoder
                key_map["lora_te2_" + kohya] = key_map["text_encoder_2." + diffusers] = key
            elif key in state:  # bigG alone (the refiner)
                key_map["lora_te_" + kohya] = key_map["text_encoder." + diffusers] = key
                key_map["lora_prior_te_" + kohya] = key
    t5_names = ["lora_te3_"]  # T5-XXL (SD3, Flux): kohya's lora_te3_; lora_te2_ is OneTrainer's
    if host == "forge" or (clip_l and not any(k.startswith("clip_g.") for k in state)):
        t5_names.append("lora_te2_")  # Forge: always; Neo: when CLIP-L is its only CLIP
    for key in state:
        if key.startswith("t5xxl.transformer.") and key.endswith(".weight"):
            flat = key[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")
            key_map.update({name + flat: key for name in t5_names})
    if host == "forge":  # OneTrainer's projection names
        if "clip_g.transformer.text_projection.weight" in state:
            key_map["text_encoder.text_projection"] = key_map["lora_te2_text_projection"] = \
                "clip_g.transformer.text_projection.weight"
        if "clip_l.transformer.text_projection.weight" in state:
            key_map["lora_te1_text_projection"] = "clip_l.transformer.text_projection.weight"
    return key_map


# ---------------------------------------------------------------------------------------------
# (b) Loading a file's adapters by name
# ---------------------------------------------------------------------------------------------

_LORA_SPELLINGS = (  # (up, down): kohya first, then diffusers/PEFT/transformers (+ Neo's two)
    (".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"))
_NEO_ONLY = {(".lora_B", ".lora_A"), (".lora_B.default.weight", ".lora_A.default.weight")}
_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
_NOT_MODELLED = ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2", "a1.weight", "w_norm",
                 "b_norm", "diff", "diff_b", "set_weight", "oft_blocks", "oft_diag",
                 "reshape_weight")


@dataclass
class Adapter:
    """One name's update as the host keeps it: the kind, its factors, alpha, DoRA's scale."""

    kind: str  # "lora" | "loha" | "lokr"
    name: str  # the LoRA name it was found under
    parts: dict[str, torch.Tensor]  # "up"/"down"; "hada_w1_a"...; "lokr_w1"/"lokr_w2_a"...
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None


def load_lora(tensors, key_map: dict[str, str], host: str
              ) -> tuple[dict[str, Adapter], dict[str, torch.Tensor]]:
    """``load_lora``: (weight name -> its adapter, the file keys no name took). A later kind
    found under the same name replaces an earlier one, as in both hosts."""
    _check_host(host)
    patches: dict[str, Adapter] = {}
    taken: set[str] = set()
    for name, target in key_map.items():
        alpha = dora = None
        if f"{name}.alpha" in tensors:
            alpha = tensors[f"{name}.alpha"].item()
            taken.add(f"{name}.alpha")
        if f"{name}.dora_scale" in tensors:
            dora = tensors[f"{name}.dora_scale"]
            taken.add(f"{name}.dora_scale")
        for up, down in _LORA_SPELLINGS:
            if (up, down) in _NEO_ONLY and host != "neo":
                continue
            if name + up in tensors:
                factors = {"up": tensors[name + up], "down": tensors[name + down]}
                patches[target] = Adapter("lora", name, factors, alpha, dora)
                taken.update((name + up, name + down))
                break
        if f"{name}.hada_w1_a" in tensors:
            parts = {p: tensors[f"{name}.{p}"] for p in _HADA}
            patches[target] = Adapter("loha", name, parts, alpha, dora)
            taken.update(f"{name}.{p}" for p in _HADA)
        lokr = {p: tensors[f"{name}.{p}"] for p in _LOKR if f"{name}.{p}" in tensors}
        if lokr:
            taken.update(f"{name}.{p}" for p in lokr)
        if {"lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"} & set(lokr):
            patches[target] = Adapter("lokr", name, lokr, alpha, dora)
        odd = [p for p in _NOT_MODELLED if f"{name}.{p}" in tensors]
        if odd:
            raise NotImplementedError(f"{name}: the host would load {odd}; this fake does not "
                                      "model those forms")
    return patches, {k: v for k, v in tensors.items() if k not in taken}


# ---------------------------------------------------------------------------------------------
# (c) The patch
# ---------------------------------------------------------------------------------------------


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.float().flatten(start_dim=1)


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """LoKr's product (a name of its own so that a test can break it)."""
    return torch.kron(w1, w2)


def update(adapter: Adapter) -> tuple[torch.Tensor, float]:
    """(d, scale) of one adapter in float32, d not yet reshaped to the weight."""
    p = adapter.parts
    if adapter.kind == "lora":
        return _flat(p["up"]) @ _flat(p["down"]), scale(adapter.alpha, p["down"].shape[0])
    if adapter.kind == "loha":
        d = (p["hada_w1_a"].float() @ p["hada_w1_b"].float()) * \
            (p["hada_w2_a"].float() @ p["hada_w2_b"].float())
        return d, scale(adapter.alpha, p["hada_w1_b"].shape[0])
    rank = None  # LoKr: the rank of a factored side, w2's winning when both are
    if "lokr_w1" in p:
        w1 = p["lokr_w1"].float()
    else:
        rank = p["lokr_w1_b"].shape[0]
        w1 = p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()
    if "lokr_w2" in p:
        w2 = p["lokr_w2"].float()
    else:
        rank = p["lokr_w2_b"].shape[0]
        w2 = p["lokr_w2_a"].float() @ p["lokr_w2_b"].float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return kron(w1, w2), scale(adapter.alpha, rank)


def scale(alpha: float | None, rank: int | None) -> float:
    """alpha / rank; 1 without alpha (or, LoKr, with neither side factored)."""
    return alpha / rank if alpha is not None and rank is not None else 1.0


def weight_decompose(dora_scale: torch.Tensor, weight: torch.Tensor, d: torch.Tensor,
                     alpha: float, strength: float) -> torch.Tensor:
    """DoRA as the hosts merge it (float32 ``weight``; returns a new tensor)."""
    calc = weight + d * alpha
    magnitude = dora_scale.float()
    if magnitude.shape[0] == calc.shape[0]:  # per output row, of the base weight (ComfyUI's)
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:  # per input column of W + d
        columns = calc.shape[1]
        norm = calc.transpose(0, 1).reshape(columns, -1).norm(dim=1)
        norm = norm.reshape(1, columns, *[1] * (calc.dim() - 2))
    calc = calc * (magnitude / (norm + torch.finfo(weight.dtype).eps))
    return calc if strength == 1.0 else weight + strength * (calc - weight)


def merge(weight: torch.Tensor, patches: list[tuple], key: str = "weight") -> torch.Tensor:
    """``merge_lora_to_weight``: ``weight`` with each (strength, adapter[, target]) applied in
    turn, in float32, returned in the weight's dtype (a new tensor; ``weight`` is not modified).
    A ``Slice`` target patches only its rows (``narrow``) and passes the update through its
    function first, as the hosts do with ComfyUI's (key, offset, function) targets."""
    out = weight.float().clone()
    for strength, adapter, *where in patches:
        where = where[0] if where and isinstance(where[0], Slice) else None
        view = out if where is None or where.offset is None else out.narrow(*where.offset)
        d, s = update(adapter)
        if d.numel() != view.numel():
            raise ValueError(f"{adapter.name}: an update of {tuple(d.shape)} for {key} "
                             f"{tuple(view.shape)}: Forge would pad, Neo would leave the weight")
        d = d.reshape(view.shape)
        if adapter.dora_scale is not None and where is not None:
            raise NotImplementedError(f"{adapter.name}: DoRA on a part of {key} is not modelled")
        if adapter.dora_scale is not None:
            out = weight_decompose(adapter.dora_scale, out, d, s, strength)
        else:
            delta = (strength * s) * d
            view += swap_scale_shift(delta) if where and where.function else delta
    return out.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# The whole file onto the loaded model (``load_lora_for_models``)
# ---------------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where a file's adapters go, and what the host would not load."""

    unet: dict[str, Adapter]  # weight name -> adapter
    clip: dict[str, Adapter]
    unloaded: list[str]  # file keys no map name took (the hosts' "unmatched keys")
    skipped: list[str]  # weight names mapped to that the loaded model does not have
    file_keys: int = 0

    @property
    def targets(self) -> dict[str, Adapter]:
        return {**self.unet, **self.clip}


def place(state, tensors, *, host: str) -> Placement:
    """The UNet's names first, then the text encoders' from what is left, as both hosts do."""
    unet_map = flux_unet_key_map(state, host) if is_flux(state) else unet_key_map(state)
    unet, rest = load_lora(tensors, unet_map, host)
    clip, rest = load_lora(rest, clip_key_map(state, host), host)
    skipped = sorted({weight_key(k) for k in (*unet, *clip)} - set(state))
    return Placement(unet, clip, sorted(rest), skipped, len(tensors))


@dataclass
class Applied:
    """The loaded model after ``<lora:name:strength>``."""

    state: dict[str, torch.Tensor]
    placement: Placement
    dropped: list[str] = field(default_factory=list)  # "file", "unet", "clip": not applied

    @property
    def touched(self) -> set[str]:
        return {weight_key(k) for k in self.placement.targets} & set(self.state)


def refused(placement: Placement, host: str) -> list[str]:
    """What the host refuses to apply at all: the file (too many unmatched keys), or the UNet's
    or the text encoders' part (too many mapped names without a weight)."""
    _check_host(host)
    unmatched = len(placement.unloaded)
    if (unmatched > 12) if host == "forge" else (unmatched / max(placement.file_keys, 1) > 0.5):
        return ["file"]
    out = []
    for part, patches in (("unet", placement.unet), ("clip", placement.clip)):
        missing = sum(weight_key(k) in placement.skipped for k in patches)
        if patches and ((missing > 12) if host == "forge" else (missing / len(patches) > 0.25)):
            out.append(part)
    return out


def apply_lora(state, lora, strength_model: float, strength_clip: float | None = None, *,
               host: str) -> Applied:
    """The loaded model (``loaded_model``) with a LoRA file (path or tensors) applied as the
    host does: a new dict; untouched tensors are the input's own objects, changed ones new
    tensors in their dtype; ``state`` is not modified."""
    tensors = _read(lora)
    placement = place(state, tensors, host=host)
    dropped = refused(placement, host)
    out = dict(state)
    if "file" in dropped:
        return Applied(out, placement, dropped)
    strength_clip = strength_model if strength_clip is None else strength_clip
    for part, patches, strength in (("unet", placement.unet, strength_model),
                                    ("clip", placement.clip, strength_clip)):
        if part in dropped:
            continue
        by_weight: dict[str, list] = {}  # several parts (q, k, v) may patch one fused weight
        for target, adapter in patches.items():
            by_weight.setdefault(weight_key(target), []).append((strength, adapter, target))
        for key, weight_patches in by_weight.items():
            if key in state:  # a name without a weight is skipped (counted above)
                out[key] = merge(state[key], weight_patches, key)
    return Applied(out, placement, dropped)


def _read(lora) -> dict[str, torch.Tensor]:
    if isinstance(lora, (str, os.PathLike)):
        from safetensors.torch import load_file

        return load_file(str(lora))
    return dict(lora)


def _check_host(host: str) -> None:
    if host not in HOSTS:
        raise ValueError(f"host must be one of {HOSTS}, not {host!r}")


# ---------------------------------------------------------------------------------------------
# Flux: the BFL-layout transformer both hosts load (``diffusion_model.double_blocks.…``)
# ---------------------------------------------------------------------------------------------

# The hosts' Flux detection (huggingface_guess / ComfyUI ``model_detection``) fixes hidden_size
# at 3072 whatever the weights say; only the diffusers-form names' offsets use it.
FLUX_HIDDEN = 3072


@dataclass(frozen=True)
class Slice:
    """A key-map target that is part of a weight (ComfyUI's ``(key, offset, function)``):
    rows ``offset`` = (dim, start, size) and/or the update's halves swapped first."""

    key: str
    offset: tuple[int, int, int] | None = None
    function: bool = False  # True: ``swap_scale_shift`` (the final AdaLN linear)


def weight_key(target) -> str:
    return target.key if isinstance(target, Slice) else target


def swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) halves <-> BFL's (shift, scale), along the output rows."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def loaded_flux_model(bfl_state, text_encoders=None) -> dict[str, torch.Tensor]:
    """A Flux transformer in BFL keys (bare or under ``model.diffusion_model.``) and its text
    encoders (``{"clip_l": CLIPTextModel state, "t5xxl": T5EncoderModel state}``) under the
    names the hosts' Flux model gives them: ``diffusion_model.…``, ``clip_l.transformer.…``."""
    out = {UNET + (k[len("model." + UNET):] if k.startswith("model." + UNET) else k): v
           for k, v in bfl_state.items()}
    for name, state in (text_encoders or {}).items():
        out.update({f"{name}.transformer.{k}": v for k, v in state.items()})
    return out


def is_flux(state) -> bool:
    """The hosts' test for a Flux transformer."""
    return f"{UNET}double_blocks.0.img_attn.norm.key_norm.scale" in state


def flux_diffusers_targets(state, hidden: int = FLUX_HIDDEN) -> dict[str, str | Slice]:
    """``flux_to_diffusers``: diffusers key -> the BFL weight (or the rows of it) it is."""
    keys = [k[len(UNET):] for k in state if k.startswith(UNET)]
    out: dict[str, str | Slice] = {}
    qkv = (("to_q", 0), ("to_k", 1), ("to_v", 2))
    for i in range(_count(keys, "double_blocks.{}.")):
        d, b = f"transformer_blocks.{i}.", f"{UNET}double_blocks.{i}."
        for end in ("weight", "bias"):
            for name, n in qkv:
                out[f"{d}attn.{name}.{end}"] = Slice(f"{b}img_attn.qkv.{end}", (0, n * hidden, hidden))
                out[f"{d}attn.add_{name[-1]}_proj.{end}"] = Slice(f"{b}txt_attn.qkv.{end}",
                                                                  (0, n * hidden, hidden))
            for src, dst in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                             ("norm1_context.linear", "txt_mod.lin"),
                             ("attn.to_add_out", "txt_attn.proj"), ("ff.net.0.proj", "img_mlp.0"),
                             ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
                             ("ff_context.net.2", "txt_mlp.2")):
                out[f"{d}{src}.{end}"] = f"{b}{dst}.{end}"
        for src, dst in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"),
                         ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{d}attn.{src}.weight"] = f"{b}{dst}.scale"
    for i in range(_count(keys, "single_blocks.{}.")):
        d, b = f"single_transformer_blocks.{i}.", f"{UNET}single_blocks.{i}."
        for end in ("weight", "bias"):
            for name, n in qkv:
                out[f"{d}attn.{name}.{end}"] = Slice(f"{b}linear1.{end}", (0, n * hidden, hidden))
            out[f"{d}proj_mlp.{end}"] = Slice(f"{b}linear1.{end}", (0, 3 * hidden, 4 * hidden))
            out[f"{d}norm.linear.{end}"] = f"{b}modulation.lin.{end}"
            out[f"{d}proj_out.{end}"] = f"{b}linear2.{end}"
        out[f"{d}attn.norm_q.weight"] = f"{b}norm.query_norm.scale"
        out[f"{d}attn.norm_k.weight"] = f"{b}norm.key_norm.scale"
    for bfl, diffusers in (("final_layer.linear", "proj_out"), ("img_in", "x_embedder"),
                           ("txt_in", "context_embedder"),
                           ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                           ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                           ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                           ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                           ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                           ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")):
        for end in ("weight", "bias"):
            out[f"{diffusers}.{end}"] = f"{UNET}{bfl}.{end}"
    for end in ("weight", "bias"):
        out[f"norm_out.linear.{end}"] = Slice(f"{UNET}final_layer.adaLN_modulation.1.{end}",
                                              None, True)
    return out


def flux_unet_key_map(state, host: str, hidden: int = FLUX_HIDDEN) -> dict[str, str | Slice]:
    """``model_lora_keys_unet`` for a Flux model: the generic names from its own weights (so
    kohya's ``lora_unet_double_blocks_0_img_attn_qkv``), no ``lora_unet_`` + diffusers names
    (``unet_to_diffusers`` gives none for Flux), and the diffusers forms ``transformer.<path>``,
    ``lycoris_<path_>``, ``lora_transformer_<path_>`` (``.weight`` keys only); Neo also
    ``diffusion_model.single_blocks.N.linear1_qkv`` (linear1's q/k/v rows)."""
    _check_host(host)
    key_map: dict[str, str | Slice] = dict(generic_unet_names(state))
    for key, target in flux_diffusers_targets(state, hidden).items():
        if key.endswith(".weight"):
            path = key[:-len(".weight")]
            flat = path.replace(".", "_")
            key_map["transformer." + path] = key_map["lycoris_" + flat] = target
            key_map["lora_transformer_" + flat] = target
    if host == "neo":
        for key in state:
            if key.endswith(".linear1.weight"):
                key_map[key.replace(".linear1.weight", ".linear1_qkv")] = Slice(
                    key, (0, 0, 3 * hidden))
    return key_map
