"""What the tab shows before a run: the identifier check, the steps and epochs, the memory a run
needs by category (and the GPU's size), and the card-size preset applied to a config."""
from __future__ import annotations

import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from dreambooth.common.config import TrainingConfig
from dreambooth.models.families import base_family, for_kind

_TOKENIZER_LOCK = threading.Lock()
_TOKENIZER: list = []  # the tokenizer once built (a failed build is retried at the next call)
_NO_BUILD_RUNNING = threading.Event()  # cleared while start_tokenizer_build's thread works
_NO_BUILD_RUNNING.set()


def tokenizer() -> Any | None:
    """The real CLIP tokenizer, built offline once (None when it cannot be built here); callers
    arriving while it is being built wait for that build instead of starting another."""
    with _TOKENIZER_LOCK:
        if not _TOKENIZER:
            try:
                from dreambooth.models.tokenizer import load_clip_tokenizer

                _TOKENIZER.append(load_clip_tokenizer())
            except Exception as exc:  # the identifier check is advice: say why it is missing
                print(f"DreamBooth: the CLIP tokenizer cannot be built here ({exc}); "
                      "the identifier check is off", file=sys.stderr)
                return None
        return _TOKENIZER[0]


def start_tokenizer_build() -> None:
    """Build the tokenizer in a background thread (the tab does it as it is built, so that the
    identifier check answers at once). transformers' lazy imports are not thread-safe (4.57: a
    model file loaded in another thread while this thread imported CLIPTokenizer failed with
    "cannot import name 'AutoImageProcessor' from 'transformers'"), so the import is done here,
    in the caller's thread, and the thread only builds."""
    try:
        from transformers import CLIPTokenizer  # noqa: F401
    except Exception:  # the build says why (and the identifier check is off)
        pass
    _NO_BUILD_RUNNING.clear()

    def build() -> None:
        try:
            tokenizer()
        finally:
            _NO_BUILD_RUNNING.set()

    threading.Thread(target=build, name="dreambooth-tokenizer", daemon=True).start()


def wait_for_tokenizer_build(timeout: float | None = None) -> None:
    """Return once no background build runs: a run waits for it before loading its model (the
    lazy-import race of :func:`start_tokenizer_build`; seconds, only right after the tab was
    built)."""
    _NO_BUILD_RUNNING.wait(timeout)


def identifier_check(instance_prompt: str, class_prompt: str) -> dict | None:
    """The identifier found in the prompts, as the tokenizer sees it (None: nothing to say)."""
    from dreambooth.data import identifier_hint

    if not (instance_prompt or "").strip():
        return None
    return identifier_hint(instance_prompt, class_prompt or "", tokenizer())


def count_pictures(config: TrainingConfig) -> int:
    from dreambooth.data import list_pictures

    total = 0
    for concept in config.concepts:
        folder = Path(concept.instance_data_dir.strip() or "\0").expanduser()
        if concept.instance_data_dir.strip() and folder.is_dir():
            total += len(list_pictures(folder, recursive=config.recursive))
    return total


def step_estimate(config: TrainingConfig) -> str:
    """Steps the run will take (the seed's pictures x 100 rule when max_train_steps is 0), epochs,
    and the run's rough memory estimate."""
    pictures = count_pictures(config)
    steps = config.total_steps(pictures)
    rule = "" if config.max_train_steps else f" ({pictures} pictures × 100, the rule of thumb)"
    per_step = config.train_batch_size * config.gradient_accumulation_steps
    epochs = (steps * per_step / pictures) if pictures else 0
    text = f"{steps} steps{rule}; {pictures} instance pictures, ≈{epochs:.1f} epochs"
    return f"{text}; {memory_estimate(config)}"


def device_type() -> str:
    """"cuda" where training runs on a GPU, else "cpu"."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # a broken CUDA setup trains on the CPU
        return "cpu"


def family_and_resolution(config: TrainingConfig) -> tuple[Any, int]:
    """The base model's family (SD1.x when it cannot be told yet) and the run's resolution
    (the family's own when the config says 0)."""
    found = base_family(config)
    family, prediction = (found[0], found[1].prediction_type) if found else (for_kind("sd1"),
                                                                             "epsilon")
    return family, config.resolution or family.default_resolution(prediction)


def memory_figure_gb(config: TrainingConfig, device: str | None = None
                     ) -> tuple[dict[str, float], Any]:
    """(GB by category and "total", family): the rough figure of ``config``'s run for its base
    model's family (SD1.x when the base is not known yet), its method and memory settings
    (:mod:`dreambooth.models.memory_estimate`), on ``device`` (this machine's by default): on
    the CPU, fp16 trains in fp32 and there is no CUDA context."""
    from dreambooth.models.memory_estimate import for_config

    device = device or device_type()
    family, resolution = family_and_resolution(config)
    if device == "cpu" and config.mixed_precision == "fp16":
        config = replace(config, mixed_precision="no")
    figures = for_config(config, family.name, resolution)
    if device == "cpu":
        figures["total"] -= figures.pop("CUDA context", 0.0)
    return figures, family


def card_preset(card: str, config: TrainingConfig, processes: int = 1):
    """The card-size preset ``card`` for ``config``'s run (:func:`dreambooth.app.card_presets.choose`,
    for its base model's family and resolution)."""
    from dreambooth.app.card_presets import bitsandbytes_installed, choose

    family, resolution = family_and_resolution(config)
    return choose(card, config, family.name, resolution, processes, device_type(),
                  bitsandbytes_installed())


def apply_card(card: str, config: TrainingConfig, processes: int = 1
               ) -> tuple[TrainingConfig, list[str], Any]:
    """``config`` with the card preset's settings, the lines that say what it chose and changed
    (``field: before → after``) for the CLI, the API and the run's log, and the choice.
    ConfigError by field when the preset would have to override the user (see card_presets)."""
    choice = card_preset(card, config, processes)
    changed = replace(config, **choice.values).check()
    lines = [f"card preset {choice.line()}"] + [f"  {line}" for line in choice.change_lines()]
    return changed, lines, choice


def memory_estimate(config: TrainingConfig) -> str:
    """The run's expected GPU memory, by category (rough; ``bench --memory`` measures it), and
    the GPU's own size where there is one."""
    from dreambooth.models.memory_estimate import describe

    device = device_type()
    figures, family = memory_figure_gb(config, device)
    what = family.title if not config.trains_adapter else f"{family.title} {config.training_method}"
    if device == "cpu":  # the run trains here, on the CPU: its tensors are in RAM
        half = " (fp16 trains in fp32 on the CPU)" if config.mixed_precision == "fp16" else ""
        return f"no GPU here: tensors in RAM {describe(figures)}, rough, {what}{half}"
    text = f"GPU memory {describe(figures)}, rough, {what}"
    try:
        import torch

        gpu_gb = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        text += f"; this GPU has {gpu_gb:.0f} GB"
    except Exception:  # a broken CUDA setup: the estimate stands alone
        pass
    return text
