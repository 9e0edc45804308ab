"""The one table between diffusers' FluxTransformer2DModel and Black Forest Labs' (BFL) layout.

Why: we train the diffusers module tree, but Forge, Forge Neo, ComfyUI and kohya's tools read
Flux files in BFL's layout, where a double block's q, k, v are ONE fused linear (`img_attn.qkv`)
and a single block's q, k, v and MLP input are one linear (`linear1`). Everything that crosses
that border (the checkpoint writer, the LoRA writer, the target list) reads this table, so the
names exist once.

Table source: the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`
(diffusers/loaders/single_file_utils.py, identical in 0.31.0 and 0.37.1), checked against
BFL's module tree as kohya sd-scripts' library/flux_models.py spells it (DoubleStreamBlock:
img_mod.lin, img_attn.qkv/.proj/.norm.query_norm.scale, img_mlp.0/.2, and txt_* alike;
SingleStreamBlock: linear1, linear2, modulation.lin, norm.*; top: img_in, txt_in, time_in,
vector_in, guidance_in, final_layer.linear, final_layer.adaLN_modulation.1).

The one reorder: BFL's final AdaLN linear yields (shift, scale), diffusers' `norm_out.linear`
yields (scale, shift); swapping the two halves of the output rows converts either way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

LINEAR, NORM, SWAP = "linear", "norm", "swap"


@dataclass(frozen=True)
class Entry:
    """One BFL module and the diffusers modules it is made of.

    kind: LINEAR (weight/bias; several parts are stacked along the output rows in this order),
    NORM (RMSNorm: diffusers `.weight` is BFL `.scale`), SWAP (one linear whose two output
    halves are swapped between the layouts).
    """
    bfl: str
    parts: tuple[str, ...]
    kind: str = LINEAR


def _double_block(i: int) -> list[Entry]:
    d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
    pairs = [("img_mod.lin", ("norm1.linear",)), ("txt_mod.lin", ("norm1_context.linear",)),
             ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
             ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
             ("img_attn.proj", ("attn.to_out.0",)), ("txt_attn.proj", ("attn.to_add_out",)),
             ("img_mlp.0", ("ff.net.0.proj",)), ("img_mlp.2", ("ff.net.2",)),
             ("txt_mlp.0", ("ff_context.net.0.proj",)), ("txt_mlp.2", ("ff_context.net.2",))]
    norms = [("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
             ("txt_attn.norm.query_norm", "attn.norm_added_q"),
             ("txt_attn.norm.key_norm", "attn.norm_added_k")]
    return ([Entry(b + bfl, tuple(d + p for p in parts)) for bfl, parts in pairs]
            + [Entry(b + bfl, (d + part,), NORM) for bfl, part in norms])


def _single_block(i: int) -> list[Entry]:
    d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
    return [Entry(b + "modulation.lin", (d + "norm.linear",)),
            Entry(b + "linear1", tuple(d + p for p in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                        "proj_mlp"))),
            Entry(b + "linear2", (d + "proj_out",)),
            Entry(b + "norm.query_norm", (d + "attn.norm_q",), NORM),
            Entry(b + "norm.key_norm", (d + "attn.norm_k",), NORM)]


def _top_level(guidance: bool) -> list[Entry]:
    embedders = [("time_in", "time_text_embed.timestep_embedder"),
                 ("vector_in", "time_text_embed.text_embedder")]
    if guidance:
        embedders.append(("guidance_in", "time_text_embed.guidance_embedder"))
    out = []
    for bfl, diff in embedders:
        out += [Entry(f"{bfl}.in_layer", (f"{diff}.linear_1",)),
                Entry(f"{bfl}.out_layer", (f"{diff}.linear_2",))]
    return out + [Entry("txt_in", ("context_embedder",)), Entry("img_in", ("x_embedder",)),
                  Entry("final_layer.linear", ("proj_out",)),
                  Entry("final_layer.adaLN_modulation.1", ("norm_out.linear",), SWAP)]


def flux_table(num_layers: int, num_single_layers: int, guidance: bool = True) -> list[Entry]:
    """Every BFL module of a Flux transformer of this depth, with its diffusers parts."""
    return (_top_level(guidance) + [e for i in range(num_layers) for e in _double_block(i)]
            + [e for i in range(num_single_layers) for e in _single_block(i)])


def _depth(names: Iterable[str]) -> tuple[int, int, bool]:
    """(double blocks, single blocks, has guidance) of a diffusers transformer, from its names."""
    double, single, guidance = set(), set(), False
    for name in names:
        if m := re.match(r"transformer_blocks\.(\d+)\.", name):
            double.add(int(m.group(1)))
        elif m := re.match(r"single_transformer_blocks\.(\d+)\.", name):
            single.add(int(m.group(1)))
        guidance = guidance or name.startswith("time_text_embed.guidance_embedder.")
    return max(double, default=-1) + 1, max(single, default=-1) + 1, guidance


def table_for(names: Iterable[str]) -> list[Entry]:
    """The table for the transformer whose (module or state) names are given."""
    return flux_table(*_depth(list(names)))


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of the output rows (its own inverse): (shift, scale) <-> (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _convert_entry(entry: Entry, state: Mapping[str, torch.Tensor], used: set[str]
                   ) -> dict[str, torch.Tensor]:
    """The BFL tensors of one entry; marks the diffusers keys it consumed in `used`."""
    if entry.kind == NORM:
        key = entry.parts[0] + ".weight"
        used.add(key)
        return {entry.bfl + ".scale": state[key]}
    out = {}
    for suffix in ("weight", "bias"):
        keys = [f"{part}.{suffix}" for part in entry.parts]
        present = [k in state for k in keys]
        if not any(present):
            continue
        if not all(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise ValueError(f"Flux fused {entry.bfl}.{suffix}: missing parts {missing}")
        used.update(keys)
        tensors = [state[k] for k in keys]
        value = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        out[f"{entry.bfl}.{suffix}"] = swap_halves(value) if entry.kind == SWAP else value
    return out


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state_dict -> BFL keys (bare, no
    `model.diffusion_model.` prefix): q/k/v fused, linear1 = q|k|v|proj_mlp, norms as `.scale`,
    the final AdaLN halves swapped. Exact inverse of diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers`. A key the table does not know raises
    ValueError (never dropped silently). Renamed tensors are the input's own objects (fused
    ones new): copy first if the model's parameters will change afterwards."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for entry in table_for(state):
        if entry.kind == NORM and entry.parts[0] + ".weight" not in state:
            raise ValueError(f"Flux state lacks {entry.parts[0]}.weight")
        out.update(_convert_entry(entry, state, used))
    _refuse_unknown(set(state) - used)
    return out


def _refuse_unknown(unknown: set[str]) -> None:
    """ValueError naming the keys the table does not know (never dropped silently)."""
    if unknown:
        names = sorted(unknown)
        raise ValueError(f"keys not in the Flux layout table: {names[:10]}"
                         f"{' ...' if len(names) > 10 else ''}")


def bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL keys (bare or under `model.diffusion_model.`) -> diffusers names: the inverse of
    `diffusers_to_bfl` for any width (diffusers' own converter assumes Flux's 3072 and 12288,
    so it cannot read the tiny test models). Split sizes come from the file itself: q/k/v are
    equal thirds; linear1's q/k/v are each linear2's output width, the rest is the MLP."""
    prefix = "model.diffusion_model."
    bare = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for entry in table_for(_bfl_as_diffusers_names(bare)):
        out.update(_split_entry(entry, bare, used))
    _refuse_unknown(set(bare) - used)
    return out


def _bfl_as_diffusers_names(bare: Iterable[str]) -> list[str]:
    """Just enough diffusers-style names for `table_for` to read the depth off BFL keys."""
    names = []
    for key in bare:
        key = re.sub(r"^double_blocks\.", "transformer_blocks.", key)
        key = re.sub(r"^single_blocks\.", "single_transformer_blocks.", key)
        names.append(re.sub(r"^guidance_in\.", "time_text_embed.guidance_embedder.", key))
    return names


def _split_entry(entry: Entry, bare: Mapping[str, torch.Tensor], used: set[str]
                 ) -> dict[str, torch.Tensor]:
    if entry.kind == NORM:
        if entry.bfl + ".scale" not in bare:
            raise ValueError(f"Flux file lacks {entry.bfl}.scale")
        used.add(entry.bfl + ".scale")
        return {entry.parts[0] + ".weight": bare[entry.bfl + ".scale"]}
    out = {}
    for suffix in ("weight", "bias"):
        key = f"{entry.bfl}.{suffix}"
        if key not in bare:
            continue
        used.add(key)
        value = bare[key]
        if entry.kind == SWAP:
            value = swap_halves(value)
        sizes = _row_sizes(entry, value.shape[0], bare)
        out.update({f"{part}.{suffix}": piece.clone() if len(sizes) > 1 else piece
                    for part, piece in zip(entry.parts, torch.split(value, sizes, dim=0))})
    return out


def _row_sizes(entry: Entry, rows: int, bare: Mapping[str, torch.Tensor]) -> list[int]:
    """Output rows of each part of a (possibly fused) BFL linear."""
    if len(entry.parts) == 1:
        return [rows]
    if len(entry.parts) == 3:
        return [rows // 3] * 3
    hidden = bare[entry.bfl.replace("linear1", "linear2") + ".weight"].shape[0]
    return [hidden, hidden, hidden, rows - 3 * hidden]


# ---------------------------------------------------------------------------------------------
# What a LoRA trains, and its tensors in kohya's Flux names
# ---------------------------------------------------------------------------------------------

# Module names inside each block (diffusers), per `lora_layers` option. kohya's networks/
# lora_flux.py trains by default every Linear of DoubleStreamBlock and SingleStreamBlock (q/k/v
# fused, attention out, both MLP linears, the modulation linears; nothing at the top level
# unless `in_dims` is given): that is "attention_mlp". "attention" keeps attention only: q/k/v
# and the out projection of both streams; a single block has no separate attention out, its
# `proj_out` (BFL linear2) projects the concatenated attention and MLP output, so it is trained
# as the attention's out projection, as the double blocks' to_out.0 is.
_DOUBLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                     "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")
_DOUBLE_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
               "norm1.linear", "norm1_context.linear")
_SINGLE_MLP = ("proj_mlp", "norm.linear")
FLUX_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {"transformer_blocks": _DOUBLE_ATTENTION,
                  "single_transformer_blocks": _SINGLE_ATTENTION},
    "attention_mlp": {"transformer_blocks": _DOUBLE_ATTENTION + _DOUBLE_MLP,
                      "single_transformer_blocks": _SINGLE_ATTENTION + _SINGLE_MLP},
}


def flux_target_modules(model: torch.nn.Module, layers: str) -> list[str]:
    """The module paths of a FluxTransformer2DModel a LoRA wraps for `lora_layers` = layers
    ("attention" | "attention_mlp"): only nn.Linear, every one of them a part of the table, so
    `lora_to_kohya_flux` can write it."""
    if layers not in FLUX_TARGETS:
        raise ValueError(f"lora_layers must be one of {sorted(FLUX_TARGETS)}, not {layers!r}")
    wanted = FLUX_TARGETS[layers]
    names = []
    for name, module in model.named_modules():
        found = re.match(r"(transformer_blocks|single_transformer_blocks)\.\d+\.(.+)$", name)
        if (found and isinstance(module, torch.nn.Linear)
                and found.group(2) in wanted[found.group(1)]):
            names.append(name)
    return names


# The text encoder's keys pass through: CLIP-L is `lora_te1_` in kohya's Flux LoRA (its
# LORA_PREFIX_TEXT_ENCODER_CLIP), and Forge, Neo and ComfyUI map both `lora_te_` and `lora_te1_`
# onto `clip_l`; diffusers' kohya-Flux converter reads both as its text_encoder.
TEXT_PREFIXES = ("lora_te_", "lora_te1_")
_LORA = {".lora_down.weight", ".lora_up.weight", ".alpha"}
MLP_RATIO = 4  # diffusers' FluxSingleTransformerBlock: mlp_hidden_dim = 4 * hidden (fixed)


def kohya_flux_name(prefix: str, bfl_module: str) -> str:
    """`lora_unet` + `double_blocks.0.img_attn.qkv` -> `lora_unet_double_blocks_0_img_attn_qkv`."""
    return f"{prefix}_{bfl_module.replace('.', '_')}"


def _layers(state: Mapping[str, torch.Tensor], prefix: str
            ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(LyCORIS layer name -> {".lora_down.weight": t, ...}, the text encoder's tensors)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    text: dict[str, torch.Tensor] = {}
    stray = []
    for key, value in state.items():
        if key.startswith(TEXT_PREFIXES):
            text[key] = value
        elif key.startswith(prefix + "_") and "." in key:
            layer = key.split(".", 1)[0]
            layers.setdefault(layer, {})[key[len(layer):]] = value
        else:
            stray.append(key)
    if stray:
        raise ValueError(f"not {prefix}_/lora_te LoRA keys: {sorted(stray)[:10]}")
    return layers, text


def _index(prefix: str, layer_names: Iterable[str]) -> dict[str, tuple[Entry, int]]:
    """LyCORIS layer name -> (its table entry, its place among the entry's parts)."""
    double, single = 0, 0
    for name in layer_names:
        if found := re.match(rf"{re.escape(prefix)}_(single_)?transformer_blocks_(\d+)_", name):
            if found.group(1):
                single = max(single, int(found.group(2)) + 1)
            else:
                double = max(double, int(found.group(2)) + 1)
    out = {}
    for entry in flux_table(double, single, guidance=True):
        if entry.kind != NORM:
            for i, part in enumerate(entry.parts):
                out[kohya_flux_name(prefix, part)] = (entry, i)
    return out


def lora_to_kohya_flux(state: dict[str, torch.Tensor], prefix: str = "lora_unet"
                       ) -> dict[str, torch.Tensor]:
    """LyCORIS LoRA/LoCon tensors under diffusers module names -> kohya's Flux names on BFL's
    layout, exactly (each BFL weight gets the same delta the diffusers parts had).

    Fused groups (q,k,v -> qkv; q,k,v,proj_mlp -> linear1): downs stacked (rows: the sum of the
    parts' ranks), ups block-diagonal (each part's up in its own output rows and its own rank
    columns, zeros elsewhere; an untrained part's rows are all zero), and the fused alpha set
    so alpha / fused rank is the parts' common scale. When the parts' scales (alpha / rank)
    differ, the largest is the common scale and every other part's up is multiplied by
    its scale / the common one (a factor <= 1, so fp16 files cannot overflow). Non-fused layers
    are renamed (the final AdaLN linear also gets its up's halves swapped). `lora_te_`/
    `lora_te1_` keys pass unchanged. dtypes are kept. Unknown keys, and forms that cannot be
    fused exactly (LoHa, LoKr, DoRA on a fused group), raise ValueError naming them."""
    layers, out = _layers(state, prefix)
    index = _index(prefix, layers)
    unknown = sorted(name for name in layers if name not in index)
    if unknown:
        raise ValueError(f"LoRA layers with no place in the Flux layout: {unknown[:10]}")
    groups: dict[Entry, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensors in layers.items():
        entry, i = index[name]
        groups.setdefault(entry, {})[i] = tensors
    for entry, parts in groups.items():
        name = kohya_flux_name(prefix, entry.bfl)
        if len(entry.parts) == 1:
            out.update(_renamed(name, entry, parts[0]))
        else:
            out.update(_fused(name, entry, parts, _mlp_rows(entry, parts, layers, prefix)))
    return out


def _renamed(name: str, entry: Entry, tensors: Mapping[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
    if entry.kind == SWAP:
        if not set(tensors) <= _LORA | {".dora_scale"}:
            raise ValueError(f"{entry.parts[0]}: only LoRA can be written for {entry.bfl} "
                             f"(its output halves are swapped), not {sorted(tensors)}")
        tensors = {**tensors, ".lora_up.weight": swap_halves(tensors[".lora_up.weight"])}
    return {name + suffix: value for suffix, value in tensors.items()}


def _scale(tensors: Mapping[str, torch.Tensor]) -> float:
    """alpha / rank as the loaders compute it (scale 1 without an alpha)."""
    rank = tensors[".lora_down.weight"].shape[0]
    return tensors[".alpha"].item() / rank if ".alpha" in tensors else 1.0


def _mlp_rows(entry: Entry, parts: Mapping[int, Mapping[str, torch.Tensor]],
              layers: Mapping[str, Mapping[str, torch.Tensor]], prefix: str) -> int:
    """linear1's MLP rows (0 for a q/k/v group): proj_mlp's own when trained, else from the
    block's proj_out (its inputs are hidden + MLP), else diffusers' fixed ratio of 4."""
    if len(entry.parts) != 4:
        return 0
    if 3 in parts:
        return parts[3][".lora_up.weight"].shape[0]
    hidden = next(iter(parts.values()))[".lora_down.weight"].shape[1]
    block = entry.parts[3].rsplit(".", 1)[0]  # single_transformer_blocks.N
    proj_out = layers.get(kohya_flux_name(prefix, block + ".proj_out"))
    if proj_out is not None:
        return proj_out[".lora_down.weight"].shape[1] - hidden
    return MLP_RATIO * hidden


def _fused(name: str, entry: Entry, parts: Mapping[int, Mapping[str, torch.Tensor]],
           mlp_rows: int) -> dict[str, torch.Tensor]:
    """One fused kohya layer from the trained parts of its group (see `lora_to_kohya_flux`)."""
    for i, tensors in parts.items():
        if set(tensors) - _LORA or not {".lora_down.weight", ".lora_up.weight"} <= set(tensors):
            raise ValueError(f"{entry.parts[i]}: only LoRA (lora_down/lora_up/alpha) can be fused "
                             f"into {entry.bfl} exactly, not {sorted(tensors)}")
    order = sorted(parts)
    first = parts[order[0]]
    down0, up0 = first[".lora_down.weight"], first[".lora_up.weight"]
    hidden = down0.shape[1]
    rows = [hidden if i < 3 else mlp_rows for i in range(len(entry.parts))]
    for i in order:
        if parts[i][".lora_up.weight"].shape[0] != rows[i]:
            raise ValueError(f"{entry.parts[i]}: {parts[i]['.lora_up.weight'].shape[0]} output "
                             f"rows, {entry.bfl} expects {rows[i]}")
    scales = {i: _scale(parts[i]) for i in order}
    common = max(scales.values())
    ranks = [parts[i][".lora_down.weight"].shape[0] for i in order]
    up = torch.zeros(sum(rows), sum(ranks), dtype=up0.dtype, device=up0.device)
    column = 0
    for i, rank in zip(order, ranks):
        part_up = parts[i][".lora_up.weight"]
        if scales[i] != common:
            part_up = (part_up.float() * (scales[i] / common)).to(up0.dtype)
        up[sum(rows[:i]):sum(rows[:i + 1]), column:column + rank] = part_up
        column += rank
    down = torch.cat([parts[i][".lora_down.weight"].to(down0.dtype) for i in order], dim=0)
    alpha_dtype = first[".alpha"].dtype if ".alpha" in first else torch.float32
    alpha = torch.tensor(common * sum(ranks), dtype=alpha_dtype)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
            f"{name}.alpha": alpha}
