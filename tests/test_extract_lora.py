"""``extract-lora``: a LoRA from a full fine-tune (trained minus base, SVD, top rank).

The "fine-tune" here is the tiny base with exact rank-2 changes added to a few layers (a UNet
attention projection, a feed-forward layer, a 3x3 conv, a 1x1 conv shortcut, a text-encoder
projection) and to one bias; so rank 2 must give back each change (up @ down * alpha / dim equals
it to fp32 rounding: relative error < 1e-5) and keep all of it, rank 1 exactly the best rank-1
share, and nothing else may show up in the file.
"""
from __future__ import annotations

import re

import pytest
import torch

from checkpoint_fixtures import components, make_base
from dreambooth.models import checkpoint
from dreambooth.app import cli
from dreambooth.models import export as ex
from dreambooth.common import files
from dreambooth.models import tiny
from dreambooth.models.adapters import extract, targets
from dreambooth.models.adapters.file import read_lora
from dreambooth.models.families import for_kind

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"  # attention_mlp only
CONV = "mid_block.resnets.0.conv1"  # 3x3: the conv rank
SHORTCUT = "up_blocks.1.resnets.0.conv_shortcut"  # 1x1 in the conv set: the linear rank
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
BIAS = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"
CHANGED = {"unet": [TO_Q, FF, CONV, SHORTCUT], "text_encoder": [TE_Q]}
KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
EXACT = 1e-5  # relative Frobenius error of a rank-2 change rebuilt from fp32 factors
HALF = 3e-3  # the same from a file written in fp16


def rank2_change(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A rank-2 difference of the layer's shape (a conv's flattened to (out, in*k*k))."""
    generator = torch.Generator().manual_seed(seed)
    out, rest = shape[0], int(torch.tensor(shape[1:]).prod())
    a = torch.randn(out, 2, generator=generator) * 0.1
    b = torch.randn(2, rest, generator=generator) * 0.1
    return (a @ b).reshape(shape)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(base file, trained file, {component: {path: added difference}})."""
    folder = tmp_path_factory.mktemp("extract")
    base = make_base(folder, "sd1")
    trained = components("sd1")
    added = {}
    with torch.no_grad():
        for seed, (component, paths) in enumerate(CHANGED.items()):
            model = getattr(trained, component)
            for i, path in enumerate(paths):
                weight = model.get_submodule(path).weight
                delta = rank2_change(tuple(weight.shape), seed * 10 + i)
                weight.add_(delta)
                added.setdefault(component, {})[path] = delta
        trained.unet.get_parameter(BIAS).add_(0.05)  # not something a LoRA carries
    path = ex.save_single_file(trained, folder / "trained.safetensors", kind="sd1")
    half = ex.save_single_file(trained, folder / "trained-fp16.safetensors", kind="sd1",
                               dtype="fp16")
    return base, path, half, added


@pytest.fixture(scope="module")
def loaded(models):
    base, trained, _, _ = models
    return checkpoint.load_components(trained)[0], checkpoint.load_components(base)[0]


def rebuilt(tensors: dict, key: str) -> torch.Tensor:
    """The weight difference a LoRA layer applies: up @ down * alpha / dim."""
    up, down = tensors[f"{key}.lora_up.weight"].float(), tensors[f"{key}.lora_down.weight"].float()
    dim = down.shape[0]
    full = up.reshape(up.shape[0], dim) @ down.reshape(dim, -1)
    return (full * float(tensors[f"{key}.alpha"]) / dim).reshape(up.shape[0], *down.shape[1:])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def layer_names(tensors: dict) -> set[str]:
    return {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
            for key in tensors}


def expected_names(paths_by_component: dict[str, list[str]]) -> set[str]:
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te"}
    return {targets.kohya_name(prefix[c], p) for c, paths in paths_by_component.items()
            for p in paths}


def test_rank_2_gives_back_an_exact_rank_2_change(models, loaded):
    _, _, _, added = models
    tensors, report = extract.extract_lora(*loaded, for_kind("sd1"), rank=2, conv_rank=2,
                                           layers="attention_mlp")
    assert layer_names(tensors) == expected_names(CHANGED)  # untouched layers: no keys
    for component, paths in added.items():
        prefix = targets.prefixes(["text_encoder"])[component]
        for path, delta in paths.items():
            key = targets.kohya_name(prefix, path)
            assert float(tensors[f"{key}.alpha"]) == 2.0
            assert relative_error(rebuilt(tensors, key), delta) < EXACT, key
    unet, text = report.components["unet"], report.components["text_encoder"]
    assert (unet.layers, text.layers) == (4, 1)
    assert unet.kept > 1 - 1e-6 and text.kept > 1 - 1e-6 and unet.worst_kept > 1 - 1e-6
    assert unet.other_changed == 1 and text.other_changed == 0  # the bias, counted, not carried
    assert unet.unchanged == len(targets.target_modules(loaded[1].unet, "unet", "attention_mlp",
                                                        True)) - 4
    assert "100%" in unet.line() and "not in the LoRA" in unet.line()


def test_rank_1_keeps_the_best_rank_1_share_and_says_so(models, loaded):
    _, _, _, added = models
    tensors, report = extract.extract_lora(*loaded, for_kind("sd1"), rank=1, conv_rank=1,
                                           layers="attention_mlp")
    shares, kept, total = {}, 0.0, 0.0
    for path, delta in added["unet"].items():
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double()).square()
        shares[targets.kohya_name("lora_unet", path)] = float(s[0] / s.sum())
        kept, total = kept + float(s[0]), total + float(s.sum())
        key = targets.kohya_name("lora_unet", path)
        assert tensors[f"{key}.lora_down.weight"].shape[0] == 1
        residual = (delta - rebuilt(tensors, key)).norm().square()
        assert float(residual) == pytest.approx(float(s[1]), rel=1e-4)  # Eckart–Young
    unet = report.components["unet"]
    assert unet.kept == pytest.approx(kept / total, rel=1e-5)
    assert unet.kept < 0.95
    worst = min(shares, key=shares.get)
    assert unet.worst_layer == worst and unet.worst_kept == pytest.approx(shares[worst], rel=1e-5)
    assert f"{100 * unet.kept:.2f}%" in unet.line() and worst in unet.line()


def test_conv_rank_0_writes_no_convolution_and_above_0_the_right_shapes(models, loaded):
    _, _, _, added = models
    family = for_kind("sd1")
    plain, _ = extract.extract_lora(*loaded, family, rank=2, conv_rank=0, layers="attention_mlp")
    assert layer_names(plain) == expected_names({"unet": [TO_Q, FF], "text_encoder": [TE_Q]})
    assert not [k for k in plain if "resnets" in k or "samplers" in k]
    assert all(t.dim() == 2 or t.shape[2:] == (1, 1) for t in plain.values() if t.dim())

    locon, report = extract.extract_lora(*loaded, family, rank=2, conv_rank=3,
                                         layers="attention_mlp")
    conv, shortcut = targets.kohya_name("lora_unet", CONV), targets.kohya_name("lora_unet", SHORTCUT)
    assert locon[f"{conv}.lora_down.weight"].shape == (3, 64, 3, 3)  # the conv rank
    assert locon[f"{conv}.lora_up.weight"].shape == (64, 3, 1, 1)
    assert float(locon[f"{conv}.alpha"]) == 3.0
    assert locon[f"{shortcut}.lora_down.weight"].shape == (2, 96, 1, 1)  # 1x1: the rank
    assert locon[f"{shortcut}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert relative_error(rebuilt(locon, conv), added["unet"][CONV]) < EXACT
    assert relative_error(rebuilt(locon, shortcut), added["unet"][SHORTCUT]) < EXACT
    assert report.components["unet"].kept > 1 - 1e-6


def test_attention_only_leaves_the_feed_forward_out_and_counts_it(loaded):
    tensors, report = extract.extract_lora(*loaded, for_kind("sd1"), rank=2, conv_rank=0,
                                           layers="attention")
    assert layer_names(tensors) == expected_names({"unet": [TO_Q], "text_encoder": [TE_Q]})
    # the feed-forward change, the bias; the convs are outside the set too without a conv rank
    assert report.components["unet"].other_changed == 4


def test_the_command_writes_a_kohya_file_and_keeps_an_existing_one(models, tmp_path, capsys):
    base, trained, _, added = models
    out = tmp_path / "extracted.safetensors"
    assert cli.extract_lora_main([str(trained), str(base), str(out), "--rank", "2"]) == files.EXIT_OK
    printed = capsys.readouterr().out
    assert "unet: 2 layers differ" in printed and "text_encoder: 1 layer differs" in printed
    tensors, meta = read_lora(out)
    assert tensors and all(KOHYA_KEY.match(key) for key in tensors)
    for name in layer_names(tensors):  # every layer has its three tensors, fp16 but the alpha
        assert tensors[f"{name}.lora_up.weight"].dtype == torch.float16
        assert tensors[f"{name}.lora_down.weight"].dtype == torch.float16
        assert tensors[f"{name}.alpha"].dtype == torch.float32
    key = targets.kohya_name("lora_unet", TO_Q)
    assert relative_error(rebuilt(tensors, key), added["unet"][TO_Q]) < HALF
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "2"
    assert meta["ss_training_comment"] == "extracted from trained.safetensors minus sd1-base.safetensors"
    assert '"base": "sd1-base.safetensors"' in meta["dreambooth.extracted_from"]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_sd_model_name"] == "sd1-base.safetensors"

    before = out.read_bytes()
    argv = [str(trained), str(base), str(out), "--rank", "2", "--conv-rank", "2"]
    assert cli.extract_lora_main(argv) == files.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "already exists" in error and len(error.strip().splitlines()) == 1
    assert out.read_bytes() == before
    assert cli.extract_lora_main(argv + ["--overwrite", "--dtype", "fp32"]) == files.EXIT_OK
    tensors, meta = read_lora(out)
    assert meta["ss_network_module"] == "lycoris.kohya" and '"algo": "locon"' in meta["ss_network_args"]
    assert targets.kohya_name("lora_unet", CONV) + ".lora_down.weight" in tensors
    assert all(KOHYA_KEY.match(key) for key in tensors)
    assert tensors[f"{key}.lora_up.weight"].dtype == torch.float32


def test_the_command_refuses_other_families_shapes_and_twins(models, tmp_path, capsys):
    base, trained, _, _ = models
    sdxl = make_base(tmp_path, "sdxl")
    small = ex.save_single_file(tiny.build_components("small"), tmp_path / "small.safetensors",
                                kind="sd1")
    out = tmp_path / "never.safetensors"
    for other, reason in ((sdxl, "SD 1.x and sdxl-base.safetensors is SDXL"),
                          (small, "not the same architecture"),
                          (base, "nothing to extract")):
        assert cli.extract_lora_main([str(trained) if other != base else str(base), str(other),
                                      str(out), "--rank", "4"]) == files.EXIT_BAD_INPUT
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and reason in error, error
        assert other.name in error
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([sdxl.name, small.name])
    assert cli.extract_lora_main([str(trained), str(base), str(tmp_path / "x.ckpt"), "--rank",
                                  "2"]) == files.EXIT_BAD_INPUT
    assert cli.extract_lora_main([str(trained), str(base), str(out), "--rank", "0"]) == \
        files.EXIT_BAD_INPUT
    assert "rank must be" in capsys.readouterr().err


def test_an_fp16_fine_tune_of_an_fp32_base_is_not_all_rounding(models, tmp_path):
    """Exported in fp16, every weight differs from the fp32 base by rounding: compared at fp16,
    only the trained layers do."""
    base, _, half, added = models
    assert extract.comparison_precision(half, base) == torch.float16
    assert extract.comparison_precision(base, base) is None
    out, report = extract.extract_lora_file(half, base, tmp_path / "half.safetensors", rank=2,
                                            conv_rank=2, log=lambda line: None)
    tensors, _ = read_lora(out)
    assert layer_names(tensors) == expected_names(CHANGED)
    assert report.components["unet"].kept > 0.999
    key = targets.kohya_name("lora_te", TE_Q)
    assert relative_error(rebuilt(tensors, key), added["text_encoder"][TE_Q]) < HALF


def test_sdxl_text_encoders_get_te1_and_te2_and_openclip_attention_is_whole(tmp_path):
    """SDXL's encoders are lora_te1 (CLIP) and lora_te2 (OpenCLIP); in OpenCLIP's attention,
    which the WebUI runs fused and patches only with all of q/k/v/out, a changed v_proj brings
    its unchanged siblings along as zero layers."""
    base = make_base(tmp_path, "sdxl")
    trained = components("sdxl")
    attention = "text_model.encoder.layers.0.self_attn"
    with torch.no_grad():
        for i, encoder in enumerate((trained.text_encoder, trained.text_encoder_2)):
            weight = encoder.get_submodule(f"{attention}.v_proj").weight
            weight.add_(rank2_change(tuple(weight.shape), 50 + i))
    trained_file = ex.save_single_file(trained, tmp_path / "xl-trained.safetensors", kind="sdxl")
    out, report = extract.extract_lora_file(trained_file, base, tmp_path / "xl.safetensors",
                                            rank=2, log=lambda line: None)
    tensors, meta = read_lora(out)
    name = attention.replace(".", "_")
    assert layer_names(tensors) == {f"lora_te1_{name}_v_proj"} | {
        f"lora_te2_{name}_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert all(KOHYA_KEY.match(key) for key in tensors)
    for p in ("q_proj", "k_proj", "out_proj"):
        assert not tensors[f"lora_te2_{name}_{p}.lora_up.weight"].any()
        assert tensors[f"lora_te2_{name}_{p}.lora_down.weight"].shape == (2, 64)
    assert tensors[f"lora_te2_{name}_v_proj.lora_up.weight"].any()
    second = report.components["text_encoder_2"]
    assert (second.layers, second.completed, report.components["text_encoder"].completed) == (4, 3, 0)
    assert second.kept > 0.99999 and second.worst_layer == f"lora_te2_{name}_v_proj"
    assert "1 layer differs" in second.line() and "3 unchanged attention projections" in second.line()
    assert report.components["unet"].layers == 0
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_a_diffusers_folder_is_a_base_too(models, tmp_path):
    _, trained, _, added = models
    base = checkpoint.load_components(models[0])[0]
    folder = tiny.save_diffusers_folder(base, tmp_path / "base-folder")
    out, report = extract.extract_lora_file(trained, folder, tmp_path / "f.safetensors", rank=2,
                                            dtype="fp32", log=lambda line: None)
    tensors, meta = read_lora(out)
    assert layer_names(tensors) == expected_names({"unet": [TO_Q, FF], "text_encoder": [TE_Q]})
    key = targets.kohya_name("lora_unet", FF)
    assert relative_error(rebuilt(tensors, key), added["unet"][FF]) < EXACT
    assert "base-folder" in meta["ss_training_comment"] and "ss_sd_model_name" not in meta
