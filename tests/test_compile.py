"""``compile_unet``: the UNet compiled in place with ``Module.compile``: its steps run through
TorchDynamo, train as the eager UNet does, and keep the state_dict keys the export and the
resume points read. The CPU test compiles with Dynamo's ``eager`` backend (the graph capture
without Inductor's C++ build, minutes on two cores); the trainer itself uses the default one."""
from __future__ import annotations

import pytest
import torch

from dreambooth.engine.trainer import train

from trainer_fixtures import RecordingReporter, base_config, flat, run_paths, tiny_components

SETTINGS = dict(max_train_steps=3, with_prior_preservation=False, train_text_encoder=False,
                optimizer="adamw", sample_steps=0)


def run(root, **overrides):
    components = tiny_components()
    keys = list(components.unet.state_dict())
    result = train(base_config(root, **{**SETTINGS, **overrides}), run_paths(root),
                   reporter=RecordingReporter(), components=components, export_model=False)
    return result, components, keys


def test_a_compiled_unet_trains_as_the_eager_one(tmp_path, monkeypatch):
    if not hasattr(torch.nn.Module, "compile"):
        pytest.skip("torch < 2.2 has no Module.compile (the option is refused: next test)")
    from torch import _dynamo

    original = torch.nn.Module.compile
    compiled: list[str] = []

    def eager_backend(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return original(module, backend="eager")

    eager, eager_model, _ = run(tmp_path / "eager")
    monkeypatch.setattr(torch.nn.Module, "compile", eager_backend)
    _dynamo.reset()
    frames_before = _dynamo.utils.counters["frames"]["ok"]
    result, model, keys = run(tmp_path / "compiled", compile_unet=True)
    assert compiled == ["UNet2DConditionModel"]
    assert model.unet._compiled_call_impl is not None
    assert _dynamo.utils.counters["frames"]["ok"] > frames_before  # it ran through Dynamo
    assert list(model.unet.state_dict()) == keys  # no "_orig_mod." prefix
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(eager.losses),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat(model.unet), flat(eager_model.unet), rtol=1e-5, atol=1e-6)
    _dynamo.reset()


def test_compiling_is_refused_by_name_without_module_compile(tmp_path, monkeypatch):
    from dreambooth.common.config import ConfigError

    monkeypatch.delattr(torch.nn.Module, "compile")
    with pytest.raises(ConfigError, match="compile_unet"):
        run(tmp_path, compile_unet=True)
