"""Model families behind one interface (see :mod:`dreambooth.models.families.base`), one module each."""
from __future__ import annotations

from dreambooth.models.families.base import Conditioning, Family, encode_clip
from dreambooth.models.families.flux import Flux
from dreambooth.models.families.sd1 import SD1
from dreambooth.models.families.sd2 import SD2
from dreambooth.models.families.sdxl import SDXL

FAMILIES: tuple[Family, ...] = (SD1(), SD2(), SDXL(), Flux())

__all__ = ["Conditioning", "Family", "FAMILIES", "base_family", "encode_clip", "for_kind",
           "of_components", "with_model_resolution"]


def for_kind(kind: str) -> Family:
    """The family of a checkpoint kind (``dreambooth.models.detect``'s sd1 / sd2 / sd2-v / sdxl,
    flux-dev / flux-schnell)."""
    for family in FAMILIES:
        if kind in family.kinds:
            return family
    raise ValueError(f"no model family knows the kind {kind!r}")


def of_components(components) -> Family:
    """The family of loaded components, from what they hold: SDXL has a second text encoder,
    SD2's OpenCLIP uses gelu where SD1's CLIP uses quick_gelu; Flux's denoiser is its
    transformer."""
    if type(components.unet).__name__ == "FluxTransformer2DModel":
        return for_kind("flux-dev")
    if getattr(components, "text_encoder_2", None) is not None:
        return for_kind("sdxl")
    act = getattr(getattr(components.text_encoder, "config", None), "hidden_act", "quick_gelu")
    return for_kind("sd2" if act == "gelu" else "sd1")


def base_family(config):
    """(family, ModelKind) of ``config.base_model`` (a file or folder path), or None when it
    cannot be told without loading (missing, unreadable, not a checkpoint): the run itself then
    says why. Reads file headers only."""
    from pathlib import Path

    from dreambooth.models.detect import detect_kind_cached

    path = Path(config.base_model).expanduser()
    if not config.base_model.strip() or not path.exists():
        return None
    try:
        kind = detect_kind_cached(path, prediction_type=config.prediction_type or None)
    except Exception:  # CheckpointError, unreadable files
        return None
    return for_kind(kind.kind), kind


def with_model_resolution(config):
    """``config`` with ``resolution`` 0 set to the base model's own (512 SD1.x/2.x, 768 SD2.x v,
    1024 SDXL); unchanged when it is set or the base cannot be told."""
    found = None if config.resolution else base_family(config)
    if found is None:
        return config
    family, kind = found
    return config.with_resolution(family.default_resolution(kind.prediction_type))
