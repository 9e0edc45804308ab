"""LoRA-family training: only the adapter trains, every option reaches the file, the file is
what diffusers' own loader reads, and it lands in models/Lora with its metadata and card picture."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreambooth.models import tiny
from dreambooth.models.adapters import lycoris, targets
from dreambooth.models.adapters.file import read_lora
from dreambooth.common.config import ConfigError
from dreambooth.engine.trainer import train

from trainer_fixtures import (Crash, RecordingReporter, base_config, crash_at, flat, run_paths,
                              tiny_components)

FAST = dict(with_prior_preservation=False, learning_rate=1e-2, lora_rank=4, lora_alpha=2.0,
            max_train_steps=2, sample_steps=0)


def lora_run(root: Path, reporter=None, components=None, **overrides):
    base = root / "base.safetensors"
    if not base.exists():
        root.mkdir(parents=True, exist_ok=True)
        tiny.save_checkpoint(base, size="tiny", seed=0)
    config = base_config(root, **{"training_method": "lora", "model_name": "zwx-lora", **FAST,
                                  **overrides})
    components = components or tiny_components()
    result = train(config, run_paths(root), reporter=reporter or RecordingReporter(),
                   components=components)
    tensors, metadata = read_lora(result.output_path)
    return result, components, tensors, metadata


def suffixes(tensors) -> set[str]:
    return {key.split(".", 1)[1] for key in tensors}


def test_a_lora_run_trains_only_the_adapter_and_writes_it_to_models_lora(tmp_path):
    untouched = tiny_components()
    result, components, tensors, metadata = lora_run(
        tmp_path, train_text_encoder=True, with_prior_preservation=True, sample_steps=2,
        max_train_steps=3)
    # the base models are exactly what they were (the adapter lived beside them)
    assert torch.equal(flat(components.unet), flat(untouched.unet))
    assert torch.equal(flat(components.text_encoder), flat(untouched.text_encoder))
    assert result.output_path == tmp_path / "Lora" / "zwx-lora.safetensors"
    assert not (tmp_path / "Stable-diffusion" / "zwx-lora.safetensors").exists()
    assert (tmp_path / "Lora" / "zwx-lora.png").is_file()  # the Lora card's picture
    assert suffixes(tensors) == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.")
               for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert all(v.dtype == torch.float16 for v in ups)  # fp16 by default
    assert any(v.abs().max() > 0 for v in ups)  # it trained (lora_up starts at zero)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["ss_output_name"] == "zwx-lora"
    assert json.loads(metadata["ss_tag_frequency"]) == {"instance": {"photo of zwx toy": 4}}
    assert "photo of zwx toy" in metadata["ss_training_comment"]
    assert metadata["ss_num_reg_images"] == "4" and metadata["dreambooth.training_method"] == "lora"


@pytest.mark.parametrize("method, expected", [
    ("locon", {"lora_down.weight", "lora_up.weight", "alpha"}),
    ("loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    ("lokr", {"lokr_w1", "lokr_w2", "alpha"}),
])
def test_each_lycoris_kind_writes_the_keys_the_webui_reads(tmp_path, method, expected):
    _, _, tensors, metadata = lora_run(tmp_path, training_method=method, lora_conv_rank=4,
                                       model_name=f"zwx-{method}")
    assert expected <= suffixes(tensors) <= expected | {"lokr_w2_a", "lokr_w2_b", "lokr_w1_a",
                                                        "lokr_w1_b"}
    assert any("_resnets_0_conv1." in k for k in tensors)  # the ResNet convolutions too
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == method


def test_layers_rank_alpha_and_conv_rank_reach_the_file(tmp_path):
    _, _, attention, _ = lora_run(tmp_path / "a", lora_layers="attention")
    _, _, mlp, meta = lora_run(tmp_path / "b", lora_layers="attention_mlp", lora_rank=8,
                               lora_alpha=0.0)
    assert not any("_ff_net_" in k or "_proj_in." in k for k in attention)
    assert any("_ff_net_0_proj." in k for k in mlp) and any("_proj_in." in k for k in mlp)
    assert not any("_resnets_" in k for k in mlp)  # plain LoRA: no convolutions
    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    assert attention[down].shape[0] == 4 and mlp[down].shape[0] == 8
    alpha = down.replace("lora_down.weight", "alpha")
    assert attention[alpha].item() == 2.0 and mlp[alpha].item() == 8.0  # 0: alpha = rank
    assert meta["ss_network_alpha"] == "8"
    _, _, conv, _ = lora_run(tmp_path / "c", training_method="locon", lora_conv_rank=2,
                             lora_conv_alpha=1.0)
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert conv[f"{conv1}.lora_down.weight"].shape[:2] == (2, 32)
    assert conv[f"{conv1}.lora_down.weight"].shape[2:] == (3, 3)
    assert conv[f"{conv1}.alpha"].item() == 1.0
    # 1x1 and linear layers in the ResNet blocks take the linear rank
    assert conv["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4
    _, _, loha, _ = lora_run(tmp_path / "d", training_method="loha", lora_conv_rank=0)
    assert not any("_resnets_" in k for k in loha)  # conv rank 0: no convolutions for LoHa


def test_dora_dropout_lokr_factor_and_the_text_encoder_options_change_training(tmp_path):
    _, _, plain, _ = lora_run(tmp_path / "plain")
    _, _, again, _ = lora_run(tmp_path / "again")
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # a run is repeatable (its seed)
    _, _, dora, meta = lora_run(tmp_path / "dora", dora=True)
    scale = dora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"]
    assert scale.shape == (1, 32)  # per input column: the WebUI's rule
    assert json.loads(meta["ss_network_args"])["dora_wd"] is True
    assert meta["ss_network_module"] == "lycoris.kohya"
    up = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    _, _, dropout, _ = lora_run(tmp_path / "dropout", lora_dropout=0.5)
    assert not torch.equal(plain[up], dropout[up])
    _, _, factor2, _ = lora_run(tmp_path / "f2", training_method="lokr", lokr_factor=2)
    _, _, factor4, _ = lora_run(tmp_path / "f4", training_method="lokr", lokr_factor=4)
    w1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1"
    assert factor2[w1].shape == (2, 2) and factor4[w1].shape == (4, 4)
    assert not any(k.startswith("lora_te") for k in plain)  # text encoder not trained
    _, _, te_slow, _ = lora_run(tmp_path / "te1", train_text_encoder=True, text_encoder_lr=1e-4)
    _, _, te_fast, _ = lora_run(tmp_path / "te2", train_text_encoder=True, text_encoder_lr=1e-2)
    te_up = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    assert te_fast[te_up].float().abs().max() > 10 * te_slow[te_up].float().abs().max()


def test_the_file_reads_back_through_diffusers_own_loader(tmp_path):
    """diffusers' kohya converter takes every key; where its PEFT backend runs (transformers
    >= 4.34: the Forge lane) the loaded pipeline gives the trained adapter's outputs."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import USE_PEFT_BACKEND

    config_values = dict(train_text_encoder=True, training_method="locon", lora_conv_rank=4,
                         export_dtype="fp32")
    result, _, tensors, _ = lora_run(tmp_path, **config_values)
    where = dict(pretrained_model_name_or_path_or_dict=str(result.output_path.parent),
                 weight_name=result.output_path.name)  # offline: diffusers wants the name said
    converted, alphas = StableDiffusionPipeline.lora_state_dict(**where)
    layers = {k.rsplit(".", 2)[0] for k in tensors}
    assert len(alphas) == len(layers)  # every layer converted, each with its alpha
    assert all(k.startswith(("unet.", "text_encoder.")) for k in converted)

    # the adapter as trained: fresh base models, the file's weights in LyCORIS networks
    config = base_config(tmp_path, **{**FAST, **config_values})
    trained = tiny_components()
    networks = lycoris.attach({"unet": trained.unet, "text_encoder": trained.text_encoder},
                              targets.prefixes(["text_encoder"]), config, "cpu")
    for network in networks.values():
        assert not network.load_state_dict(tensors, strict=False).missing_keys
    loaded = tiny_components()
    pipe = loaded.pipeline()
    if not USE_PEFT_BACKEND:  # the WebUI's transformers 4.30: diffusers says so itself
        with pytest.raises(ValueError, match="PEFT backend is required"):
            pipe.load_lora_weights(**where)
        return
    pipe.load_lora_weights(**where)
    torch.manual_seed(0)
    noisy, steps = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ids = loaded.tokenizer(["photo of zwx toy", "a toy"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        want_text = trained.text_encoder(ids)[0]
        want = trained.unet(noisy, steps, want_text).sample
        got_text = pipe.text_encoder(ids)[0]
        got = pipe.unet(noisy, steps, got_text).sample
        base = tiny_components()
        untrained = base.unet(noisy, steps, base.text_encoder(ids)[0]).sample
    assert (want - untrained).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got_text, want_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_cancelled_lora_run_resumes_to_the_same_adapter(tmp_path):
    options = dict(max_train_steps=4, checkpoint_every_n_steps=2, train_text_encoder=True,
                   use_ema=True, export_dtype="fp32")
    _, _, straight, _ = lora_run(tmp_path / "a", **options)

    with pytest.raises(Crash):
        lora_run(tmp_path / "b", reporter=crash_at(3), **options)
    reporter = RecordingReporter()
    config = base_config(tmp_path / "b", **{"training_method": "lora", "model_name": "zwx-lora",
                                           **FAST, **options})
    result = train(config, run_paths(tmp_path / "b"), reporter=reporter,
                   components=tiny_components(), resume=True)
    assert [s for s, _, _ in reporter.steps] == [3, 4]
    resumed, _ = read_lora(result.output_path)
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_ema_and_intermediate_saves_of_a_lora(tmp_path):
    _, _, plain, _ = lora_run(tmp_path / "a", max_train_steps=4)
    result, _, averaged, _ = lora_run(tmp_path / "b", max_train_steps=4, use_ema=True,
                                      ema_decay=0.5, save_every_n_steps=2)
    up = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    assert not torch.equal(plain[up], averaged[up])  # the file holds the EMA weights
    saved = sorted(p.name for p in result.output_path.parent.glob("*.safetensors"))
    assert saved == ["zwx-lora.safetensors", "zwx-lora_2.safetensors"]


def test_an_existing_lora_file_is_kept(tmp_path):
    lora_run(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        lora_run(tmp_path)
    # a full run of the same name writes a checkpoint, not over the LoRA
    config = base_config(tmp_path, **{**FAST, "model_name": "zwx-lora", "learning_rate": 1e-4})
    result = train(config, run_paths(tmp_path), reporter=RecordingReporter(),
                   components=tiny_components())
    assert result.output_path.parent.name == "Stable-diffusion"


def test_without_lycoris_the_method_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(lycoris, "unavailable", lambda: "LoRA training needs lycoris-lora")
    with pytest.raises(ConfigError) as caught:
        lora_run(tmp_path)
    assert [e.field for e in caught.value.errors] == ["training_method"]
    assert "lycoris-lora" in str(caught.value)


def test_an_sdxl_lora_names_both_text_encoders(tmp_path):
    tiny.save_checkpoint(tmp_path / "base.safetensors", kind="sdxl")
    components = tiny.build_variant("sdxl")
    untouched = flat(components.unet)
    _, _, tensors, metadata = lora_run(tmp_path, components=components, train_text_encoder=True)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors)
    assert not any(k.startswith("lora_te_text") for k in tensors)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert torch.equal(flat(components.unet), untouched)


def test_two_processes_train_one_lora_and_agree(tmp_path):
    """The adapter's gradients are averaged over the processes: both end with the same adapter
    (checked by the run itself, which fails otherwise), and rank 0 alone writes the file."""
    from test_cli import train_two_processes, write_config

    config = write_config(tmp_path, max_train_steps=2, training_method="lora", lora_rank=4,
                          with_prior_preservation=False, learning_rate=1e-2, sample_steps=0)
    train_two_processes(config, tmp_path)
    tensors, _ = read_lora(tmp_path / "models" / "Lora" / "cli-model.safetensors")
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    assert not (tmp_path / "models" / "Stable-diffusion" / "cli-model.safetensors").exists()


def test_lora_presets_and_a_full_preset_after_them():
    from dreambooth.app.presets import apply_preset
    from dreambooth.common.config import TrainingConfig

    lora = apply_preset(TrainingConfig(), "person-lora")
    assert (lora.training_method, lora.lora_rank, lora.lora_alpha) == ("lora", 32, 16.0)
    assert (lora.learning_rate, lora.text_encoder_lr, lora.train_text_encoder) == (1e-4, 5e-5, True)
    assert apply_preset(TrainingConfig(), "style-lora").training_method == "locon"
    # a full preset after a LoRA one is exactly that full preset
    assert apply_preset(lora, "person") == apply_preset(TrainingConfig(), "person")


def test_the_tab_says_when_lycoris_is_missing_before_train(monkeypatch):
    from dreambooth.tab import ui

    assert "lycoris-lora" not in ui.method_note("lora", 1e-4)
    monkeypatch.setattr(lycoris, "unavailable", lambda: "LoRA training needs lycoris-lora (x)")
    assert "⚠ LoRA training needs lycoris-lora (x)" in ui.method_note("lora", 1e-4)
    assert "lycoris-lora" not in ui.method_note("full", 1e-6)


def test_gradient_checkpointing_trains_the_same_lora(tmp_path):
    """Checkpointing recomputes the frozen models' activations; the adapters inside them (the
    text encoder's too, which the WebUI's transformers 4.30 checkpoints re-entrantly) still get
    their gradients, the same ones."""
    _, _, plain, _ = lora_run(tmp_path / "a", train_text_encoder=True, export_dtype="fp32")
    _, _, recomputed, _ = lora_run(tmp_path / "b", train_text_encoder=True, export_dtype="fp32",
                                   gradient_checkpointing=True)
    te_up = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    assert recomputed[te_up].abs().max() > 0
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-5, atol=1e-7)


def test_a_rank_above_every_layer_is_warned_with_the_most_that_helps(tmp_path):
    from dreambooth.models import adapters

    unet = tiny_components().unet
    widest = targets.largest_useful_rank(unet, targets.target_modules(
        unet, "unet", "attention_mlp", convs=False))
    config = base_config(tmp_path, training_method="lora", lora_rank=widest)
    assert adapters.rank_warning(config, {"unet": unet}) is None  # the widest layer's size: fine
    reporter = RecordingReporter()
    lora_run(tmp_path, reporter=reporter, lora_rank=widest * 4)
    (warning,) = [line for line in reporter.lines if "lora_rank" in line]
    assert f"at most {widest}" in warning and "4.0× larger" in warning
