"""The fused backward pass: the same training as the plain path, without a full set of
gradients ever held; what it cannot honour is refused by name."""
from __future__ import annotations

import pytest
import torch

from dreambooth.engine import fused
from dreambooth.models import tiny
from dreambooth.common.config import ConfigError
from dreambooth.engine.trainer import train

from trainer_fixtures import (Crash, RecordingReporter, base_config, crash_at, flat, run_paths,
                              tiny_components)

PLAIN = dict(max_grad_norm=0.0, optimizer="adamw", with_prior_preservation=True,
             train_text_encoder=True, text_encoder_stop=0.5, max_train_steps=4, sample_steps=0)


def run(root, reporter=None, export=False, **overrides):
    config = base_config(root, **{**PLAIN, **overrides})
    components = tiny_components()
    result = train(config, run_paths(root), reporter=reporter or RecordingReporter(),
                   components=components, export_model=export)
    return result, components


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fused_trains_exactly_as_the_plain_path(tmp_path, optimizer):
    plain, plain_model = run(tmp_path / "plain", optimizer=optimizer)
    fused_run, fused_model = run(tmp_path / "fused", optimizer=optimizer, fused_backward=True)
    # same losses and weights (the text encoder frozen after step 2 included); per-parameter
    # steps are the same arithmetic, so only summation order could differ
    torch.testing.assert_close(torch.tensor(fused_run.losses), torch.tensor(plain.losses),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat(fused_model.unet), flat(plain_model.unet), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat(fused_model.text_encoder), flat(plain_model.text_encoder),
                               rtol=1e-5, atol=1e-6)
    assert not torch.equal(flat(plain_model.unet), flat(tiny_components().unet))  # it trained


def test_no_full_set_of_gradients_is_ever_held(tmp_path, monkeypatch):
    """At each weight's step, how many gradients exist: with fusing only the few of the layers
    whose backward is done and not yet stepped, never all of them."""
    live: list[int] = []
    original = fused.PerWeightOptimizer._stepper

    def counting(group, inner, generator):
        step = original(group, inner, generator)

        def counted(param):
            live.append(sum(p.grad is not None for p in counted.params))
            step(param)
        counted.params = group["params"]
        return counted

    monkeypatch.setattr(fused.PerWeightOptimizer, "_stepper", staticmethod(counting))
    run(tmp_path, fused_backward=True, train_text_encoder=False, max_train_steps=2)
    unet_params = len(list(tiny_components().unet.parameters()))
    assert live and max(live) <= 2 < unet_params  # measured: 1 (the weight being stepped)


def test_what_fusing_cannot_honour_is_refused_by_name(tmp_path):
    config = base_config(tmp_path, fused_backward=True, max_grad_norm=1.0,
                         gradient_accumulation_steps=2, optimizer="prodigy")
    assert {e.field for e in config.validate()} >= {"max_grad_norm", "gradient_accumulation_steps",
                                                    "fused_backward"}
    assert fused.runtime_problem("fp16", 1).field == "fused_backward"
    assert "bf16" in fused.runtime_problem("fp16", 1).message
    assert fused.runtime_problem("no", 2) is not None and fused.runtime_problem("bf16", 1) is None
    with pytest.raises(ConfigError, match="max_grad_norm"):
        run(tmp_path, fused_backward=True, max_grad_norm=1.0)


def test_a_fused_run_resumes_to_the_same_weights(tmp_path):
    _, straight = run(tmp_path / "a", fused_backward=True, checkpoint_every_n_steps=2)

    with pytest.raises(Crash):
        run(tmp_path / "b", reporter=crash_at(3), fused_backward=True,
            checkpoint_every_n_steps=2)
    config = base_config(tmp_path / "b", **{**PLAIN, "fused_backward": True,
                                           "checkpoint_every_n_steps": 2})
    resumed = tiny_components()
    reporter = RecordingReporter()
    train(config, run_paths(tmp_path / "b"), reporter=reporter, components=resumed,
          resume=True, export_model=False)
    assert [s for s, _, _ in reporter.steps] == [3, 4]
    assert torch.equal(flat(resumed.unet), flat(straight.unet))
    assert torch.equal(flat(resumed.text_encoder), flat(straight.text_encoder))


def test_a_lora_trains_fused_too(tmp_path):
    from dreambooth.models.adapters.file import read_lora

    tiny.save_checkpoint(tmp_path / "base.safetensors", size="tiny", seed=0)
    lora = dict(training_method="lora", lora_rank=4, learning_rate=1e-2, export_dtype="fp32",
                with_prior_preservation=False, max_train_steps=2)
    outputs = []
    for name, extra in (("plain", {}), ("fused", {"fused_backward": True})):
        result, _ = run(tmp_path, export=True, model_name=f"lora-{name}", **lora, **extra)
        outputs.append(read_lora(result.output_path)[0])
    plain_file, fused_file = outputs
    assert plain_file.keys() == fused_file.keys()
    for key in plain_file:
        torch.testing.assert_close(fused_file[key], plain_file[key], rtol=1e-5, atol=1e-6)
