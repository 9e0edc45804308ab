"""Our LoRA files as the WebUI's built-in Lora extension applies them (issue 14, 3b and 3c).

A LoRA trained on a tiny base, put onto the base single file the way A1111 1.10 does it
(``fake_webui/lora_networks.py``), must give the single file of the diffusers model with the
same adapter merged in (the file loaded into LyCORIS networks built as training builds them,
each layer's weight as their forward uses it, converted with the repo's own converter): every
tensor the LoRA touches matches, every other is the base's own; at multiplier 0 it is the base
exactly.

Tolerance: both sides read the same fp16 adapter tensors from the file and compute in fp32, so
they differ only by fp32 rounding in another order of operations and LyCORIS' eps in the DoRA
norm: |ours - reference| <= 1e-5 * max|W| + 1e-5 * |reference| per tensor. Measured: 0 (bit
equal) for LoRA, LoHa and LoKr, 6e-7 * max|W| with DoRA; the smallest update of any layer is
2e-4 * max|W| (LoKr) to 3e-3 (LoRA), so a lost, misplaced or wrongly scaled update is far
outside it.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch

from dreambooth.models import tiny
from dreambooth.models.adapters import lycoris, targets
from dreambooth.models.adapters.file import read_lora
from dreambooth.models.detect import detect_kind
from dreambooth.models.detect import UNET_PREFIX
from dreambooth.models.ldm_keys import components_to_ldm, unet_to_ldm
from dreambooth.engine.trainer import train
from fake_webui import lora_networks as webui
from trainer_fixtures import RecordingReporter, base_config, picture_folders, run_paths

FAST = dict(with_prior_preservation=False, learning_rate=1e-2, lora_rank=4, lora_alpha=2.0,
            max_train_steps=1, sample_steps=0, train_text_encoder=True)
CASES = {
    "lora": dict(training_method="lora"),
    "locon-dora": dict(training_method="locon", dora=True, lora_conv_rank=4, lora_conv_alpha=2.0),
    "loha": dict(training_method="loha", lora_conv_rank=4, lora_conv_alpha=2.0),
    # rank 2 makes LyCORIS factor w2 (lokr_w2_a @ lokr_w2_b), so alpha / dim is not 1
    "lokr": dict(training_method="lokr", lora_rank=2, lora_alpha=1.0, lora_conv_rank=2,
                 lora_conv_alpha=1.0),
}
RTOL = ATOL_OF_SCALE = 1e-5


@functools.lru_cache(maxsize=None)
def _components(kind: str) -> tiny.Components:
    return tiny.build_components("tiny", seed=0) if kind == "sd1" else tiny.build_variant(kind, 0)


def fresh(kind: str) -> tiny.Components:
    """The base model as save_checkpoint(kind=...) wrote it, as a new copy."""
    return copy.deepcopy(_components(kind))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """kind -> (its single file, its state dict), made once."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("bases")
    made = {}

    def base(kind):
        if kind not in made:
            path = tiny.save_checkpoint(root / f"{kind}.safetensors", kind=kind)
            made[kind] = path, load_file(str(path))
        return made[kind]

    return base


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bases):
    """(kind, case) -> (config, LoRA file path, its tensors), each trained once."""
    made = {}

    def run(kind, case):
        if (kind, case) not in made:
            root = tmp_path_factory.mktemp(f"{kind}-{case}")
            path, _ = bases(kind)
            picture_folders(root, instances=1, classes=1)  # one picture: one VAE encode, one step
            config = base_config(root, **{**FAST, **CASES[case], "base_model": str(path),
                                          "model_name": f"zwx-{kind}-{case}"})
            result = train(config, run_paths(root), reporter=RecordingReporter(),
                           components=fresh(kind))
            made[kind, case] = config, result.output_path, read_lora(result.output_path)[0]
        return made[kind, case]

    return run


def merged_reference(kind: str, base_path: Path, config, tensors) -> dict[str, torch.Tensor]:
    """The diffusers base with the file's adapter loaded into LyCORIS networks built as training
    builds them, each layer's weight replaced by the one its LyCORIS forward uses, in the
    single-file layout of the repo's own converter.

    The weight is taken from the forward (LyCORIS' rebuild path, captured where it calls the
    layer's op with W' - W), not from ``merge_to``: in lycoris-lora 4.1.3 the merge scales LoHa
    and LoKr twice (``get_weight`` already holds alpha / dim and ``get_diff_weight`` multiplies by
    it again), while the forward that trains them scales once, as the WebUI does."""
    components = fresh(kind)
    detected = detect_kind(base_path)
    lycoris.quiet()
    for component, prefix in targets.prefixes(list(detected.text_encoders)).items():
        own = {k: v for k, v in tensors.items() if k.startswith(prefix + "_")}
        if not own:
            continue
        network = lycoris.build_network(getattr(components, component), component, prefix, config)
        network.load_state_dict(own)  # strict: the file has exactly the network's keys
        deltas = [(module.org_module[0], forward_delta(module)) for module in network.loras]
        network.restore()
        with torch.no_grad():
            for layer, delta in deltas:
                layer.weight += delta
    return components_to_ldm(components, detected)


def forward_delta(module) -> torch.Tensor:
    """W' - W of one LyCORIS module at multiplier 1, as its (non-bypass) forward applies it."""
    layer = module.org_module[0]
    seen = []
    op = module.op

    def capture(x, weight, *args, **kwargs):
        seen.append(weight.detach().clone())
        return op(x, weight, *args, **kwargs)

    module.bypass_mode, module.multiplier, module.op = False, 1.0, capture
    probe = (torch.zeros(1, layer.in_features) if isinstance(layer, torch.nn.Linear)
             else torch.zeros(1, layer.in_channels, 4, 4))
    with torch.no_grad():
        module.eval()(probe)
    module.op = op
    assert len(seen) == 1, module.lora_name
    return seen[0].reshape(layer.weight.shape)


def check_against_reference(base, ours, reference, touched):
    """``touched``: the tensors the WebUI's mapping puts the file's layers on."""
    changed = {k for k in reference if k in base and not torch.equal(reference[k], base[k])}
    assert changed and changed <= touched  # the adapter changes nothing the WebUI leaves alone
    # (a layer with no gradient, e.g. SDXL's unused last CLIP layer, keeps lora_up = 0)
    assert {k for k in touched if not torch.equal(ours[k], base[k])} == changed
    for key in touched:
        weight, got, want = base[key].float(), ours[key].float(), reference[key].float()
        assert got.shape == want.shape and ours[key].dtype == base[key].dtype
        limit = ATOL_OF_SCALE * weight.abs().max() + RTOL * want.abs()
        assert ((got - want).abs() <= limit).all(), (key, (got - want).abs().max().item())
    for key in base:
        if key not in touched:
            assert ours[key] is base[key]


@pytest.mark.parametrize("case", list(CASES))
def test_sd1_lora_applied_as_the_webui_does_equals_the_merged_model(trained, bases, case):
    path, base = bases("sd1")
    config, lora_path, tensors = trained("sd1", case)
    placed = webui.targets(base, tensors)
    assert len(placed) == len(webui.group_file(tensors))  # every layer found (else KeyError)
    assert any(k.startswith("lora_te_") for k in placed)
    assert any(t.ldm_key.startswith(UNET_PREFIX) for t in placed.values())
    if case == "locon-dora":
        assert any(t.ldm_key.endswith("in_layers.2.weight") for t in placed.values())
        assert any(k.endswith(".dora_scale") for k in tensors)
    if case == "lokr":
        assert any(k.endswith(".lokr_w2_b") for k in tensors)
    touched = {t.ldm_key for t in placed.values()}
    before = {k: v.clone() for k, v in base.items()}

    ours = webui.apply_lora(base, lora_path, 1.0)
    assert all(torch.equal(base[k], before[k]) for k in base)  # the input is not modified
    check_against_reference(base, ours, merged_reference("sd1", path, config, tensors), touched)

    # (c) multiplier 0: the base model back, bit for bit
    zero = webui.apply_lora(base, lora_path, 0.0)
    assert zero.keys() == base.keys()
    assert all(torch.equal(zero[k], base[k]) for k in base)
    if case == "lora":  # without DoRA the change is linear in the multiplier
        half = webui.apply_lora(base, lora_path, 0.5)
        for key in touched:
            torch.testing.assert_close(half[key] - base[key], (ours[key] - base[key]) / 2,
                                       rtol=1e-4, atol=1e-6)


def test_sdxl_lora_applied_as_the_webui_does_equals_the_merged_model(trained, bases):
    """Both text encoders: CLIP ViT-L (lora_te1_, found through the WebUI's te1 fallback) and
    OpenCLIP bigG (lora_te2_, q/k/v into the thirds of the fused in_proj_weight)."""
    path, base = bases("sdxl")
    config, lora_path, tensors = trained("sdxl", "lora")
    placed = webui.targets(base, tensors)
    assert any(k.startswith("lora_te1_") for k in placed)
    fused = [t for t in placed.values() if t.rows is not None]
    assert fused and all(t.ldm_key.startswith("conditioner.embedders.1.model.transformer.")
                         and t.ldm_key.endswith(".attn.in_proj_weight") for t in fused)
    touched = {t.ldm_key for t in placed.values()}
    ours = webui.apply_lora(base, lora_path, 1.0)
    check_against_reference(base, ours, merged_reference("sdxl", path, config, tensors), touched)
    zero = webui.apply_lora(base, lora_path, 0.0)
    assert all(torch.equal(zero[k], base[k]) for k in base)


def test_sd2_lora_goes_into_openclips_fused_attention(trained, bases):
    """SD2's one OpenCLIP encoder: lora_te_ keys, converted the SD2 way (attn, mlp_c_fc)."""
    path, base = bases("sd2")
    config, lora_path, tensors = trained("sd2", "lora")
    placed = webui.targets(base, tensors)
    assert {t.ldm_key.rsplit(".", 2)[-2] for t in placed.values()
            if t.ldm_key.startswith("cond_stage_model.")} >= {"attn", "out_proj", "c_fc", "c_proj"}
    touched = {t.ldm_key for t in placed.values()}
    ours = webui.apply_lora(base, lora_path, 1.0)
    check_against_reference(base, ours, merged_reference("sd2", path, config, tensors), touched)


# ---------------------------------------------------------------------------------------------
# The name conversion on the real models' block layout (2 layers per block: what the WebUI's
# formula assumes), against the repo's own diffusers -> LDM converter
# ---------------------------------------------------------------------------------------------

REAL_LAYOUTS = {
    "sd1": dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(32, 32, 32, 32)),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 1, 2),
                 use_linear_projection=True),
}


@pytest.mark.parametrize("layout", list(REAL_LAYOUTS))
def test_webui_names_land_where_the_converter_puts_each_layer(layout):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=2, cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32, **REAL_LAYOUTS[layout])
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config)
    ldm_key_of = {id(value): key for key, value in ldm.items()}  # the converter moves, not copies
    mapping = webui.layer_mapping(ldm)
    assert webui.layers_per_block(ldm) == 2
    lost = set()
    for path in targets.target_modules(unet, "unet", "attention_mlp", convs=True):
        name = targets.kohya_name(targets.UNET_PREFIX, path)
        expected = ldm_key_of[id(state[path + ".weight"])]
        try:
            _, layer = webui.find_layer(name, mapping, is_sd2=False, per_block=2)
        except KeyError:
            lost.add(name)
            continue
        assert f"{layer.path}.weight" == expected, name
    # A1111 1.10 puts an up block's upsampler after its attention only from the second up block
    # on (SD1/SD2's first up block has none); SDXL's first has one, so the WebUI would look for
    # output_blocks_2_1_conv and drop that layer: targets.py leaves it out (SDXL only)
    assert lost == set()
    assert ("up_blocks.0.upsamplers.0.conv" in targets.target_modules(
        unet, "unet", "attention_mlp", convs=True)) == (layout != "sdxl")


def test_what_the_webui_would_drop_or_skip_is_an_error(bases):
    _, base = bases("sd2")
    one = torch.zeros(4, 32)
    with pytest.raises(KeyError, match="lora_unet_down_blocks_9_attentions_0_proj_in"):
        webui.targets(base, {"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": one})
    qkv = {f"lora_te_text_model_encoder_layers_0_self_attn_{p}.{part}": torch.zeros(shape)
           for p in ("q_proj", "k_proj", "v_proj")
           for part, shape in (("lora_down.weight", (4, 32)), ("lora_up.weight", (32, 4)))}
    with pytest.raises(ValueError, match="out_proj all present"):
        webui.targets(base, qkv)  # OpenCLIP's fused attention without out_proj: skipped whole
