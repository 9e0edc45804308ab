"""Our LoRA files as lllyasviel's Forge and Forge Neo apply them (their ComfyUI-derived loaders,
``fake_webui/comfy_lora.py``), as ``test_lora_webui.py`` proves for A1111's rules.

For each host (forge, neo) x base (SD1, SDXL) x kind (LoRA, LoCon with DoRA, LoHa, LoKr): a
1-step adapter trained on the tiny base, put onto the model the host loads from the base single
file, must give that same model loaded from the single file of the diffusers model with the
adapter merged (``test_lora_webui.merged_reference``: the file loaded into LyCORIS networks built
as training builds them, each layer's weight as their forward uses it, converted with the repo's
own converter). No file key may be left unmatched (the hosts' "unmatched keys"; Forge drops the
whole file past 12 of them) and no mapped name may lack its weight; every weight the file touches
matches, every other is the base's own object; strength 0 gives the base bit for bit.

Tolerance, the same argument as for A1111: both sides read the same fp16 adapter tensors and
compute in float32, so they differ only by float32 rounding in another order of operations and,
with DoRA, by the norm's epsilon (the hosts add float32's eps to the column norm, LyCORIS its
own): |ours - reference| <= 1e-5 * max|W| + 1e-5 * |reference| per tensor. Measured: 0 (bit
equal) for LoRA, LoHa and LoKr on both hosts, 2e-9 * max|W| with DoRA; the smallest change of
any changed layer is 2e-4 * max|W| (SD1 LoKr, SDXL DoRA; 5e-4 to 8e-3 for the others), 20 times
the tolerance, so a lost, misplaced or wrongly scaled update is far outside it
(``test_a_broken_rule_is_caught`` doubles the scale, takes DoRA's norm of W instead of W + d and
swaps LoKr's kron order, and sees each fail).
"""
from __future__ import annotations

import pytest
import torch

from dreambooth.models.adapters import targets
from dreambooth.models.ldm_keys import unet_to_ldm
from fake_webui import comfy_lora
import test_lora_webui as a1111
from test_lora_webui import CASES, REAL_LAYOUTS, check_against_reference, merged_reference

KINDS = ("sd1", "sdxl")
# the A1111 test's module fixtures, shared here: one base file per kind, one adapter per case
bases, trained = a1111.bases, a1111.trained


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module, restored after: the tensors are tiny, and on a
    shared 2-core machine two OpenMP threads spin against other processes (measured: a whole
    SDXL patch 1.2 s with 2 threads, 0.09 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(trained, bases):
    """(kind, case) -> the merged reference in the host's loaded-model names, made once."""
    made = {}

    def reference(kind, case):
        if (kind, case) not in made:
            path, _ = bases(kind)
            config, _, tensors = trained(kind, case)
            made[kind, case] = comfy_lora.loaded_model(
                merged_reference(kind, path, config, tensors))
        return made[kind, case]

    return reference


@pytest.fixture(scope="module")
def loaded(bases):
    """kind -> the base as the host loads it (same for both hosts)."""
    made = {}

    def load(kind):
        if kind not in made:
            made[kind] = comfy_lora.loaded_model(bases(kind)[1])
        return made[kind]

    return load


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("host", comfy_lora.HOSTS)
def test_lora_applied_as_the_host_does_equals_the_merged_model(trained, loaded, references,
                                                               host, kind, case):
    base = loaded(kind)
    _, lora_path, tensors = trained(kind, case)
    placement = comfy_lora.place(base, tensors, host=host)
    assert placement.unloaded == []  # every file key loaded: no "unmatched keys"
    assert placement.skipped == []  # every mapped name is a weight of the loaded model
    assert comfy_lora.refused(placement, host) == []
    names = {k.split(".", 1)[0] for k in tensors}
    assert {a.name for a in placement.targets.values()} == names  # one weight per name
    assert any(k.startswith("diffusion_model.") for k in placement.unet)
    if kind == "sd1":
        assert {a.name[:8] for a in placement.clip.values()} == {"lora_te_"}
        assert all(k.startswith("clip_l.transformer.text_model.") for k in placement.clip)
    else:  # ViT-L as clip_l, bigG as clip_g with q/k/v separate (in_proj's thirds)
        assert {k.split(".", 1)[0] for k in placement.clip} == {"clip_l", "clip_g"}
        assert all(a.name.startswith("lora_te1_") == k.startswith("clip_l.")
                   for k, a in placement.clip.items())
        assert any(k.startswith("clip_g.") and k.endswith(".self_attn.k_proj.weight")
                   for k in placement.clip)
    kinds = {a.kind for a in placement.targets.values()}
    assert kinds == {{"lora": "lora", "locon-dora": "lora", "loha": "loha", "lokr": "lokr"}[case]}
    if case == "locon-dora":
        assert all(a.dora_scale is not None for a in placement.targets.values())
        assert any(k.endswith(".in_layers.2.weight") for k in placement.unet)  # a ResNet conv
    if case == "lokr":
        assert any("lokr_w2_a" in a.parts for a in placement.targets.values())
    before = {k: v.clone() for k, v in base.items()}

    ours = comfy_lora.apply_lora(base, lora_path, 1.0, host=host)
    assert ours.dropped == [] and ours.touched == set(placement.targets)
    assert all(torch.equal(base[k], before[k]) for k in base)  # the input is not modified
    check_against_reference(base, ours.state, references(kind, case), ours.touched)

    zero = comfy_lora.apply_lora(base, lora_path, 0.0, host=host).state  # strength 0: the base
    assert zero.keys() == base.keys()
    assert all(torch.equal(zero[k], base[k]) for k in base)
    if case == "lora":  # without DoRA the change is linear in the strength
        half = comfy_lora.apply_lora(base, lora_path, 0.5, host=host).state
        for key in ours.touched:
            torch.testing.assert_close(half[key] - base[key], (ours.state[key] - base[key]) / 2,
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("host", comfy_lora.HOSTS)
def test_text_encoder_and_unet_strengths_are_separate(trained, loaded, host):
    """``<lora:name:te:unet>``: the text encoders' strength touches only clip_*, the UNet's only
    diffusion_model.*."""
    base = loaded("sdxl")
    _, lora_path, _ = trained("sdxl", "lora")
    unet_only = comfy_lora.apply_lora(base, lora_path, 1.0, 0.0, host=host).state
    clip_only = comfy_lora.apply_lora(base, lora_path, 0.0, 1.0, host=host).state
    moved = {k for k in base if not torch.equal(unet_only[k], base[k])}
    assert moved and all(k.startswith("diffusion_model.") for k in moved)
    moved = {k for k in base if not torch.equal(clip_only[k], base[k])}
    assert moved and all(k.startswith(("clip_l.", "clip_g.")) for k in moved)


MUTANTS = {"scale-doubled": ("sd1", "lora"), "dora-norm-of-base": ("sd1", "locon-dora"),
           "lokr-kron-order": ("sd1", "lokr")}


def _dora_norm_of_base(dora_scale, weight, d, alpha, strength):
    """DoRA normalised by ||W|| instead of ||W + d||: a plausible slip."""
    columns = weight.shape[1]
    norm = weight.transpose(0, 1).reshape(columns, -1).norm(dim=1)
    norm = norm.reshape(1, columns, *[1] * (weight.dim() - 2))
    calc = (weight + d * alpha) * (dora_scale.float() / norm)
    return weight + strength * (calc - weight)


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_broken_rule_is_caught(monkeypatch, trained, loaded, references, mutant):
    """The comparison is sharp enough to see one rule of the stand-in broken."""
    kind, case = MUTANTS[mutant]
    base = loaded(kind)
    _, lora_path, _ = trained(kind, case)
    if mutant == "scale-doubled":
        right = comfy_lora.scale
        monkeypatch.setattr(comfy_lora, "scale", lambda alpha, rank: 2 * right(alpha, rank))
    elif mutant == "dora-norm-of-base":
        monkeypatch.setattr(comfy_lora, "weight_decompose", _dora_norm_of_base)
    else:
        monkeypatch.setattr(comfy_lora, "kron", lambda w1, w2: torch.kron(w2, w1))
    ours = comfy_lora.apply_lora(base, lora_path, 1.0, host="forge")
    with pytest.raises(AssertionError):
        check_against_reference(base, ours.state, references(kind, case), ours.touched)


# ---------------------------------------------------------------------------------------------
# The hosts' name map on the real models' block layout, against the repo's own converter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(REAL_LAYOUTS))
def test_host_names_land_where_the_converter_puts_each_layer(layout):
    """Every UNet module with a weight (2 layers per block, as real models have) maps to the
    tensor the repo's converter puts it at, SDXL's first up block's upsampler included (which
    A1111 1.10 drops and ``targets.py`` leaves out for it)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=2, cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32, **REAL_LAYOUTS[layout])
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config)
    loaded_key_of = {id(v): k for k, v in comfy_lora.loaded_model(ldm).items()}
    key_map = comfy_lora.unet_key_map(comfy_lora.loaded_model(ldm))
    layers = [name for name, module in unet.named_modules()
              if isinstance(getattr(module, "weight", None), torch.Tensor)]
    assert "up_blocks.0.upsamplers.0.conv" in layers
    for path in layers:
        name = targets.kohya_name(targets.UNET_PREFIX, path)
        assert key_map.get(name) == loaded_key_of[id(state[path + ".weight"])], name
    depth = 2 if layout == "sdxl" else 1
    assert comfy_lora.unet_layout(comfy_lora.loaded_model(ldm)).transformer_depth_middle == depth


# ---------------------------------------------------------------------------------------------
# What the hosts would not load, and where Forge and Neo part ways
# ---------------------------------------------------------------------------------------------


def _with_stray_keys(tensors, count):
    stray = {f"lora_unet_nowhere_{i}.lora_up.weight": torch.zeros(4, 4) for i in range(count)}
    return {**tensors, **stray}


def test_keys_no_map_takes_are_reported(trained, loaded):
    base = loaded("sd1")
    _, _, tensors = trained("sd1", "lora")
    for host in comfy_lora.HOSTS:
        placement = comfy_lora.place(base, _with_stray_keys(tensors, 2), host=host)
        assert placement.unloaded == ["lora_unet_nowhere_0.lora_up.weight",
                                      "lora_unet_nowhere_1.lora_up.weight"]


def test_forge_drops_a_file_with_more_than_12_unmatched_keys_neo_does_not(trained, loaded):
    """Forge: > 12 unmatched keys -> "LoRA version mismatch", nothing applied. Neo gives up only
    when more than half of the file's keys are unmatched."""
    base = loaded("sd1")
    _, _, tensors = trained("sd1", "lora")
    lora = _with_stray_keys(tensors, 13)
    forge = comfy_lora.apply_lora(base, lora, 1.0, host="forge")
    assert forge.dropped == ["file"] and all(forge.state[k] is base[k] for k in base)
    assert comfy_lora.apply_lora(base, _with_stray_keys(tensors, 12), 1.0,
                                 host="forge").dropped == []
    neo = comfy_lora.apply_lora(base, lora, 1.0, host="neo")
    assert neo.dropped == [] and any(not torch.equal(neo.state[k], base[k]) for k in base)
    half = {k: v for k, v in tensors.items() if k.startswith("lora_te_")}
    assert comfy_lora.apply_lora(base, _with_stray_keys(half, len(half) + 1), 1.0,
                                 host="neo").dropped == ["file"]


def test_a_part_whose_names_have_no_weight_is_dropped(loaded):
    """Names mapped to weights the loaded model lacks (a ResNet's shortcut the map knows from
    the layout, absent in a same-width block): skipped; past Forge's 12 or Neo's quarter the
    whole part is not applied."""
    base = loaded("sd1")
    missing = [k for k, v in comfy_lora.unet_key_map(base).items()
               if k.startswith("lora_unet_") and v not in base]
    assert missing  # e.g. down_blocks.0.resnets.0.conv_shortcut
    adapter = {"lora_down.weight": torch.zeros(1, 1), "lora_up.weight": torch.zeros(1, 1)}
    lora = {f"{name}.{part}": t for name in missing[:1] for part, t in adapter.items()}
    for host in comfy_lora.HOSTS:
        applied = comfy_lora.apply_lora(base, lora, 1.0, host=host)
        assert applied.placement.skipped and applied.placement.unloaded == []
        assert applied.dropped == (["unet"] if host == "neo" else [])  # 1 of 1 > a quarter


def test_sizes_that_do_not_fit_and_unmodelled_forms_are_errors(loaded):
    base = loaded("sd1")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    wrong = {f"{name}.lora_down.weight": torch.zeros(2, 7, 1, 1),
             f"{name}.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    with pytest.raises(ValueError, match="Forge would pad, Neo would leave the weight"):
        comfy_lora.apply_lora(base, wrong, 1.0, host="forge")
    tucker = {**wrong, f"{name}.lora_mid.weight": torch.zeros(2, 2, 3, 3)}
    with pytest.raises(NotImplementedError, match="lora_mid"):
        comfy_lora.place(base, tucker, host="neo")
    with pytest.raises(ValueError, match="host must be one of"):
        comfy_lora.place(base, wrong, host="a1111")
