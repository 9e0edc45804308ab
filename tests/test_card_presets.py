"""Card-size presets: a small card gets every saving it needs, a large one keeps the faster
settings; the values make a valid config, and the bench and the tab apply them."""
from __future__ import annotations

import dataclasses
import json

import pytest

from dreambooth.app import bench, card_presets, service
from dreambooth.app.card_presets import CARDS, choose
from dreambooth.common.config import ConfigError, TrainingConfig
from dreambooth.models.memory_estimate import for_config

BASE = dict(base_model="", model_name="x", train_text_encoder=True,
            with_prior_preservation=True)


@pytest.mark.parametrize("family, resolution, method", [
    ("sd1", 512, "full"), ("sdxl", 1024, "full"), ("sd1", 512, "lora"), ("sdxl", 1024, "lora")])
def test_smaller_cards_get_more_savings_and_each_choice_fits(family, resolution, method):
    config = TrainingConfig(**{**BASE, "train_text_encoder": family == "sd1"},
                            training_method=method)
    choices = [choose(card, config, family, resolution) for card in CARDS]
    names = [c.rung for c in choices]
    rungs = [n for n, _ in card_presets.rungs_for(config)]
    order = [rungs.index(n) for n in names]
    assert order == sorted(order, reverse=True)  # 6 GB: the leanest ... 24 GB: the fastest
    for choice in choices:
        assert choice.fits == (choice.figures["total"] <= CARDS[choice.card] * card_presets.MARGIN)
        applied = dataclasses.replace(config, **choice.values, base_model="m.safetensors")
        # the settings agree with each other (e.g. the fused pass with clipping off)
        assert [e for e in applied.validate() if e.field != "concepts"] == []
    assert choices[-1].fits  # every run here fits a 24 GB card


def test_the_targets_of_the_issue_are_what_the_presets_aim_at():
    sd15_full = choose("6gb", TrainingConfig(**BASE), "sd1", 512)
    assert sd15_full.fits and sd15_full.values["trained_precision"] == "bf16"
    assert sd15_full.values["fused_backward"] is True
    sdxl_full = TrainingConfig(**{**BASE, "train_text_encoder": False})
    assert not choose("8gb", sdxl_full, "sdxl", 1024).fits  # SDXL full needs more than 8 GB
    assert choose("12gb", sdxl_full, "sdxl", 1024).fits
    sdxl_lora = choose("6gb", TrainingConfig(**{**BASE, "train_text_encoder": False},
                                             training_method="lora"), "sdxl", 1024)
    assert sdxl_lora.values["base_weights_8bit"] is True
    # the issue's SDXL LoRA, rank 32: the leanest rung (fused pass, bf16 adapter weights) is
    # what takes it under 5 GB of tensors (the estimate less its CUDA context)
    rank32 = TrainingConfig(**{**BASE, "train_text_encoder": False}, training_method="lora",
                            lora_rank=32)
    lean = choose("6gb", rank32, "sdxl", 1024)
    assert lean.fits and lean.rung == card_presets.ADAPTER_RUNGS[-1][0]
    assert lean.values["fused_backward"] and lean.values["trained_precision"] == "bf16"
    assert lean.figures["total"] - lean.figures["CUDA context"] <= 5.0
    eight_bit_only = for_config(dataclasses.replace(rank32, **card_presets.ADAPTER_RUNGS[-2][1]),
                                "sdxl", 1024)
    assert eight_bit_only["total"] > CARDS["6gb"] * card_presets.MARGIN  # the rung before: no
    # DoRA rebuilds the weights from the base: never an 8-bit base
    dora = TrainingConfig(**BASE, training_method="lora", dora=True)
    assert all(not choose(c, dora, "sdxl", 1024).values["base_weights_8bit"] for c in CARDS)
    with pytest.raises(ConfigError, match="preset"):
        choose("4gb", sdxl_full, "sdxl", 1024)
    assert "GB" in sd15_full.line() and "fits" in sd15_full.line()


def test_the_service_uses_the_base_models_family():
    from dreambooth.app.card_presets import bitsandbytes_installed
    from dreambooth.app.estimates import device_type

    config = TrainingConfig(**BASE)
    assert service.card_preset("8gb", config) == choose(
        "8gb", config, "sd1", 512, device=device_type(), bitsandbytes=bitsandbytes_installed())


def test_on_the_cpu_the_presets_and_the_estimate_know_the_device():
    """An SDXL LoRA with --card 6gb on a CPU-only machine peaked at 21.9 GB of RAM: the preset's
    fp16 trained in fp32 there. On the CPU a preset's half precision is bf16, and the estimate
    counts fp16 as fp32 and no CUDA context."""
    lora = TrainingConfig(**{**BASE, "train_text_encoder": False}, training_method="lora",
                          lora_rank=32)
    for card in CARDS:
        on_cpu = choose(card, lora, "sdxl", 1024, device="cpu").values
        assert on_cpu["mixed_precision"] == "bf16"
    assert choose("24gb", lora, "sdxl", 1024, device="cuda").values["mixed_precision"] == "fp16"
    gpu, _ = service.memory_figure_gb(lora, "cuda")
    cpu, _ = service.memory_figure_gb(lora, "cpu")
    assert "CUDA context" in gpu and "CUDA context" not in cpu
    assert cpu["activations"] > gpu["activations"]  # fp16 counted as the fp32 it trains in
    line = service.memory_estimate(lora)  # this machine has no GPU
    assert line.startswith("no GPU here") and "CUDA context" not in line


@pytest.mark.bitsandbytes
def test_the_bench_applies_a_preset_and_the_command_line_wins(tmp_path):
    out = tmp_path / "run.json"
    argv = ["--size", "tiny", "--steps", "1", "--warmup", "1", "--no-prior", "--class-pictures",
            "0", "--sample-steps", "0", "--no-export", "--threads", "2", "--quiet",
            "--train-text-encoder", "--preset", "6gb", "--json", str(out)]
    assert bench.bench_main(argv) == 0
    options = json.loads(out.read_text())["runs"][0]["options"]
    assert options["preset"] == "6gb" and options["fused_backward"] is True
    assert options["trained_precision"] == "bf16" and options["precision"] == "bf16"
    assert options["gradient_checkpointing"] is True
    assert bench.bench_main(argv + ["--no-fused-backward"]) == 0
    options = json.loads(out.read_text())["runs"][0]["options"]
    assert options["fused_backward"] is False and options["trained_precision"] == "bf16"


@pytest.mark.bitsandbytes
def test_train_on_the_command_line_takes_a_card(tmp_path, capsys):
    from dreambooth.__main__ import main as cli_main

    from test_cli import write_config

    # the default optimizer: the preset keeps a user's own (8-bit AdamW's state is what fits)
    config = write_config(tmp_path, with_prior_preservation=False, train_text_encoder=True,
                          mixed_precision="fp16", max_grad_norm=1.0, optimizer="adamw8bit")
    assert cli_main(["train", str(config), "--card", "6gb", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "card preset 6gb: + bf16 trained weights" in out
    assert "  max_grad_norm: 1.0 → 0.0" in out and "  fused_backward: False → True" in out
    saved = json.loads((tmp_path / "models" / "dreambooth" / "cli-model" / "config.json")
                       .read_text())
    assert saved["fused_backward"] is True and saved["trained_precision"] == "bf16"
    assert saved["max_grad_norm"] == 0.0 and saved["mixed_precision"] == "bf16"


# --- a preset never overrides the user silently ----------------------------------------------
def test_every_change_is_said_field_by_field():
    config = TrainingConfig(**BASE)  # max_grad_norm and the memory settings at their defaults
    choice = choose("6gb", config, "sd1", 512)
    said = choice.change_lines()
    assert "max_grad_norm: 1.0 → 0.0" in said
    assert "fused_backward: False → True" in said and "mixed_precision: 'fp16' → 'bf16'" in said
    changed = {name for name, before, after in choice.changes}
    assert changed == {k for k, v in choice.values.items() if getattr(config, k) != v}


def test_a_learning_rate_free_optimizer_is_kept_never_swapped():
    """The tester's case: Prodigy at lr 1.0 became 8-bit AdamW at lr 1.0."""
    lora = TrainingConfig(**BASE, training_method="lora", optimizer="prodigy", learning_rate=1.0)
    choice = choose("6gb", lora, "sd1", 512)
    applied = dataclasses.replace(lora, **choice.values)
    assert applied.optimizer == "prodigy" and applied.learning_rate == 1.0
    assert "kept your optimizer 'prodigy'" in choice.change_lines()
    # a full SD1.5 run needs the fused pass and bf16 weights, which Prodigy rules out: refused
    full = TrainingConfig(**BASE, optimizer="prodigy", learning_rate=1.0)
    with pytest.raises(ConfigError) as refused:
        choose("6gb", full, "sd1", 512)
    assert [e.field for e in refused.value.errors] == ["optimizer"]
    assert "'adamw8bit'" in str(refused.value)  # what to do: its default


@pytest.mark.parametrize("field, value", [("gradient_accumulation_steps", 4),
                                          ("max_grad_norm", 0.5)])
def test_accumulation_and_clipping_the_user_set_are_kept_or_refused_by_name(field, value):
    full = TrainingConfig(**BASE, **{field: value})
    with pytest.raises(ConfigError) as refused:  # 6 GB needs the fused pass, which cannot
        choose("6gb", full, "sd1", 512)
    assert [e.field for e in refused.value.errors] == [field]
    roomy = choose("16gb", full, "sd1", 512)  # a rung without the fused pass fits: kept
    assert field not in roomy.values or roomy.values[field] == value
    assert dataclasses.replace(full, **roomy.values).validate() == full.validate()


def test_several_processes_never_get_the_fused_pass():
    full = TrainingConfig(**BASE)
    with pytest.raises(ConfigError) as refused:
        choose("6gb", full, "sd1", 512, processes=2)
    assert [e.field for e in refused.value.errors] == ["card"]
    assert "one process" in str(refused.value) and "fused_backward" not in str(refused.value)
    lora = choose("6gb", TrainingConfig(**BASE, training_method="lora"), "sd1", 512, processes=2)
    assert not lora.values.get("fused_backward")


@pytest.mark.bitsandbytes
def test_the_api_and_the_run_log_say_what_the_card_changed(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from dreambooth.app import api
    from dreambooth.host import StandaloneHost

    from test_cli import write_config

    config = json.loads(write_config(tmp_path, with_prior_preservation=False,
                                     optimizer="adamw8bit").read_text())
    host = StandaloneHost(tmp_path / "models")
    app = FastAPI()
    api.mount(app, host=host, credentials={})
    started = []
    original = service.start_training

    def record(config, host, runner=None, **kwargs):
        started.append((config, kwargs.get("notes")))
        return 1

    service.start_training = record
    try:
        client = TestClient(app, base_url="http://127.0.0.1")
        answer = client.post("/dreambooth/v1/train?card=6gb", json=config)
        refused = client.post("/dreambooth/v1/train?card=6gb",
                              json={**config, "gradient_accumulation_steps": 4})
    finally:
        service.start_training = original
    assert answer.status_code == 200, answer.text
    changes = {c["field"]: (c["before"], c["after"]) for c in answer.json()["card"]["changes"]}
    assert changes["max_grad_norm"] == (1.0, 0.0)
    trained, notes = started[0]
    assert trained.fused_backward and "  max_grad_norm: 1.0 → 0.0" in notes
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "gradient_accumulation_steps"


def test_without_bitsandbytes_a_card_preset_uses_plain_adamw_and_no_8bit_base():
    """Forge Neo without --bnb: a preset must not choose what would be refused (8-bit AdamW, an
    8-bit or NF4 base); its first rung says so in its name, and the change is said as any other."""
    lora = TrainingConfig(**BASE, training_method="lora")
    with_bnb = choose("6gb", lora, "sdxl", 1024)
    without = choose("6gb", lora, "sdxl", 1024, bitsandbytes=False)
    bases = ("base_weights_8bit", "base_weights_4bit")
    assert with_bnb.values["optimizer"] == "adamw8bit" and any(with_bnb.values[b] for b in bases)
    assert without.values["optimizer"] == "adamw" and not any(without.values[b] for b in bases)
    assert without.figures["total"] > with_bnb.figures["total"]  # AdamW's state is bigger
    full = choose("24gb", TrainingConfig(**BASE), "sd1", 512, bitsandbytes=False)
    assert "no bitsandbytes" in full.rung and full.values["optimizer"] == "adamw"
    assert ("optimizer", "adamw8bit", "adamw") in full.changes


def test_a_new_form_starts_with_adamw_where_bitsandbytes_is_missing(monkeypatch):
    import sys

    from dreambooth.app.card_presets import bitsandbytes_installed
    from dreambooth.tab.ui import starting_config

    assert starting_config().optimizer == ("adamw8bit" if bitsandbytes_installed() else "adamw")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert starting_config().optimizer == "adamw"


def test_flux_takes_the_fp8_base_rung_even_without_bitsandbytes(tmp_path):
    """Flux's 8-bit base is fp8 (no package): its rung stays where bitsandbytes is missing (Forge
    Neo without --bnb), and it is what brings a Flux LoRA at 1024 px under a 24 GB card."""
    config = TrainingConfig(base_model="x", model_name="m", training_method="lora")
    plain = for_config(config, "flux", 1024)["total"]
    choice = card_presets.choose("24gb", config, "flux", 1024, bitsandbytes=False)
    assert choice.fits and choice.values["base_weights_8bit"] and plain > 24
    assert choice.values["optimizer"] == "adamw"  # no bitsandbytes: no 8-bit AdamW
    sd = card_presets.choose("6gb", config, "sdxl", 1024, bitsandbytes=False)
    assert not sd.values.get("base_weights_8bit")  # the UNets' int8 base needs bitsandbytes


@pytest.mark.parametrize("bitsandbytes", [False, True])
@pytest.mark.parametrize("card, resolution", [("8gb", 1024), ("6gb", 512)])
def test_small_cards_fit_flux_by_swapping_blocks_and_only_flux_gets_the_rung(card, resolution,
                                                                              bitsandbytes):
    """The issue's targets: Flux.1 dev LoRA rank 16 at 1024 px in 8 GB and at 512 px in 6 GB, by
    the estimate (one picture a step: no prior preservation) — through block swap over the fp8
    base, or the NF4 one where bitsandbytes is (fewer blocks to swap); the UNet ladders never
    swap."""
    config = TrainingConfig(base_model="x", model_name="m", training_method="lora", lora_rank=16,
                            with_prior_preservation=False)
    choice = card_presets.choose(card, config, "flux", resolution, bitsandbytes=bitsandbytes)
    assert choice.fits and choice.values["blocks_to_swap"] > 0 and "block swap" in choice.rung
    assert choice.figures["total"] <= CARDS[card] * 0.9
    assert choice.values["base_weights_4bit" if bitsandbytes else "base_weights_8bit"]
    assert ("NF4" if bitsandbytes else "8-bit") in choice.rung
    assert ("blocks_to_swap", 0, choice.values["blocks_to_swap"]) in choice.changes
    leaner = dataclasses.replace(config, **{**choice.values, "blocks_to_swap": 0})
    assert for_config(leaner, "flux", resolution)["total"] > CARDS[card] * 0.9
    for family in ("sd1", "sdxl"):
        assert not card_presets.choose(card, config, family, resolution).values["blocks_to_swap"]
