"""Flux names across the border: diffusers' FluxTransformer2DModel <-> BFL's layout
(``dreambooth/models/flux_layout.py``), and our LoRA files in kohya's Flux names as Forge, Forge
Neo and diffusers read them.

- ``diffusers_to_bfl`` is checked against the real thing: diffusers' own
  ``convert_flux_transformer_checkpoint_to_diffusers`` must give back every key and tensor. That
  converter fixes Flux's widths (3072 hidden, 12288 MLP) to split ``linear1``, so it runs on a
  state with Flux's real output rows and 2 input columns (the converter only cuts rows); the
  tiny model goes through our own inverse.
- A LoRA built as training builds it (``lycoris.build_network`` over ``flux_target_modules``),
  its up weights randomised, is written with ``lora_to_kohya_flux`` and put onto the BFL model
  by the stand-in of Forge's and Neo's loaders (``fake_webui/comfy_lora.py``). Reference: the
  same LyCORIS network merged by LyCORIS' own ``merge_to``, the merged diffusers state turned
  BFL by ``diffusers_to_bfl``. Tolerance: both sides read the same float32 tensors and compute
  in float32; they differ only in summation order (a fused up is the parts' ups with exact
  zeros between), so |ours - reference| <= 1e-6 * max|W| per tensor. Measured: 0 (bit equal)
  on both hosts, both options; the smallest change of a changed weight is 2.3e-2 * max|W|,
  2 x 10^4 times the tolerance (asserted >= 100 times), so swapped k/v rows (error 0.13 *
  max|W|) or an unscaled fused alpha (0.07) are far outside it
  (``test_a_broken_conversion_is_caught``).
- diffusers' kohya-Flux converter (``_convert_kohya_flux_lora_to_diffusers``, reached through
  ``FluxPipeline.lora_state_dict``) hard-codes ``linear1``'s split as [3072]*3 + [12288], so it
  needs Flux's real widths: a depth-1/1 transformer of real widths, built on the meta device
  for the converter check (all lanes), and in float32 on the CPU for the full load through
  PEFT (``load_lora_into_transformer``; only the forge lane has peft): 531 M parameters,
  3.2 GB peak, ~11 s. Outputs: |PEFT - LyCORIS-merged| = 3e-6 on outputs of size 3.3 (float32
  rounding over 3072-wide sums), the LoRA's own change 0.14, so 1e-4 * max|out| bounds the
  error and the change must be 100 times the error.
"""
from __future__ import annotations

import copy

import pytest
import torch

from dreambooth.common.config import TrainingConfig
from dreambooth.models import flux_layout as fl
from dreambooth.models.adapters import lycoris as lyco
from dreambooth.models.adapters import targets
from fake_webui import comfy_lora

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
# Flux.1's real widths at depth 1/1 (24 heads x 128 = 3072; the MLP is 4 x 3072)
REAL = dict(TINY, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=64, axes_dims_rope=(16, 56, 56))
LAYERS = ("attention", "attention_mlp")
TOLERANCE = 1e-6  # x max|W|, see the module docstring


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the tiny tensors (a shared 2-core machine), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flux_model(config: dict, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**config)


def network(model: torch.nn.Module, component: str, prefix: str, layers: str, seed: int):
    """The LyCORIS network training builds (rank 4, alpha 2: scale 0.5), its zero-initialised
    up weights replaced by seeded random ones, as if trained."""
    lyco.quiet()
    config = TrainingConfig(training_method="lora", lora_rank=4, lora_alpha=2.0,
                            lora_layers=layers)
    net = lyco.build_network(model, component, prefix, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return net


# ---------------------------------------------------------------------------------------------
# diffusers <-> BFL
# ---------------------------------------------------------------------------------------------


def test_diffusers_to_bfl_is_the_inverse_of_diffusers_converter():
    from diffusers.loaders.single_file_utils import \
        convert_flux_transformer_checkpoint_to_diffusers as diffusers_converter

    with torch.device("meta"):
        shapes = flux_model(dict(REAL, num_layers=2, num_single_layers=2)).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape[0], *([2] if v.dim() == 2 else []), generator=generator)
             for k, v in shapes.items()}
    bfl = fl.diffusers_to_bfl(dict(state))
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.bias" in bfl
    assert not any(k.startswith("model.") for k in bfl)
    back = diffusers_converter({"model.diffusion_model." + k: v for k, v in bfl.items()})
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # the one reorder: BFL's final AdaLN is (shift, scale), diffusers' norm_out (scale, shift)
    half = state["norm_out.linear.weight"].shape[0] // 2
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"][:half],
                       state["norm_out.linear.weight"][half:])


def test_the_tiny_model_goes_there_and_back():
    state = flux_model(TINY).state_dict()
    bfl = fl.diffusers_to_bfl(dict(state))
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 32 + 128, 32)
    assert torch.equal(bfl["double_blocks.1.txt_attn.qkv.weight"][32:64],
                       state["transformer_blocks.1.attn.add_k_proj.weight"])
    back = fl.bfl_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()})
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_unknown_keys_raise():
    state = flux_model(TINY).state_dict()
    with pytest.raises(ValueError, match="pos_embed.extra"):
        fl.diffusers_to_bfl({**state, "pos_embed.extra": torch.zeros(1)})
    partial = {k: v for k, v in state.items() if k != "transformer_blocks.0.attn.to_k.weight"}
    with pytest.raises(ValueError, match="to_k.weight"):
        fl.diffusers_to_bfl(partial)
    lora = {"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(ValueError, match="lora_unet_transformer_blocks_0_attn_norm_q"):
        fl.lora_to_kohya_flux({**lora, "lora_unet_transformer_blocks_0_attn_norm_q.diff":
                               torch.zeros(16)})
    with pytest.raises(ValueError, match="lora_te2_x.alpha"):
        fl.lora_to_kohya_flux({**lora, "lora_te2_x.alpha": torch.tensor(1.0)})
    loha = {"lora_unet_transformer_blocks_0_attn_to_k.hada_w1_a": torch.zeros(32, 4)}
    with pytest.raises(ValueError, match="only LoRA"):
        fl.lora_to_kohya_flux({**lora, **loha})


# ---------------------------------------------------------------------------------------------
# what a LoRA trains, and its file
# ---------------------------------------------------------------------------------------------


def test_targets_are_linears_the_writer_maps():
    model = flux_model(TINY)
    modules = dict(model.named_modules())
    every_block_linear = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)
                          and n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    names = {layers: fl.flux_target_modules(model, layers) for layers in LAYERS}
    # kohya's default trains every Linear of the double and single blocks, nothing outside
    assert set(names["attention_mlp"]) == every_block_linear
    assert set(names["attention"]) < set(names["attention_mlp"])
    assert "single_transformer_blocks.1.proj_out" in names["attention"]
    assert not any("ff" in n or "norm" in n or "proj_mlp" in n for n in names["attention"])
    for layers in LAYERS:  # every target has a place in a kohya name
        assert all(isinstance(modules[n], torch.nn.Linear) for n in names[layers])
        lora = {}
        for n in names[layers]:
            out, inp = modules[n].weight.shape
            flat = targets.kohya_name("lora_unet", n)
            lora[flat + ".lora_down.weight"] = torch.ones(2, inp)
            lora[flat + ".lora_up.weight"] = torch.ones(out, 2)
        kohya = fl.lora_to_kohya_flux(lora)
        assert len({k.split(".")[0] for k in kohya}) == (26 if layers == "attention_mlp" else 12)


def test_fused_parts_keep_their_own_scale():
    """Parts of different rank and alpha, one part untrained, fp16: each part's delta exact."""
    g = torch.Generator().manual_seed(3)
    hidden, mlp = 8, 32
    parts = {"to_q": (2, 1.0), "to_v": (3, 6.0), "proj_mlp": (1, 0.25)}  # to_k untrained
    lora, want = {}, {}
    for part, (rank, alpha) in parts.items():
        rows = mlp if part == "proj_mlp" else hidden
        down = torch.randn(rank, hidden, generator=g).half()
        up = torch.randn(rows, rank, generator=g).half()
        name = f"lora_unet_single_transformer_blocks_0_{'' if part == 'proj_mlp' else 'attn_'}{part}"
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                     f"{name}.alpha": torch.tensor(alpha)})
        want[part] = up.float() @ down.float() * (alpha / rank)
    kohya = fl.lora_to_kohya_flux(lora)
    name = "lora_unet_single_blocks_0_linear1"
    assert set(kohya) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
    assert down.dtype == up.dtype == torch.float16 and kohya[f"{name}.alpha"].dtype == torch.float32
    assert down.shape == (6, hidden) and up.shape == (3 * hidden + mlp, 6)
    # the common scale is the largest (to_v's 2.0): alpha = 2.0 * 6
    assert kohya[f"{name}.alpha"].item() == 12.0
    delta = up.float() @ down.float() * (kohya[f"{name}.alpha"].item() / 6)
    rows = {"to_q": slice(0, 8), "to_k": slice(8, 16), "to_v": slice(16, 24),
            "proj_mlp": slice(24, 56)}
    assert torch.equal(delta[rows["to_k"]], torch.zeros(hidden, hidden))
    for part, expected in want.items():  # fp16 ups rescaled by 1/4 and 1/8: exact powers of 2
        torch.testing.assert_close(delta[rows[part]], expected, rtol=1e-6, atol=1e-6)


def seeded_lora(layers: str, seed: int) -> tuple:
    """A tiny Flux model and CLIP-L with a seeded LoRA of ``layers`` (as training builds it):
    (base BFL state, merged BFL state, kohya file, base CLIP, merged CLIP), merged by LyCORIS'
    own ``merge_to``. Also used by tests/forge_source_check.py with Forge's own code."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.models.tiny import text_config

    model, clip = flux_model(TINY), CLIPTextModel(CLIPTextConfig(**text_config("tiny")))
    # copies: the state_dicts hold the parameters themselves, which merge_to changes
    base = fl.diffusers_to_bfl(copy.deepcopy(model.state_dict()))
    base_clip = copy.deepcopy(clip.state_dict())
    unet_net = network(model, "unet", "lora_unet", layers, seed=10 + seed)
    text_net = network(clip, "text_encoder", "lora_te1", layers, seed=20 + seed)
    kohya = fl.lora_to_kohya_flux({**unet_net.state_dict(), **text_net.state_dict()})
    for net in (unet_net, text_net):  # LyCORIS' own merge into the base weights
        net.restore()
        net.merge_to(1.0)
    return base, fl.diffusers_to_bfl(model.state_dict()), kohya, base_clip, clip.state_dict()


@pytest.fixture(scope="module")
def trained():
    """layers -> (base BFL state, merged BFL state, kohya file, base CLIP, merged CLIP)."""
    return {layers: seeded_lora(layers, i) for i, layers in enumerate(LAYERS)}


def loaded(bfl: dict, clip: dict) -> dict:
    return comfy_lora.loaded_flux_model(bfl, {"clip_l": clip})


@pytest.mark.parametrize("host", comfy_lora.HOSTS)
@pytest.mark.parametrize("layers", LAYERS)
def test_forge_hosts_apply_our_file(trained, layers, host):
    base, merged, kohya, base_clip, merged_clip = trained[layers]
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_"))
               for k in kohya)
    state = loaded(base, base_clip)
    placement = comfy_lora.place(state, kohya, host=host)
    assert placement.unloaded == [] and placement.skipped == []
    assert comfy_lora.refused(placement, host) == []
    assert all(isinstance(t, str) for t in placement.targets)  # whole weights, no offsets
    assert any(k.startswith("clip_l.") for k in placement.clip)
    applied = comfy_lora.apply_lora(state, kohya, 1.0, host=host).state
    reference = loaded(merged, merged_clip)
    smallest = float("inf")
    for key, weight in state.items():
        scale = weight.abs().max().item()
        error = (applied[key] - reference[key]).abs().max().item()
        assert error <= TOLERANCE * scale, (key, error / scale)
        change = (reference[key] - weight).abs().max().item()
        if key in placement.targets:
            smallest = min(smallest, change / scale)
        else:
            assert applied[key] is weight
    assert smallest >= 100 * TOLERANCE, smallest
    zero = comfy_lora.apply_lora(state, kohya, 0.0, host=host).state
    assert all(torch.equal(zero[k], state[k]) for k in state)


def test_top_level_layers_are_renamed_and_the_final_adaln_swapped():
    """Layers outside the blocks (not trained by default, but mappable): x_embedder -> img_in,
    norm_out.linear -> final_layer.adaLN_modulation.1 with its up's halves swapped, …"""
    model = flux_model(TINY)
    diffusers_state = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(4)
    lora, merged = {}, dict(diffusers_state)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." not in name:
            out, inp = module.weight.shape
            down, up = torch.randn(2, inp, generator=g), torch.randn(out, 2, generator=g) * 0.1
            flat = targets.kohya_name("lora_unet", name)
            lora.update({f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up,
                         f"{flat}.alpha": torch.tensor(1.0)})
            merged[name + ".weight"] = merged[name + ".weight"] + up @ down * 0.5
    kohya = fl.lora_to_kohya_flux(lora)
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in kohya
    assert "lora_unet_guidance_in_out_layer.alpha" in kohya
    state = loaded(fl.diffusers_to_bfl(diffusers_state), {})
    placement = comfy_lora.place(state, kohya, host="neo")
    assert placement.unloaded == [] and placement.skipped == [] and len(placement.unet) == 10
    applied = comfy_lora.apply_lora(state, kohya, 1.0, host="neo").state
    reference = loaded(fl.diffusers_to_bfl(merged), {})
    for key in state:
        torch.testing.assert_close(applied[key], reference[key], rtol=0, atol=1e-6)


def _broken(kohya: dict, how: str) -> dict:
    out = dict(kohya)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    if how == "k and v swapped":
        up = out[f"{name}.lora_up.weight"]
        third = up.shape[0] // 3
        out[f"{name}.lora_up.weight"] = torch.cat([up[:third], up[2 * third:], up[third:2 * third]])
    else:  # "alpha not scaled": the fused alpha left as one part's
        out[f"{name}.alpha"] = out[f"{name}.alpha"] / 3
    return out


@pytest.mark.parametrize("how", ["k and v swapped", "alpha not scaled"])
def test_a_broken_conversion_is_caught(trained, how):
    base, merged, kohya, base_clip, merged_clip = trained["attention"]
    state = loaded(base, base_clip)
    applied = comfy_lora.apply_lora(state, _broken(kohya, how), 1.0, host="forge").state
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    scale = state[key].abs().max().item()
    error = (applied[key] - loaded(merged, merged_clip)[key]).abs().max().item()
    assert error > 100 * TOLERANCE * scale


# ---------------------------------------------------------------------------------------------
# diffusers' kohya-Flux loader
# ---------------------------------------------------------------------------------------------


def _diffusers_lora(kohya: dict) -> dict:
    from diffusers import FluxPipeline

    out = FluxPipeline.lora_state_dict(dict(kohya))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("layers", LAYERS)
def test_diffusers_converter_reads_our_file(layers):
    """On a real-width skeleton (meta device): every diffusers module gets B @ A equal to the
    LyCORIS module's own delta, scale * up @ down (the converter folds alpha / rank in).
    Compared as linear maps on 4 random inputs (the full 3072-wide products cost seconds);
    a rank-limited difference that random inputs all miss has probability 0."""
    with torch.device("meta"):
        model = flux_model(REAL)
    net = network(model, "unet", "lora_unet", layers, seed=5)
    converted = _diffusers_lora(fl.lora_to_kohya_flux(net.state_dict()))
    probe = torch.randn(15360, 4, generator=torch.Generator().manual_seed(2))
    for lora in net.loras:
        path = "transformer." + next(n for n in fl.flux_target_modules(model, layers)
                                     if targets.kohya_name("lora_unet", n) == lora.lora_name)
        x = probe[:lora.lora_down.weight.shape[1]]
        with torch.no_grad():
            ours = converted[path + ".lora_B.weight"] @ (converted[path + ".lora_A.weight"] @ x)
            expected = lora.lora_up.weight @ (lora.lora_down.weight @ x) * lora.scale
        torch.testing.assert_close(ours, expected, rtol=1e-5,
                                   atol=1e-6 * expected.abs().max().item())
    if layers == "attention":  # proj_mlp was not trained: its share of linear1 is zero
        zero = "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"
        assert not converted[zero].any()


def test_clip_l_prefix_is_lora_te1():
    """kohya's Flux LoRA names CLIP-L ``lora_te1_``; diffusers 0.31's Flux converter refuses
    ``lora_te_`` (0.37 takes both), Forge and Neo take both."""
    import diffusers

    tensors = {".lora_down.weight": torch.ones(2, 8), ".lora_up.weight": torch.ones(8, 2),
               ".alpha": torch.tensor(2.0)}
    layer = "text_model_encoder_layers_0_self_attn_q_proj"
    te1 = {f"lora_te1_{layer}{s}": t for s, t in tensors.items()}
    assert set(fl.lora_to_kohya_flux(te1)) == set(te1)
    assert any(k.startswith("text_encoder.") for k in _diffusers_lora(te1))
    te = {f"lora_te_{layer}{s}": t for s, t in tensors.items()}
    if diffusers.__version__.startswith("0.31."):
        with pytest.raises(ValueError, match="Incompatible keys"):
            _diffusers_lora(te)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("peft"),
                    reason="diffusers loads LoRA into a model through peft (forge lane only)")
def test_diffusers_loads_our_file_into_a_real_width_transformer():
    """Real widths, depth 1/1, float32: PEFT's outputs == the LyCORIS-merged model's."""
    from diffusers import FluxPipeline

    with torch.device("meta"):
        model = flux_model(REAL)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    net = network(model, "unet", "lora_unet", "attention_mlp", seed=7)
    kohya = fl.lora_to_kohya_flux(net.state_dict())
    net.restore()
    inputs = _inputs(REAL)
    with torch.no_grad():
        base_out = model(**inputs).sample
        FluxPipeline.load_lora_into_transformer(_diffusers_lora(kohya), None, transformer=model)
        peft_out = model(**inputs).sample
        model.unload_lora()
        net.merge_to(1.0)
        merged_out = model(**inputs).sample
    change = (merged_out - base_out).abs().max().item()
    error = (peft_out - merged_out).abs().max().item()
    scale = merged_out.abs().max().item()
    assert error <= 1e-4 * scale and change >= 100 * error, (error, change, scale)


def _inputs(config: dict, tokens: int = 4, text: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, tokens, config["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"],
                                                  generator=g),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
                return_dict=True)
