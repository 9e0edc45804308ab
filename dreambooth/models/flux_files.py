"""Flux.1 checkpoints as Forge users keep them: recognised from the safetensors header alone
(:mod:`dreambooth.models.flux_detect`, re-exported here), loaded offline into
diffusers/transformers modules, and (for tests and the demo) written.

Layouts recognised (key names as ComfyUI's ``supported_models.Flux`` / ``model_detection`` and
Forge's ``backend/loader.py`` read them):

- BFL's transformer-only file (``flux1-dev.safetensors`` as Black Forest Labs ship it): bare keys
  ``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``, ``img_in.weight``,
  ``vector_in.in_layer.weight``, and ``guidance_in.in_layer.weight`` only in dev;
- the same under ``model.diffusion_model.`` (ComfyUI/Forge all-in-one files), which may also hold
  ``text_encoders.clip_l.transformer.text_model.*`` (CLIP-L, transformers' CLIPTextModel keys),
  ``text_encoders.t5xxl.transformer.*`` (T5EncoderModel keys: ``encoder.block.*``,
  ``shared.weight``) and ``vae.*`` (the LDM VAE layout, as SD's ``first_stage_model.*``);
- diffusers' transformer file (``transformer_blocks.N.attn.to_q.weight``, ``x_embedder.weight``).

dev vs schnell: ``guidance_in`` (diffusers: ``time_text_embed.guidance_embedder``) is dev. Chroma
(no ``vector_in``), Flux.2 and Fill/Depth (``img_in`` wider than the output) are not Flux.1 here.

Separate parts, as Forge keeps them in ``models/text_encoder`` and ``models/VAE``: ``clip_path``
(clip_l.safetensors: ``text_model.*``, or under any root such as ``text_encoders.clip_l.
transformer.``), ``t5_path`` (t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors: ``encoder.*`` and
``shared.weight``), ``vae_path`` (ae.safetensors: the LDM layout without prefix; a diffusers VAE
file works too). A part given separately replaces the one inside the file.

Configs come from the tensor shapes (see the ``*_config_from_shapes`` functions); nothing is
fetched. The T5 tokenizer is not in any weights file; it is looked for
(:func:`dreambooth.models.t5_tokenizer.t5_tokenizer_places`), in this order, at the
``t5_tokenizer`` argument, beside the checkpoint (``tokenizer_2/``, ``tokenizer.json``,
``spiece.model``), in ``models/text_encoder/t5_tokenizer/`` (the folder beside the T5 file, or
beside ``models/Stable-diffusion``), and in Forge's bundled copy
(``backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2/`` of the WebUI holding the file).
Only the tiny test model (T5 vocabulary of :data:`t5_tokenizer.VOCAB_SIZE`) falls back to the
tokenizer built in code.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from dreambooth.models.components import Components
from dreambooth.models.detect import CheckpointError, read_shapes
from dreambooth.models.flux_detect import (CLIP_MARK, CLIP_PREFIX, KEY_DIFFUSERS_GUIDANCE,
                                           KEY_GUIDANCE, T5_MARK, T5_PREFIX, TRANSFORMER_PREFIX,
                                           VAE_MARK, VAE_PREFIXES, FluxFile, find_root,
                                           flux_file_of)
from dreambooth.models.flux_detect import flux_variant_of  # noqa: F401  (one place to import)

FLUX_HEAD_DIM = 128
FLUX_ROPE = (16, 56, 56)
DIFFUSERS_FLUX_WIDTH, DIFFUSERS_FLUX_MLP = 3072, 12288  # what diffusers' converter assumes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
WEIGHT_SCALES = (".scale_weight", ".weight_scale")  # ComfyUI's scaled fp8 (older, newer names)
SCALE_SUFFIXES = WEIGHT_SCALES + (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")
FP8_MARKERS = ("scaled_fp8",)


# --------------------------------------------------------------------------------------------
# Configs from shapes


def _count(shapes: Mapping, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE widths of Flux's three position axes (index, row, column) for a head width: Flux's
    (16, 56, 56) at 128; otherwise each spatial axis takes the largest even width up to 7/16 of
    the head (56/128, as Flux) and the first axis the rest: (4, 6, 6) at 16. Not stored in the
    weights; every width must be even (RoPE rotates pairs) and they must sum to the head."""
    if head_dim == FLUX_HEAD_DIM:
        return FLUX_ROPE
    spatial = 2 * (7 * head_dim // 32)
    return head_dim - 2 * spatial, spatial, spatial


def transformer_config_from_shapes(shapes: Mapping[str, tuple], prefix: str = "",
                                   layout: str = "bfl") -> dict:
    """FluxTransformer2DModel kwargs: depths by counting blocks, widths from the embedders, the
    head width from the q-norm's scale (heads = width / head width: 24 of 128 in Flux.1)."""
    p = prefix
    if layout == "diffusers":
        names = dict(img="x_embedder.weight", txt="context_embedder.weight",
                     vec="time_text_embed.text_embedder.linear_1.weight", out="proj_out.weight",
                     norm="transformer_blocks.0.attn.norm_q.weight",
                     guidance=KEY_DIFFUSERS_GUIDANCE, double=r"transformer_blocks\.(\d+)\.",
                     single=r"single_transformer_blocks\.(\d+)\.")
    else:
        names = dict(img="img_in.weight", txt="txt_in.weight", vec="vector_in.in_layer.weight",
                     out="final_layer.linear.weight",
                     norm="double_blocks.0.img_attn.norm.query_norm.scale", guidance=KEY_GUIDANCE,
                     double=r"double_blocks\.(\d+)\.", single=r"single_blocks\.(\d+)\.")
    hidden, in_channels = shapes[p + names["img"]]
    head_dim = shapes[p + names["norm"]][0]
    config = dict(patch_size=1, in_channels=in_channels,
                  num_layers=_count(shapes, re.escape(p) + names["double"]),
                  num_single_layers=_count(shapes, re.escape(p) + names["single"]),
                  attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
                  joint_attention_dim=shapes[p + names["txt"]][1],
                  pooled_projection_dim=shapes[p + names["vec"]][1],
                  guidance_embeds=p + names["guidance"] in shapes,
                  axes_dims_rope=rope_axes(head_dim))
    if shapes[p + names["out"]][0] != in_channels:
        config["out_channels"] = shapes[p + names["out"]][0]
    return config


def clip_config_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """CLIPTextConfig kwargs from ``text_model.*`` shapes. Heads are 64 wide (CLIP-L: 12 of 64);
    widths that are no multiple of 64 (test models) use 8-wide heads, as checkpoint.py does."""
    from dreambooth.models.tiny_flux import CLIP_FIXED

    vocab, hidden = shapes["text_model." + CLIP_MARK]
    positions = shapes["text_model.embeddings.position_embedding.weight"][0]
    return dict(CLIP_FIXED, vocab_size=vocab, hidden_size=hidden,
                max_position_embeddings=positions,
                intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
                num_attention_heads=hidden // 64 if hidden % 64 == 0 else max(1, hidden // 8),
                num_hidden_layers=_count(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
                projection_dim=hidden)


def t5_config_from_shapes(shapes: Mapping[str, tuple], source: str = "T5") -> dict:
    """T5Config kwargs of a T5 v1.1 encoder (T5-XXL: 24 layers, d_model 4096, 64 heads of 64):
    heads and buckets from the relative attention bias, d_kv = q rows / heads."""
    from dreambooth.models.tiny_flux import T5_FIXED

    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in shapes:
        raise CheckpointError(f"{source} is not a T5 v1.1 encoder (no gated feed-forward); Flux "
                              "uses T5-XXL v1.1 (t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors)")
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    vocab, width = shapes["shared.weight"]
    return dict(T5_FIXED, vocab_size=vocab, d_model=width,
                d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
                d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                num_layers=_count(shapes, r"encoder\.block\.(\d+)\."), num_heads=heads,
                relative_attention_num_buckets=buckets)


def vae_config_from_shapes(shapes: Mapping[str, tuple], layout: str = "ldm") -> dict:
    """AutoencoderKL kwargs of Flux's VAE from LDM (or diffusers) keys; the latent scale and
    shift are Flux's, the group count the largest divisor of every width up to 32."""
    from dreambooth.models.tiny_flux import FLUX_VAE_FIXED

    if layout == "diffusers":
        level = r"encoder\.down_blocks\.(\d+)\."
        block = r"encoder\.down_blocks\.0\.resnets\.(\d+)\."
        attention = "encoder.mid_block.attentions.0.to_q.weight"
        conv1 = "encoder.down_blocks.{}.resnets.0.conv1.weight"
    else:
        level, block, attention = (r"encoder\.down\.(\d+)\.", r"encoder\.down\.0\.block\.(\d+)\.",
                                   "encoder.mid.attn_1.q.weight")
        conv1 = "encoder.down.{}.block.0.conv1.weight"
    levels = _count(shapes, level)
    channels = [shapes[conv1.format(i)][0] for i in range(levels)]
    return dict(FLUX_VAE_FIXED, in_channels=shapes["encoder.conv_in.weight"][1],
                out_channels=shapes["decoder.conv_out.weight"][0],
                latent_channels=shapes["decoder.conv_in.weight"][1],
                layers_per_block=_count(shapes, block), block_out_channels=channels,
                norm_num_groups=min(32, math.gcd(*channels)),
                down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels,
                mid_block_add_attention=attention in shapes)


# --------------------------------------------------------------------------------------------
# Reading tensors


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors (fp8 included: never kept as such) to ``dtype``, always in memory of
    their own: a tensor read from a file may start at any byte, and the CPU kernels round
    differently on unaligned memory (a fp32 file would not give the saved model's outputs
    bit for bit). One tensor at a time, so the copy costs no peak memory."""
    return tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor


def _read(path: Path, root: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors under ``root`` (the root cut off), cast to ``dtype`` one by one; the weights
    of ComfyUI's "scaled fp8" files multiplied by their scales (:func:`_unscaled`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {k[len(root):]: handle.get_tensor(k) if k.endswith(SCALE_SUFFIXES)
                     else _cast(handle.get_tensor(k), dtype)
                     for k in handle.keys() if k.startswith(root)}
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc}); if it was "
                              "downloaded, download it again") from exc
    return _unscaled(state, dtype, path.name)


def _unscaled(state: dict[str, torch.Tensor], dtype: torch.dtype, source: str
              ) -> dict[str, torch.Tensor]:
    """ComfyUI's "scaled fp8" files (t5xxl_fp8_e4m3fn_scaled and the like) store each matrix
    divided by a scale, with ``<layer>.scale_weight`` (newer: ``<layer>.weight_scale``) beside it
    and a ``scaled_fp8`` marker; the weight is the stored one times its scale (ComfyUI's
    QUANTIZATION.md). Per-tensor and per-row scales are applied; block-wise ones are refused.
    The input scales only serve fp8 matmuls and are dropped; 4-bit layouts (nvfp4: a second
    scale, packed integer weights) are refused by name."""
    for key in [k for k in state if k.endswith(SCALE_SUFFIXES) or k.split(".")[-1] in FP8_MARKERS]:
        scale = state.pop(key)
        if not key.endswith(WEIGHT_SCALES + (".weight_scale_2",)):
            continue
        layer = key.rsplit(".", 1)[0]
        weight = state.get(layer + ".weight")
        if key.endswith("_2") or weight is None or not weight.is_floating_point() \
                or scale.numel() not in (1, weight.shape[0]) or scale.ndim > 2:
            raise CheckpointError(f"{source}: the fp8 scale {key!r} {tuple(scale.shape)} is not "
                                  "per tensor or per row; this quantized format is not supported")
        scale = scale.float().reshape(-1, *([1] * (weight.ndim - 1))) if scale.numel() > 1 \
            else scale.float().reshape(())
        state[layer + ".weight"] = (weight.float() * scale).to(dtype)
    return state


def _shapes(path: Path) -> dict[str, tuple]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: Flux files are read as .safetensors; {path.suffix!r} "
                              "(GGUF, pickles) is not supported")
    return read_shapes(path)


def _build(factory: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor], what: str,
           source: str, dtype: torch.dtype) -> torch.nn.Module:
    """The module made without allocating its weights, then given the file's tensors. Buffers
    (CLIP's position ids) are the module's own; every weight must come from the file."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = factory()
    expected = {k for k, v in model.state_dict().items() if v.is_meta}
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{source}: the {what} weights are incomplete; missing "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict({k: v.contiguous() for k, v in state.items() if k in expected},
                          strict=False, assign=True)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:  # pragma: no cover - every parameter is a state-dict key
        raise CheckpointError(f"{source}: the {what} weights are incomplete ({meta[:5]})")
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------
# Loading each part


def _bfl_to_diffusers(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """diffusers' own converter. It splits a single block's linear1 at Flux's fixed widths
    (3072 per q/k/v, 12288 MLP), so narrower models are laid out at those offsets first and the
    parts cut back after: at Flux's width this is the converter alone."""
    from diffusers.loaders.single_file_utils import \
        convert_flux_transformer_checkpoint_to_diffusers as convert

    hidden = state["img_in.weight"].shape[0]
    blocks = [k[: -len(".linear1.weight")] for k in state if k.endswith(".linear1.weight")]
    mlp = state[blocks[0] + ".linear1.weight"].shape[0] - 3 * hidden if blocks else 0
    padded = hidden != DIFFUSERS_FLUX_WIDTH
    if padded and (hidden > DIFFUSERS_FLUX_WIDTH or mlp > DIFFUSERS_FLUX_MLP):
        raise CheckpointError(f"{source}: a Flux transformer {hidden} wide is not supported")
    if padded:
        offsets = [0, DIFFUSERS_FLUX_WIDTH, 2 * DIFFUSERS_FLUX_WIDTH, 3 * DIFFUSERS_FLUX_WIDTH]
        for block in blocks:
            for suffix in ("weight", "bias"):
                value = state[f"{block}.linear1.{suffix}"]
                rows = 3 * DIFFUSERS_FLUX_WIDTH + DIFFUSERS_FLUX_MLP
                wide = value.new_zeros((rows,) + value.shape[1:])
                for start, piece in zip(offsets, value.split([hidden] * 3 + [mlp])):
                    wide[start:start + len(piece)] = piece
                state[f"{block}.linear1.{suffix}"] = wide
    out = convert(state)
    if padded:
        for key in [k for k in out if k.startswith("single_transformer_blocks.")]:
            if ".attn.to_" in key or ".proj_mlp." in key:
                out[key] = out[key][: mlp if ".proj_mlp." in key else hidden].clone()
    return out


def _load_transformer(path: Path, found: FluxFile, shapes: Mapping, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    try:
        config = transformer_config_from_shapes(shapes, found.prefix, found.layout)
    except KeyError as exc:
        raise CheckpointError(f"{path.name}: the transformer lacks the weight "
                              f"{exc.args[0]!r}") from exc
    state = _read(path, found.prefix, dtype)
    if found.layout == "bfl":
        state = _bfl_to_diffusers(state, path.name)
    return _build(lambda: FluxTransformer2DModel(**config), state, "transformer", path.name, dtype)


def _load_clip(state: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype):
    """CLIP-L from the keys under its root, as CLIPTextModel's ``text_model.*`` (position ids
    dropped: the module's own are right, and files store them as int64, float or not at all)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    state = {"text_model." + k: v for k, v in state.items() if not k.endswith("position_ids")}
    config = _derive(clip_config_from_shapes, state, source, "CLIP-L text encoder")
    return _build(lambda: CLIPTextModel(CLIPTextConfig(**config)), state, "CLIP-L text encoder",
                  source, dtype)


def _load_t5(state: dict[str, torch.Tensor], source: str, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    state["shared.weight"] = state["encoder.embed_tokens.weight"] = shared  # tied in T5
    config = _derive(t5_config_from_shapes, state, source, "T5-XXL text encoder", source)
    return _build(lambda: T5EncoderModel(T5Config(**config)), state, "T5-XXL text encoder",
                  source, dtype)


def _load_vae(state: dict[str, torch.Tensor], source: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    layout = "diffusers" if any(k.startswith("encoder.down_blocks.") for k in state) else "ldm"
    config = _derive(vae_config_from_shapes, state, source, "VAE", layout)
    if config["latent_channels"] != 16:
        raise CheckpointError(f"{source} is not Flux's VAE ({config['latent_channels']} latent "
                              "channels; Flux's ae.safetensors has 16)")
    if layout == "ldm":
        state = convert_ldm_vae_checkpoint(state, config)
    return _build(lambda: AutoencoderKL(**config), state, "VAE", source, dtype)


def _locate(path: str | os.PathLike | None, inside: tuple[Path, str] | None, mark: str,
            what: str) -> tuple[Path, str]:
    """Where a part's tensors are (file, root), from headers only: its own file when given, else
    inside the checkpoint (the caller checked that one of the two is there)."""
    if path is None:
        assert inside is not None
        return inside
    path = Path(path)
    root = find_root(_shapes(path), mark)
    if root is None:
        raise CheckpointError(f"{path.name} is not a {what} file (no key ending in {mark})")
    return path, root


def _derive(config_of: Callable[..., dict], state: Mapping[str, torch.Tensor], source: str,
            what: str, *args) -> dict:
    """A config from the state's shapes; a weight the rule needs and the file lacks is named."""
    try:
        return config_of({k: tuple(v.shape) for k, v in state.items()}, *args)
    except KeyError as exc:
        raise CheckpointError(f"{source}: the {what} lacks the weight {exc.args[0]!r} (a damaged "
                              "or unsupported file)") from exc


def _missing_error(path: Path, missing: list[str], transformer_only: bool) -> CheckpointError:
    if transformer_only and len(missing) == 3:
        return CheckpointError(
            f"{path.name} holds only the transformer: choose the text encoders (clip_l, t5xxl) "
            "and the VAE (ae.safetensors)")
    what = {"clip_l": "the CLIP-L text encoder (clip_l.safetensors in models/text_encoder)",
            "t5xxl": "the T5-XXL text encoder (t5xxl_fp16 or t5xxl_fp8_e4m3fn.safetensors in "
                     "models/text_encoder)", "vae": "the VAE (ae.safetensors in models/VAE)"}
    return CheckpointError(f"{path.name} has no {', '.join(m for m in missing)}: choose "
                           + " and ".join(what[m] for m in missing))


# --------------------------------------------------------------------------------------------
# Loading a whole model


def load_flux(path: str | os.PathLike, *, clip_path: str | os.PathLike | None = None,
              t5_path: str | os.PathLike | None = None, vae_path: str | os.PathLike | None = None,
              dtype: torch.dtype | str | None = None,
              t5_tokenizer: str | os.PathLike | None = None) -> Components:
    """A Flux.1 file (and its separate parts) as Components, offline: the transformer in the
    ``unet`` slot, CLIP-L and T5 as text encoders 1 and 2, the flow-matching scheduler of the
    variant. Every tensor is cast to ``dtype`` while read (default fp32; fp8 is never kept)."""
    from dreambooth.models.t5_tokenizer import load_flux_t5_tokenizer
    from dreambooth.models.tiny_flux import flux_scheduler
    from dreambooth.models.tokenizer import load_clip_tokenizer

    path = Path(path)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or torch.float32)
    shapes = _shapes(path)
    found = flux_file_of(shapes)
    if found is None:
        raise CheckpointError(f"{path.name} is not a Flux.1 (dev or schnell) transformer")
    inside = {name: (path, root) if root is not None else None for name, root in
              (("clip_l", found.clip_root), ("t5xxl", found.t5_root), ("vae", found.vae_root))}
    given = {"clip_l": clip_path, "t5xxl": t5_path, "vae": vae_path}
    missing = [name for name in given if given[name] is None and inside[name] is None]
    if missing:
        raise _missing_error(path, missing, found.prefix != TRANSFORMER_PREFIX)
    clip = _locate(clip_path, inside["clip_l"], CLIP_MARK, "CLIP-L")
    t5 = _locate(t5_path, inside["t5xxl"], T5_MARK, "T5-XXL")
    vae = _locate(vae_path, inside["vae"], VAE_MARK, "VAE")
    # the tokenizer first (from the header's vocabulary size): a missing one fails in a moment,
    # not after reading gigabytes
    t5_shapes = shapes if t5[0] == path else _shapes(t5[0])
    vocab = (t5_shapes.get(t5[1] + "shared.weight")
             or t5_shapes.get(t5[1] + "encoder.embed_tokens.weight") or (0,))[0]
    if not vocab:
        raise CheckpointError(f"{t5[0].name}: the T5 text encoder has no token embedding "
                              "(shared.weight)")
    tokenizer_2 = load_flux_t5_tokenizer(path, vocab, t5_path=Path(t5_path) if t5_path else None,
                                         t5_tokenizer=Path(t5_tokenizer) if t5_tokenizer else None)
    return Components(
        unet=_load_transformer(path, found, shapes, dtype),
        vae=_load_vae(_read(*vae, dtype), vae[0].name, dtype),
        text_encoder=_load_clip(_read(*clip, dtype), clip[0].name, dtype),
        tokenizer=load_clip_tokenizer(),
        noise_scheduler=flux_scheduler(found.variant.split("-")[1]),
        text_encoder_2=_load_t5(_read(*t5, dtype), t5[0].name, dtype), tokenizer_2=tokenizer_2)


# --------------------------------------------------------------------------------------------
# Writing the files (tests and the demo)

LAYOUTS = ("all-in-one", "transformer")
WRITE_DTYPES = ("fp32", "bf16", "fp8")
PART_FILES = {"clip_l": "clip_l.safetensors", "t5xxl": "t5xxl.safetensors", "vae": "ae.safetensors"}

# diffusers -> LDM names of the VAE's blocks ({last} is the number of levels - 1: LDM numbers the
# decoder's levels from the bottom, diffusers from the top)
_VAE_BLOCKS = ((r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", "mid_resnet"),
               (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
               (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
               (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
               (r"^decoder\.up_blocks\.(\d+)\.resnets\.", "up.{}.block."),
               (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", "up.{}.upsample."))
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))


def vae_to_ldm(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state as the LDM keys of ae.safetensors (no prefix): the
    inverse of diffusers' ``convert_ldm_vae_checkpoint`` (as ``ldm_keys.vae_to_ldm`` does for
    SD's ``first_stage_model.``; kept here so that loading Flux never imports the SD export)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    out = {}
    for key, value in state.items():
        name = fixed.get(key)
        for pattern, target in _VAE_BLOCKS if name is None else ():
            match = re.match(pattern, key)
            if not match:
                continue
            if target == "mid_resnet":
                name = f"{match[1]}.mid.block_{int(match[2]) + 1}." + key[match.end():]
            elif target.startswith("up."):
                name = "decoder." + target.format(levels - 1 - int(match[1])) + key[match.end():]
            else:
                name = match.expand(target) + key[match.end():]
            break
        if name is None:
            raise CheckpointError(f"unknown VAE key {key!r}")
        name = name.replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in name:
            for old, new in _VAE_ATTENTION:
                name = name.replace(old, new)
            value = value[:, :, None, None] if value.ndim == 2 else value  # 1x1 convs in LDM
        out[name] = value
    return out


def _stored(tensors: Mapping[str, torch.Tensor], quantize: bool, *, dtype: str
            ) -> dict[str, torch.Tensor]:
    """Tensors as a file of ``dtype`` keeps them: "fp8" stores weight matrices as float8_e4m3fn
    where ``quantize`` (the transformer and T5, as ComfyUI's and Forge's fp8 checkpoints do) and
    everything else in bf16."""
    target = torch.bfloat16 if dtype == "fp8" else DTYPES[dtype]
    out = {}
    for key, value in tensors.items():
        value = value.detach().cpu()
        if quantize and dtype == "fp8" and value.ndim == 2 and key.endswith("weight"):
            value = value.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)
        elif value.is_floating_point():
            value = value.to(target)
        out[key] = value.contiguous()
    return out


def _parts(components: Components, dtype: str, names: tuple[str, ...]
           ) -> dict[str, dict[str, torch.Tensor]]:
    """Each named part's tensors in its file layout, without prefix: the transformer in BFL's
    names, CLIP-L as ``text_model.*``, T5 as ``encoder.*`` + ``shared.weight``, the VAE as LDM."""
    from dreambooth.models.flux_layout import diffusers_to_bfl

    makers = {
        "transformer": lambda: (diffusers_to_bfl(dict(components.unet.state_dict())), True),
        "clip_l": lambda: ({k: v for k, v in components.text_encoder.state_dict().items()
                            if not k.endswith("position_ids")}, False),
        "t5xxl": lambda: ({k: v for k, v in components.text_encoder_2.state_dict().items()
                           if k != "encoder.embed_tokens.weight"}, True),  # tied to shared
        "vae": lambda: (vae_to_ldm(components.vae.state_dict(),
                                   len(components.vae.config.block_out_channels)), False)}
    return {name: _stored(*makers[name](), dtype=dtype) for name in names}


def _write(tensors: Mapping[str, torch.Tensor], path: Path, overwrite: bool) -> Path:
    from safetensors.torch import save_file

    from dreambooth.common.files import atomic_path

    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(path, overwrite=overwrite, needed_bytes=needed) as tmp:
        save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
    return path


def save_flux_file(components: Components, path: str | os.PathLike, *,
                   layout: str = "all-in-one", dtype: str = "fp32", overwrite: bool = True) -> Path:
    """Write a Flux model as one .safetensors file, written whole or not at all: "all-in-one"
    (the transformer under ``model.diffusion_model.``, CLIP-L, T5 and the VAE under their
    ComfyUI/Forge prefixes) or "transformer" (BFL's bare transformer-only file)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {WRITE_DTYPES}, not {dtype!r}")
    if layout == "transformer":
        return _write(_parts(components, dtype, ("transformer",))["transformer"], Path(path),
                      overwrite)
    parts = _parts(components, dtype, ("transformer",) + tuple(PART_FILES))
    roots = {"transformer": TRANSFORMER_PREFIX, "clip_l": CLIP_PREFIX, "t5xxl": T5_PREFIX,
             "vae": VAE_PREFIXES[0]}
    tensors = {roots[name] + key: value for name, part in parts.items()
               for key, value in part.items()}
    return _write(tensors, Path(path), overwrite)


def save_flux_parts(components: Components, folder: str | os.PathLike, *, dtype: str = "fp32",
                    overwrite: bool = True) -> dict[str, Path]:
    """Write the text encoders and the VAE as Forge keeps them beside a transformer-only file:
    clip_l.safetensors and t5xxl.safetensors (transformers' keys, for models/text_encoder) and
    ae.safetensors (BFL's VAE, for models/VAE), all in ``folder``. Returns name -> path."""
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {WRITE_DTYPES}, not {dtype!r}")
    parts = _parts(components, dtype, tuple(PART_FILES))
    return {name: _write(parts[name], Path(folder) / file, overwrite)
            for name, file in PART_FILES.items()}
