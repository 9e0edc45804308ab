"""The frozen base in NF4 (``base_weights_4bit``, bitsandbytes): each linear weight in 4 bits with
a scale per 64, dequantized for the moment of its matmul; nothing larger than the packed weight
kept for the backward; a LoRA trains over it with the same keys as over a full-precision base and
a loss close to that run's; Flux's blocks swap with it; what cannot is refused by field."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from dreambooth.common.config import ConfigError
from dreambooth.engine.trainer import train
from dreambooth.models import tiny
from dreambooth.models.adapters.file import read_lora
from trainer_fixtures import RecordingReporter, base_config, run_paths, tiny_components

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed in this lane "
                          "(Forge Neo without --bnb): the 4-bit base is refused instead")
pytest.importorskip("lycoris")

from dreambooth.models.adapters import nf4  # noqa: E402

RUN = dict(training_method="lora", model_name="zwx-nf4", with_prior_preservation=False,
           learning_rate=1e-2, lora_rank=4, lora_alpha=2.0, max_train_steps=4, sample_steps=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_nf4_layer_computes_with_its_dequantized_weight_and_keeps_only_nf4(dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 128).to(dtype).requires_grad_(False)
    original = layer.weight.detach().clone()
    stored = nf4.nf4_linears(layer)
    assert stored.layers == 1 and layer.weight.dtype == torch.uint8
    assert stored.bytes_after == 256 * 128 // 2 + 256 * 128 // 64 * 4  # 4 bits + a scale per 64
    weight = nf4.dequantize(layer.weight, layer.nf4_absmax, torch.Size((128, 256)), dtype)
    assert 0 < (weight.float() - original.float()).abs().mean() < 0.1 * original.abs().mean()
    x = torch.randn(3, 256, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.detach(), weight, layer.bias),
                               rtol=0, atol=0)
    y.float().square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * y.detach().float() @ weight.float()).to(dtype),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)
    # kept for the backward: the packed weight and its scales, nothing of weight size in dtype
    assert max(t.numel() * t.element_size() for t in saved) < weight.numel() * 1


def lora_run(root: Path, **overrides):
    root.mkdir(parents=True, exist_ok=True)
    tiny.save_checkpoint(root / "base.safetensors", size="tiny", seed=0)
    reporter = RecordingReporter()
    result = train(base_config(root, **{**RUN, **overrides}), run_paths(root), reporter=reporter,
                   components=tiny_components())
    return result, read_lora(result.output_path)[0], reporter.lines


def test_a_lora_trains_over_an_nf4_base_with_the_same_keys_and_a_close_loss(tmp_path):
    plain, plain_file, _ = lora_run(tmp_path / "plain")
    result, tensors, lines = lora_run(tmp_path / "nf4", base_weights_4bit=True)
    assert any("linear layers of the SD 1.x denoiser in NF4" in line for line in lines)
    assert set(tensors) == set(plain_file)
    assert all(tensors[k].dtype == plain_file[k].dtype for k in tensors)
    assert all(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    # measured (4 steps, seed 7): within 7.8e-4 of the fp32 base's losses (int8: 1.6e-4)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(plain.losses),
                               rtol=3e-3, atol=0)
    assert result.losses != plain.losses


def test_flux_blocks_swap_over_an_nf4_base_to_the_same_lora(tmp_path):
    from dreambooth.models.tiny_flux import build_flux
    from test_block_swap import flux_swap_run

    built = build_flux("dev", seed=0, depth=2, single_depth=3)
    plain, _ = flux_swap_run(tmp_path / "plain", copy.deepcopy(built), base_weights_4bit=True)
    swapped, lines = flux_swap_run(tmp_path / "swapped", copy.deepcopy(built), blocks_to_swap=3,
                                   base_weights_4bit=True)
    ours, theirs = read_lora(swapped.output_path)[0], read_lora(plain.output_path)[0]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours) and ours.keys() == theirs.keys()
    assert any("in NF4" in line for line in lines)


def test_what_cannot_keep_its_base_in_4_bits_is_refused_by_name(tmp_path, monkeypatch):
    def fields(**settings):
        return {e.field for e in base_config(tmp_path, **{**RUN, **settings}).validate()}

    assert "base_weights_4bit" in fields(training_method="full", base_weights_4bit=True)
    assert "base_weights_4bit" in fields(dora=True, base_weights_4bit=True)
    assert "base_weights_4bit" in fields(base_weights_8bit=True, base_weights_4bit=True)
    assert "base_weights_4bit" not in fields(base_weights_4bit=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: before any work
    with pytest.raises(ConfigError, match="base_weights_4bit: bitsandbytes is not installed"):
        lora_run(tmp_path / "missing", base_weights_4bit=True)
    assert not (tmp_path / "missing" / "Lora").exists()
