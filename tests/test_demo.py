"""`make demo`: the whole path on the tiny model (class pictures, caching, training, samples,
export), here with fewer steps."""
from __future__ import annotations

from dreambooth.models import checkpoint, tiny
from dreambooth.app import demo
from trainer_fixtures import RecordingReporter


def test_demo_runs_the_whole_path(tmp_path):
    base_file = demo.base_path(tmp_path)
    base_file.parent.mkdir(parents=True)
    tiny.save_checkpoint(base_file, size="tiny", seed=0)
    base_hash = checkpoint.file_hash(base_file)
    reporter = RecordingReporter()
    shown = []
    reporter.samples = lambda paths: shown.extend(paths)
    result, paths = demo.run(tmp_path, steps=4, reporter=reporter)
    assert reporter.phases[:4] == ["loading", "class_images", "caching", "training"]
    assert "saving" in reporter.phases
    assert result.steps == 4 and not result.cancelled
    assert result.output_path == tmp_path / "Stable-diffusion" / "dreambooth-demo.safetensors"
    assert len(list((tmp_path / "dreambooth" / "demo-class-toy").glob("*.png"))) == 4
    assert shown and all(p.parent == paths.samples_dir for p in shown)
    trained, kind = checkpoint.load_components(result.output_path)
    base, _ = checkpoint.load_components(demo.base_path(tmp_path))
    changed = any(not (a == b).all() for a, b in zip(trained.unet.state_dict().values(),
                                                       base.unet.state_dict().values()))
    assert changed and kind.kind == "sd1"
    assert checkpoint.file_hash(base_file) == base_hash  # the base model is never modified


def test_demo_on_the_tiny_sdxl_model(tmp_path, capsys):
    """`python -m dreambooth demo --family sdxl`: the same path on the SDXL-shaped model."""
    from dreambooth.__main__ import main

    assert main(["demo", "--family", "sdxl", "--steps", "3", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    output = tmp_path / "Stable-diffusion" / "dreambooth-demo-sdxl.safetensors"
    assert str(output) in out and "SDXL" in out
    trained, kind = checkpoint.load_components(output)
    base, _ = checkpoint.load_components(demo.base_path(tmp_path, "sdxl"))
    assert kind.kind == "sdxl"
    # the class pictures were made by the SDXL pipeline from the tiny SDXL model
    assert len(list((tmp_path / "dreambooth" / "demo-class-toy").glob("*.png"))) == 4
    for name in ("unet", "text_encoder", "text_encoder_2"):
        pairs = zip(getattr(trained, name).state_dict().values(),
                    getattr(base, name).state_dict().values())
        assert any(not (a == b).all() for a, b in pairs), f"{name} was not trained"


def test_demo_on_the_tiny_flux_model(tmp_path, capsys):
    """`python -m dreambooth demo --family flux`: a Flux.1 dev LoRA from an all-in-one file, with
    class pictures from the Flux pipeline, samples and kohya's Flux names."""
    from dreambooth.__main__ import main
    from dreambooth.models.adapters.file import read_lora

    assert main(["demo", "--family", "flux", "--steps", "3", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    output = tmp_path / "Lora" / "dreambooth-demo-flux.safetensors"
    assert str(output) in out and "Flux.1" in out
    assert checkpoint.detect_kind(demo.base_path(tmp_path, "flux")).kind == "flux-dev"
    assert len(list((tmp_path / "dreambooth" / "demo-class-toy").glob("*.png"))) == 4
    assert list((tmp_path / "dreambooth" / "dreambooth-demo-flux" / "samples").glob("*.png"))
    tensors, metadata = read_lora(output)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in tensors)
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
