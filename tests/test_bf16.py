"""``trained_precision`` bf16: the trained weights kept in bf16 and updated through an fp32 copy
with stochastic rounding — half the memory of fp32 master weights, the same training within a
stated tolerance, and small updates that add up instead of being rounded away."""
from __future__ import annotations

import pytest
import torch

from dreambooth.engine import fused
from dreambooth.engine.trainer import train

from trainer_fixtures import (Crash, RecordingReporter, base_config, crash_at, flat, run_paths,
                              tiny_components)

# bf16 mixed precision both ways (the CPU's autocast), so only the trained weights' precision
# differs between the runs compared.
BF16 = dict(max_grad_norm=0.0, optimizer="adamw", mixed_precision="bf16", learning_rate=1e-3,
            with_prior_preservation=True, train_text_encoder=True, max_train_steps=8,
            sample_steps=0)


def run(root, reporter=None, **overrides):
    config = base_config(root, **{**BF16, **overrides})
    components = tiny_components()
    result = train(config, run_paths(root), reporter=reporter or RecordingReporter(),
                   components=components, export_model=False)
    return result, components


def test_stochastic_rounding_is_exact_on_average():
    value = torch.full((200_000,), 1.0 + 2 ** -10)  # a quarter of the way from 1 to 1 + 2^-8
    rounded = torch.empty_like(value, dtype=torch.bfloat16)
    fused.round_to_bf16_(rounded, value, torch.Generator().manual_seed(0))
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}  # only the neighbours
    assert rounded.float().mean().item() == pytest.approx(value[0].item(), abs=2e-5)
    assert value.to(torch.bfloat16).float().mean().item() == 1.0  # round-to-nearest loses it
    negative = torch.full((200_000,), -(1.0 + 2 ** -10))
    fused.round_to_bf16_(rounded, negative, torch.Generator().manual_seed(1))
    assert rounded.float().mean().item() == pytest.approx(negative[0].item(), abs=2e-5)


def test_small_updates_add_up_in_bf16():
    """Many steps each below half a bf16 step: rounded to nearest they all vanish; through the
    per-weight optimizer's fp32 copy and stochastic rounding they move the weight as fp32 does."""
    start = torch.full((4096,), 0.1)
    reference = torch.nn.Parameter(start.clone())
    plain = torch.nn.Parameter(start.to(torch.bfloat16))
    rounded = torch.nn.Parameter(start.to(torch.bfloat16))
    make = lambda groups: torch.optim.SGD(groups)  # noqa: E731
    optimizers = [torch.optim.SGD([reference], lr=1e-5), torch.optim.SGD([plain], lr=1e-5),
                  fused.PerWeightOptimizer([{"params": [rounded], "lr": 1e-5}], make,
                                           in_backward=False,
                                           generator=torch.Generator().manual_seed(0))]
    for _ in range(200):
        for param, optimizer in zip((reference, plain, rounded), optimizers):
            param.grad = torch.ones_like(param)
            optimizer.step()
    moved = (start - reference.detach()).mean().item()  # 200 * 1e-5 = 2e-3
    assert moved == pytest.approx(2e-3, rel=1e-3)
    assert torch.equal(plain.detach(), start.to(torch.bfloat16))  # every update rounded away
    assert (start - rounded.detach().float()).mean().item() == pytest.approx(moved, rel=0.05)
    assert rounded.dtype == torch.bfloat16 and rounded.grad is None


@pytest.mark.parametrize("fused_backward", [False, True])
def test_bf16_weights_train_like_fp32_master_weights(tmp_path, fused_backward):
    fp32, fp32_model = run(tmp_path / "fp32")
    half, half_model = run(tmp_path / "bf16", trained_precision="bf16",
                           fused_backward=fused_backward)
    seen = {p.dtype for p in half_model.unet.parameters()} | \
        {p.dtype for p in half_model.text_encoder.parameters()}
    assert seen == {torch.bfloat16}  # what trained was bf16 (half the bytes)
    assert {p.dtype for p in fp32_model.unet.parameters()} == {torch.float32}
    # The loss curves: measured within 0.3 % at every step of 8 (lr 1e-3, bf16 autocast both
    # ways); 2 % is the tolerance.
    torch.testing.assert_close(torch.tensor(half.losses), torch.tensor(fp32.losses), rtol=0.02,
                               atol=1e-4)
    # and it trained: the weights moved from the start by about what fp32's did
    start = flat(tiny_components().unet)
    moved_fp32 = (flat(fp32_model.unet) - start).norm()
    moved_bf16 = (flat(half_model.unet).float() - start).norm()
    assert moved_bf16 == pytest.approx(moved_fp32.item(), rel=0.05)


def test_a_bf16_run_resumes_to_the_same_weights(tmp_path):
    """The rounding's random numbers are part of the resume point: resumed = straight, bit for bit."""
    settings = dict(trained_precision="bf16", checkpoint_every_n_steps=2, max_train_steps=4)
    _, straight = run(tmp_path / "a", **settings)
    with pytest.raises(Crash):
        run(tmp_path / "b", reporter=crash_at(3), **settings)
    config = base_config(tmp_path / "b", **{**BF16, **settings})
    resumed = tiny_components()
    reporter = RecordingReporter()
    train(config, run_paths(tmp_path / "b"), reporter=reporter, components=resumed, resume=True,
          export_model=False)
    assert [s for s, _, _ in reporter.steps] == [3, 4]
    assert torch.equal(flat(resumed.unet), flat(straight.unet))
    assert torch.equal(flat(resumed.text_encoder), flat(straight.text_encoder))


def test_what_bf16_weights_need_is_asked_by_name(tmp_path):
    assert {e.field for e in base_config(tmp_path, trained_precision="bf16",
                                         mixed_precision="no").validate()} == {"trained_precision"}
    assert "prodigy" in base_config(tmp_path, trained_precision="bf16", mixed_precision="bf16",
                                    optimizer="prodigy").validate()[0].message
    assert base_config(tmp_path, trained_precision="bf16", mixed_precision="bf16").validate() == []


@pytest.mark.parametrize("written, resumed, field", [
    (dict(trained_precision="bf16"), dict(trained_precision="fp32"), "trained_precision"),
    (dict(fused_backward=True), dict(fused_backward=False), "fused_backward"),
    (dict(), dict(trained_precision="bf16"), "trained_precision")])
def test_resuming_with_other_memory_settings_names_the_field(tmp_path, written, resumed, field):
    from dreambooth.common.config import ConfigError

    settings = dict(checkpoint_every_n_steps=2, max_train_steps=4, **written)
    with pytest.raises(Crash):
        run(tmp_path, reporter=crash_at(3), **settings)
    config = base_config(tmp_path, **{**BF16, **settings, **resumed})
    with pytest.raises(ConfigError) as caught:
        train(config, run_paths(tmp_path), reporter=RecordingReporter(),
              components=tiny_components(), resume=True, export_model=False)
    assert [e.field for e in caught.value.errors] == [field]
    assert "as it was" in caught.value.errors[0].message or "as they were" in caught.value.errors[0].message
