"""Presets by card size: the memory settings that fit a run into a GPU of 6, 8, 12, 16 or 24 GB.

Each method has a ladder of settings, from the fastest to the leanest, each rung adding one
saving to the one before (gradient checkpointing, the fused backward pass, bf16 trained
weights, Adafactor; for adapters an 8-bit base). A preset is the first rung whose estimated
peak (:mod:`dreambooth.memory_estimate`, calibrated on the bench's measures) fits the card with a
margin, for the run's family, method, resolution and text-encoder choice — so a small card gets
every saving and a large one keeps the faster settings. The values go into the config like any
other, so the form, the saved config and the bench (``--preset``) show what was chosen.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, FieldError, TrainingConfig
from .memory_estimate import for_config

CARDS = {"6gb": 6, "8gb": 8, "12gb": 12, "16gb": 16, "24gb": 24}
MARGIN = 0.9  # of the card: the allocator's fragmentation, the desktop, another program

_START = dict(mixed_precision="fp16", optimizer="adamw8bit", gradient_checkpointing=False,
              fused_backward=False, trained_precision="fp32", base_weights_8bit=False,
              cache_latents=True, cache_text_embeddings=True)
_CKPT = dict(_START, gradient_checkpointing=True)
# bf16 from the fused rung on: the fused pass cannot use fp16's loss scaling (NVIDIA RTX 30xx
# and newer have bf16; older cards stop at the rung before).
_FUSED = dict(_CKPT, mixed_precision="bf16", fused_backward=True, max_grad_norm=0.0,
              gradient_accumulation_steps=1)
_BF16 = dict(_FUSED, trained_precision="bf16")
FULL_RUNGS: list[tuple[str, dict[str, Any]]] = [
    ("fp16, 8-bit AdamW", _START),
    ("+ gradient checkpointing", _CKPT),
    ("+ fused backward pass (bf16)", _FUSED),
    ("+ bf16 trained weights", _BF16),
    ("+ Adafactor", dict(_BF16, optimizer="adafactor")),
]
_BASE_8BIT = dict(_CKPT, base_weights_8bit=True)
ADAPTER_RUNGS: list[tuple[str, dict[str, Any]]] = [
    ("fp16, 8-bit AdamW", _START),
    ("+ gradient checkpointing", _CKPT),
    ("+ 8-bit base model", _BASE_8BIT),
    # the adapter's gradients and weights are small, but at SDXL size (~100 M at rank 32) the
    # pass and bf16 still take ~0.5 GB off: what brings an SDXL LoRA under 5 GB of tensors
    ("+ fused backward pass, bf16 adapter weights (bf16)", dict(_BF16, base_weights_8bit=True)),
]


@dataclass(frozen=True)
class CardChoice:
    """What a card-size preset chose: the settings, the rung's name, its estimate, and whether
    it fits the card (False: the leanest rung, which still does not)."""

    card: str
    rung: str
    values: dict[str, Any]
    figures: dict[str, float]
    fits: bool

    def line(self) -> str:
        from .memory_estimate import describe

        verdict = "fits" if self.fits else "does NOT fit even with every saving"
        return f"{self.card}: {self.rung} — {describe(self.figures)}; {verdict}"


def rungs_for(config: TrainingConfig) -> list[tuple[str, dict[str, Any]]]:
    if not config.trains_adapter:
        return FULL_RUNGS
    if config.dora:  # DoRA rebuilds each weight from the full base's own: no 8-bit rung
        return [rung for rung in ADAPTER_RUNGS if not rung[1]["base_weights_8bit"]]
    return ADAPTER_RUNGS


def choose(card: str, config: TrainingConfig, family: str, resolution: int) -> CardChoice:
    """The first rung of ``config``'s method whose estimate fits ``card`` (see the module)."""
    if card not in CARDS:
        raise ConfigError([FieldError("preset", f"choose one of {', '.join(CARDS)}")])
    budget = CARDS[card] * MARGIN
    choice = None
    for name, values in rungs_for(config):
        figures = for_config(dataclasses.replace(config, **values), family, resolution)
        choice = CardChoice(card, name, dict(values), figures, figures["total"] <= budget)
        if choice.fits:
            break
    return choice
