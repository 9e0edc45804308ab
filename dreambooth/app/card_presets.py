"""Presets by card size: the memory settings that fit a run into a GPU of 6, 8, 12, 16 or 24 GB.

Each method has a ladder of settings, from the fastest to the leanest, each rung adding one
saving to the one before (gradient checkpointing, the fused backward pass, bf16 trained
weights, Adafactor; for adapters an 8-bit base). A preset is the first rung whose estimated
peak (:mod:`dreambooth.models.memory_estimate`, calibrated on the bench's measures) fits the card with a
margin, for the run's family, method, resolution and text-encoder choice — so a small card gets
every saving and a large one keeps the faster settings. The values go into the config like any
other, so the form, the saved config and the bench (``--preset``) show what was chosen.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dreambooth.common.config import ConfigError, FieldError, TrainingConfig
from dreambooth.models.memory_estimate import for_config

CARDS = {"6gb": 6, "8gb": 8, "12gb": 12, "16gb": 16, "24gb": 24}
MARGIN = 0.9  # of the card: the allocator's fragmentation, the desktop, another program

_START = dict(mixed_precision="fp16", optimizer="adamw8bit", gradient_checkpointing=False,
              fused_backward=False, trained_precision="fp32", base_weights_8bit=False,
              cache_latents=True, cache_text_embeddings=True, blocks_to_swap=0,
              base_weights_4bit=False)
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
# After those, where bitsandbytes is: the base in NF4 (QLoRA's 4 bits a weight).
NF4_RUNG = ("+ NF4 base (4 bits)", dict(ADAPTER_RUNGS[-1][1], base_weights_8bit=False,
                                       base_weights_4bit=True))


def swap_rungs(bitsandbytes: bool) -> list[tuple[str, dict[str, Any]]]:
    """Then, for a family whose denoiser runs as chains of blocks (Flux): more of its blocks
    wait in RAM at each rung (slower steps: each swapped block is copied in twice a step), over
    the NF4 base where bitsandbytes is, else over the 8-bit one."""
    base, kind = (NF4_RUNG[1], "NF4") if bitsandbytes else (ADAPTER_RUNGS[-1][1], "8-bit")
    return [(f"+ block swap, {count} blocks in RAM ({kind} base)",
             dict(base, blocks_to_swap=count)) for count in (20, 30, 45, 55)]


# What a card preset is for: settings that change memory and speed, not what is learned. It
# sets these (and lists each change). The settings that change how training learns (RECIPE) it
# changes only where the user left them at their defaults; a rung that would need another value
# is skipped, so the user's optimizer, clipping and accumulation are never replaced silently.
RECIPE = ("optimizer", "max_grad_norm", "gradient_accumulation_steps")


@dataclass(frozen=True)
class CardChoice:
    """What a card-size preset chose: the settings it changes, the rung's name, its estimate,
    and whether it fits the card (False: the leanest rung allowed, which still does not).
    ``changes`` lists ``(field, before, after)`` for every value it changes; ``kept`` says which
    of the user's choices kept a leaner rung out."""

    card: str
    rung: str
    values: dict[str, Any]
    figures: dict[str, float]
    fits: bool
    changes: tuple[tuple[str, Any, Any], ...] = ()
    kept: tuple[str, ...] = ()

    def line(self) -> str:
        from dreambooth.models.memory_estimate import describe

        verdict = "fits" if self.fits else "does NOT fit even with every saving"
        return f"{self.card}: {self.rung} — {describe(self.figures)}; {verdict}"

    def change_lines(self) -> list[str]:
        """``field: before → after`` for each value the preset changes, then what it kept."""
        return ([f"{name}: {before!r} → {after!r}" for name, before, after in self.changes]
                + [f"kept {note}" for note in self.kept])


def rungs_for(config: TrainingConfig) -> list[tuple[str, dict[str, Any]]]:
    if not config.trains_adapter:
        return FULL_RUNGS
    if config.dora:  # DoRA rebuilds each weight from the full base's own: no 8-bit rung
        return [rung for rung in ADAPTER_RUNGS if not rung[1]["base_weights_8bit"]]
    return ADAPTER_RUNGS


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(TrainingConfig)
            if f.default is not dataclasses.MISSING}


def _split(config: TrainingConfig, rung: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The rung's values that may be applied to ``config``, and the user's recipe settings
    (changed from their defaults) that differ from the rung's and so are kept instead."""
    defaults = _defaults()
    values, mine = {}, []
    for name, value in rung.items():
        own = getattr(config, name)
        if name in RECIPE and own != defaults[name] and own != value:
            mine.append(name)
        else:
            values[name] = value
    return values, mine


def _runs(config: TrainingConfig, values: dict[str, Any]) -> bool:
    """Whether ``values`` over ``config`` adds no validation error (the fused pass refuses a
    user's clipping, accumulation or Prodigy, which the preset keeps)."""
    before = {(e.field, e.message) for e in config.validate()}
    return all((e.field, e.message) in before
               for e in dataclasses.replace(config, **values).validate())


def for_device(rung: dict[str, Any], device: str, bitsandbytes: bool = True,
               base_8bit: str = "int8") -> dict[str, Any] | None:
    """A rung's settings for ``device``: on the CPU, half precision is bf16 (fp16 would train in
    fp32 there, at twice the memory the preset was chosen for). Without bitsandbytes (Forge Neo
    not started with --bnb) the 8-bit optimizer is plain AdamW and an int8 base rung is left
    out (None); the family's fp8 base (``base_8bit`` "fp8": Flux) needs no package."""
    if device == "cpu" and rung.get("mixed_precision") == "fp16":
        rung = {**rung, "mixed_precision": "bf16"}
    if not bitsandbytes:
        if rung.get("base_weights_8bit") and base_8bit == "int8":
            return None
        if rung.get("optimizer") == "adamw8bit":
            rung = {**rung, "optimizer": "adamw"}
    return rung


def _base_8bit(family: str) -> str:
    """How the family named ``family`` keeps an 8-bit base ("int8" or "fp8")."""
    from dreambooth.models.families import FAMILIES

    return next((f.base_8bit for f in FAMILIES if f.name == family), "int8")


def swaps_blocks(family: str) -> bool:
    """Whether ``blocks_to_swap`` applies to the family named ``family`` (Flux)."""
    from dreambooth.models.memory_estimate import SIZES

    return bool(SIZES[family].chains) if family in SIZES else False


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes can be imported here (found, not imported: that takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):  # a None placeholder in sys.modules: not importable
        return False


def choose(card: str, config: TrainingConfig, family: str, resolution: int,
           processes: int = 1, device: str = "cuda", bitsandbytes: bool = True) -> CardChoice:
    """The first rung of ``config``'s method whose estimate fits ``card`` (see the module),
    among those that keep the user's recipe settings, for ``device`` ("cuda" or "cpu") and
    whether ``bitsandbytes`` is there. ConfigError naming those settings when a rung that would
    fit was left out for them and none of the others fits."""
    if card not in CARDS:
        raise ConfigError([FieldError("preset", f"choose one of {', '.join(CARDS)}")])
    budget = CARDS[card] * MARGIN
    choice, previous, kept, refused = None, None, [], []
    ladder = rungs_for(config)
    if ladder is ADAPTER_RUNGS:  # not DoRA, which needs the base's own weights
        ladder = ladder + ([NF4_RUNG] if bitsandbytes else [])
        ladder += swap_rungs(bitsandbytes) if swaps_blocks(family) else []
    for name, rung in ladder:
        rung = for_device(rung, device, bitsandbytes, _base_8bit(family))
        if rung is None:
            continue
        if not bitsandbytes:
            name = name.replace("8-bit AdamW", "AdamW (no bitsandbytes here)")
        values, mine = _split(config, rung)
        kept += [f"your {field_} {getattr(config, field_)!r}" for field_ in mine]
        # a rung that cannot run with the user's settings, or is the rung before once they are
        # kept (Adafactor's rung with the user's optimizer), is left out
        blocked = mine if mine and (values == previous or not _runs(config, values)) else []
        if processes > 1 and values.get("fused_backward"):
            blocked = blocked + ["processes"]
        previous = values
        if blocked:
            full = for_config(dataclasses.replace(config, **rung), family, resolution)
            if full["total"] <= budget and not refused:
                refused = blocked
            continue
        figures = for_config(dataclasses.replace(config, **values), family, resolution)
        choice = CardChoice(card, name, values, figures, figures["total"] <= budget)
        if choice.fits:
            break
    if (choice is None or not choice.fits) and refused:
        raise ConfigError([_refusal(field_, config, card, processes) for field_ in refused])
    assert choice is not None, "the first rung of every ladder runs with any recipe setting"
    changes = tuple((k, getattr(config, k), v) for k, v in choice.values.items()
                    if getattr(config, k) != v)
    return dataclasses.replace(choice, changes=changes, kept=tuple(dict.fromkeys(kept)))


def _refusal(name: str, config: TrainingConfig, card: str, processes: int) -> FieldError:
    if name == "processes":
        return FieldError("card", f"{card} needs the fused backward pass, which runs on one "
                          f"process (this run has {processes}): train on one process or pick a "
                          "larger card")
    default = _defaults()[name]
    return FieldError(name, f"{getattr(config, name)!r} rules out the savings {card} needs (the "
                      f"preset never changes it for you): set {default!r}, its default, to let "
                      "the preset choose them, or pick a larger card")
